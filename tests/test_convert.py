"""Whole-graph quantization (lowbit.convert, lowbit.placement): call sites, batch-norm folding, activations on graph
edges, the report's fractions, and the integer graph onnxruntime runs."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lowbit
from lowbit.config import QuantConfig
from lowbit.errors import UnsupportedLayerError
from lowbit.export.onnx import to_onnx
from lowbit.nn import QuantAct, QuantConv2d, QuantLinear

#: converts every layer and quantizes nothing: the quantized graph must compute the float model's bits
NOTHING = QuantConfig(first="same", last="same")


class SamePad(nn.Conv2d):
    """TensorFlow "same" padding: an asymmetric zero pad, then the conv through F.conv2d (EfficientNet-Lite's)."""

    def __init__(self, cin, cout, k, stride):
        super().__init__(cin, cout, k, stride)
        total = k - stride
        self.static_padding = nn.ZeroPad2d((total // 2, total - total // 2, total // 2, total - total // 2))

    def forward(self, x):
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class SameNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = SamePad(3, 8, 3, 2)
        self.bn = nn.BatchNorm2d(8)
        self.dw = SamePad(8, 8, 5, 2)
        self.dw.groups = 8
        self.dw.weight = nn.Parameter(torch.randn(8, 1, 5, 5) * 0.2)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu6(self.bn(self.stem(x)))
        return self.head(F.relu6(self.dw(x)).mean((2, 3)))


def settled(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(3):
            model.train()(torch.randn(8, 3, 16, 16))
    return model.eval()


def test_a_subclass_with_its_own_forward_keeps_its_padding_bit_for_bit():
    model = settled(SameNet())
    report = lowbit.quantize_report(model, NOTHING, fold_bn=False)
    assert report.converted == ["stem.conv2d", "dw.conv2d", "head"]  # the owners hold their pads too
    assert report.unsupported == []
    calls = [n.target for n in report.model.graph.nodes if n.op == "call_module"]
    assert "stem.static_padding" in calls and "dw.static_padding" in calls
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(report.model(x), model(x))


def test_functional_calls_on_parameters_become_layers():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.k = nn.Parameter(torch.randn(6, 2, 3, 3) * 0.3)
            self.w = nn.Parameter(torch.randn(5, 6) * 0.3)
            self.b = nn.Parameter(torch.randn(5))

        def forward(self, x):
            y = F.conv2d(x, self.k, None, stride=2, padding=1, groups=2)
            return F.linear(y.mean((2, 3)), self.w, self.b)

    model = Functional().eval()
    report = lowbit.quantize_report(model, NOTHING)
    assert report.converted == ["conv2d", "linear"] and report.weight_fraction == 0  # no weight quantizers
    assert [type(report.model.get_submodule(n)) for n in report.converted] == [QuantConv2d, QuantLinear]
    x = torch.randn(3, 4, 9, 9)
    with torch.no_grad():
        assert torch.equal(report.model(x), model(x))
    quantized = lowbit.quantize_report(model, "w8a8")
    assert quantized.weight_fraction == pytest.approx((6 * 2 * 9 + 5 * 6) / (6 * 2 * 9 + 5 * 6 + 5))


def test_a_functional_conv_with_a_computed_weight_runs_float_and_is_reported():
    class Standardized(nn.Conv2d):  # weight standardization: the weight is computed in the graph
        def forward(self, x):
            w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
            return F.conv2d(x, w, self.bias)

    model = nn.Sequential(Standardized(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)).eval()
    with pytest.warns(UserWarning, match="its weight is computed in the graph"):
        report = lowbit.quantize_report(model, "w8a8")
    assert report.converted == ["3"]
    assert ("conv2d", "conv2d call: its weight is computed in the graph, not a parameter") in report.unsupported
    with pytest.raises(UnsupportedLayerError, match="computed in the graph"):
        lowbit.quantize(model, "w8a8", strict=True)


def test_batch_norm_folds_exactly_to_float_tolerance_in_eval_mode():
    model = nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                          nn.Linear(6 * 6 * 6, 5), nn.BatchNorm1d(5))
    with torch.no_grad():
        for bn in (model[1], model[5]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.2, 3)
            bn.weight.uniform_(-2, 2)
            bn.bias.uniform_(-1, 1)
    model.eval()
    report = lowbit.quantize_report(model, NOTHING)
    assert report.folded == ["1", "5"]
    assert not any(isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) for m in report.model.modules())
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(report.model(x), model(x), rtol=1e-5, atol=1e-5)
    training = lowbit.quantize_report(model.train(), NOTHING)  # training: batch norm stays (folded at export)
    assert training.folded == [] and isinstance(training.model.get_submodule("1"), nn.BatchNorm2d)
    assert lowbit.quantize_report(model.eval(), NOTHING, fold_bn=False).folded == []


class Block(nn.Module):
    """A residual add, a concatenation and a squeeze-and-excitation product."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.squeeze = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        y = F.relu(self.conv2(F.relu(self.conv1(x))) + x)
        both = torch.cat([y, x], 1)
        gate = torch.sigmoid(self.squeeze(both.mean((2, 3), keepdim=True)))
        return self.head(both * gate).mean((2, 3))


def calibrated_block():
    torch.manual_seed(0)
    model = Block().eval()
    quantized = lowbit.quantize(model, "w8a8")
    lowbit.calibrate(quantized, [torch.randn(8, 4, 8, 8) for _ in range(3)])
    return model, quantized


def test_each_tensor_entering_a_quantized_op_is_quantized_once():
    _, q = calibrated_block()
    acts = {name for name, m in q.named_modules() if isinstance(m, QuantAct)}
    # x feeds conv1, the add and the concatenation: one quantizer at x, none in conv1
    assert "quant_acts.x" in acts and q.conv1.input_quantizer is None
    assert q.conv2.input_quantizer is not None  # relu(conv1) is read by conv2 alone
    assert q.conv2.output_quantizer is not None  # the add's input
    assert {"quant_acts.relu_1", "quant_acts.sigmoid", "quant_acts.cat"} <= acts
    assert "quant_acts.mul" not in acts and q.head.input_quantizer is not None  # the product is read by head alone
    quantizers = [m for m in q.modules() if isinstance(m, lowbit.quantizers.Quantizer) and m.bits == 8]
    labels = [m.label for m in quantizers if not m.label.endswith(".weight")]
    assert len(labels) == len(set(labels))


def test_the_export_runs_every_conv_and_join_as_an_integer_op(tmp_path):
    model, q = calibrated_block()
    x = torch.randn(4, 4, 8, 8)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    session = ort.InferenceSession(to_onnx(q, x[:1]).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    ops = collections.Counter(n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node)
    assert ops["QLinearConv"] == 4 and ops["Conv"] == 0
    assert ops["QLinearAdd"] == 1 and ops["QLinearConcat"] == 1 and ops["QLinearMul"] == 1
    with torch.no_grad():
        expected = q(x).numpy()
    np.testing.assert_allclose(out, expected, atol=0.05)


def test_mac_and_weight_fractions_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)).eval()
    report = lowbit.quantize_report(model, {"weight": "binary", "first": "same", "last": "float"},
                                    example_input=(1, 3, 8, 8))
    conv_macs, linear_macs = 4 * 6 * 6 * 3 * 9, 10 * 144
    assert report.mac_fraction == pytest.approx(conv_macs / (conv_macs + linear_macs))
    assert report.weight_fraction == pytest.approx(108 / (108 + 4 + 1440 + 10))
    assert report.kept_float == ["3"] and "kept float by the config: 3" in str(report)


def test_layers_that_arrive_quantized_count_in_the_fractions():
    """A quantization-aware checkpoint quantized again: its quantized layers stay and count as quantized MACs."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)).eval()
    config = {"weight": "binary", "first": "same", "last": "float"}
    once = lowbit.quantize_report(model, config, example_input=(1, 3, 8, 8))
    again = lowbit.quantize_report(once.model, config, example_input=(1, 3, 8, 8))
    assert again.converted == [] and again.already_quantized == ["0"] and once.already_quantized == []
    assert again.mac_fraction == pytest.approx(once.mac_fraction) and 0 < once.mac_fraction < 1
    assert again.weight_fraction == pytest.approx(once.weight_fraction)
    assert str(again).startswith("quantized 0 layer(s), 1 already quantized (")


def test_leaves_stay_whole_and_are_reported():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    model = nn.Sequential(nn.Linear(3, 3), Branchy(), nn.Linear(3, 2))
    with pytest.raises(UnsupportedLayerError, match="leaves="):
        lowbit.quantize(model, "w8a8")
    with pytest.warns(UserWarning, match=r"1 \(Branchy runs in float\)"):
        report = lowbit.quantize_report(model, "w8a8", leaves=["1"])
    assert report.converted == ["0", "2"]


def test_an_example_input_that_does_not_fit_names_the_shape():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    with pytest.raises(lowbit.errors.ShapeMismatchError, match=r"example input of shape \[1, 3, 9, 9\]"):
        lowbit.quantize_report(model, "w8a8", example_input=(1, 3, 9, 9))


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a rank check, F.batch_norm on its own statistics, then an activation."""

    def __init__(self, channels):
        super().__init__(channels)
        self.act = nn.ReLU()

    def forward(self, x):
        torch._assert(x.ndim == 4, "expected NCHW")
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, self.eps)
        return self.act(x)


def test_a_functional_batch_norm_after_a_conv_folds_or_trains_as_a_module():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with torch.no_grad():
        for _ in range(3):
            model.train()(torch.randn(8, 3, 8, 8))
    model.eval()
    report = lowbit.quantize_report(model, NOTHING)
    assert report.folded == ["1.batch_norm"] and report.unsupported == []
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(report.model(x), model(x), rtol=1e-5, atol=1e-5)
    training = lowbit.quantize(model.train(), "w8a8")  # quantization-aware: a module that updates its statistics
    assert isinstance(training.get_submodule("1.batch_norm"), nn.BatchNorm2d)
    before = training.get_submodule("1.batch_norm").running_mean.clone()
    training(torch.randn(8, 3, 8, 8))
    assert not torch.equal(training.get_submodule("1.batch_norm").running_mean, before)


class KeywordSpotter(nn.Module):
    """An audio net: Conv1d stem with batch norm, a depthwise dilated Conv1d with a residual add, a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv1d(8, 16, 5, padding=2)
        self.bn = nn.BatchNorm1d(16)
        self.depthwise = nn.Conv1d(16, 16, 3, padding=2, dilation=2, groups=16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        return self.fc(F.relu(self.depthwise(x) + x).mean(-1))


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1)
        self.out = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.out(F.relu(self.up(x)))


@pytest.mark.parametrize("model, shape", [(KeywordSpotter, (4, 8, 32)), (Decoder, (4, 4, 6, 6))])
def test_conv1d_and_transposed_conv_nets_quantize_whole(model, shape, tmp_path):
    torch.manual_seed(0)
    float_model = model()
    with torch.no_grad():
        for _ in range(3):
            float_model.train()(torch.randn(*shape))
    report = lowbit.quantize_report(float_model.eval(), "w8a8", example_input=(1, *shape[1:]))
    assert report.mac_fraction == 1.0 and report.unsupported == []
    assert len(report.converted) == sum(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear))
                                        for m in float_model.modules())
    quantized = lowbit.calibrate(report.model, [torch.randn(*shape) for _ in range(2)])
    x = torch.randn(*shape)
    lowbit.save(quantized, tmp_path / "m.lowbit", x[:1])
    with torch.no_grad():
        expected = quantized(x)
        assert torch.equal(lowbit.load(tmp_path / "m.lowbit")(x), expected)
    session = ort.InferenceSession(to_onnx(quantized, x[:1]).SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(out, expected.numpy(), atol=0.05)
