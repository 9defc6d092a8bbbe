"""ONNX export: checker, onnxruntime parity (QDQ w8a8 per tensor / per channel, binary as float), int8 kernels
after onnxruntime's QDQ fusion, input-channel padding of int8 convs, rounding against QuantizeLinear, and the
errors for what cannot export."""

from __future__ import annotations

import argparse

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper
from torch import nn

import lowbit
from lowbit.config import uniform_act, uniform_weight
from lowbit.errors import ConfigError, UnsupportedLayerError
from lowbit.export import export_command, export_onnx, to_onnx
from lowbit.export.onnx import local_vnni, uint8_weight_layers
from lowbit.models import get_model
from lowbit.nn import QuantAct

#: stated parity tolerance, as a fraction of the batch's largest |logit|: every logit within 2% at 8 bits (5% at
#: 4-5 bits), the mean within 0.5%, argmax equal wherever the top two logits differ by more than twice the bound.
#: Codes differ by one where a value lies within a float32 rounding of a tie (x / s vs x * (1/s)) or within
#: half a bias step s_x s_w / 2 of a rounding boundary (int32 bias codes), moving downstream values by one step.
LOGIT_TOLERANCE = 0.02
LOW_BIT_TOLERANCE = 0.05
MEAN_TOLERANCE = 0.005


def _session(proto: onnx.ModelProto, optimized: str | None = None, fuse: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if optimized:
        options.optimized_model_filepath = optimized
    if not fuse:  # the graph as written: QDQ pairs and float ops, no int8 kernels
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _run(proto: onnx.ModelProto, x: torch.Tensor, fuse: bool = True) -> np.ndarray:
    session = _session(proto, fuse=fuse)
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _check_parity(model: nn.Module, proto: onnx.ModelProto, x: torch.Tensor, bound: float = LOGIT_TOLERANCE) -> None:
    with torch.no_grad():
        ref = model(x).numpy()
    got = _run(proto, x)
    tolerance = bound * np.abs(ref).max()
    np.testing.assert_allclose(got, ref, rtol=0, atol=tolerance)
    assert np.abs(got - ref).mean() <= MEAN_TOLERANCE * np.abs(ref).max()
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * tolerance
    assert (got.argmax(1) == ref.argmax(1))[clear].all()


def _calibrated(model: nn.Module, config, seed: int = 0, shape=(1, 28, 28)) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    quantized = lowbit.quantize(model.eval(), config)
    lowbit.calibrate(quantized, [torch.randn(32, *shape)])
    return quantized.eval(), torch.randn(16, *shape)


def _small_cnn(in_channels: int = 1) -> nn.Module:
    model = get_model("vgg-small", in_channels=in_channels, layers=(8, "M", 16, "M"), hidden=32)
    with torch.no_grad():  # batch-norm statistics and a negative gamma, so folding is exercised
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(-1.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))


PER_TENSOR = {"weight": {"name": "uniform", "bits": 8, "symmetric": True, "per_channel": False},
              "input": uniform_act(8), "first": "same", "last": "same"}


def _weight_dequantizers(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("weight.codes")]


def _op_types(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_checker_passes_on_written_file(tmp_path):
    model, x = _calibrated(_small_cnn(), "w8a8")
    path = export_onnx(model, tmp_path / "m.onnx", x[:1])
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def test_w8a8_per_channel_parity_and_int8_kernels(tmp_path):
    model, x = _calibrated(_small_cnn(), "w8a8")
    proto = to_onnx(model, x[:1])
    _check_parity(model, proto, x)
    weights = _weight_dequantizers(proto)
    assert weights and all(any(a.name == "axis" for a in n.attribute) for n in weights)
    _session(proto, str(tmp_path / "opt.onnx"))
    ops = _op_types(tmp_path / "opt.onnx")
    assert "QLinearConv" in ops and "QGemm" in ops
    # batch norm folded, ReLU dropped into the int8 kernels, max pool on the int8 tensor, logits straight from QGemm
    assert not ops & {"Conv", "Gemm", "BatchNormalization", "Relu", "MaxPool", "DequantizeLinear"}


def _first_conv_codes(proto: onnx.ModelProto) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in proto.graph.initializer if t.name == "features.0.weight.codes")


#: 7-bit weights: codes within +-64, which the default weight_type="safe" keeps in int8 (no saturation)
W7A8 = {"weight": uniform_weight(7), "input": uniform_act(8), "first": "same", "last": "same"}


@pytest.mark.parametrize("in_channels", [1, 3])
def test_int8_conv_input_is_padded_to_four_zero_channels(in_channels):
    model, x = _calibrated(_small_cnn(in_channels), W7A8, shape=(in_channels, 28, 28))
    padded, plain = to_onnx(model, x[:1]), to_onnx(model, x[:1], channel_multiple=1)
    pads = [n for n in padded.graph.node if n.op_type == "Pad"]
    assert len(pads) == 1 and not any(n.op_type == "Pad" for n in plain.graph.node)  # the 8-channel conv is not
    quantize = next(n for n in padded.graph.node if n.op_type == "QuantizeLinear")
    assert quantize.input[0] == pads[0].output[0]  # padded before quantization, so onnxruntime still fuses it
    codes, plain_codes = _first_conv_codes(padded), _first_conv_codes(plain)
    assert codes.dtype == np.int8 and codes.shape == (8, 4, 3, 3) and plain_codes.shape == (8, in_channels, 3, 3)
    np.testing.assert_array_equal(codes[:, :in_channels], plain_codes)
    assert not codes[:, in_channels:].any()  # zero codes of zero-point-0 weights: the extra channels add 0
    _check_parity(model, padded, x)
    # the graphs as written compute the same sums (up to float32 summation order)
    np.testing.assert_allclose(_run(padded, x, fuse=False), _run(plain, x, fuse=False), rtol=1e-5, atol=1e-5)


def _codes_and_zero_points(proto: onnx.ModelProto, layer: str) -> tuple[np.ndarray, np.ndarray]:
    stored = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    return stored[f"{layer}.weight.codes"], stored[f"{layer}.weight.zero_point"]


@pytest.mark.parametrize("weight_type, config, unsigned", [
    ("safe", "w8a8", True), ("safe", W7A8, False), ("int8", "w8a8", False), ("uint8", W7A8, True)])
def test_weight_type_stores_the_same_values_as_int8_or_uint8(weight_type, config, unsigned):
    model, x = _calibrated(_small_cnn(), config)
    proto = to_onnx(model, x[:1], weight_type=weight_type)
    reference = to_onnx(model, x[:1], weight_type="int8", channel_multiple=1)
    layers = [t.name.removesuffix(".weight.codes") for t in reference.graph.initializer
              if t.name.endswith(".weight.codes")]
    assert len(layers) == 4  # two convs, two linears
    for layer in layers:
        codes, zero = _codes_and_zero_points(proto, layer)
        signed, signed_zero = _codes_and_zero_points(reference, layer)
        assert codes.dtype == (np.uint8 if unsigned else np.int8) and signed.dtype == np.int8
        if unsigned:  # codes and zero points 128 higher: (q + 128) - (z + 128) = q - z
            np.testing.assert_array_equal(codes.astype(np.int16) - 128, signed)
            np.testing.assert_array_equal(zero.astype(np.int16) - 128, signed_zero)
    assert any(n.op_type == "Pad" for n in proto.graph.node) != unsigned  # the symmetric kernel needs int8
    assert uint8_weight_layers(proto) == (layers if unsigned else [])  # recorded in the model's metadata
    np.testing.assert_allclose(_run(proto, x, fuse=False), _run(reference, x, fuse=False), rtol=1e-5, atol=1e-5)
    if unsigned or config == W7A8:  # int8 codes past +-64 may saturate on x86 without VNNI
        _check_parity(model, proto, x)


def test_safe_weights_do_not_saturate_the_int8_kernels(tmp_path):
    """Every weight code at +-127 and every input code at 255: the worst case for int16 pair sums."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 8, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.where(torch.arange(8 * 256).reshape(8, 256) % 3 == 0, -1.0, 1.0))
    model, _ = _calibrated(model, {"weight": uniform_weight(8), "input": uniform_act(8),
                                   "first": "same", "last": "same"}, shape=(256,))
    x = torch.full((4, 256), 10.0)  # above the calibrated range: every input code is the largest, 255
    proto = to_onnx(model, x[:1])
    assert _codes_and_zero_points(proto, "1")[0].dtype == np.uint8
    _session(proto, str(tmp_path / "opt.onnx"))
    assert "QGemm" in _op_types(tmp_path / "opt.onnx")  # the integer kernel runs
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(_run(proto, x), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_bad_weight_type_raises_config_error():
    model, x = _calibrated(_mlp(), "w8a8")
    with pytest.raises(ConfigError, match="weight_type must be one of safe, int8, uint8"):
        to_onnx(model, x[:1], weight_type="int7")


ASYMMETRIC = {"weight": {"name": "uniform", "bits": 8, "symmetric": False, "per_channel": True},
              "input": uniform_act(8), "first": "same", "last": "same"}


@pytest.mark.parametrize("conv, shape, config", [
    (nn.Conv2d(6, 6, 3, groups=2), (6, 8, 8), "w8a8"),  # grouped
    (nn.Conv2d(1, 4, 5), (1, 8, 8), "w8a8"),  # more than 3x3 taps
    (nn.Conv2d(1, 4, 3), (1, 8, 8), ASYMMETRIC),  # uint8 weights with zero points: not the symmetric kernel
    (nn.Conv2d(1, 4, 3), (1, 8, 8), {"weight": uniform_weight(8), "first": "same", "last": "same"}),  # float input
])
def test_convs_off_the_symmetric_int8_kernel_are_not_padded(conv, shape, config):
    model, x = _calibrated(nn.Sequential(conv), config, shape=shape)
    proto = to_onnx(model, x[:1])
    assert not any(n.op_type == "Pad" for n in proto.graph.node)
    _check_parity(model, proto, x)


def test_float_model_is_not_padded():
    model = _small_cnn().eval()
    assert not any(n.op_type == "Pad" for n in to_onnx(model, torch.zeros(1, 1, 28, 28)).graph.node)


@pytest.mark.parametrize("bad", [0, -4, True, 2.0, "4"])
def test_bad_channel_multiple_raises_config_error(bad):
    model, x = _calibrated(_mlp(), "w8a8")
    with pytest.raises(ConfigError, match="channel_multiple must be a positive integer"):
        to_onnx(model, x[:1], channel_multiple=bad)


def test_w8a8_per_tensor_parity_and_int8_kernels(tmp_path):
    model, x = _calibrated(_mlp(), PER_TENSOR)
    proto = to_onnx(model, x[:1])
    _check_parity(model, proto, x)
    weights = _weight_dequantizers(proto)
    assert len(weights) == 2 and not any(a.name == "axis" for n in weights for a in n.attribute)
    _session(proto, str(tmp_path / "opt.onnx"))
    assert "QGemm" in _op_types(tmp_path / "opt.onnx")


def test_weight_initializers_are_the_quantizer_codes():
    model, x = _calibrated(_mlp(), "w8a8")
    proto = to_onnx(model, x[:1])
    stored = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    layer = model.get_submodule("1")
    enc = layer.weight_quantizer.encode(layer.weight.detach())
    assert stored["1.weight.codes"].dtype == np.uint8  # 8-bit codes past +-64: uint8 under weight_type="safe"
    np.testing.assert_array_equal(stored["1.weight.codes"].astype(np.int64) - 128, enc.codes.numpy())
    np.testing.assert_array_equal(stored["1.weight.zero_point"], 128)
    np.testing.assert_array_equal(stored["1.weight.scale"], enc.params["scale"].numpy())
    # int32 bias codes with scale s_x s_w, as onnxruntime's QDQ fusion needs
    s_x = float(stored["_0.input.scale"])  # the input is quantized before the flatten (node _0) that feeds layer 1
    np.testing.assert_array_equal(stored["1.bias.scale"], np.float32(s_x) * enc.params["scale"].numpy())
    np.testing.assert_array_equal(stored["1.bias.codes"],
                                  np.round(layer.bias.detach().double().numpy() / stored["1.bias.scale"]))


def test_binary_model_exports_as_float_and_matches():
    model = get_model("bnn-mlp", width=32, depth=2).eval()
    model, x = _calibrated(model, "bnn", seed=2)
    proto = to_onnx(model, x[:1])
    assert "Where" in {n.op_type for n in proto.graph.node}  # sign activations
    binary = [numpy_helper.to_array(t) for t in proto.graph.initializer
              if t.name.endswith(".weight") and t.data_type == onnx.TensorProto.FLOAT and t.dims[0] == 32]
    assert binary and all(set(np.unique(w)) <= {-1.0, 1.0} for w in binary)  # dequantized float weights
    with torch.no_grad():
        ref = model(x).numpy()
    got = _run(proto, x)
    # the same float32 values enter every sign; only a pre-activation within float32 rounding of 0 could flip
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_int4_weights_at_opset_21_match():
    model, x = _calibrated(_mlp(), {"weight": {"name": "uniform", "bits": 4, "symmetric": True, "per_channel": True},
                                    "input": uniform_act(4), "first": "same", "last": "same"})
    proto = to_onnx(model, x[:1], int4=True)
    types = {t.name: t.data_type for t in proto.graph.initializer}
    assert types["1.weight.codes"] == onnx.TensorProto.INT4 and types["1.input.zero_point"] == onnx.TensorProto.UINT4
    _check_parity(model, proto, x, LOW_BIT_TOLERANCE)
    _check_parity(model, to_onnx(model, x[:1]), x, LOW_BIT_TOLERANCE)  # the same codes in int8 containers


def test_narrow_activation_range_is_clipped_before_quantize():
    model, x = _calibrated(_mlp(), {**PER_TENSOR, "weight": "uniform", "input": uniform_act(5)})
    proto = to_onnx(model, x[:1])
    assert "Clip" in {n.op_type for n in proto.graph.node}
    _check_parity(model, proto, x, LOW_BIT_TOLERANCE)


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_subnormal=True, width=32)


@settings(max_examples=25, deadline=None)
@given(st.lists(finite, min_size=1, max_size=64), st.floats(min_value=-4, max_value=4), st.floats(0.01, 4))
def test_quantize_linear_matches_lowbit_within_one_code(values, lo, width):
    """ONNX QuantizeLinear computes round(x / s), lowbit round(x * (1/s)): at most one code apart, at ties only."""
    act = nn.Sequential(QuantAct({"name": "uniform", "bits": 8, "dynamic": False}))
    act.train()
    act(torch.tensor([lo, lo + width]))
    act.eval()
    x = torch.tensor([0.0, *values], dtype=torch.float32).reshape(1, -1)
    proto = to_onnx(act, x)
    scale = float(act[0].quantizer.qparams(x)[0])
    with torch.no_grad():
        ref = act(x).numpy()
    got = _run(proto, x)
    steps = np.abs(got - ref) / scale
    assert steps.max() <= 1 + 1e-3
    off = steps > 0.5
    quotient = x.numpy() / np.float32(scale)
    assert np.all(np.abs(np.abs(quotient - np.floor(quotient)) - 0.5)[off] < 1e-3)  # only at ties


def test_export_command_writes_a_runnable_file(tmp_path):
    model, x = _calibrated(get_model("lenet5"), "w8a8")
    lowbit.save(model, tmp_path / "m.lowbit", example_input=x[:1])
    parser = argparse.ArgumentParser()
    export_command.add_arguments(parser)
    output = export_command.run(parser.parse_args([str(tmp_path / "m.lowbit"), "--out", str(tmp_path / "m.onnx")]))
    assert output.data["path"] == str(tmp_path / "m.onnx")
    _check_parity(model, onnx.load(str(tmp_path / "m.onnx")), x)


class _Elu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.ELU()

    def forward(self, x):
        return self.act(self.fc(x))


def test_unsupported_layer_raises_named_error():
    with pytest.raises(UnsupportedLayerError, match="'act'.*ELU"):
        to_onnx(_Elu(), torch.zeros(1, 4))


def test_log_activation_and_dynamic_linear_range_raise_named_error():
    log = nn.Sequential(QuantAct({"name": "log2", "bits": 4}))
    with pytest.raises(UnsupportedLayerError, match="log2.*'0'"):
        to_onnx(log.eval(), torch.zeros(1, 4))
    dynamic = nn.Sequential(QuantAct({"name": "linear", "bits": 8, "dynamic": True}))
    with pytest.raises(UnsupportedLayerError, match="dynamic"):
        to_onnx(dynamic.eval(), torch.zeros(1, 4))


def test_a_dynamic_per_tensor_range_exports_bit_for_bit():
    model = nn.Sequential(QuantAct({"name": "uniform", "bits": 8, "dynamic": True})).eval()
    x = torch.randn(3, 4, 5) * 7
    session = ort.InferenceSession(to_onnx(model, x[:1]).SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.array_equal(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0], model(x).numpy())


def test_old_opsets_raise_config_error():
    model, x = _calibrated(_mlp(), "w8a8")
    with pytest.raises(ConfigError, match="int4.*opset >= 21"):
        to_onnx(model, x[:1], opset=20, int4=True)
    with pytest.raises(ConfigError, match="per-channel.*opset >= 13"):
        to_onnx(model, x[:1], opset=12)
    with pytest.raises(ConfigError, match="opset must be"):
        to_onnx(model, x[:1], opset=9)
    per_tensor, _ = _calibrated(_mlp(), PER_TENSOR)
    _check_parity(per_tensor, to_onnx(per_tensor, x[:1], opset=12), x)


def _binary_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardtanh(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.Hardtanh(),
                         nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=2), nn.Hardtanh(), nn.Flatten(),
                         nn.Linear(16 * 4 * 4, 13), nn.BatchNorm1d(13), nn.Hardtanh(), nn.Linear(13, 10))


@pytest.mark.parametrize("preset", ["bwn", {"weight": {"name": "binary"}, "first": "same", "last": "same"},
                                    "bnn", "xnor"])
def test_custom_binary_ops_store_sign_bits_and_match_the_float_export(preset):
    from onnx.reference import ReferenceEvaluator

    from lowbit.export.binary_ops import reference_ops, unpack_signs

    torch.manual_seed(0)
    model = _binary_cnn().eval()
    x = torch.randn(16, 1, 8, 8)
    model = lowbit.quantize(model, preset)
    lowbit.calibrate(model, [x])
    model.eval()
    custom = to_onnx(model, x[:1], binary_ops="custom")
    ops = [n for n in custom.graph.node if n.domain == "ai.lowbit"]
    assert {n.op_type for n in ops} == {"BinaryConv", "BinaryGemm"}
    assert {(o.domain, o.version) for o in custom.opset_import} == {("", 21), ("ai.lowbit", 1)}
    stored = {t.name: numpy_helper.to_array(t) for t in custom.graph.initializer}
    for node in ops:  # one bit per weight, and bits x scale are the torch layer's quantized weights
        layer = dict(model.named_modules())[node.input[1].removesuffix(".weight.signs")]
        with torch.no_grad():
            weight = layer.weight_quantizer(layer.weight).reshape(layer.weight.shape[0], -1).numpy()
        signs = stored[node.input[1]]
        assert signs.dtype == np.uint8 and signs.shape == (weight.shape[0], -(-weight.shape[1] // 8))
        np.testing.assert_array_equal(unpack_signs(signs, weight.shape[1]) * stored[node.input[2]][:, None], weight)
    with torch.no_grad():
        ref = model(x).numpy()
    got = ReferenceEvaluator(custom, new_ops=reference_ops()).run(None, {custom.graph.input[0].name: x.numpy()})[0]
    if any(n.op_type == "Where" for n in custom.graph.node):
        # sign activations: a pre-activation within float32 rounding of 0 may flip one sign and move its row
        assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9
    else:
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
        np.testing.assert_allclose(got, _run(to_onnx(model, x[:1]), x), rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_custom_binary_ops_leave_other_layers_standard_and_check_their_argument():
    model, x = _calibrated(_mlp(), "w8a8")
    assert to_onnx(model, x[:1], binary_ops="custom") == to_onnx(model, x[:1])  # no binary weight: no change
    with pytest.raises(ConfigError, match="binary_ops"):
        to_onnx(model, x[:1], binary_ops="bits")


def test_local_vnni_reads_the_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"
                    "processor\t: 1\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni amx_int8\n")
    assert local_vnni(info) == ["amx_int8", "avx512_vnni"]
    info.write_text("flags\t\t: fpu sse2 avx2 fma\n")
    assert local_vnni(info) == []
    assert local_vnni(tmp_path / "missing") is None
