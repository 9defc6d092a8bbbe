"""linear: ``y = x W^T + b`` over the last axis (torch.nn.functional.linear); weight [out, in], optional bias [out]."""

from __future__ import annotations

import numpy as np

from .schema import Capture, Node, OpSchema, Shape, register


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """torch.nn.functional.linear: ``x W^T + b``."""
    y = x @ weight.T
    return y + bias if bias is not None else y


def _shape(node: Node) -> Shape:
    x, weight, bias = node.inputs[0], node.tensors["weight"], node.tensors.get("bias")
    if len(weight) != 2:
        raise node.fail(f"its weight must be 2-D [out, in], got {list(weight)}")
    if not x or x[-1] != weight[1]:
        raise node.fail(f"its input {[-1, *x]} must end in the weight's {weight[1]} input features")
    if bias is not None and bias != weight[:1]:
        raise node.fail(f"its bias must have shape [{weight[0]}], got {list(bias)}")
    return (*x[:-1], weight[0])


LINEAR = register(OpSchema("linear", _shape, tensors=("weight",), optional=("bias",),
                           quant=("weight", "input", "output"), state=("input_quantizer", "output_quantizer"),
                           module=True, capture=Capture(modules=("torch.nn.Linear",))))
