"""The op schema: every declared op runs the same in torch, the loaded GraphModel, the Engine and onnxruntime;
hostile attributes are FormatErrors naming the node; quantizer specs are checked as ``quantizers.get`` builds them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lowbit
from lowbit.errors import ConfigError, FormatError
from lowbit.export.onnx import to_onnx
from lowbit.format.container import pack_safetensors, parse_safetensors
from lowbit.nn import QuantAct
from lowbit.ops import MAX_ELEMENTS, MAX_SPATIAL, REGISTRY, Graph, check_spec
from lowbit.ops.specs import KMEANS_INITS, OBSERVERS, ROLES, SIGN_STES, SPECS
from lowbit.ops.validate import RESERVED_PARTS
from lowbit.quantizers import get, names
from lowbit.runtime import Engine
from lowbit.serialize import GraphModel


# ---------------------------------------------------------------- one small model per op


class Functional(nn.Module):
    """A conv stem, then ``body`` (a function of the map and the module)."""

    def __init__(self, body, channels: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.body = body

    def forward(self, x):
        return self.body(self.stem(x), self)


class Recurrent(nn.Module):
    """A recurrent layer on [N, L, features]: its output sequence, or (``last``) its last step."""

    def __init__(self, rnn: nn.Module, last: bool):
        super().__init__()
        self.rnn, self.last = rnn, last

    def forward(self, x):
        out, _ = self.rnn(x)
        return out[:, -1] if self.last else out


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.a(x)
        gate = F.adaptive_avg_pool2d(y, 1)
        return torch.cat([self.b(y) + y, y * gate], dim=1)


def _channel_shuffle(y: torch.Tensor, m: nn.Module) -> torch.Tensor:
    """ShuffleNet's channel shuffle: sizes read off the tensor, view, transpose, view; then a permute."""
    batch, channels, height, width = y.size()
    y = torch.transpose(y.view(batch, 2, channels // 2, height, width), 1, 2).contiguous()
    return y.view(batch, -1, height, width).permute(0, 1, 3, 2)


def _split_and_slice(y: torch.Tensor, m: nn.Module) -> torch.Tensor:
    """chunk, split, their pieces indexed, and a slice of a tensor."""
    a, b = y.chunk(2, dim=1)
    c, d = torch.split(y, [1, 3], 1)
    return torch.cat([b, a, d[:, 1:3], c], dim=1)[:, :, 2:6]


class Scaled(nn.Module):
    """Tensors read directly: a layer scale [C, 1, 1] (ConvNeXt's), a buffer [1, C, 1, 1], a 0-d parameter and a
    buffer [W]."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.scale = nn.Parameter(torch.randn(4, 1, 1))
        self.register_buffer("shift", torch.randn(1, 4, 1, 1))
        self.gain = nn.Parameter(torch.tensor(0.5))
        self.register_buffer("row", torch.randn(8))

    def forward(self, x):
        y = self.stem(x)
        return (self.scale * y + self.shift) / self.gain - self.scale + self.row


class LayerNorm2d(nn.LayerNorm):
    """torchvision's ConvNeXt norm: F.layer_norm of the NHWC view between two permutes (traced through)."""

    def forward(self, x):
        y = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class Norms(nn.Module):
    """Layer norms: functional (LayerNorm2d), a module over NHWC's channels, weight only, and over two axes without
    weight or bias."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.norm2d, self.norm = LayerNorm2d(4, eps=1e-6), nn.LayerNorm(4)
        self.rows, self.plain = nn.LayerNorm(8, bias=False), nn.LayerNorm([8, 8], elementwise_affine=False)
        for p in [self.norm2d.weight, self.norm2d.bias, self.norm.weight, self.norm.bias, self.rows.weight]:
            nn.init.normal_(p)

    def forward(self, x):
        y = self.norm2d(self.stem(x))
        y = self.norm(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.plain(self.rows(y))


class Adaptive(nn.Module):
    """Adaptive pools, functional and as a module: overlapping bins (8x8 to 3x5), an output larger than the input
    (to 10x12), even bins (to 5x4) and 1x1; every stage is an output."""

    def __init__(self, function, module):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.function, self.up = function, module((10, 12))

    def forward(self, x):
        a = self.function(self.stem(x), (3, 5))
        b = self.up(a)
        c = self.function(b, (5, 4))
        return torch.cat([t.flatten(1) for t in (a, b, c, self.function(c, 1))], 1)


def _quant_act() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), QuantAct(get({"name": "uniform", "bits": 8, "dynamic": False})))
    lowbit.calibrate(model, [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))])
    return model


def _react() -> nn.Module:
    """ReActNet's RSign threshold and RPReLU, their per-channel values away from their inits."""
    from lowbit.nn.react import RPReLU, RSignThreshold

    model = nn.Sequential(RSignThreshold(3), RPReLU(3))
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(3))
    return model


#: op -> a model whose graph holds it; every declared op needs one (the registry walk below)
EXAMPLES = {
    "linear": lambda: nn.Sequential(nn.Flatten(), nn.Linear(192, 5)),
    "conv2d": lambda: nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=2, dilation=2), nn.Conv2d(6, 6, 3, groups=3)),
    # the 8x8 map read as a sequence of 64: depthwise and dilated, then grouped and strided
    "conv1d": lambda: nn.Sequential(nn.Flatten(2), nn.Conv1d(3, 6, 3, padding=2, dilation=2, groups=3),
                                    nn.Conv1d(6, 4, 5, stride=2, padding=1, groups=2, bias=False)),
    "conv_transpose2d": lambda: nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
        nn.ConvTranspose2d(6, 2, (2, 3), stride=(1, 2), dilation=2, bias=False)),
    "batchnorm": lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 6),
                                       nn.BatchNorm1d(6)),
    "relu": lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()),
    "tanh": lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh()),
    "hardtanh": lambda: nn.Sequential(Functional(lambda y, m: F.hardtanh(y, -0.5, 0.25) * F.relu6(y + 3) / 6),
                                      nn.ReLU6()),
    "sigmoid": lambda: Functional(lambda y, m: torch.sigmoid(y) + nn.functional.sigmoid(y) * y.sigmoid()),
    "silu": lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU()),
    "hardsigmoid": lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Hardsigmoid()),
    "hardswish": lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Hardswish()),
    "gelu": lambda: nn.Sequential(Functional(lambda y, m: F.gelu(y, approximate="tanh")), nn.GELU()),
    "leaky_relu": lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.LeakyReLU(0.2)),
    "softmax": lambda: nn.Sequential(Functional(lambda y, m: y.softmax(1) + F.softmax(y, dim=-1)), nn.Softmax(2)),
    "maxpool2d": lambda: nn.Sequential(Functional(lambda y, m: F.max_pool2d(y, 3, 2, ceil_mode=True)),
                                       nn.MaxPool2d(2, 2, padding=1), nn.MaxPool2d(2, 2, ceil_mode=True)),
    "avgpool2d": lambda: nn.Sequential(
        Functional(lambda y, m: F.avg_pool2d(y, 3, 2, 1, ceil_mode=True)), nn.Conv2d(4, 4, 1),
        nn.AvgPool2d(3, 2, padding=1, count_include_pad=False),
        nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False)),
    "adaptive_avgpool2d": lambda: Adaptive(F.adaptive_avg_pool2d, nn.AdaptiveAvgPool2d),
    "adaptive_maxpool2d": lambda: Adaptive(F.adaptive_max_pool2d, nn.AdaptiveMaxPool2d),
    "reshape": lambda: Functional(lambda y, m: torch.flatten(y, 1)),
    # a Python number on either side (the node's scalar attribute), beside adds and products of two tensors
    "add": lambda: Functional(lambda y, m: (y + 0.5) + (3 + y) + torch.add(y, 2) + y.add(-1.25)),
    "mul": lambda: Functional(lambda y, m: (y * 0.5) * (-3 * y) + torch.mul(y, 1e-3) * y.mul(2)),
    "concat": Residual,
    "quant_act": _quant_act,
    "sub": lambda: Functional(lambda y, m: (y - torch.relu(y)) - (1 - y) - (y - 0.25) - torch.sub(y, 2)),
    "div": lambda: Functional(lambda y, m: y / (torch.sigmoid(y) + torch.sigmoid(y)) + y / 6 + y.div(0.1)
                              + 1 / (torch.sigmoid(y) + 1) - 3 / (torch.sigmoid(y) + 0.5)),
    "transpose": lambda: Functional(_channel_shuffle),
    "mean": lambda: Functional(lambda y, m: (y * y.mean((2, 3), keepdim=True)).mean(-1)),
    "pad": lambda: Functional(lambda y, m: F.pad(y, (1, 2, 0, 1), value=0.5)),
    "slice": lambda: Functional(_split_and_slice),
    "upsample": lambda: nn.Sequential(Functional(lambda y, m: F.interpolate(y, scale_factor=2)),
                                      nn.Upsample(size=(32, 48))),
    "upsample_bilinear": lambda: nn.Sequential(
        Functional(lambda y, m: F.interpolate(F.interpolate(y, scale_factor=1.5, mode="bilinear"), size=(11, 17),
                                              mode="bilinear", align_corners=False)),
        nn.UpsamplingBilinear2d(size=(13, 7)), nn.Upsample(scale_factor=(0.7, 2), mode="bilinear")),
    "constant": Scaled,
    "layer_norm": Norms,
    "rsign_threshold": _react,
    "rprelu": _react,
    "embedding": lambda: nn.Sequential(nn.Embedding(50, 6), nn.Flatten(), nn.Linear(48, 5)),
    # the whole output sequence of a 2-layer LSTM, the last step of a bias-free GRU ([N, 7, 6] inputs)
    "lstm": lambda: Recurrent(nn.LSTM(6, 5, 2, batch_first=True), last=False),
    "gru": lambda: Recurrent(nn.GRU(6, 5, batch_first=True, bias=False), last=True),
    # y y^T per channel ([N, 4, 8, 8]), then a batched product of its rows with the map's
    "matmul": lambda: Functional(lambda y, m: torch.bmm(torch.matmul(y, y.transpose(2, 3)).flatten(1, 2),
                                                        (y @ y).flatten(1, 2).transpose(1, 2))),
    # each channel's 8 rows attend over its rows: default scale 1 / sqrt(8), and a given one
    "attention": lambda: Functional(lambda y, m: F.scaled_dot_product_attention(y, y, y)
                                    + F.scaled_dot_product_attention(y, y * 0.5, torch.relu(y), scale=0.3)),
}
#: the examples that take other inputs than a float [3, 3, 8, 8] batch
INPUTS = {"embedding": lambda: torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(2)),
          "lstm": lambda: torch.randn(3, 7, 6, generator=torch.Generator().manual_seed(2)),
          "gru": lambda: torch.randn(3, 7, 6, generator=torch.Generator().manual_seed(2))}


def test_every_declared_op_has_an_example_and_every_example_op_is_declared():
    assert set(EXAMPLES) == set(REGISTRY)


def _saved(op: str, tmp_path: Path) -> tuple[nn.Module, torch.Tensor, Path]:
    torch.manual_seed(0)
    model = EXAMPLES[op]().eval()
    x = INPUTS[op]() if op in INPUTS else torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    path = tmp_path / f"{op}.lowbit"
    lowbit.save(model, path, x[:1])
    return model, x, path


@pytest.mark.parametrize("op", sorted(REGISTRY))
def test_op_runs_alike_in_torch_the_loaded_model_the_engine_and_onnxruntime(op, tmp_path):
    model, x, path = _saved(op, tmp_path)
    loaded = lowbit.load(path)
    assert op in {node["op"] for node in loaded.ir["nodes"]}
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(loaded(x), expected)
    np.testing.assert_allclose(Engine(path).run(x.numpy()), expected.numpy(), rtol=1e-5, atol=1e-5)
    session = ort.InferenceSession(to_onnx(loaded, x[:1]).SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    step = 1.0 if op == "quant_act" else 0.0  # a float32 sum in another order may cross one rounding boundary
    tolerance = 1e-4 + step * float(expected.abs().max()) / 127
    np.testing.assert_allclose(got, expected.numpy(), atol=tolerance)


def test_every_op_declares_its_capture_and_parameter_free_ops_all_three_implementations():
    module_ops = {op for op, schema in REGISTRY.items() if schema.module}
    # run by their modules, the Engine, ONNX
    assert module_ops == {"linear", "conv1d", "conv2d", "conv_transpose2d", "embedding", "lstm", "gru", "batchnorm",
                          "quant_act"}
    for op, schema in REGISTRY.items():
        assert schema.capture.functions or schema.capture.modules or schema.capture.get_attr, op
        assert (schema.capture.call is not None) == bool(schema.capture.functions), op
        if op not in module_ops:
            assert None not in (schema.numpy, schema.torch, schema.onnx), op


def test_module_path_parts_cannot_shadow_torch_module_attributes():
    model = GraphModel({}, Graph({}, [], []), {}, {})
    assert {name for name in dir(model) if not name.startswith("__")} <= RESERVED_PARTS


# ---------------------------------------------------------------- hostile attributes, shapes and specs


def _document(path: Path) -> dict:
    _, metadata, _ = parse_safetensors(path.read_bytes())
    return json.loads(metadata["lowbit"])


def _write(path: Path, document: dict, out: Path) -> Path:
    arrays, _, _ = parse_safetensors(path.read_bytes())
    out.write_bytes(pack_safetensors(dict(arrays), {"lowbit": json.dumps(document)}))
    return out


def _node(document: dict, op: str) -> dict:
    return next(n for n in document["graph"]["nodes"] if n["op"] == op)


def _both_refuse(path: Path, match: str) -> None:
    """load and the Engine both raise a FormatError whose message contains ``match``."""
    with pytest.raises(FormatError, match=match):
        lowbit.load(path)
    with pytest.raises(FormatError, match=match):
        Engine(path)
    with pytest.raises(FormatError, match=match):
        lowbit.load_state_dict(path)


HOSTILE = [
    ("conv2d", "stride", [0, 1], "stride must be a list of 2 ints from 1"),
    ("conv2d", "dilation", [1, -1], "dilation must be a list of 2 ints from 1"),
    ("conv2d", "padding", [2**30, 2**30], f"padding must be a list of 2 ints from 0 to {MAX_SPATIAL}"),
    ("conv2d", "groups", 5, "divisible by groups 5"),
    ("conv2d", "groups", 0, "groups must be an int from 1"),
    ("conv2d", "groups", True, "groups must be an int"),
    ("conv2d", "stride", [1, 1.5], "stride must be a list of 2 ints"),
    ("conv2d", "padding", [20, 20], "records the output shape"),
    ("conv2d", "padding", [2**15, 2**15], "padded input"),
    ("maxpool2d", "kernel", [2**31 - 1, 2**31 - 1], "kernel must be a list of 2 ints from 1 to"),
    ("maxpool2d", "padding", [2, 2], "at most half the kernel"),
    ("maxpool2d", "kernel", [64, 64], "does not fit an input"),
    ("maxpool2d", "kernel", {"a": [[[]]]}, "kernel must be a list"),
    ("batchnorm", "eps", 0.0, "eps must be a finite number > 0"),
    ("batchnorm", "eps", -1, "eps must be a finite number > 0"),
    ("batchnorm", "eps", "1e-5", "eps must be a finite number > 0"),
    ("reshape", "shape", [-1, 7], "the sizes differ"),
    ("reshape", "shape", [-1, 2**63], "sizes from 1 to"),
    ("reshape", "shape", [-1, 0, 5], "sizes from 1 to"),
    ("linear", "extra", 1, "has the attributes"),
]


@pytest.fixture(scope="module")
def lenet_file(tmp_path_factory) -> Path:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(4 * 5 * 5, 10)).eval()
    path = tmp_path_factory.mktemp("ops") / "net.lowbit"
    lowbit.save(model, path, torch.zeros(1, 1, 12, 12))
    return path


@pytest.mark.parametrize("op, key, value, match", HOSTILE)
def test_hostile_attributes_are_refused_alike_by_load_and_engine(lenet_file, tmp_path, op, key, value, match):
    document = _document(lenet_file)
    _node(document, op)["attrs"][key] = value
    _both_refuse(_write(lenet_file, document, tmp_path / "bad.lowbit"), match)


def test_recorded_output_shapes_must_follow_from_the_input(lenet_file, tmp_path):
    document = _document(lenet_file)
    _node(document, "relu")["shape"] = [-1, 4, 10, 11]
    _both_refuse(_write(lenet_file, document, tmp_path / "bad.lowbit"), "records the output shape")


def test_a_huge_input_shape_is_refused_before_anything_is_allocated(lenet_file, tmp_path):
    document = _document(lenet_file)
    document["graph"]["inputs"][0]["shape"] = [-1, 1, 2**20, 2**20]
    document["model"]["input_shape"] = [1, 1, 2**20, 2**20]
    _both_refuse(_write(lenet_file, document, tmp_path / "bad.lowbit"), str(MAX_ELEMENTS))


@pytest.mark.parametrize("edit, match", [
    (lambda d: _node(d, "conv2d").update(params={"weight": "3.weight"}), "must be stored as"),
    (lambda d: _node(d, "linear").update(params={"weight": "5.weight", "bias": "5.bias", "other": "5.other"}),
     "reads the tensors weight, bias and the state of"),
    (lambda d: _node(d, "linear").update(module="forward"), "dotted path"),
    (lambda d: _node(d, "linear").update(module="0.x"), "must be stored as"),
    (lambda d: _node(d, "linear").update(quant={"weight": {"name": "uniform", "bits": 2**62}}), "bits must be"),
    (lambda d: _node(d, "linear").update(quant={"weight": {"name": "uniform"}}), "differ from the document"),
    (lambda d: _node(d, "relu").update(inputs=["relu_missing"]), "must name earlier nodes"),
    (lambda d: _node(d, "relu").update(op="swish2"), "unknown op"),
    (lambda d: d["graph"].update(outputs=[]), "outputs"),
    (lambda d: d["graph"]["nodes"].append(dict(_node(d, "relu"))), "used twice"),
    (lambda d: d["model"].update(input_shape=[1, 1, 12, 13]), "does not match the document's input_shape"),
])
def test_hostile_graphs_are_refused_alike(lenet_file, tmp_path, edit, match):
    document = _document(lenet_file)
    edit(document)
    _both_refuse(_write(lenet_file, document, tmp_path / "bad.lowbit"), match)


def test_an_uncalibrated_static_model_is_a_calibration_error(tmp_path):
    model = lowbit.quantize(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2)), "w8a8")
    with pytest.raises(lowbit.errors.CalibrationError, match="calibrate"):
        lowbit.save(model, tmp_path / "m.lowbit", torch.zeros(1, 1, 4, 4))
    assert not (tmp_path / "m.lowbit").exists()


# ---------------------------------------------------------------- constants: tensors read directly


def test_constants_are_stored_at_their_state_dict_keys_and_restored_by_load(tmp_path):
    model, x, path = _saved("constant", tmp_path)
    constants = [n for n in _document(path)["graph"]["nodes"] if n["op"] == "constant"]
    assert {n["params"]["value"]: (n["shape"], n["attrs"]["parameter"]) for n in constants} == {
        "scale": ([4, 1, 1], True), "shift": ([1, 4, 1, 1], False), "gain": ([], True), "row": ([8], False)}
    loaded = lowbit.load(path)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert {"scale", "gain"} <= dict(loaded.named_parameters()).keys()
    assert {"shift", "row"} <= dict(loaded.named_buffers()).keys()
    fresh = Scaled().eval()
    fresh.load_state_dict(lowbit.load_state_dict(path), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def _constant_name(document: dict, key: str) -> str:
    return next(n["name"] for n in document["graph"]["nodes"] if n["op"] == "constant" and n["params"]["value"] == key)


def _replace_constant(document: dict, key: str, **fields) -> None:
    nodes = document["graph"]["nodes"]
    nodes[nodes.index(next(n for n in nodes if n["name"] == _constant_name(document, key)))].update(fields)


@pytest.mark.parametrize("edit, match", [
    (lambda d: _replace_constant(d, "scale", params={"value": "missing.scale"}), "is not stored in the file"),
    (lambda d: _replace_constant(d, "scale", params={"value": "forward"}), "stored at a dotted path"),
    (lambda d: _replace_constant(d, "scale", params={"value": "stem.weight"}, shape=[4, 3, 3, 3]),
     "lies in module 'stem'"),
    (lambda d: _replace_constant(d, "scale", shape=[-1, 4, 1, 1]), "records the output shape"),
    (lambda d: _replace_constant(d, "scale", inputs=["x"]), "takes 0 input"),
    (lambda d: _node(d, "mul").update(inputs=[_constant_name(d, "scale")] * 2), "both its inputs are constants"),
    (lambda d: d["graph"].update(outputs=[_constant_name(d, "row")]), "is a constant; outputs carry the batch"),
])
def test_hostile_constants_are_refused_alike(tmp_path, edit, match):
    _, _, path = _saved("constant", tmp_path)
    document = _document(path)
    edit(document)
    _both_refuse(_write(path, document, tmp_path / "bad.lowbit"), match)


def _scalar_node(document: dict, op: str) -> dict:
    return next(n for n in document["graph"]["nodes"] if n["op"] == op and n["attrs"].get("scalar") is not None)


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div"])
@pytest.mark.parametrize("edit, match", [
    (lambda d, n: n["attrs"].update(scalar=1e39), "scalar must be a finite number"),
    (lambda d, n: n["attrs"].update(scalar=-3.5e38), "scalar must be a finite number"),
    (lambda d, n: n["attrs"].update(scalar="0.5"), "scalar must be a finite number"),
    (lambda d, n: n["attrs"].update(scalar=True), "scalar must be a finite number"),
    (lambda d, n: n["attrs"].update(scalar=[0.5]), "scalar must be a finite number"),
    (lambda d, n: n["attrs"].update(scalar_first=1), "scalar_first must be true or false"),
    (lambda d, n: n["attrs"].update(scalar=None, scalar_first=False), "takes 2 inputs \\(1 with a scalar\\), got 1"),
    (lambda d, n: n.update(attrs={}), "takes 2 inputs \\(1 with a scalar\\), got 1"),
    (lambda d, n: n.update(attrs={"scalar_first": True}), "scalar_first is set without a scalar"),
    (lambda d, n: n.update(inputs=n["inputs"] * 2), "has a scalar operand and 2 inputs"),
    (lambda d, n: n.update(inputs=[]), "takes one or more input"),
    (lambda d, n: n["attrs"].update(extra=1), "has the attributes"),
])
def test_hostile_scalar_attributes_are_refused_alike(tmp_path, op, edit, match):
    _, _, path = _saved(op, tmp_path)
    document = _document(path)
    node = _scalar_node(document, op)
    edit(document, node)
    _both_refuse(_write(path, document, tmp_path / "bad.lowbit"), f"graph node '{node['name']}' \\({op}\\).*{match}")


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div"])
def test_arithmetic_examples_hold_a_number_on_either_side_and_two_tensors(tmp_path, op):
    _, _, path = _saved(op, tmp_path)
    attrs = [n["attrs"] for n in _document(path)["graph"]["nodes"] if n["op"] == op]
    assert {a["scalar_first"] for a in attrs if "scalar" in a} == {False, True} and {} in attrs


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_scalar_that_is_not_finite_is_refused(tmp_path, value):
    """JSON has no NaN or Infinity (the container refuses them); the graph check refuses them too."""
    from lowbit.ops import validate_document

    _, _, path = _saved("mul", tmp_path)
    document = _document(path)
    node = _scalar_node(document, "mul")
    node["attrs"]["scalar"] = value
    with pytest.raises(FormatError, match="bad-json|NaN|Infinity"):
        lowbit.load(_write(path, document, tmp_path / "bad.lowbit"))
    shapes = {k: tuple(v["shape"]) for k, v in document["tensors"].items()}
    with pytest.raises(FormatError, match=f"graph node '{node['name']}' \\(mul\\): scalar must be a finite number"):
        validate_document(document, shapes)


def test_a_scalar_beside_a_constant_alone_is_refused(tmp_path):
    _, _, path = _saved("constant", tmp_path)
    document = _document(path)
    _node(document, "mul").update(inputs=[_constant_name(document, "scale")], attrs={"scalar": 2.0})
    _both_refuse(_write(path, document, tmp_path / "bad.lowbit"), "computes on a constant and a scalar only")


@pytest.mark.parametrize("edit, match", [
    (lambda d, nodes: nodes["transpose"][1].update(inputs=[_constant_name(d, "norm2d.weight")]),
     "input 'norm2d_weight' is a constant"),
    (lambda d, nodes: nodes["layer_norm"][0].update(inputs=[_constant_name(d, "norm2d.weight")] * 3),
     "normalizes a constant"),
    (lambda d, nodes: nodes["layer_norm"][0]["inputs"].reverse(), "normalizes a constant"),
    (lambda d, nodes: nodes["layer_norm"][1]["inputs"].pop(), "3 input"),
    (lambda d, nodes: nodes["layer_norm"][1].update(inputs=nodes["layer_norm"][1]["inputs"][:1] * 3),
     "its weight must be a constant of shape normalized_shape"),
])
def test_hostile_layer_norm_inputs_are_refused_alike(tmp_path, edit, match):
    _, _, path = _saved("layer_norm", tmp_path)
    document = _document(path)
    nodes: dict[str, list[dict]] = {}
    for node in document["graph"]["nodes"]:
        nodes.setdefault(node["op"], []).append(node)
    edit(document, nodes)
    _both_refuse(_write(path, document, tmp_path / "bad.lowbit"), match)


@pytest.mark.parametrize("batched, constant, match", [
    ((4, 8, 8), (3, 1, 1), "does not broadcast"),
    ((4, 8, 8), (2, 4, 1, 1), "size 1 on the batch axis"),
    ((4, 8, 8), (1, 1, 4, 1, 1), "at most as many axes"),
    ((4, 8), (8, 1), "does not broadcast"),
])
def test_a_constant_must_broadcast_against_the_batch(batched, constant, match):
    from lowbit.ops.schema import Node

    for order in ([batched, constant], [constant, batched]):
        node = Node("m", "mul", {}, order, {}, [shape is constant for shape in order])
        with pytest.raises(FormatError, match=match):
            REGISTRY["mul"].shape(node)
    ok = Node("m", "mul", {}, [(4, 8, 8), (1, 4, 1, 8)], {}, [False, True])
    assert REGISTRY["mul"].shape(ok) == (4, 8, 8)


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Parameter(torch.ones(3, 1, 1))

    def forward(self, x):
        return x * torch.sigmoid(self.gate)


class PlainAttribute(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.ones(3, 1, 1)  # neither a parameter nor a buffer

    def forward(self, x):
        return x * self.scale


@pytest.mark.parametrize("model, match", [
    (Gated(), "computes on stored tensors only \\(gate\\)"),
    (PlainAttribute(), "which is no parameter or persistent buffer"),
])
def test_tensors_that_a_file_cannot_hold_are_not_captured(tmp_path, model, match):
    with pytest.raises(lowbit.errors.UnsupportedLayerError, match=match):
        lowbit.save(model, tmp_path / "m.lowbit", torch.zeros(1, 3, 4, 4))
    assert not (tmp_path / "m.lowbit").exists()


@pytest.mark.parametrize("model, match", [
    (nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveMaxPool2d(2, return_indices=True)), "returns indices"),
    (Functional(lambda y, m: F.adaptive_max_pool2d(y, 2, return_indices=True)[0]),
     "calls 'adaptive_max_pool2d_with_indices'"),
    (nn.Sequential(nn.Conv2d(3, 4, 1), nn.Upsample(scale_factor=2, mode="bicubic")), "'nearest' or 'bilinear'"),
    (Functional(lambda y, m: F.interpolate(y, size=(4, 4), mode="bilinear", antialias=True)), "antialias"),
    (Functional(lambda y, m: F.layer_norm(y, y.shape[1:])), "normalized_shape given as ints"),
    (Functional(lambda y, m: F.layer_norm(y, (1, 4, 8, 8))), "over the batch axis"),
])
def test_forms_the_new_ops_cannot_express_are_refused_by_name(tmp_path, model, match):
    with pytest.raises(lowbit.errors.UnsupportedLayerError, match=match):
        lowbit.save(model, tmp_path / "m.lowbit", torch.zeros(1, 3, 8, 8))


def test_layer_norm_exports_as_primitive_ops_before_opset_17(tmp_path):
    model, x, _ = _saved("layer_norm", tmp_path)
    for opset, expected in [(16, False), (17, True)]:
        proto = to_onnx(model, x[:1], opset=opset)
        assert any(n.op_type == "LayerNormalization" for n in proto.graph.node) is expected
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(got, model(x).numpy(), atol=1e-4)


# ---------------------------------------------------------------- quantizer specs: check_spec accepts what get builds


def test_spec_tables_list_every_quantizer_and_its_parameters():
    assert set(SPECS) == set(names())
    for name in names():
        spec = get(name).spec()
        assert set(spec) - {"name"} == set(SPECS[name]) - OPTIONAL.get(name, set())
        assert check_spec(spec, "here") == spec
    token = get({"name": "uniform", "per_token": True, "token_axis": -2}).spec()  # written only when set
    assert set(token) - {"name"} == set(SPECS["uniform"]) and check_spec(token, "here") == token


#: spec parameters a quantizer writes only when they are set
OPTIONAL = {"uniform": {"per_token", "token_axis"}}


def test_spec_choices_match_the_quantizers():
    from lowbit.quantizers import kmeans, lsq, observers, ste

    assert SIGN_STES == tuple(ste.SIGN_STES)
    assert OBSERVERS == observers.OBSERVERS
    assert KMEANS_INITS == kmeans.INITS
    assert ROLES == lsq.ROLES


_VALUES = st.one_of(
    st.integers(-3, 20), st.sampled_from([2**31 - 1, 2**62, -(2**63), 127, 128, -125, -126, 10_000, 10_001]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 50.0, 100.0, 100.5, 1e-30]),
    st.booleans(), st.none(), st.sampled_from([*SIGN_STES, *OBSERVERS, *KMEANS_INITS, *ROLES, "", "x"]),
    st.just([1]), st.just({"a": 1}),
)


@st.composite
def specs(draw):
    name = draw(st.sampled_from(sorted(SPECS)))
    keys = draw(st.lists(st.sampled_from([*SPECS[name], "unknown"]), unique=True))
    return {"name": name, **{k: draw(_VALUES) for k in keys}}


@settings(max_examples=600, deadline=None)
@given(specs())
def test_check_spec_accepts_exactly_what_get_builds(spec):
    try:
        built = get(spec)
    except ConfigError:
        built = None
    try:
        full = check_spec(spec, "layer 'x'")
    except FormatError as exc:
        assert built is None, f"check_spec refused a spec get builds: {exc}"
        assert "layer 'x'" in str(exc)
        return
    assert built is not None, f"check_spec accepted a spec get refuses: {spec}"
    assert full == built.spec()


@pytest.mark.parametrize("spec, code", [
    ({"name": "uniform", "bits": 2**62}, "bad-spec"), ({"name": "log2", "bits": 8, "fsr": 129}, "bad-spec"),
    ({"name": "linear", "bits": 4, "fsr": -124}, "bad-spec"), ({"name": "nope"}, "unknown-quantizer"),
    ({"bits": 4}, "bad-spec"), ("uniform", "bad-spec"), ({"name": "pact", "alpha": math.inf}, "bad-spec"),
])
def test_bad_specs_are_typed_and_named(spec, code):
    with pytest.raises(FormatError) as info:
        check_spec(spec, "layer 'fc' weight quantizer")
    assert info.value.code == code and "layer 'fc' weight quantizer" in str(info.value)


def test_an_adaptive_pool_has_a_bounded_number_of_bins(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.AdaptiveAvgPool2d((65, 64)))
    with pytest.raises(lowbit.errors.UnsupportedLayerError, match="at most 4096 bins"):
        lowbit.save(model, tmp_path / "m.lowbit", torch.zeros(1, 1, 65, 64))


@pytest.mark.parametrize("op, key, value, match", [
    ("transpose", "perm", [1, 0, 2, 3], "permutation of 0 .. rank - 1 starting at 0"),
    ("transpose", "perm", [0, 1, 2], "must order all 5 axes"),
    ("mean", "axes", [-4], "must name non-batch axes"),
    ("mean", "axes", [-1, -1], "distinct axes"),
    ("pad", "pads", [1, 2, 3], "pairs"),
    ("pad", "pads", [1, -2], "ints from 0"),
    ("softmax", "axis", 0, "from -8 to -1"),
    ("slice", "end", 9, "must lie within"),
    ("slice", "start", 6, "must lie within"),
    ("upsample", "size", [17, 16], "whole factors"),
    ("layer_norm", "normalized_shape", [5], "must be the last axes of its input"),
    ("layer_norm", "normalized_shape", [4, 8, 8, 4], "must be the last axes of its input"),
    ("layer_norm", "normalized_shape", [], "must be the last axes of its input"),
    ("layer_norm", "weight", False, "2 input"),
    ("layer_norm", "eps", 0, "eps must be a finite number > 0"),
    ("adaptive_maxpool2d", "output_size", [65, 64], "at most 4096 bins"),
    ("adaptive_avgpool2d", "output_size", [0, 4], "output_size must be a list of 2 ints from 1"),
    ("upsample_bilinear", "scales", [1.5, 2.5], "floor"),
    ("upsample_bilinear", "scales", [0, 1.5], "scales must be a finite number > 0"),
    ("upsample_bilinear", "align_corners", None, "align_corners must be true or false"),
    ("constant", "parameter", 1, "parameter must be true or false"),
])
def test_hostile_attributes_of_shape_ops_are_refused_alike(tmp_path, op, key, value, match):
    _, _, path = _saved(op, tmp_path)
    document = _document(path)
    _node(document, op)["attrs"][key] = value
    _both_refuse(_write(path, document, tmp_path / "bad.lowbit"), match)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 12), st.integers(1, 5), st.integers(1, 4), st.integers(0, 2), st.booleans(),
       st.sampled_from(["max", "avg", "avg-no-pad-count"]))
def test_pools_follow_torch(size, kernel, stride, padding, ceil_mode, kind):
    """Output sizes, values and divisors in floor and ceil mode, against torch's max_pool2d / avg_pool2d (which
    refuse what the shape rule refuses)."""
    from lowbit.ops.pool import avgpool2d, maxpool2d, pool_size

    x = torch.randn(1, 2, size, size + 1, generator=torch.Generator().manual_seed(size))
    expected_fits = padding <= kernel // 2 and all(pool_size(n, kernel, stride, padding, ceil_mode) >= 1
                                                   for n in (size, size + 1))
    window = [kernel] * 2, [stride] * 2, [padding] * 2
    try:
        if kind == "max":
            want = F.max_pool2d(x, kernel, stride, padding, ceil_mode=ceil_mode)
        else:
            want = F.avg_pool2d(x, kernel, stride, padding, ceil_mode=ceil_mode, count_include_pad=kind == "avg")
    except RuntimeError:
        assert not expected_fits
        return
    assert expected_fits
    if kind == "max":
        np.testing.assert_array_equal(maxpool2d(x.numpy(), *window, ceil_mode), want.numpy())
    else:
        got = avgpool2d(x.numpy(), *window, count_include_pad=kind == "avg", ceil_mode=ceil_mode)
        np.testing.assert_array_equal(got, want.numpy())  # window sums in torch's row-major order: its bits


def stochastic_depth(x: torch.Tensor, p: float, mode: str, training: bool = True) -> torch.Tensor:
    """Stands in for torchvision.ops.stochastic_depth (an fx leaf function, the identity in eval mode)."""
    return x * (torch.rand_like(x) > p) / (1 - p) if training else x


stochastic_depth.__module__ = "torchvision.ops.stochastic_depth"
torch.fx.wrap("stochastic_depth")


def test_dropout_and_stochastic_depth_functions_disappear_in_eval(tmp_path):
    model = Functional(lambda y, m: F.dropout(y, 0.5, m.training) + stochastic_depth(F.dropout2d(y, 0.2, m.training),
                                                                                       0.3, "row", m.training)).eval()
    x = torch.randn(2, 3, 8, 8)
    lowbit.save(model, tmp_path / "m.lowbit", x[:1])
    loaded = lowbit.load(tmp_path / "m.lowbit")
    assert [node["op"] for node in loaded.ir["nodes"]] == ["conv2d", "add"]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    random = Functional(lambda y, m: F.dropout(y, 0.5))  # training=True whatever the mode
    with pytest.raises(lowbit.errors.UnsupportedLayerError, match="training=True is random"):
        lowbit.save(random, tmp_path / "r.lowbit", x[:1])


class SamePaddingConv(nn.Conv2d):
    """TF "same" padding, as EfficientNet-Lite's Conv2dStaticSamePadding: a custom forward around conv2d."""

    def forward(self, x):
        return super().forward(F.pad(x, (0, 1, 0, 1)))


class PlainConv(nn.Conv2d):
    pass


def test_a_subclass_with_its_own_forward_is_traced_through_not_swapped(tmp_path):
    model = nn.Sequential(PlainConv(3, 4, 3), SamePaddingConv(4, 4, 2, stride=2)).eval()
    with pytest.raises(lowbit.errors.UnsupportedLayerError, match="calls 'conv2d'"):
        lowbit.save(model, tmp_path / "m.lowbit", torch.zeros(1, 3, 9, 9))
    plain = nn.Sequential(PlainConv(3, 4, 3)).eval()
    lowbit.save(plain, tmp_path / "p.lowbit", torch.zeros(1, 3, 9, 9))
    assert [node["op"] for node in lowbit.load(tmp_path / "p.lowbit").ir["nodes"]] == ["conv2d"]


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # a branch on tensor values
            return self.fc(x)
        return x


def test_an_untraceable_model_names_the_line(tmp_path):
    with pytest.raises(lowbit.errors.UnsupportedLayerError, match=r"test_ops.py:\d+ in forward \('if x.sum\(\) > 0:"):
        lowbit.save(Branchy(), tmp_path / "m.lowbit", torch.zeros(1, 4))
