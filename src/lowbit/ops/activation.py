"""Element-wise activations: relu, tanh, hardtanh ``clip(x, min, max)`` (ReLU6 is hardtanh(0, 6)), and quant_act
(a QuantAct module's activation quantizer, run by :mod:`lowbit.runtime.activations`)."""

from __future__ import annotations

import numpy as np

from .schema import Capture, Node, Number, OpSchema, Shape, argument, register, same_shape, unary


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
    "relu", same_shape,
    capture=Capture(("torch.nn.functional.relu", "torch.relu", "Tensor.relu"), unary, ("torch.nn.ReLU",)),
    numpy=lambda xs, a: np.maximum(xs[0], np.float32(0)), torch=lambda t, xs, a: t.nn.functional.relu(xs[0]),
    onnx=lambda b, name, xs, a: b.node("Relu", xs, name)))
TANH = register(OpSchema(
    "tanh", same_shape, capture=Capture(("torch.tanh", "Tensor.tanh"), unary, ("torch.nn.Tanh",)),
    numpy=lambda xs, a: np.tanh(xs[0]), torch=lambda t, xs, a: t.tanh(xs[0]),
    onnx=lambda b, name, xs, a: b.node("Tanh", xs, name)))
HARDTANH = register(OpSchema(
    "hardtanh", _hardtanh_shape, attrs={"min": Number(), "max": Number()},
    capture=Capture(("torch.nn.functional.hardtanh",), _hardtanh_call, ("torch.nn.Hardtanh",),
                    lambda m, shape, where: {"min": float(m.min_val), "max": float(m.max_val)}),
    numpy=lambda xs, a: np.clip(xs[0], np.float32(a["min"]), np.float32(a["max"])),
    torch=lambda t, xs, a: t.nn.functional.hardtanh(xs[0], a["min"], a["max"]), onnx=_clip))
QUANT_ACT = register(OpSchema("quant_act", same_shape, quant=("output",), state=("quantizer",), module=True,
                              capture=Capture(modules=("lowbit.nn.QuantAct",))))
