"""Bias correction (lowbit.ptq.bias_correction): a hand-worked layer, the mean output error of every corrected layer
against an oracle written with hooks, layers without a bias (save, load, ONNX), frozen layers, and the analytic
variant against numerical integration."""

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, stats
from torch import nn
from torch.nn import functional as F

import lowbit
from lowbit.errors import CalibrationError
from lowbit.nn import freeze_weight
from lowbit.ptq.bias_correction import clipped_normal_mean, correct_bias, correct_bias_analytic, relu_normal_mean
from lowbit.ptq.capture import quantizers_off
from lowbit.ptq.equalize import FOLDED_BATCHNORM, equalize

TWO_BITS = {"name": "uniform", "bits": 2, "symmetric": True, "per_channel": False, "dynamic": True}


def weights_only(spec):
    return {"weight": spec, "input": None, "first": "same", "last": "same"}


def test_single_linear_layer_by_hand():
    # W = (1, 0.4) on the 2-bit grid {-2, -1, 0, 1} * 2/3 is (2/3, 2/3); the inputs' mean is (1, 2), so
    # E[W x - W~ x] = 1.8 - 2 = -0.2 and b = 0.1 becomes -0.1. Errors d = (-0.2, 1, -1.4): E[d^2] = 1, after 0.96
    model = nn.Sequential(nn.Linear(2, 1)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.4]]))
        model[0].bias.fill_(0.1)
    q = lowbit.quantize(model, weights_only(TWO_BITS))
    (result,) = correct_bias(q, [torch.tensor([[1.0, 2.0], [3.0, 0.0]]), torch.tensor([[-1.0, 4.0]])])
    assert q.get_submodule("0").bias.item() == pytest.approx(-0.1, abs=1e-6)
    assert (result.method, result.layer, result.details["bias_added"]) == ("bias", "0", False)
    assert result.error_before == pytest.approx(1.0, abs=1e-6)
    assert result.error_after == pytest.approx(0.96, abs=1e-6)
    assert result.details["max_shift"] == pytest.approx(0.2, abs=1e-6)


def small_net(bias=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=bias), nn.BatchNorm2d(8) if bias else nn.Identity(), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, groups=8, padding=1, bias=bias), nn.ReLU(), nn.Conv2d(8, 6, 1, bias=bias),
                         nn.Flatten(), nn.Linear(6 * 6 * 6, 5, bias=bias)).eval()


def mean_errors(quantized, reference, batches):
    """Per quantized layer, the largest |E[y - y~]| over its output channels: y from ``reference`` with its
    quantizers off, y~ from ``quantized`` (input quantizer, quantized weight, bias), taken with forward hooks."""
    layers = [name for name, m in quantized.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    errors = {}
    for name in layers:
        sums = []
        for model, on in ((reference, False), (quantized, True)):
            layer, seen = model.get_submodule(name), []
            handle = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
            with torch.no_grad():
                if on:
                    for batch in batches:
                        model(batch)
                else:
                    with quantizers_off(model):
                        for batch in batches:
                            model(batch)
            handle.remove()
            weight = layer.weight_quantizer(layer.weight) if on else layer.weight
            outs = []
            for x in seen:
                x = layer.input_quantizer(x) if on and layer.input_quantizer is not None else x
                y = F.linear(x, weight, layer.bias) if isinstance(layer, nn.Linear) else \
                    F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
                outs.append(y.double().transpose(0, 1).reshape(y.shape[1], -1))
            sums.append(torch.cat(outs, 1).mean(1))
        errors[name] = float((sums[0] - sums[1]).detach().abs().max())
    return errors


def calibrated(model, batches, config="w4a8"):
    return lowbit.calibrate(lowbit.quantize(model, config), batches)


def test_corrected_layers_have_no_mean_error_on_the_calibration_set():
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 3, 8, 8, generator=g) for _ in range(3)]
    model = small_net()
    q = calibrated(model, batches)
    uncorrected = copy.deepcopy(q)
    results = correct_bias(q, batches)
    assert [r.layer for r in results] == ["0", "3", "5", "7"]
    before = mean_errors(uncorrected, uncorrected, batches)
    after = mean_errors(q, uncorrected, batches)
    assert max(before.values()) > 1e-2
    for name in before:
        assert after[name] < 1e-5 + 1e-4 * before[name], name
    for r in results:
        assert r.error_after < r.error_before


def test_layers_without_bias_get_one_that_save_load_and_onnx_keep(tmp_path):
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(4, 3, 8, 8, generator=g) for _ in range(2)]
    q = calibrated(small_net(bias=False), batches)
    results = correct_bias(q, batches)
    assert all(r.details["bias_added"] for r in results)
    assert all(isinstance(q.get_submodule(r.layer).bias, nn.Parameter) for r in results)
    x = torch.randn(2, 3, 8, 8, generator=g)
    with torch.no_grad():
        expected = q(x)
    lowbit.save(q, tmp_path / "m.lowbit", x[:1])
    with torch.no_grad():
        assert torch.equal(lowbit.load(tmp_path / "m.lowbit")(x), expected)
    import onnxruntime as ort

    from lowbit.export.onnx import to_onnx

    proto = to_onnx(q, x[:1])
    assert {f"{r.layer}.bias.codes" for r in results} <= {t.name for t in proto.graph.initializer}
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    # int8 graphs hold a bias as int32 codes of the input step times the weight step, and requantize between
    # layers as integer kernels do: a few percent of the largest logit on this small net
    np.testing.assert_allclose(got, expected.numpy(), atol=0.05 * float(expected.abs().max()))


def test_added_bias_loads_into_the_float_architecture(tmp_path):
    batches = [torch.randn(4, 3, 8, 8)]
    model = small_net(bias=False)
    q = calibrated(model, batches)
    correct_bias(q, batches)
    lowbit.save(q, tmp_path / "m.lowbit", batches[0][:1])
    with torch.no_grad():
        assert torch.equal(lowbit.load(tmp_path / "m.lowbit", model=model)(batches[0]), q(batches[0]))


def test_frozen_layers_need_the_float_reference():
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(8, 3, 8, 8, generator=g) for _ in range(2)]
    q = calibrated(small_net(), batches)
    reference = copy.deepcopy(q)
    for name in ("0", "3", "5", "7"):
        layer = q.get_submodule(name)
        freeze_weight(layer, layer.weight_quantizer.encode(layer.weight))
    with pytest.raises(CalibrationError, match="reference="):
        correct_bias(q, batches)
    correct_bias(q, batches, reference=reference)
    # the frozen weights pass through unchanged in eval mode: the reference's float weights are the target
    after = mean_errors(q, reference, batches)
    assert max(after.values()) < 1e-5
    with pytest.raises(CalibrationError, match="batch"):
        correct_bias(q, [])


@settings(max_examples=40, deadline=None)
@given(mean=st.floats(-5, 5), std=st.one_of(st.just(0.0), st.floats(0.01, 4)), top=st.floats(0.5, 8))
def test_clipped_normal_means_match_numerical_integration(mean, std, top):
    if std == 0:
        relu, clipped = max(mean, 0.0), min(max(mean, 0.0), top)
    else:
        density = stats.norm(mean, std).pdf
        span = (mean - 12 * std, mean + 12 * std)
        relu = integrate.quad(lambda v: max(v, 0.0) * density(v), *span, points=[0.0], limit=200)[0]
        clipped = integrate.quad(lambda v: min(max(v, 0.0), top) * density(v), *span, points=[0.0, top],
                                 limit=200)[0]
    m, s = torch.tensor([mean], dtype=torch.float64), torch.tensor([std], dtype=torch.float64)
    assert float(relu_normal_mean(m, s)) == pytest.approx(relu, abs=1e-7)
    assert float(clipped_normal_mean(m, s, top)) == pytest.approx(clipped, abs=1e-7)


def test_analytic_correction_by_hand():
    # layer 2 reads relu(N(mu, sigma^2)) per channel: b2 -= (W2~ - W2) E[x]
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1)).eval()
    with torch.no_grad():
        model[2].weight.copy_(torch.tensor([[1.0, 0.4]]))
        model[2].bias.fill_(0.1)
    q = lowbit.quantize(model, weights_only(TWO_BITS))
    mu, sigma = [0.5, -1.0], [1.0, 2.0]
    q.meta[FOLDED_BATCHNORM] = {"0": (torch.tensor(mu, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64))}
    first_bias = q.get_submodule("0").bias.detach().clone()
    (result,) = correct_bias_analytic(q)
    expected_x = [m * stats.norm.cdf(m / s) + s * stats.norm.pdf(m / s) for m, s in zip(mu, sigma)]
    weight_error = [2 / 3 - 1.0, 2 / 3 - 0.4]
    expected = 0.1 - sum(e * x for e, x in zip(weight_error, expected_x))
    assert q.get_submodule("2").bias.item() == pytest.approx(expected, abs=1e-6)
    assert (result.method, result.layer, result.details["source"]) == ("bias-analytic", "2", "0")
    assert torch.equal(q.get_submodule("0").bias, first_bias)  # the first layer reads the image: no statistics
    assert not math.isclose(expected, 0.1)


def test_analytic_correction_through_a_clip_kept_exact_by_equalization():
    # after equalization layer 2 reads relu6(s h') / s with h' = h / s: E[x] = E[relu6(N(mu, sigma^2))] / s
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU6(), nn.Linear(2, 1)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.1, 0.2, -0.1]]))
        model[2].weight.copy_(torch.tensor([[0.3, 0.9]]))
    q = lowbit.quantize(model, weights_only(TWO_BITS))
    mu, sigma = [4.0, 0.2], [3.0, 0.1]
    q.meta[FOLDED_BATCHNORM] = {"0": (torch.tensor(mu, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64))}
    equalize(q)
    scale = q.cle_scales.get_buffer(next(name for name, _ in q.cle_scales.named_buffers())).double()
    layer = q.get_submodule("2")
    weight, bias = layer.weight.detach().double().clone(), float(layer.bias.detach())
    (result,) = correct_bias_analytic(q)
    clipped = [integrate.quad(lambda v: min(max(v, 0.0), 6.0) * stats.norm(m, s).pdf(v), m - 12 * s, m + 12 * s,
                              points=[0.0, 6.0])[0] for m, s in zip(mu, sigma)]
    expected_x = torch.tensor(clipped, dtype=torch.float64) / scale
    weight_error = layer.weight_quantizer(weight.float()).double() - weight
    assert (result.layer, result.details["source"]) == ("2", "0")
    assert float(layer.bias.detach()) == pytest.approx(bias - float(weight_error @ expected_x), abs=1e-6)
