"""QuantConv1d and QuantConvTranspose2d through the whole stack: the float layers bit for bit, w8a8 calibrated, saved,
loaded from the file alone, run by the Engine and onnxruntime; hostile stored attributes refused alike."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lowbit
from lowbit.config import PRESETS
from lowbit.errors import ConfigError, FormatError
from lowbit.export.onnx import to_onnx
from lowbit.format.container import pack_safetensors, parse_safetensors
from lowbit.nn import QuantConv1d, QuantConv2d, QuantConvTranspose2d, QuantLinear, label_quantizers
from lowbit.ops.conv import conv1d, conv_transpose2d, transposed_weight_refusal
from lowbit.quantizers import get
from lowbit.runtime import Engine

W8 = PRESETS["w8a8"]["weight"]
A8 = PRESETS["w8a8"]["input"]


# ---------------------------------------------------------------- the float layers, bit for bit


@pytest.mark.parametrize("kwargs", [
    {}, {"stride": 2, "padding": 2, "dilation": 2}, {"groups": 3, "bias": False}, {"groups": 6, "padding": 1},
    {"padding": 2, "padding_mode": "circular"}, {"padding": 1, "padding_mode": "reflect"}, {"padding": "same"},
])
def test_quant_conv1d_without_quantizers_is_the_float_layer(kwargs):
    torch.manual_seed(0)
    float_layer = nn.Conv1d(6, 12, 3, **kwargs)
    layer = QuantConv1d.from_float(float_layer)
    built = QuantConv1d(6, 12, 3, **kwargs)
    built.load_state_dict(float_layer.state_dict())
    assert layer.state_dict().keys() == float_layer.state_dict().keys() == built.state_dict().keys()
    x = torch.randn(2, 6, 17, requires_grad=True)
    expected = float_layer(x)
    for candidate in (layer, built):
        y = candidate(x)
        assert torch.equal(y, expected)
        grad = torch.autograd.grad(y.sum(), x)[0]
        assert torch.equal(grad, torch.autograd.grad(expected.sum(), x, retain_graph=True)[0])


@pytest.mark.parametrize("kwargs", [
    {}, {"stride": 2, "padding": 1, "output_padding": 1}, {"stride": 2, "groups": 2, "output_padding": 1},
    {"dilation": 2, "padding": 2, "bias": False}, {"stride": (2, 3), "output_padding": (0, 2), "groups": 4},
])
def test_quant_conv_transpose2d_without_quantizers_is_the_float_layer(kwargs):
    torch.manual_seed(0)
    float_layer = nn.ConvTranspose2d(4, 8, 3, **kwargs)
    layer = QuantConvTranspose2d.from_float(float_layer)
    built = QuantConvTranspose2d(4, 8, 3, **kwargs)
    built.load_state_dict(float_layer.state_dict())
    assert layer.state_dict().keys() == float_layer.state_dict().keys() == built.state_dict().keys()
    x = torch.randn(2, 4, 5, 6)
    for candidate in (layer, built):
        assert torch.equal(candidate(x), float_layer(x))
    size = [s + 1 for s in float_layer(x).shape[2:]] if kwargs.get("stride") else None
    if size is not None and not kwargs.get("output_padding"):
        assert torch.equal(layer(x, size), float_layer(x, size))


def test_from_float_keeps_mode_device_dtype_and_requires_grad():
    source = nn.ConvTranspose2d(2, 4, 3, stride=2, output_padding=1, dtype=torch.float64).eval()
    source.bias.requires_grad_(False)
    layer = QuantConvTranspose2d.from_float(source, weight_quantizer=W8)
    assert not layer.training and layer.weight.dtype == torch.float64 and not layer.bias.requires_grad
    assert (layer.stride, layer.output_padding) == ((2, 2), (1, 1))
    conv = QuantConv1d.from_float(nn.Conv1d(2, 4, 5, stride=3, dilation=2, groups=2), input_quantizer=A8)
    assert (conv.stride, conv.dilation, conv.groups, conv.weight_quantizer) == ((3,), (2,), 2, None)
    assert conv.input_quantizer == get(A8)


def test_label_quantizers_names_the_new_layers():
    model = nn.Sequential(QuantConv1d(2, 2, 1, weight_quantizer=W8, input_quantizer=A8),
                          nn.Sequential(QuantConvTranspose2d(2, 2, 1, output_quantizer=A8)))
    label_quantizers(model)
    assert (model[0].weight_quantizer.label, model[0].input_quantizer.label) == ("0.weight", "0.input")
    assert model[1][0].output_quantizer.label == "1.0.output"


# ---------------------------------------------------------------- per-channel weights of the transposed conv


def test_transposed_per_channel_uniform_scales_follow_the_output_channel():
    layer = QuantConvTranspose2d(4, 6, 3, groups=2, weight_quantizer=W8)
    assert layer.weight_quantizer.axis == 1
    enc = layer.weight_quantizer.encode(layer.weight.detach())
    assert enc.meta["axis"] == 1 and enc.params["scale"].shape == (3,)  # C_out / groups
    w = layer.weight.detach()
    expected = w.abs().amax(dim=(0, 2, 3)) / 127
    torch.testing.assert_close(enc.params["scale"], expected, rtol=0, atol=1e-9)
    later = QuantConvTranspose2d(4, 6, 3)
    later.weight_quantizer = get(W8)  # assigned after construction: moved to axis 1 as well
    assert later.weight_quantizer.axis == 1
    assert QuantConv1d(4, 6, 3, weight_quantizer=W8).weight_quantizer.axis == 0


@pytest.mark.parametrize("spec", [
    {"name": "lsq", "bits": 4, "per_channel": True}, {"name": "ternary", "per_channel": True},
    {"name": "xnor", "role": "weight"},
])
def test_transposed_weight_quantizers_fixed_on_axis_0_are_refused(spec):
    with pytest.raises(ConfigError, match="input channel"):
        QuantConvTranspose2d(4, 6, 3, weight_quantizer=spec)
    layer = QuantConvTranspose2d(4, 6, 3)
    with pytest.raises(ConfigError, match="input channel"):
        layer.weight_quantizer = get(spec)
    with pytest.raises(ConfigError, match="input channel"):
        QuantConvTranspose2d.from_float(nn.ConvTranspose2d(4, 6, 3), weight_quantizer=spec)
    assert transposed_weight_refusal(get(spec).spec()) is not None  # the file's validation says the same


@pytest.mark.parametrize("spec", [
    {"name": "lsq", "bits": 4}, {"name": "ternary"}, {"name": "binary"}, W8, {"name": "kmeans", "bits": 2},
])
def test_per_tensor_and_uniform_weights_are_accepted_by_the_transposed_conv(spec):
    layer = QuantConvTranspose2d(4, 6, 3, weight_quantizer=spec)
    assert layer(torch.randn(1, 4, 3, 3)).shape == (1, 6, 5, 5)
    assert transposed_weight_refusal(get(spec).spec()) is None


def test_the_layer_and_the_file_validation_refuse_the_same_transposed_weight_quantizers():
    from lowbit.ops.specs import SPECS
    from lowbit.quantizers import names

    for name in names():
        variants = [{"name": name}] + ([{"name": name, "per_channel": True}] if "per_channel" in SPECS[name] else [])
        variants += [{"name": name, "role": role} for role in ("weight", "activation") if "role" in SPECS[name]]
        for spec in variants:
            refused = transposed_weight_refusal(get(spec).spec()) is not None
            try:
                QuantConvTranspose2d(2, 2, 1, weight_quantizer=spec)
            except ConfigError:
                assert refused, spec
            else:
                assert not refused, spec


def test_every_quantized_layer_has_a_document_type_and_an_op():
    from lowbit.nn import QUANT_LAYERS
    from lowbit.ops import LAYER_OPS, REGISTRY
    from lowbit.ops.validate import LAYER_TYPES

    assert [cls.__name__ for cls in QUANT_LAYERS] == list(LAYER_TYPES)
    assert set(LAYER_OPS) <= set(REGISTRY) and all(REGISTRY[op].module for op in LAYER_OPS)


# ---------------------------------------------------------------- numpy halves against torch


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.sampled_from([1, 2]), st.integers(1, 3), st.integers(1, 3),
       st.integers(0, 2), st.integers(1, 2), st.integers(0, 2), st.integers(1, 5), st.integers(1, 5))
def test_numpy_conv_transpose2d_follows_torch(cg, og, groups, kernel, stride, padding, dilation, extra, h, w):
    output_padding = min(extra, max(stride, dilation) - 1)
    rng = np.random.default_rng(kernel * 31 + h)
    x = rng.standard_normal((2, cg * groups, h, w)).astype(np.float32)
    weight = rng.standard_normal((cg * groups, og, kernel, kernel + 1)).astype(np.float32)
    bias = rng.standard_normal(og * groups).astype(np.float32)
    try:
        want = F.conv_transpose2d(torch.from_numpy(x), torch.from_numpy(weight), torch.from_numpy(bias), stride,
                                  padding, output_padding, groups, dilation).numpy()
    except RuntimeError:  # the output would be empty
        return
    got = conv_transpose2d(x, weight, bias, [stride] * 2, [padding] * 2, [output_padding] * 2, [dilation] * 2, groups)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.sampled_from([1, 2, 3]), st.integers(1, 4), st.integers(1, 3), st.integers(0, 3),
       st.integers(1, 3), st.integers(1, 20))
def test_numpy_conv1d_follows_torch(cg, groups, kernel, stride, padding, dilation, length):
    rng = np.random.default_rng(length)
    x = rng.standard_normal((2, cg * groups, length)).astype(np.float32)
    weight = rng.standard_normal((2 * groups, cg, kernel)).astype(np.float32)
    try:
        want = F.conv1d(torch.from_numpy(x), torch.from_numpy(weight), None, stride, padding, dilation, groups)
    except RuntimeError:  # the kernel does not fit
        return
    got = conv1d(x, weight, None, [stride], [padding], [dilation], groups)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- w8a8 through save, load, the Engine and ONNX


class Net(nn.Module):
    """A sequence [N, 3, 16] through two conv1d (the second grouped and dilated), read as a 4x4 map, upsampled by a
    grouped transposed conv to 8x8, then a 1x1 conv and a linear head."""

    def __init__(self, weight=W8, act=A8, transposed_weight=W8):
        super().__init__()
        q = {"weight_quantizer": weight, "input_quantizer": act}
        self.conv1 = QuantConv1d(3, 8, 3, padding=1, **q)
        self.conv2 = QuantConv1d(8, 8, 3, padding=2, dilation=2, groups=4, **q)
        self.up = QuantConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1, groups=2,
                                       weight_quantizer=transposed_weight, input_quantizer=act)
        self.mix = QuantConv2d(6, 4, 1, **q)
        self.head = QuantLinear(4 * 8 * 8, 5, **q)

    def forward(self, x):
        y = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        y = torch.relu(self.up(y.view(-1, 8, 4, 4)))
        return self.head(torch.relu(self.mix(y)).flatten(1))


@pytest.fixture(scope="module")
def w8a8(tmp_path_factory) -> tuple[nn.Module, torch.Tensor, Path]:
    torch.manual_seed(0)
    model = Net()
    generator = torch.Generator().manual_seed(1)
    lowbit.calibrate(model, [torch.randn(16, 3, 16, generator=generator) for _ in range(4)])
    model.eval()
    x = torch.randn(32, 3, 16, generator=torch.Generator().manual_seed(2))
    path = tmp_path_factory.mktemp("conv_family") / "net.lowbit"
    lowbit.save(model, path, x[:1])
    return model, x, path


def test_w8a8_loads_from_the_file_alone_bit_for_bit(w8a8):
    model, x, path = w8a8
    loaded = lowbit.load(path)
    ops = [node["op"] for node in loaded.ir["nodes"]]
    assert ops.count("conv1d") == 2 and ops.count("conv_transpose2d") == 1
    assert type(loaded.up) is QuantConvTranspose2d and type(loaded.conv2) is QuantConv1d
    assert loaded.up.weight_quantizer.axis == 1
    layers = json.loads(parse_safetensors(path.read_bytes())[1]["lowbit"])["model"]["layers"]
    assert {layers[n]["type"] for n in ("conv1", "up")} == {"QuantConv1d", "QuantConvTranspose2d"}
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(loaded(x), expected)
    lowbit.save(loaded, path.with_name("again.lowbit"), x[:1])  # saved again: the same bytes
    assert path.with_name("again.lowbit").read_bytes() == path.read_bytes()


def test_w8a8_runs_alike_in_the_engine(w8a8):
    model, x, path = w8a8
    with torch.no_grad():
        expected = model(x).numpy()
    got = Engine(path).run(x.numpy())
    scale = float(np.abs(expected).max())
    assert np.abs(got - expected).max() <= 0.02 * scale
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.95


def test_w8a8_exports_to_onnx_as_qdq_and_runs_alike_in_onnxruntime(w8a8):
    model, x, path = w8a8
    loaded = lowbit.load(path)
    proto = to_onnx(loaded, x[:1])
    onnx.checker.check_model(proto, full_check=True)
    nodes = {n.name: n for n in proto.graph.node}
    kinds = [n.op_type for n in proto.graph.node]
    assert kinds.count("ConvTranspose") == 1 and kinds.count("Conv") == 3
    transposed = next(n for n in proto.graph.node if n.op_type == "ConvTranspose")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in transposed.attribute}
    assert (attrs["strides"], attrs["pads"], attrs["output_padding"], attrs["group"]) == ([2, 2], [1, 1, 1, 1],
                                                                                          [1, 1], 2)
    weight_dq = nodes[transposed.input[1]]
    assert weight_dq.op_type == "DequantizeLinear"
    assert {a.name: a.i for a in weight_dq.attribute} == {"axis": 1}
    conv1 = next(n for n in proto.graph.node if n.op_type == "Conv")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in conv1.attribute}
    assert (attrs["kernel_shape"], attrs["pads"], attrs["strides"]) == ([3], [1, 1], [1])
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = model(x).numpy()
    cosine = (got * expected).sum() / np.linalg.norm(got) / np.linalg.norm(expected)
    assert cosine > 0.999
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.95


class Plain(nn.Module):
    """Float torch layers: a conv1d, its output read as a 2x7 map, a transposed conv."""

    def __init__(self):
        super().__init__()
        self.conv, self.up = nn.Conv1d(3, 4, 3), nn.ConvTranspose2d(4, 2, 2, stride=2)

    def forward(self, x):
        return self.up(self.conv(x).view(-1, 4, 2, 7))


def test_float_and_binary_weight_layers_run_alike_in_the_engine(tmp_path):
    torch.manual_seed(3)
    model = Net(weight={"name": "xnor", "role": "weight"}, act={"name": "binary"},
                transposed_weight={"name": "binary"}).eval()
    x = torch.randn(4, 3, 16)
    lowbit.save(model, tmp_path / "b.lowbit", x[:1])
    engine = Engine(tmp_path / "b.lowbit")
    assert engine.binary_layers == ["mix", "head"]  # conv1d and transposed convs run dequantized in numpy
    with torch.no_grad():
        expected = lowbit.load(tmp_path / "b.lowbit")(x).numpy()
        assert np.array_equal(expected, model(x).numpy())
    np.testing.assert_allclose(engine.run(x.numpy()), expected, rtol=1e-4, atol=1e-4)
    plain = Plain().eval()
    lowbit.save(plain, tmp_path / "f.lowbit", x[:1])
    loaded = lowbit.load(tmp_path / "f.lowbit")
    assert (type(loaded.conv), type(loaded.up)) == (nn.Conv1d, nn.ConvTranspose2d)
    with torch.no_grad():
        assert torch.equal(loaded(x), plain(x))
    np.testing.assert_allclose(Engine(tmp_path / "f.lowbit").run(x.numpy()), plain(x).detach().numpy(), atol=1e-5)


# ---------------------------------------------------------------- hostile stored graphs


def _document(path: Path) -> dict:
    return json.loads(parse_safetensors(path.read_bytes())[1]["lowbit"])


def _write(path: Path, document: dict, out: Path) -> Path:
    arrays, _, _ = parse_safetensors(path.read_bytes())
    out.write_bytes(pack_safetensors(dict(arrays), {"lowbit": json.dumps(document)}))
    return out


def _node(document: dict, module: str) -> dict:
    return next(n for n in document["graph"]["nodes"] if n.get("module") == module)


@pytest.mark.parametrize("module, key, value, match", [
    ("up", "stride", [2**16, 2**16], "exceeds"),
    ("up", "stride", [2**17, 1], "stride must be a list of 2 ints from 1 to 65536"),
    ("up", "groups", 3, "divisible by groups 3"),
    ("up", "groups", 0, "groups must be an int from 1"),
    ("up", "output_padding", [2, 1], "output_padding 2 must be smaller than its stride 2 or its dilation 1"),
    ("up", "output_padding", [0], "output_padding must be a list of 2 ints"),
    ("up", "padding", [9, 9], "is empty once cropped"),
    ("up", "dilation", [2**16, 2**16], "exceeds"),
    ("conv2", "groups", 3, "divisible by groups 3"),
    ("conv2", "groups", True, "groups must be an int"),
    ("conv2", "stride", [0], "stride must be a list of 1 ints from 1"),
    ("conv2", "stride", [2, 2], "stride must be a list of 1 ints"),
    ("conv2", "padding", [2**16], "exceeds the spatial size cap"),
    ("conv2", "dilation", [2**10], "does not fit"),
    ("conv1", "padding", [3], "records the output shape"),
])
def test_hostile_attributes_are_refused_alike(w8a8, tmp_path, module, key, value, match):
    _, _, path = w8a8
    document = _document(path)
    _node(document, module)["attrs"][key] = value
    bad = _write(path, document, tmp_path / "bad.lowbit")
    for read in (lowbit.load, Engine, lowbit.load_state_dict):
        with pytest.raises(FormatError, match=match):
            read(bad)


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["model"]["layers"]["up"].update(weight={"name": "lsq", "bits": 8, "per_channel": True}),
     "input channel"),
    (lambda d: d["model"]["layers"]["up"].update(type="QuantConv2d"), "is a QuantConv2d in the document's layers"),
    (lambda d: d["model"]["layers"]["conv1"].update(type="QuantLinear"), "is a QuantLinear in the document's layers"),
    (lambda d: d["model"]["layers"]["conv1"].update(type="QuantConv3d"), "type must be QuantLinear, QuantConv1d"),
    (lambda d: _node(d, "up").update(op="conv2d", attrs={"stride": [2, 2], "padding": [1, 1], "dilation": [1, 1],
                                                         "groups": 2}),
     "is a QuantConvTranspose2d in the document's layers"),
])
def test_hostile_layers_are_refused_alike(w8a8, tmp_path, edit, match):
    _, _, path = w8a8
    document = _document(path)
    edit(document)
    bad = _write(path, document, tmp_path / "bad.lowbit")
    for read in (lowbit.load, Engine, lowbit.load_state_dict):
        with pytest.raises(FormatError, match=match):
            read(bad)


@pytest.mark.parametrize("model, match", [
    (nn.Sequential(nn.Conv1d(3, 3, 3, padding="same")), "padding 'same'"),
    (nn.Sequential(nn.Conv1d(3, 3, 3, padding=1, padding_mode="circular")), "padding_mode 'circular'"),
])
def test_conv1d_forms_the_op_cannot_express_are_refused_by_name(tmp_path, model, match):
    with pytest.raises(lowbit.errors.UnsupportedLayerError, match=match):
        lowbit.save(model, tmp_path / "m.lowbit", torch.zeros(1, 3, 8))
