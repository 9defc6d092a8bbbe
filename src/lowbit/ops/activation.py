"""Element-wise activations: relu, tanh, hardtanh ``clip(x, min, max)``, and quant_act (a QuantAct module's
activation quantizer, run by :mod:`lowbit.runtime.activations`)."""

from __future__ import annotations

import numpy as np

from .schema import Node, Number, OpSchema, Shape, register, same_shape


def _hardtanh_shape(node: Node) -> Shape:
    if node.attrs["min"] > node.attrs["max"]:
        raise node.fail(f"hardtanh min {node.attrs['min']} must not exceed max {node.attrs['max']}")
    return node.inputs[0]


RELU = register(OpSchema("relu", same_shape, numpy=lambda xs, a: np.maximum(xs[0], np.float32(0))))
TANH = register(OpSchema("tanh", same_shape, numpy=lambda xs, a: np.tanh(xs[0])))
HARDTANH = register(OpSchema("hardtanh", _hardtanh_shape, attrs={"min": Number(), "max": Number()},
                             numpy=lambda xs, a: np.clip(xs[0], np.float32(a["min"]), np.float32(a["max"]))))
QUANT_ACT = register(OpSchema("quant_act", same_shape, quant=("output",), state=("quantizer",), module=True))
