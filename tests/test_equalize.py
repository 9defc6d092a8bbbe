"""Cross-layer equalization and high-bias absorption (lowbit.ptq.equalize): hand-worked scales, per-channel ranges
against a loop-by-loop oracle, unchanged float outputs, the absorbed amounts, ReLU6, look-alikes, and a
MobileNet-like net with per-tensor weights."""

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lowbit
from lowbit.errors import ConfigError
from lowbit.nn import freeze_weight
from lowbit.ptq.capture import quantizers_off
from lowbit.ptq.equalize import FOLDED_BATCHNORM, batchnorm_statistics, equalize

#: weights only, so the float view and the quantized model differ by the weights alone
PER_TENSOR_8 = {"name": "uniform", "bits": 8, "symmetric": True, "per_channel": False, "dynamic": True}


def weights_only(spec=PER_TENSOR_8):
    return {"weight": spec, "input": None, "first": "same", "last": "same"}


def randomize_batchnorms(model, generator, spread=1.0, top=None):
    """Batch norms with running statistics, and scales spread over ``10 ** [-spread, spread]`` (or
    ``[top - 2 spread, top]``)."""
    top = spread if top is None else top
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            m.weight.data.copy_(10 ** (top - torch.rand(n, generator=generator) * 2 * spread))
            m.bias.data.copy_(torch.randn(n, generator=generator) * 0.5)
    return model.eval()


def close(actual, expected, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def float_out(model, x):
    with quantizers_off(model), torch.no_grad():
        return model(x)


def out_ranges(weight):
    """max |W1[i]| per output channel, one channel at a time."""
    return torch.stack([weight[i].abs().max() for i in range(weight.shape[0])])


def in_ranges(weight, groups=1, block=1):
    """max |W2[:, i]| per input channel i of layer 1, one channel at a time: a grouped conv's channel i is read by
    its group's outputs at position i % (C / groups); a linear layer reads features i * block .. (i + 1) * block."""
    if weight.dim() == 2:
        channels = weight.shape[1] // block
        return torch.stack([weight[:, i * block:(i + 1) * block].abs().max() for i in range(channels)])
    per_group, outs = weight.shape[1], weight.shape[0] // groups
    return torch.stack([weight[(i // per_group) * outs:(i // per_group + 1) * outs, i % per_group].abs().max()
                        for i in range(per_group * groups)])


def test_two_channel_scales_by_hand():
    # r1 = (4, 1), r2 = (1, 4): s = (sqrt(4 / 1), sqrt(1 / 4)) = (2, 0.5); both ranges become sqrt(r1 r2) = 2
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[4.0, -2.0], [0.5, 1.0]]))
        model[0].bias.copy_(torch.tensor([2.0, -1.0]))
        model[2].weight.copy_(torch.tensor([[1.0, 0.25], [-0.5, 4.0]]))
        model[2].bias.copy_(torch.tensor([0.5, 0.5]))
    q = lowbit.quantize(model, weights_only())
    (result,) = equalize(q)
    assert torch.equal(q.get_submodule("0").weight, torch.tensor([[2.0, -1.0], [1.0, 2.0]]))
    assert torch.equal(q.get_submodule("0").bias, torch.tensor([1.0, -2.0]))
    assert torch.equal(q.get_submodule("2").weight, torch.tensor([[2.0, 0.125], [-1.0, 2.0]]))
    assert torch.equal(q.get_submodule("2").bias, torch.tensor([0.5, 0.5]))
    assert (result.layer, result.details["next"], result.details["activation"]) == ("0", "2", "relu")
    assert (result.details["scale_min"], result.details["scale_max"]) == (0.5, 2.0)
    assert result.details["absorption"].startswith("no batch-norm statistics")


def conv_bn(cin, cout, kernel=3, groups=1, act=nn.ReLU):
    """Conv (weights from torch's global generator: seed it) and batch norm, then ``act``."""
    layers = [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return layers + ([act()] if act is not None else [])


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), width=st.integers(2, 6), pool=st.booleans(), depthwise=st.booleans())
def test_random_nets_equal_ranges_and_unchanged_outputs(seed, width, pool, depthwise):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    c = 2 * width
    body = [*conv_bn(3, c), *([nn.MaxPool2d(2)] if pool else []),
            *conv_bn(c, c, groups=c if depthwise else 2), *conv_bn(c, 4, kernel=1),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 5)]
    model = randomize_batchnorms(nn.Sequential(*body), g, spread=1.5)
    q = lowbit.quantize(model, weights_only())
    x = torch.randn(2, 3, 8, 8, generator=g)
    before = float_out(q, x)
    results = equalize(q, absorb_bias=False)  # absorption is exact only above c: tested on its own
    close(float_out(q, x), before, 1e-4)
    pairs = [(r.layer, r.details["next"]) for r in results]
    convs = [name for name, m in q.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert pairs == list(zip(convs, convs[1:]))  # every layer pairs with the next, the flattened linear included
    for first, second in pairs:
        w1, layer2 = q.get_submodule(first).weight.detach(), q.get_submodule(second)
        block = layer2.in_features // w1.shape[0] if isinstance(layer2, nn.Linear) else 1
        expected = in_ranges(layer2.weight.detach(), getattr(layer2, "groups", 1), block)
        close(out_ranges(w1), expected, atol=0)


def test_conv_depthwise_conv_chain_settles_over_passes():
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = randomize_batchnorms(nn.Sequential(*conv_bn(3, 8, kernel=1), *conv_bn(8, 8, groups=8),
                                               *conv_bn(8, 6, kernel=1)), g, spread=2.0)
    q = lowbit.quantize(model, weights_only())
    x = torch.randn(2, 3, 6, 6, generator=g)
    before = float_out(q, x)
    first, second = equalize(q)
    assert (first.layer, first.details["next"], second.layer, second.details["next"]) == ("0", "3", "3", "6")
    assert first.details["passes"] > 2  # one pass equalizes the pairs one at a time, not together
    close(float_out(q, x), before, 1e-4)
    w0, w3, w6 = (q.get_submodule(n).weight.detach() for n in ("0", "3", "6"))
    close(out_ranges(w0), in_ranges(w3, groups=8), atol=0)
    close(out_ranges(w3), in_ranges(w6), atol=0)
    # with an iteration budget of one pass the first pair is thrown off balance again by the second
    q1 = lowbit.quantize(model, weights_only())
    equalize(q1, iterations=1)
    w0, w3 = (q1.get_submodule(n).weight.detach() for n in ("0", "3"))
    assert not torch.allclose(out_ranges(w0), in_ranges(w3, groups=8), rtol=1e-3)


def absorption_pair():
    """Linear -> ReLU -> Linear, already equalized (every range 1), with recorded statistics mean (5, 1), std 1."""
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[0].bias.copy_(torch.tensor([5.0, 1.0]))
        model[2].weight.copy_(torch.tensor([[1.0, 0.0], [0.5, 1.0]]))
        model[2].bias.zero_()
    q = lowbit.quantize(model, weights_only())
    q.meta[FOLDED_BATCHNORM] = {"0": (torch.tensor([5.0, 1.0], dtype=torch.float64),
                                      torch.tensor([1.0, 1.0], dtype=torch.float64))}
    return q


def test_high_bias_absorption_moves_exactly_c():
    # c = max(0, mean - 3 std) = (2, 0): b1 -= c -> (3, 1); b2 += W2 c = (2, 1)
    q = absorption_pair()
    x = torch.tensor([[-3.0, 0.0], [0.0, -1.0], [10.0, 2.0]])  # pre-activations x + b1 >= c
    before = float_out(q, x)
    (result,) = equalize(q)
    assert (result.details["scale_min"], result.details["scale_max"]) == (1.0, 1.0)
    assert torch.equal(q.get_submodule("0").bias, torch.tensor([3.0, 1.0]))
    assert torch.equal(q.get_submodule("2").bias, torch.tensor([2.0, 1.0]))
    assert (result.details["absorbed_channels"], result.details["absorbed_max"]) == (1, 2.0)
    assert torch.equal(float_out(q, x), before)
    # below c the output changes: relu(0) = 0 before, relu(-2) + 2 after
    assert not torch.equal(float_out(q, torch.tensor([[-5.0, 0.0]])), float_out(absorption_pair(),
                                                                                 torch.tensor([[-5.0, 0.0]])))
    assert torch.equal(q.meta[FOLDED_BATCHNORM]["0"][0], torch.tensor([3.0, 1.0], dtype=torch.float64))
    assert equalize(absorption_pair(), absorb_bias=False)[0].details.get("absorbed_channels") is None


def test_absorption_after_scaling_uses_the_scaled_statistics():
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = nn.Sequential(*conv_bn(3, 6, kernel=1), *conv_bn(6, 4, kernel=1, act=None)).eval()
    randomize_batchnorms(model, g, spread=1.0)
    with torch.no_grad():  # pre-activations near beta: small weights, unit statistics, beta well above 3 gamma
        model[0].weight.mul_(0.01)
        model[1].running_mean.zero_()
        model[1].running_var.fill_(1.0)
        model[1].weight.copy_(torch.rand(6, generator=g) * 0.2 + 0.1)
        model[1].bias.copy_(torch.rand(6, generator=g) * 2 + 1)
    q = lowbit.quantize(model, weights_only())
    mean, std = batchnorm_statistics(model[1])
    q.meta[FOLDED_BATCHNORM] = {"0": (mean, std)}
    layer = q.get_submodule("0")
    w1, b1 = layer.weight.detach().double().clone(), layer.bias.detach().double().clone()
    x = torch.randn(4, 3, 5, 5, generator=g)
    c = (mean - 3 * std).clamp(min=0)
    with torch.no_grad():
        assert bool((layer(x).double() >= c[None, :, None, None]).all())  # the condition holds on x
    before = float_out(q, x)
    (result,) = equalize(q)
    scale = out_ranges(w1) / out_ranges(layer.weight.detach().double())  # s_i: W1[i] / s_i
    assert float(scale.min()) == pytest.approx(result.details["scale_min"])
    # b1 / s - b1_after: the amount moved, in the scaled units c / s
    close(b1 / scale - layer.bias.detach().double(), c / scale, 1e-6, 1e-6)
    close(q.meta[FOLDED_BATCHNORM]["0"][0], (mean - c) / scale, 1e-6, 1e-6)
    assert result.details["absorbed_channels"] == 6 and result.details["padded"] is False
    close(float_out(q, x), before)


def test_absorption_into_a_padded_conv_is_exact_inside_only():
    g = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    model = nn.Sequential(*conv_bn(3, 4, kernel=1), *conv_bn(4, 2, kernel=3, act=None)).eval()
    randomize_batchnorms(model, g, spread=0.5)
    with torch.no_grad():
        model[0].weight.mul_(0.01)
        model[1].running_mean.zero_()
        model[1].running_var.fill_(1.0)
        model[1].weight.fill_(0.2)
        model[1].bias.fill_(2.0)
    q = lowbit.quantize(model, weights_only())
    q.meta[FOLDED_BATCHNORM] = {"0": batchnorm_statistics(model[1])}
    x = torch.randn(1, 3, 6, 6, generator=g)
    before = float_out(q, x)
    (result,) = equalize(q)
    after = float_out(q, x)
    assert result.details["padded"] is True
    close(after[..., 1:-1, 1:-1], before[..., 1:-1, 1:-1])
    assert (after[..., 0, :] - before[..., 0, :]).abs().max() > 1e-2


def relu6_net(act=nn.ReLU6):
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    return randomize_batchnorms(nn.Sequential(*conv_bn(3, 4, act=act), *conv_bn(4, 3, kernel=1, act=None)), g, 1.0)


def test_relu6_kept_exact_by_scaling_around_the_clip(tmp_path):
    model = relu6_net()
    q = lowbit.quantize(model, weights_only())
    x = torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(6)) * 4
    assert bool((model[:2](x) > 6).any())  # the clip matters on x
    (result,) = equalize(q)
    assert result.details["activation"] == "relu6" and "clip" in result.details["absorption"]
    close(float_out(q, x), model(x), 1e-5, 1e-5)
    scale = q.cle_scales.get_buffer(next(name for name, _ in q.cle_scales.named_buffers()))
    assert scale.shape == (4, 1, 1) and not torch.allclose(scale, torch.ones_like(scale))
    close(out_ranges(q.get_submodule("0").weight.detach()), in_ranges(q.get_submodule("3").weight.detach()), atol=0)
    lowbit.save(q, tmp_path / "m.lowbit", x[:1])
    with torch.no_grad():
        assert torch.equal(lowbit.load(tmp_path / "m.lowbit")(x), q(x))


def test_relu6_replaced_by_relu_is_reported():
    model = relu6_net()
    q = lowbit.quantize(model, weights_only())
    (result,) = equalize(q, relu6="replace")
    assert result.details["activation"] == "relu6 -> relu"
    assert "relu" in q.code and "hardtanh" not in q.code and "relu6" not in q.code
    # the float model is now the one with ReLU in place of ReLU6: an independent copy with nn.ReLU agrees
    with_relu = copy.deepcopy(model)
    with_relu[2] = nn.ReLU()
    x = torch.randn(3, 3, 6, 6) * 4
    expected = with_relu(x)
    close(float_out(q, x), expected, 1e-4, 1e-4)
    assert (expected - model(x)).abs().max() > 1e-2  # where it clipped at 6, the float output moved


def test_relu6_skip_leaves_the_pair_and_says_why():
    q = lowbit.quantize(relu6_net(), weights_only())
    weights = [p.detach().clone() for p in q.parameters()]
    (result,) = equalize(q, relu6="skip")
    assert "relu6='skip'" in result.details["skipped"]
    assert all(torch.equal(a, b) for a, b in zip(weights, q.parameters()))
    with pytest.raises(ConfigError, match="relu6"):
        equalize(q, relu6="clip")


def test_look_alikes_are_listed_and_non_pairs_are_not():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d = (nn.Conv2d(3, 3, 1) for _ in range(4))
            self.up = nn.ConvTranspose2d(3, 3, 2, stride=2)

        def forward(self, x):
            y = self.a(x)
            z = self.b(torch.relu(y)) + y  # y reaches b and the add, b's output the add: no pairs
            v = self.c(nn.functional.silu(self.d(z)))
            return self.up(torch.relu(v))

    q = lowbit.quantize(Residual().eval(), weights_only())
    results = equalize(q)
    skipped = {r.layer: r.details["skipped"] for r in results}
    assert set(skipped) == {"d", "c"}  # d -> silu -> c, c -> relu -> up
    assert "silu" in skipped["d"] and "transposed" in skipped["c"]


def test_no_pair_is_a_no_op_with_a_warning():
    q = lowbit.quantize(nn.Sequential(nn.Linear(4, 3)).eval(), weights_only())
    weights = [p.detach().clone() for p in q.parameters()]
    with pytest.warns(UserWarning, match="no pair"):
        assert equalize(q) == []
    assert all(torch.equal(a, b) for a, b in zip(weights, q.parameters()))


def test_rounded_or_calibrated_layers_are_skipped():
    model = relu6_net(act=nn.ReLU)
    frozen = lowbit.quantize(model, weights_only())
    layer = frozen.get_submodule("0")
    freeze_weight(layer, layer.weight_quantizer.encode(layer.weight))
    assert "frozen" in equalize(frozen)[0].details["skipped"]
    calibrated = lowbit.calibrate(lowbit.quantize(model, "w8a8"), [torch.randn(2, 3, 6, 6)])
    assert "calibrated" in equalize(calibrated)[0].details["skipped"]
    with pytest.raises(ConfigError, match="iterations"):
        equalize(frozen, iterations=0)


def record_folds(quantized, model):
    """What the fold records in ``meta`` for a Sequential of conv / batch norm pairs."""
    children = list(model.named_children())
    quantized.meta[FOLDED_BATCHNORM] = {name: batchnorm_statistics(bn) for (name, _), (_, bn) in
                                        zip(children, children[1:]) if isinstance(bn, nn.BatchNorm2d)}


def mobilenet_like(seed):
    """Two blocks conv-bn-relu6 -> depthwise-bn-relu6 -> conv-bn, then a linear head. A quarter of the expanding
    convs' channels are nearly off (batch-norm scale 1e-3 .. 1e-1), so the depthwise batch norms, whose statistics
    come from data, see small variances there and fold into weights tens of times larger than the rest: the
    per-tensor weight grid of those depthwise convs then fits their outliers alone, as in MobileNetV2."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    body = [*conv_bn(3, 16, act=nn.ReLU6), *conv_bn(16, 16, groups=16, act=nn.ReLU6), *conv_bn(16, 8, 1, act=None),
            *conv_bn(8, 24, 1, act=nn.ReLU6), *conv_bn(24, 24, groups=24, act=nn.ReLU6), *conv_bn(24, 8, 1, act=None),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)]
    model = nn.Sequential(*body)
    for index in (1, 9):  # the expanding convs' batch norms
        bn = model[index]
        off = torch.rand(bn.num_features, generator=g) < 0.25
        with torch.no_grad():
            bn.weight.copy_(torch.where(off, 10 ** (-3 + 2 * torch.rand(bn.num_features, generator=g)), 1.0))
            bn.bias.copy_(torch.where(off, 0.0, 0.5 + 0.5 * torch.randn(bn.num_features, generator=g)))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # running statistics: the plain average over the batches below
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(32, 3, 12, 12, generator=g))
    return model.eval()
@pytest.mark.parametrize("bits", [8, 4])
def test_mobilenet_like_per_tensor_weights_lose_much_less_after_equalization(bits):
    model = mobilenet_like(seed=7)
    config = weights_only({**PER_TENSOR_8, "bits": bits})
    x = torch.randn(64, 3, 12, 12, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        reference = model(x)
        plain = lowbit.quantize(model, config)
        equalized = lowbit.quantize(model, config)
        record_folds(equalized, model)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            results = equalize(equalized)
        assert len(results) == 6 and all("skipped" not in r.details for r in results)

        def error(q):
            return float((q(x) - reference).square().mean() / reference.square().mean())

        def agreement(q):
            return float((q(x).argmax(1) == reference.argmax(1)).float().mean())

        assert error(equalized) < error(plain) / 10
        assert agreement(equalized) >= agreement(plain)
        assert agreement(equalized) > 0.95 if bits == 8 else error(equalized) < 0.2
