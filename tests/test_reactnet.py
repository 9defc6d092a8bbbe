"""ReActNet (Liu et al., ECCV 2020): RSign and RPReLU against hand-worked values of the paper's formulas, their
gradients, the ReActNet and Bi-Real models saved, loaded, run in the Engine and onnxruntime alike, the recipe."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import ConfigError, DataError, FormatError, ShapeMismatchError
from lowbit.export.onnx import to_onnx
from lowbit.models import get_model
from lowbit.nn.react import RPReLU, RSignThreshold
from lowbit.ops import REGISTRY
from lowbit.ops.react import rprelu
from lowbit.ops.schema import Node
from lowbit.quantizers import get
from lowbit.recipes import get_recipe, train_recipe
from lowbit.recipes.driver import carry_weights, stage_model
from lowbit.runtime import Engine
from lowbit.workflow import build_model

SIGN = {"name": "binary", "ste": "approx_sign"}
#: the reactnet recipe's last stage: binary weights (mean |W_c| sign W) and binary inputs, first and last real
BINARY = get_recipe("reactnet").config


def _rsign(x: torch.Tensor, alpha: list[float]) -> tuple[torch.Tensor, RSignThreshold]:
    """RSign as lowbit runs it: the threshold module, then the binary input quantizer's sign."""
    threshold = RSignThreshold(len(alpha))
    with torch.no_grad():
        threshold.alpha.copy_(torch.tensor(alpha))
    return get(SIGN)(threshold(x)), threshold


# ------------------------------------------------------------------ RSign


def test_rsign_hand_worked_forward_and_approx_sign_gradients():
    # channel 0: alpha 0.5, channel 1: alpha -1; first column x == alpha (a tie)
    x = torch.tensor([[[0.5, 0.0, 1.0, 1.6, -0.6], [-1.0, 0.0, -2.0, 3.0, -0.25]]], requires_grad=True)
    y, threshold = _rsign(x, [0.5, -1.0])
    # x - alpha: [0, -0.5, 0.5, 1.1, -1.1] and [0, 1, -1, 4, 0.75]; +1 iff x > alpha, and +1 at the tie (sign(0) = +1)
    assert y.tolist() == [[[1, -1, 1, 1, -1], [1, 1, -1, 1, 1]]]
    g = torch.tensor([[[1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 2.0, 3.0, 4.0, 5.0]]])
    y.backward(g)
    # ApproxSign F'(t) = 2 - 2|t| for |t| <= 1, else 0: [2, 1, 1, 0, 0] and [2, 0, 0, 0, 0.5]
    assert x.grad.tolist() == [[[2.0, 2.0, 3.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0, 2.5]]]
    # dL/dalpha_c = -sum_i g_i F'(x_i - alpha_c)
    assert threshold.alpha.grad.tolist() == [-7.0, -4.5]


def test_rsign_at_zero_threshold_is_the_binary_sign_and_constants_are_exact():
    x = torch.tensor([[0.0, -0.0, 2.0, -3.0], [0.0, 0.0, 0.0, 0.0]])
    y, threshold = _rsign(x, [0.0, 0.0, 0.0, 0.0])
    assert torch.equal(y, get("binary")(x)) and y.tolist() == [[1, 1, 1, -1], [1, 1, 1, 1]]
    constant = torch.full((3, 2, 4, 4), 0.25, requires_grad=True)
    y, threshold = _rsign(constant, [0.25, 0.5])
    assert (y[:, 0] == 1).all() and (y[:, 1] == -1).all()  # x == alpha gives +1, x < alpha -1
    y.sum().backward()
    # F'(0) = 2 on channel 0, F'(-0.25) = 1.5 on channel 1; alpha's gradient sums 48 positions
    assert (constant.grad[:, 0] == 2).all() and (constant.grad[:, 1] == 1.5).all()
    assert threshold.alpha.grad.tolist() == [-96.0, -72.0]


def test_rsign_threshold_refuses_the_wrong_channel_count():
    with pytest.raises(ShapeMismatchError, match=r"\(N, 3, \.\.\.\)"):
        RSignThreshold(3)(torch.zeros(2, 4, 5, 5))
    with pytest.raises(ConfigError, match="channels"):
        RSignThreshold(0)


# ------------------------------------------------------------------ RPReLU


def _rprelu(gamma: list[float], beta: list[float], zeta: list[float]) -> RPReLU:
    module = RPReLU(len(gamma))
    with torch.no_grad():
        for name, values in (("gamma", gamma), ("beta", beta), ("zeta", zeta)):
            getattr(module, name).copy_(torch.tensor(values))
    return module


def test_rprelu_hand_worked_forward_and_gradients():
    module = _rprelu([1.0, -0.5], [0.25, -2.0], [0.5, 0.0])
    # first column x == gamma: the paper's x <= gamma branch, beta (x - gamma) + zeta = zeta
    x = torch.tensor([[[1.0, 3.0, 0.0, -1.0], [-0.5, 0.0, -1.5, 0.5]]], requires_grad=True)
    y = module(x)
    # t = x - gamma: [0, 2, -1, -2] and [0, 0.5, -1, 1]
    assert y.tolist() == [[[0.5, 2.5, 0.25, 0.0], [0.0, 0.5, 2.0, 1.0]]]
    y.sum().backward()
    assert x.grad.tolist() == [[[0.25, 1.0, 0.25, 0.25], [-2.0, 1.0, -2.0, 1.0]]]  # 1 above gamma, beta at or below
    assert module.gamma.grad.tolist() == [-1.75, 2.0]  # -sum of df/dx
    assert module.beta.grad.tolist() == [-3.0, -1.0]  # sum of (x - gamma) at or below gamma
    assert module.zeta.grad.tolist() == [4.0, 4.0]


def test_rprelu_on_zeros_and_constants_and_its_numpy_form():
    module = RPReLU(2)  # gamma = zeta = 0, beta = 0.25
    assert torch.equal(module(torch.zeros(1, 2, 3, 3)), torch.zeros(1, 2, 3, 3))
    assert (module(torch.full((1, 2, 3, 3), -4.0)) == -1.0).all()
    module = _rprelu([0.3, -0.7], [0.1, 1.5], [-0.2, 0.9])
    x = torch.randn(4, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = module(x).numpy()
    params = [p.detach().numpy() for p in (module.gamma, module.beta, module.zeta)]
    assert np.array_equal(rprelu(x.numpy(), *params), expected)


# ------------------------------------------------------------------ models


def test_reactnet_model_checks_its_sizes():
    odd = get_model("reactnet", widths=(8, 16, 32), blocks=(1, 1, 1), stem_pool=2)  # 28 -> 14 -> 7 -> 4
    assert odd(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert odd.blocks[2].pool(torch.ones(1, 1, 7, 7)).shape == (1, 1, 4, 4)
    with pytest.raises(ConfigError, match="keeps or doubles"):
        get_model("reactnet", widths=(8, 32), blocks=(1, 1))
    assert get_model("reactnet", in_channels=3, input_size=32)(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_every_learnable_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = lowbit.quantize(get_model("reactnet", widths=(8, 16), blocks=(1, 1)).train(), BINARY, strict=True)
    model(torch.randn(8, 1, 28, 28)).logsumexp(1).sum().backward()
    react = [(n, p) for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in ("alpha", "gamma", "beta", "zeta")]
    assert len(react) == 5 + 3 * 4  # five RSign thresholds, four RPReLUs
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def _trained_statistics(model: nn.Module, seed: int) -> nn.Module:
    """Batch-norm running statistics and RSign / RPReLU values away from their inits, then eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("alpha", "gamma", "zeta")):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
        model.train()
        for _ in range(3):
            model(torch.randn(64, 1, 28, 28, generator=g))
    return model.eval()


def _model(name: str) -> tuple[nn.Module, int]:
    """A tiny quantized ReActNet or Bi-Real net and its count of binary convs."""
    torch.manual_seed(0)
    if name == "reactnet":  # stem pool, then 14 -> 7 -> 4: ceil-mode shortcut pools on an odd map
        net = get_model("reactnet", widths=(8, 16, 16), blocks=(1, 1, 1), stem_pool=2)
        return lowbit.quantize(net.train(), BINARY, strict=True), 7
    # one stage, no downsampling shortcut (tests/test_bireal.py saves multi-stage nets with ceil-mode pools)
    bireal_net = get_model("resnet-small", block="bireal", activation="hardtanh", widths=(8,), blocks=(2,)).train()
    with pytest.warns(UserWarning, match=r"\*shortcut\*"):  # no downsampling shortcut conv to keep real
        return lowbit.quantize(bireal_net, get_recipe("bireal").config, strict=True), 4


@pytest.mark.parametrize("name", ["reactnet", "bireal"])
def test_saved_model_loads_bit_identical_and_runs_alike_in_the_engine_and_onnxruntime(name, tmp_path):
    model, binary_layers = _model(name)
    model = _trained_statistics(model, 1)
    path = tmp_path / f"{name}.lowbit"
    x = torch.randn(128, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    lowbit.save(model, path, x[:1])
    loaded = lowbit.load(path)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(loaded(x), expected)
    ref = expected.numpy()
    engine = Engine(path)
    assert len(engine.binary_layers) == binary_layers  # every binary conv on the XNOR-popcount kernels
    got = engine.run(x.numpy())
    assert np.array_equal(got.argmax(1), ref.argmax(1))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    proto = to_onnx(loaded, x[:1])
    if name == "reactnet":
        ops = [n.op_type for n in proto.graph.node]
        assert ops.count("PRelu") == 6 and ops.count("Where") == 7
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert np.array_equal(onnx_out.argmax(1), ref.argmax(1))
    np.testing.assert_allclose(onnx_out, ref, rtol=1e-4, atol=1e-4)


def test_stored_graph_holds_the_thresholds_and_rprelu_as_constants(tmp_path):
    model = _trained_statistics(_model("reactnet")[0], 3)
    path = tmp_path / "reactnet.lowbit"
    lowbit.save(model, path, torch.zeros(1, 1, 28, 28))
    graph = lowbit.ops.validate_file(lowbit.format.container.read_file(path))[1]
    ops = [n.op for n in graph.nodes]
    assert ops.count("rsign_threshold") == 7 and ops.count("rprelu") == 6
    node = next(n for n in graph.nodes if n.op == "rprelu")
    assert len(node.inputs) == 4 and node.inputs[1].endswith("gamma")


# ------------------------------------------------------------------ recipe


def test_reactnet_recipe_is_two_steps_with_real_first_and_last_layers():
    recipe = get_recipe("reactnet")
    assert [s.name for s in recipe.stages] == ["binary-activations", "binary"]
    first, last = (s.config for s in recipe.stages)
    assert first["weight"] is None and first["input"] == SIGN
    assert last["weight"]["name"] == "xnor" and last["input"] == SIGN
    assert last["first"] == last["last"] == "float"
    assert recipe.optimizer == "adam" and "teacher" in recipe.notes


@pytest.fixture(scope="module")
def mnist_available():
    try:
        from lowbit.data import load_dataset

        load_dataset("mnist", "test")
    except DataError as exc:
        pytest.skip(f"MNIST is not installed: {exc}")


def test_thresholds_and_rprelu_learned_in_step_one_start_step_two():
    recipe = get_recipe("reactnet")
    net = build_model(recipe.model, "mnist", dict(recipe.model_kwargs))
    step1 = stage_model(net, recipe.stages[0], recipe)
    with torch.no_grad():
        for name, p in step1.named_parameters():
            if name.endswith(("alpha", "gamma", "beta", "zeta")):
                p.add_(0.5)
    carry_weights(step1, net)
    step2 = dict(stage_model(net, recipe.stages[1], recipe).named_parameters())
    learned = {n: p for n, p in step1.named_parameters() if n.endswith(("alpha", "gamma", "beta", "zeta"))}
    assert set(learned) == {n for n in net.state_dict() if n.endswith(("alpha", "gamma", "beta", "zeta"))} != set()
    for name, p in learned.items():
        assert torch.equal(step2[name], p), name


def test_recipe_smoke_run_learns(mnist_available):
    # one epoch per step on 800 images, one block per stage (a binary-activation net from scratch learns slowly:
    # ~25% after 40 steps)
    recipe = replace(get_recipe("reactnet"), model_kwargs={"widths": (16, 32, 64), "blocks": (1, 1, 1)})
    result = train_recipe(recipe, "mnist", epochs=2, limit=800, batch_size=40, lr=2e-3, progress=False)
    assert [s["epochs"] for s in result["stages"]] == [1, 1]
    losses = [row["train_loss"] for stage in result["stages"] for row in stage["history"]]
    assert losses[-1] < losses[0] and result["final_acc"] > 0.15


# ------------------------------------------------------------------ Engine: folded into the integer thresholds


class Chain(nn.Module):
    """Two binary convs with RSign and RPReLU between them and no shortcut, so the Engine may fold them."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn1, self.rsign2 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), RSignThreshold(8)
        self.conv2, self.bn2, self.rprelu2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), RPReLU(16)
        self.rsign3, self.conv3, self.bn3 = RSignThreshold(16), nn.Conv2d(16, 16, 3, stride=2), nn.BatchNorm2d(16)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, 10)

    def forward(self, x):
        y = self.conv2(self.rsign2(self.bn1(self.stem(x))))
        y = self.bn3(self.conv3(self.rsign3(self.rprelu2(self.bn2(y)))))
        return self.fc(self.pool(y).flatten(1))


@pytest.mark.parametrize("slope", [0.25, -0.5])
def test_thresholds_and_monotone_rprelu_fold_into_the_binary_layer(slope, tmp_path):
    torch.manual_seed(4)
    model = _trained_statistics(lowbit.quantize(Chain().train(), BINARY, strict=True), 5)
    with torch.no_grad():
        model.rprelu2.beta[3] = slope  # a negative slope makes the channel's sign non-monotone in the dot product
    path = tmp_path / "chain.lowbit"
    x = torch.randn(128, 1, 12, 12, generator=torch.Generator().manual_seed(6))
    lowbit.save(model, path, x[:1])
    engine = Engine(path)
    folded = [engine._nodes[name].op for names in engine.folded.values() for name in names]
    assert folded == (["batchnorm", "rprelu", "rsign_threshold"] if slope > 0 else [])
    with torch.no_grad():
        ref = model(x).numpy()
    got = engine.run(x.numpy())
    assert np.array_equal(got.argmax(1), ref.argmax(1))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_stored_vectors_of_the_wrong_shape_or_a_constant_input_are_refused():
    def node(inputs, constant):
        return Node("act", "rprelu", {}, inputs, {}, constant)

    assert REGISTRY["rprelu"].shape(node([(4, 8, 8), (4,), (4,), (4,)], [False, True, True, True])) == (4, 8, 8)
    with pytest.raises(FormatError, match=r"its beta must be a constant of shape \[4\]"):
        REGISTRY["rprelu"].shape(node([(4, 8, 8), (4,), (3,), (4,)], [False, True, True, True]))
    with pytest.raises(FormatError, match="its zeta must be a constant"):
        REGISTRY["rprelu"].shape(node([(4, 8, 8), (4,), (4,), (4, 8, 8)], [False, True, True, False]))
    with pytest.raises(FormatError, match="batched input"):
        REGISTRY["rprelu"].shape(node([(4,), (4,), (4,), (4,)], [True, True, True, True]))
    with pytest.raises(FormatError, match="2 inputs"):
        REGISTRY["rsign_threshold"].shape(node([(4, 8, 8)], [False]))
