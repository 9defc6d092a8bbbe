"""Training recipes: names, the tricks' formulas, one step per recipe (value sets), gradients, smoke training."""

from __future__ import annotations

import functools
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import ConfigError, DataError
from lowbit.nn import QuantConv2d, QuantLinear
from lowbit.recipes import get_recipe, recipe_names, square_hinge, stage_epochs, train_recipe
from lowbit.recipes.driver import (RefreshBatchNorm, glorot_lr_scale, make_optimizer, refresh_batch_norm, stage_model,
                                   trainer_for)
from lowbit.recipes.table import RECIPES
from lowbit.train import Trainer
from lowbit.workflow import build_model

#: every recipe the issue names: the fixed ones and each listed member of the bit-width families
SMOKE = ("bnn", "bnn-cnn", "xnor", "bwn", "dorefa-w1a2g6", "dorefa-w1a2g32", "dorefa-w2a2g32", "dorefa-w8a8g8",
         "abc-3-3", "abc-5-5", "bireal", "lsq-w2a2", "lsq-w3a3", "lsq-w4a4", "pact-w2a2", "pact-w3a3", "pact-w4a4",
         "ternary", "log")


# ------------------------------------------------------------------ names


def test_listed_recipes_resolve_and_cover_the_issue():
    names = recipe_names()
    for name in ("bnn", "xnor", "bwn", "bireal", "ternary", "log", "dorefa-w1a2g6", "dorefa-w2a2g32",
                 "dorefa-w8a8g8", "abc-3-3", "abc-5-5", *(f"{m}-w{b}a{b}" for m in ("lsq", "pact") for b in (2, 3, 4))):
        assert name in names
    for name in names:
        recipe = get_recipe(name)
        assert recipe.name == name and recipe.paper and recipe.notes


def test_family_members_parse_their_bit_widths():
    r = get_recipe("dorefa-w3a4g5")
    assert (r.weight_bits, r.act_bits) == (3, 4)
    assert r.config["weight"] == {"name": "dorefa_weight", "bits": 3}
    assert r.config["output"] == {"name": "dorefa_grad", "bits": 5, "seed": 0}
    assert get_recipe("dorefa-w1a2g32").config["output"] is None  # G = 32: float gradients
    assert get_recipe("abc-5-5").config["weight"] == {"name": "abc_weight", "bases": 5}
    assert get_recipe("lsq-w3a3").config["input"]["bits"] == 3


@pytest.mark.parametrize("name", ["nope", "dorefa-w0a2g6", "dorefa-w1a2g17", "lsq-w2a3", "lsq-w1a1", "abc-9-3",
                                  "dorefa", "BNN"])
def test_unknown_or_out_of_range_names_raise_config_error(name):
    with pytest.raises(ConfigError, match="recipe"):
        get_recipe(name)


def test_unknown_name_lists_the_recipes():
    with pytest.raises(ConfigError, match="bnn, bnn-cnn, xnor"):
        get_recipe("nope")


# ------------------------------------------------------------ the tricks


def test_square_hinge_hand_worked():
    # outputs (0.5, -2, 0), label 0: t = (1, -1, -1), 1 - t y = (0.5, -1, 1) -> (0.25, 0, 1) / 3
    loss = square_hinge(torch.tensor([[0.5, -2.0, 0.0]]), torch.tensor([0]))
    assert loss.item() == pytest.approx(1.25 / 3)


def test_stage_epochs_split():
    bireal = get_recipe("bireal")  # fractions 1/4, 1/4, 1/2
    assert stage_epochs(bireal, 8) == [2, 2, 4]
    assert stage_epochs(bireal, 3) == [1, 1, 1]
    assert stage_epochs(get_recipe("lsq-w2a2"), 3) == [1, 2]
    with pytest.raises(ConfigError, match="epochs >= 3"):
        stage_epochs(bireal, 2)


def test_bnn_glorot_learning_rates_and_latent_init():
    recipe = get_recipe("bnn")
    torch.manual_seed(0)
    model = stage_model(build_model("bnn-mlp", "mnist", {"width": 64}), recipe.stages[-1], recipe)
    optimizer = make_optimizer(model, recipe, 3e-3)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    # Lasagne's Glorot H = sqrt(1.5 / (fan_in + fan_out)); the lr of a binary layer is lr / H
    assert lr_of[id(model.fc1.weight)] == pytest.approx(3e-3 / math.sqrt(1.5 / (784 + 64)))
    assert lr_of[id(model.fc4.weight)] == pytest.approx(3e-3 / math.sqrt(1.5 / (64 + 10)))
    assert lr_of[id(model.bn1.weight)] == pytest.approx(3e-3)
    conv = QuantConv2d(3, 8, 5)
    assert glorot_lr_scale(conv) == pytest.approx(1 / math.sqrt(1.5 / (3 * 25 + 8 * 25)))
    # latent weights re-drawn from U(-1, 1): they fill the interval, unlike torch's default init
    assert model.fc1.weight.abs().max() > 0.99 and model.fc1.weight.abs().max() <= 1


def test_first_and_last_layer_policies():
    bnn = stage_model(build_model("bnn-mlp", "mnist", {"width": 32}), get_recipe("bnn").stages[-1], get_recipe("bnn"))
    assert bnn.fc1.input_quantizer is None and bnn.fc1.weight_quantizer.name == "binary"  # real pixels
    assert bnn.fc4.input_quantizer.name == "binary"
    recipe = get_recipe("bnn-cnn")
    cnn = stage_model(build_model(recipe.model, "mnist", recipe.model_kwargs), recipe.stages[-1], recipe)
    for layer in (cnn.conv1, cnn.ip2):
        assert layer.weight_quantizer.spec()["bits"] == 8 and layer.input_quantizer.spec()["bits"] == 8
    assert cnn.conv2.weight_quantizer.name == "binary" and cnn.ip1.input_quantizer.name == "binary"
    recipe = get_recipe("bireal")
    net = stage_model(build_model(recipe.model, "mnist", recipe.model_kwargs), recipe.stages[-1], recipe)
    assert type(net.stem.conv) is torch.nn.Conv2d and type(net.fc) is torch.nn.Linear  # real first and last
    assert type(net.get_submodule("layer2.0.shortcut.1")) is torch.nn.Conv2d  # real downsampling shortcut
    assert net.get_submodule("layer2.0.conv1").input_quantizer.ste == "approx_sign"


# ------------------------------------------------ value sets after one step


def _close_to_set(values: torch.Tensor, allowed: torch.Tensor) -> bool:
    distance = (values.double().reshape(-1, 1) - allowed.double().reshape(1, -1)).abs().min(dim=1).values
    return bool((distance <= 1e-6 * allowed.abs().max().clamp(min=1e-30)).all())


def assert_in_value_set(q, w: torch.Tensor, v: torch.Tensor) -> None:
    """The quantized weights ``v`` of latent ``w`` lie in the value set the papers define."""
    w64, name, spec = w.double(), q.name, q.spec()
    if name == "binary":
        assert set(v.unique().tolist()) <= {-1.0, 1.0}
    elif name == "xnor":  # exactly {-alpha_c, +alpha_c}, alpha_c = mean |W_c|, sign(0) = +1
        alpha = w64.abs().reshape(len(w), -1).mean(1).reshape(-1, *[1] * (w.dim() - 1))
        expected = torch.where(w64 >= 0, alpha, -alpha)
        torch.testing.assert_close(v.double(), expected, rtol=1e-6, atol=0)
    elif name == "dorefa_weight" and spec["bits"] == 1:
        mean = w64.abs().mean()
        assert _close_to_set(v, torch.stack([-mean, mean]))
    elif name == "dorefa_weight":
        levels = 2 ** spec["bits"] - 1
        assert _close_to_set(v, 2 * torch.arange(levels + 1) / levels - 1)
    elif name == "ternary":  # TWN: delta = 0.7 mean|W|, alpha = mean of |W| above delta
        delta = 0.7 * w64.abs().mean()
        alpha = w64.abs()[w64.abs() > delta].mean()
        assert _close_to_set(v, torch.stack([-alpha, alpha * 0, alpha]))
        assert bool(((v == 0) == (w64.abs() <= delta)).all())
    elif name == "abc_weight":  # sum_i alpha_i B_i with B_i = sign(W - mean + u_i std), alphas by least squares
        m = spec["bases"]
        x = w64.reshape(-1).numpy()
        u = [-1 + 2 * i / (m - 1) for i in range(m)] if m > 1 else [0.0]
        bases = np.stack([np.where(x - x.mean() + ui * x.std() >= 0, 1.0, -1.0) for ui in u], axis=1)
        alphas = np.linalg.lstsq(bases, x, rcond=None)[0]
        np.testing.assert_allclose(v.double().reshape(-1).numpy(), bases @ alphas, rtol=1e-5, atol=1e-6)
        assert len(v.unique()) <= m + 1  # nested bases
    elif name == "lsq":
        codes = v.double() / q.step.detach().double()
        q_n, q_p = (2 ** (spec["bits"] - 1), 2 ** (spec["bits"] - 1) - 1) if spec["signed"] else (0, 2 ** spec["bits"] - 1)
        assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.min() >= -q_n - 1e-4 and codes.max() <= q_p + 1e-4
    elif name == "uniform":  # symmetric per channel: s_c = max|W_c| / 127.5 with codes in [-128, 127], or narrow
        half = 2 ** (spec["bits"] - 1) - (1 if spec["narrow"] else 0.5)  # s_c = max|W_c| / 127, codes in +-127
        scale = w64.abs().reshape(len(w), -1).amax(1).reshape(-1, *[1] * (w.dim() - 1)) / half
        codes = v.double() / scale
        assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= 2 ** (spec["bits"] - 1) + 1e-3
    elif name == "log2":  # 0 or +-2^e, e in [fsr - 2^b + 1, fsr - 1], 2^fsr >= max|W|
        fsr = math.ceil(math.log2(w64.abs().max()))
        mags = v.abs()[v != 0].double()
        exps = torch.log2(mags)
        assert torch.equal(exps, exps.round())
        assert exps.min() >= fsr - 2 ** spec["bits"] + 1 and exps.max() <= fsr - 1
    else:
        raise AssertionError(f"no value-set oracle for quantizer {name!r}")


@pytest.mark.parametrize("name", recipe_names())
def test_one_step_changes_latent_weights_and_keeps_the_value_set(name):
    recipe = get_recipe(name)
    kwargs = {"width": 64} if recipe.model == "bnn-mlp" else recipe.model_kwargs
    torch.manual_seed(0)
    model = stage_model(build_model(recipe.model, "mnist", kwargs), recipe.stages[-1], recipe)
    x, y = torch.randn(16, 1, 28, 28), torch.arange(16) % 10
    layers = {n: m for n, m in model.named_modules()
              if isinstance(m, (QuantLinear, QuantConv2d)) and m.weight_quantizer is not None}
    assert layers, "the recipe quantizes some layer"
    before = {n: m.weight.detach().clone() for n, m in layers.items()}
    trainer_for(model, recipe, ([(x, y)], None), 1, recipe.lr, 0, None, False).fit()
    for n, layer in layers.items():
        assert not torch.equal(layer.weight, before[n]), f"{name}: {n}.weight did not change"
        if recipe.latent_clip is not None and layer.weight_quantizer.name in ("binary", "xnor"):
            assert layer.weight.abs().max() <= recipe.latent_clip
        with torch.no_grad():
            assert_in_value_set(layer.weight_quantizer, layer.weight.detach(), layer.weight_quantizer(layer.weight))


# ---------------------------------------------------------------- gradients


def approx_sign_derivative(x: np.ndarray) -> np.ndarray:
    """Bi-Real Net's dF/dx: 2 + 2x on [-1, 0), 2 - 2x on [0, 1), 0 elsewhere (F = -1, 2x + x^2, 2x - x^2, 1)."""
    return np.where((x >= -1) & (x < 0), 2 + 2 * x, np.where((x >= 0) & (x < 1), 2 - 2 * x, 0.0))


@functools.cache
def bireal_activation_quantizer():
    """The input quantizer of a binary conv in the Bi-Real recipe's last stage."""
    recipe = get_recipe("bireal")
    net = stage_model(build_model(recipe.model, "mnist", recipe.model_kwargs), recipe.stages[-1], recipe)
    return net.get_submodule("layer1.0.conv1").input_quantizer


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(st.floats(-3, 3, width=32), st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 1e-40])),
                min_size=1, max_size=16))
def test_bireal_approx_sign_gradient_matches_its_formula(values):
    quantizer = bireal_activation_quantizer()
    x = torch.tensor(values, dtype=torch.float32).reshape(1, -1, 1, 1).requires_grad_()
    y = quantizer(x)
    g = torch.linspace(-1, 2, x.numel()).reshape(x.shape)
    y.backward(g)
    assert set(y.detach().unique().tolist()) <= {-1.0, 1.0}
    expected = g.reshape(-1).numpy().astype(np.float64) * approx_sign_derivative(np.asarray(values, dtype=np.float32).astype(np.float64))
    np.testing.assert_allclose(x.grad.reshape(-1).numpy(), expected.reshape(-1), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name, bits", [("dorefa-w1a2g6", 6), ("dorefa-w8a8g8", 8), ("dorefa-w2a2g4", 4)])
def test_dorefa_gradients_are_quantized_to_k_bits(name, bits):
    recipe = get_recipe(name)
    layer = stage_model(build_model(recipe.model, "mnist"), recipe.stages[-1], recipe).ip1
    assert layer.output_quantizer.spec() == {"name": "dorefa_grad", "bits": bits, "seed": 0}
    # record the gradient that reaches the layer's pre-quantization output z, i.e. what DoReFa's
    # gradient quantizer passes on for the incoming gradient dr
    seen: dict[str, torch.Tensor] = {}

    def watch(quantizer, args) -> None:
        args[0].register_hook(lambda grad: seen.__setitem__("g", grad))

    layer.output_quantizer.register_forward_pre_hook(watch)
    x = torch.rand(2, layer.in_features)
    dr = torch.stack([torch.linspace(-0.3, 0.7, layer.out_features) ** 3, torch.linspace(2, -1, layer.out_features)])
    layer(x).backward(dr)
    for g, d in zip(seen["g"].double(), dr.double()):
        assert_k_bit_gradient(g, d, bits)


def assert_k_bit_gradient(g: torch.Tensor, dr: torch.Tensor, bits: int) -> None:
    """g = 2m (j / (2^k - 1) - 1/2), j in 0..2^k - 1, m = max|dr| of the sample; within one step of dr."""
    m = dr.abs().max()
    levels = 2**bits - 1
    code = (g / (2 * m) + 0.5) * levels  # g = 2m (j / (2^k - 1) - 1/2), j in 0..2^k - 1
    assert torch.allclose(code, code.round(), atol=1e-6 * levels)
    assert code.round().min() >= 0 and code.round().max() <= levels
    assert not torch.allclose(g, dr)  # really changed
    assert (g - dr).abs().max() <= 2 * m / levels + 1e-6  # within one step


def test_dorefa_g32_leaves_gradients_float():
    recipe = get_recipe("dorefa-w1a2g32")
    layer = stage_model(build_model(recipe.model, "mnist"), recipe.stages[-1], recipe).ip1
    assert layer.output_quantizer is None


# ------------------------------------------------------------ smoke training


@pytest.fixture(scope="module")
def mnist_available():
    try:
        from lowbit.data import load_dataset

        load_dataset("mnist", "test")
    except DataError as exc:
        pytest.skip(f"MNIST is not installed: {exc}")


@pytest.mark.parametrize("name", SMOKE)
def test_tiny_smoke_training_learns(name, mnist_available):
    recipe = get_recipe(name)
    if recipe.model == "bnn-mlp":
        recipe = replace(recipe, model_kwargs={"width": 256})
    epochs = max(3, len(recipe.stages) + 1)
    result = train_recipe(recipe, "mnist", epochs=epochs, limit=400, batch_size=40, progress=False)
    losses = [row["train_loss"] for stage in result["stages"] for row in stage["history"]]
    assert losses[-1] < losses[0], f"{name}: loss did not fall: {losses}"
    assert result["final_acc"] > 0.25, f"{name}: accuracy {result['final_acc']} is not clearly above chance (0.1)"
    assert result["train_time_per_epoch"] > 0 and len(result["stages"]) == len(recipe.stages)


def test_recipe_table_is_data():
    # every fixed recipe's config is JSON-like data a QuantConfig can read
    from lowbit.config import QuantConfig

    for recipe in RECIPES.values():
        for stage in recipe.stages:
            if stage.config is not None:
                QuantConfig.from_dict(stage.config)


def test_out_dir_holds_a_checkpoint_that_lowbit_can_reload(tmp_path, mnist_available):
    from lowbit.data import load_dataset
    from lowbit.workflow import accuracy, load_trained

    result = train_recipe("ternary", "mnist", epochs=1, limit=200, batch_size=50, out=tmp_path, progress=False)
    model, run = load_trained(tmp_path / "last.safetensors")
    assert run["recipe"] == "ternary" and run["quant"]["weight"] == {"name": "ternary"}
    images, labels = load_dataset("mnist", "test")
    assert accuracy(model, images[:200], labels[:200], progress=False) == pytest.approx(result["final_acc"])


def _bn_net() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


def test_refresh_batch_norm_takes_the_plain_average_of_batch_statistics():
    net = _bn_net()
    net[1].running_mean.fill_(5.0)  # stale statistics, as after training with moving weights
    net[1].running_var.fill_(9.0)
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 4, generator=generator) * (i + 1) + i, torch.zeros(8, dtype=torch.long)) for i in range(3)]
    refresh_batch_norm(net, batches, max_batches=2)
    with torch.no_grad():  # oracle: torch's mean / unbiased variance of the BN inputs, averaged over 2 batches
        hidden = [net[0](x) for x, _ in batches[:2]]
    expected_mean = torch.stack([h.mean(0) for h in hidden]).mean(0)
    expected_var = torch.stack([h.var(0, unbiased=True) for h in hidden]).mean(0)
    torch.testing.assert_close(net[1].running_mean, expected_mean)
    torch.testing.assert_close(net[1].running_var, expected_var)
    assert net[1].momentum == 0.1 and net.training


class _Reversed(torch.nn.Module):
    """Two batch norms around a sign, registered in the reverse of the order the forward pass runs them."""

    def __init__(self):
        super().__init__()
        self.second = torch.nn.BatchNorm1d(3)
        self.first = torch.nn.BatchNorm1d(3)
        self.linear = torch.nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.linear(torch.sign(self.first(x))))


def test_refresh_batch_norm_measures_each_norm_as_the_eval_mode_network_feeds_it():
    torch.manual_seed(0)
    net = _Reversed()
    for norm in (net.first, net.second):
        norm.running_mean.fill_(5.0)
        norm.running_var.fill_(9.0)
    generator = torch.Generator().manual_seed(3)
    batches = [(torch.randn(16, 3, generator=generator) + 0.3 * i, torch.zeros(16, dtype=torch.long)) for i in range(3)]
    refresh_batch_norm(net, batches, max_batches=3)
    inputs = torch.cat([x for x, _ in batches]).view(3, 16, 3)
    torch.testing.assert_close(net.first.running_mean, inputs.mean(1).mean(0))
    torch.testing.assert_close(net.first.running_var, inputs.var(1).mean(0))
    with torch.no_grad():  # oracle: the second norm's input with the first norm in eval mode on its new statistics
        net.eval()
        hidden = torch.stack([net.linear(torch.sign(net.first(x))) for x, _ in batches])
    torch.testing.assert_close(net.second.running_mean, hidden.mean(1).mean(0))
    torch.testing.assert_close(net.second.running_var, hidden.var(1).mean(0))


def test_refresh_callback_replaces_the_test_accuracy_of_stale_statistics():
    net = _bn_net()
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(2))
    y = (x[:, 0] > 0).long()
    loader = [(x[:32], y[:32]), (x[32:], y[32:])]
    trainer = Trainer(net, loader, loader, epochs=1, optimizer="adam", lr=1e-2, schedule="none",
                      callbacks=[RefreshBatchNorm()], progress=False)
    trainer.fit()
    fresh = {k: v.clone() for k, v in net.state_dict().items()}
    refresh_batch_norm(net, loader, max_batches=100)  # stats of the final weights: a second refresh changes nothing
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, fresh[key])
    assert trainer.history[-1]["test_acc"] == trainer.evaluate()["acc"]


def test_bireal_refreshes_batch_norm_after_every_epoch():
    recipe = get_recipe("bireal")
    assert recipe.bn_refresh
    net = build_model(recipe.model, "mnist", dict(recipe.model_kwargs))
    model = stage_model(net, recipe.stages[-1], recipe)
    batch = [(torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))]
    trainer = trainer_for(model, recipe, (batch, batch), 1, recipe.lr, 0, None, False)
    assert any(isinstance(c, RefreshBatchNorm) for c in trainer.callbacks)
    assert not get_recipe("xnor").bn_refresh


def test_latent_weights_of_binary_conv1d_layers_are_clipped_and_grouped():
    from torch import nn

    import lowbit
    from lowbit.recipes import get_recipe
    from lowbit.recipes.driver import sign_layers

    net = nn.Sequential(nn.Conv1d(4, 8, 3), nn.ReLU(), nn.Conv1d(8, 8, 3), nn.ReLU(), nn.Conv1d(8, 2, 3)).train()
    q = lowbit.quantize(net, get_recipe("bwn").stages[-1].config)
    assert [type(m).__name__ for m in sign_layers(q)] == ["QuantConv1d"]  # first and last layers stay real
