"""Activations: relu, tanh, hardtanh ``clip(x, min, max)`` (ReLU6 is hardtanh(0, 6)), sigmoid, silu ``x sigmoid(x)``,
hardsigmoid, hardswish ``x hardsigmoid(x)``, gelu, leaky_relu, softmax, and quant_act (a QuantAct module's activation
quantizer, run by :mod:`lowbit.runtime.activations`)."""

from __future__ import annotations

import numpy as np

from ..errors import UnsupportedLayerError
from .schema import (MAX_RANK, Bool, Capture, Choice, Int, Node, Number, OpSchema, Shape, argument, register,
                     same_shape, unary)


def _hardtanh_shape(node: Node) -> Shape:
    if node.attrs["min"] > node.attrs["max"]:
        raise node.fail(f"hardtanh min {node.attrs['min']} must not exceed max {node.attrs['max']}")
    return node.inputs[0]


def _hardtanh_call(args: list, kwargs: dict, shape: list[int], where: str) -> tuple[dict, list]:
    bounds = argument(args, kwargs, 1, "min_val", -1.0), argument(args, kwargs, 2, "max_val", 1.0)
    return {"min": float(bounds[0]), "max": float(bounds[1])}, args[:1]


def _clip(b, name: str, xs: list[str], a: dict) -> str:
    bounds = [b.const(f"{name}.{k}", np.array(a[k], np.float32)) for k in ("min", "max")]
    return b.node("Clip", [xs[0], *bounds], name)


RELU = register(OpSchema(
    "relu", same_shape, placement="clips",
    capture=Capture(("torch.nn.functional.relu", "torch.relu", "Tensor.relu"), unary, ("torch.nn.ReLU",)),
    numpy=lambda xs, a: np.maximum(xs[0], np.float32(0)), torch=lambda t, xs, a: t.nn.functional.relu(xs[0]),
    onnx=lambda b, name, xs, a: b.node("Relu", xs, name)))
TANH = register(OpSchema(
    "tanh", same_shape, capture=Capture(("torch.tanh", "Tensor.tanh"), unary, ("torch.nn.Tanh",)),
    numpy=lambda xs, a: np.tanh(xs[0]), torch=lambda t, xs, a: t.tanh(xs[0]),
    onnx=lambda b, name, xs, a: b.node("Tanh", xs, name)))
HARDTANH = register(OpSchema(
    "hardtanh", _hardtanh_shape, placement="clips", attrs={"min": Number(), "max": Number()},
    capture=Capture(("torch.nn.functional.hardtanh",), _hardtanh_call, ("torch.nn.Hardtanh",),
                    lambda m, shape, where: {"min": float(m.min_val), "max": float(m.max_val)},
                    calls={"torch.nn.functional.relu6": lambda args, kwargs, shape, where: ({"min": 0.0, "max": 6.0},
                                                                                            args[:1])}),
    numpy=lambda xs, a: np.clip(xs[0], np.float32(a["min"]), np.float32(a["max"])),
    torch=lambda t, xs, a: t.nn.functional.hardtanh(xs[0], a["min"], a["max"]), onnx=_clip))
QUANT_ACT = register(OpSchema("quant_act", same_shape, quant=("output",), state=("quantizer",), module=True,
                              capture=Capture(modules=("lowbit.nn.QuantAct",))))


# ---------------------------------------------------------------- smooth and piecewise activations of modern CNNs


def sigmoid(x: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-x))`` in float32 (torch.sigmoid)."""
    with np.errstate(over="ignore"):
        return (np.float32(1) / (np.float32(1) + np.exp(-x))).astype(np.float32, copy=False)


def hardsigmoid(x: np.ndarray) -> np.ndarray:
    """``relu6(x + 3) / 6`` (Howard et al. 2019, MobileNetV3)."""
    return np.minimum(np.maximum(x + np.float32(3), np.float32(0)), np.float32(6)) / np.float32(6)


def gelu(x: np.ndarray, approximate: str) -> np.ndarray:
    """GELU (Hendrycks & Gimpel 2016): ``x Phi(x) = x / 2 (1 + erf(x / sqrt 2))``, or with ``approximate="tanh"``
    ``x / 2 (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))``."""
    from scipy.special import erf

    half = np.float32(0.5) * x
    if approximate == "tanh":
        inner = np.float32(np.sqrt(2 / np.pi)) * (x + np.float32(0.044715) * x * x * x)
        return half * (np.float32(1) + np.tanh(inner))
    return half * (np.float32(1) + erf(x * np.float32(1 / np.sqrt(2))).astype(np.float32))


def causal_mask(queries: int, keys: int) -> np.ndarray:
    """The positions a causal softmax drops: True where key ``j`` comes after query ``i`` (``j > i``; top-left
    aligned, as torch's ``is_causal``). Row ``i`` keeps key 0 at least, so no row is ever fully masked."""
    return np.triu(np.ones((queries, keys), bool), 1)


def softmax(x: np.ndarray, axis: int, causal: bool = False) -> np.ndarray:
    """``exp(x - max) / sum(exp(x - max))`` along ``axis``; ``causal``: over the last axis (keys) of scores
    ``[..., L_query, L_key]``, the keys after each query set to -inf first (weight exactly 0; no row is all -inf,
    so the max stays finite and nothing is NaN)."""
    if causal:
        x = np.where(causal_mask(*x.shape[-2:]), np.float32(-np.inf), x)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _gelu_onnx(b, name: str, xs: list[str], a: dict) -> str:
    """GELU from primitives (Erf or Tanh), which every opset writes and onnxruntime fuses."""
    x = xs[0]
    const = lambda key, value: b.const(f"{name}.{key}", np.array(value, np.float32))  # noqa: E731
    if a["approximate"] == "tanh":
        cube = b.node("Mul", [b.node("Mul", [x, x], f"{name}.square"), x], f"{name}.cube")
        inner = b.node("Add", [x, b.node("Mul", [cube, const("c", 0.044715)], f"{name}.scaled")], f"{name}.sum")
        core = b.node("Tanh", [b.node("Mul", [inner, const("k", np.sqrt(2 / np.pi))], f"{name}.inner")],
                      f"{name}.tanh")
    else:
        core = b.node("Erf", [b.node("Mul", [x, const("k", 1 / np.sqrt(2))], f"{name}.scaled")], f"{name}.erf")
    gate = b.node("Add", [core, const("one", 1.0)], f"{name}.gate")
    return b.node("Mul", [b.node("Mul", [x, gate], f"{name}.product"), const("half", 0.5)], name)


def _hardswish_onnx(b, name: str, xs: list[str], a: dict) -> str:
    if b.opset >= 14:
        return b.node("HardSwish", xs, name)
    return b.node("Mul", [xs[0], b.node("HardSigmoid", xs, f"{name}.gate", alpha=1 / 6, beta=0.5)], name)


def _softmax_shape(node: Node) -> Shape:
    if not -len(node.inputs[0]) <= node.attrs["axis"] <= -1:
        raise node.fail(f"softmax axis {node.attrs['axis']} must name a non-batch axis of {[-1, *node.inputs[0]]} "
                        "(counted from the end: -1 is the last)")
    if node.attrs["causal"] and (node.attrs["axis"] != -1 or len(node.inputs[0]) < 2):
        raise node.fail("a causal softmax runs over the last axis (keys) of scores [..., L_query, L_key]")
    return node.inputs[0]


def _softmax_call(args: list, kwargs: dict, shape: list[int], where: str) -> tuple[dict, list]:
    dim = argument(args, kwargs, 1, "dim", None)
    if dim is None or argument(args, kwargs, 3, "dtype", None) is not None:
        raise UnsupportedLayerError(f"{where}: softmax is captured with an explicit dim and no dtype")
    attrs = {"axis": int(dim) - len(shape) if dim >= 0 else int(dim)}
    return ({**attrs, "causal": True} if kwargs.get("causal") else attrs), args[:1]


def _softmax_module(m, shape: list[int], where: str) -> dict:
    return _softmax_call([None], {"dim": m.dim}, shape, where)[0]


def causal_scores(b, name: str, x: str) -> str:
    """ONNX: scores ``x`` [..., L_query, L_key] plus an additive constant, 0 where a query attends and -inf where
    the key comes later (exp gives exactly 0 there, as the numpy and torch forms)."""
    queries, keys = b.shapes[x][-2:]
    mask = np.where(causal_mask(queries, keys), np.float32(-np.inf), np.float32(0))
    return b.node("Add", [x, b.const(f"{name}.causal_mask", mask)], f"{name}.masked")


def _softmax_onnx(b, name: str, xs: list[str], a: dict) -> str:
    if b.opset < 13 and a["axis"] != -1:
        raise UnsupportedLayerError(f"node {name!r}: softmax over axis {a['axis']} needs opset >= 13")
    return b.node("Softmax", [causal_scores(b, name, xs[0]) if a["causal"] else xs[0]], name, axis=a["axis"])


def torch_softmax(t, x, axis: int, causal: bool):
    """The torch form of the softmax op (``t``: the torch module): later keys filled with -inf where causal."""
    if causal:
        later = t.ones(x.shape[-2:], dtype=t.bool, device=x.device).triu(1)
        x = x.masked_fill(later, float("-inf"))
    return t.softmax(x, axis)


SIGMOID = register(OpSchema(
    "sigmoid", same_shape,
    capture=Capture(("torch.sigmoid", "torch.nn.functional.sigmoid", "Tensor.sigmoid"), unary, ("torch.nn.Sigmoid",)),
    numpy=lambda xs, a: sigmoid(xs[0]), torch=lambda t, xs, a: t.sigmoid(xs[0]),
    onnx=lambda b, name, xs, a: b.node("Sigmoid", xs, name)))
SILU = register(OpSchema(
    "silu", same_shape, capture=Capture(("torch.nn.functional.silu",), unary, ("torch.nn.SiLU",)),
    numpy=lambda xs, a: xs[0] * sigmoid(xs[0]), torch=lambda t, xs, a: t.nn.functional.silu(xs[0]),
    onnx=lambda b, name, xs, a: b.node("Mul", [xs[0], b.node("Sigmoid", xs, f"{name}.gate")], name)))
HARDSIGMOID = register(OpSchema(
    "hardsigmoid", same_shape,
    capture=Capture(("torch.nn.functional.hardsigmoid",), unary, ("torch.nn.Hardsigmoid",)),
    numpy=lambda xs, a: hardsigmoid(xs[0]), torch=lambda t, xs, a: t.nn.functional.hardsigmoid(xs[0]),
    onnx=lambda b, name, xs, a: b.node("HardSigmoid", xs, name, alpha=1 / 6, beta=0.5)))
HARDSWISH = register(OpSchema(
    "hardswish", same_shape, capture=Capture(("torch.nn.functional.hardswish",), unary, ("torch.nn.Hardswish",)),
    numpy=lambda xs, a: xs[0] * hardsigmoid(xs[0]), torch=lambda t, xs, a: t.nn.functional.hardswish(xs[0]),
    onnx=_hardswish_onnx))
GELU = register(OpSchema(
    "gelu", same_shape, attrs={"approximate": Choice(("none", "tanh"))},
    capture=Capture(("torch.nn.functional.gelu",),
                    lambda args, kwargs, shape, where: ({"approximate": kwargs.get("approximate", "none")}, args[:1]),
                    ("torch.nn.GELU",), lambda m, shape, where: {"approximate": m.approximate}),
    numpy=lambda xs, a: gelu(xs[0], a["approximate"]),
    torch=lambda t, xs, a: t.nn.functional.gelu(xs[0], approximate=a["approximate"]), onnx=_gelu_onnx))
LEAKY_RELU = register(OpSchema(
    "leaky_relu", same_shape, attrs={"slope": Number()},
    capture=Capture(("torch.nn.functional.leaky_relu",),
                    lambda args, kwargs, shape, where: (
                        {"slope": float(argument(args, kwargs, 1, "negative_slope", 0.01))}, args[:1]),
                    ("torch.nn.LeakyReLU",), lambda m, shape, where: {"slope": float(m.negative_slope)}),
    numpy=lambda xs, a: np.where(xs[0] > 0, xs[0], xs[0] * np.float32(a["slope"])),
    torch=lambda t, xs, a: t.nn.functional.leaky_relu(xs[0], a["slope"]),
    onnx=lambda b, name, xs, a: b.node("LeakyRelu", xs, name, alpha=a["slope"])))
SOFTMAX = register(OpSchema(
    "softmax", _softmax_shape, attrs={"axis": Int(-MAX_RANK, -1), "causal": Bool()}, defaults={"causal": False},
    capture=Capture(("torch.softmax", "torch.nn.functional.softmax", "Tensor.softmax",
                     "lowbit.export.transformer.CAUSAL_SOFTMAX"), _softmax_call, ("torch.nn.Softmax",),
                    _softmax_module),
    numpy=lambda xs, a: softmax(xs[0], a["axis"], a["causal"]),
    torch=lambda t, xs, a: torch_softmax(t, xs[0], a["axis"], a["causal"]),
    onnx=_softmax_onnx))
