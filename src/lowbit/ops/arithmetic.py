"""add, sub, mul and div of two tensors, broadcast as numpy and torch do: two batched tensors of the same rank (each
size equal, or 1 in one), or a batched tensor and a constant (a stored tensor without the batch axis, such as a
layer scale of shape [C, 1, 1]), aligned from the last axis; a constant as long as the batched tensor (batch axis
included) has size 1 on the batch axis."""

from __future__ import annotations

import numpy as np

from ..errors import UnsupportedLayerError
from .schema import Capture, Node, OpSchema, Shape, register


def broadcast(node: Node) -> Shape:
    a, b = node.inputs
    constant = node.constant or [False, False]
    if all(constant):
        raise node.fail("both its inputs are constants; one must be a batched tensor")
    if any(constant):
        (x, c) = (a, b) if constant[1] else (b, a)
        if len(c) > len(x) + 1 or len(c) == len(x) + 1 and c[0] != 1:
            raise node.fail(f"constant {list(c)} does not broadcast with {[-1, *x]}: at most as many axes, and "
                            "size 1 on the batch axis")
        c = tuple(c[1:]) if len(c) == len(x) + 1 else (1,) * (len(x) - len(c)) + tuple(c)
        if any(p != q and 1 not in (p, q) for p, q in zip(x, c)):
            raise node.fail(f"constant {list(node.inputs[0 if constant[0] else 1])} does not broadcast with "
                            f"{[-1, *x]} (sizes equal or 1, aligned from the last axis)")
        return tuple(max(p, q) for p, q in zip(x, c))
    if len(a) != len(b) or any(x != y and 1 not in (x, y) for x, y in zip(a, b)):
        raise node.fail(f"its inputs {[-1, *a]} and {[-1, *b]} do not broadcast (same rank, sizes equal or 1)")
    return tuple(max(x, y) for x, y in zip(a, b))


def divide(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``x / y`` in IEEE float32 (a zero divisor gives +-inf or NaN, as in torch)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return x / y


def _binary(args: list, kwargs: dict, shape: list[int], where: str) -> tuple[dict, list]:
    if len(args) != 2 or set(kwargs) - {"alpha", "rounding_mode"} or kwargs.get("alpha", 1) != 1 \
            or kwargs.get("rounding_mode") is not None:
        raise UnsupportedLayerError(f"{where}: add, sub, mul and div are captured on two tensors, without alpha or "
                                    "rounding_mode")
    return {}, args


ADD = register(OpSchema(
    "add", broadcast, placement="joins", inputs=2, constants=True,
    capture=Capture(("operator.add", "operator.iadd", "torch.add", "Tensor.add"), _binary),
    numpy=lambda xs, a: xs[0] + xs[1], torch=lambda t, xs, a: xs[0] + xs[1],
    onnx=lambda b, name, xs, a: b.node("Add", xs, name)))
MUL = register(OpSchema(
    "mul", broadcast, placement="joins", inputs=2, constants=True,
    capture=Capture(("operator.mul", "operator.imul", "torch.mul", "Tensor.mul"), _binary),
    numpy=lambda xs, a: xs[0] * xs[1], torch=lambda t, xs, a: xs[0] * xs[1],
    onnx=lambda b, name, xs, a: b.node("Mul", xs, name)))
SUB = register(OpSchema(
    "sub", broadcast, placement="joins", inputs=2, constants=True,
    capture=Capture(("operator.sub", "operator.isub", "torch.sub", "Tensor.sub"), _binary),
    numpy=lambda xs, a: xs[0] - xs[1], torch=lambda t, xs, a: xs[0] - xs[1],
    onnx=lambda b, name, xs, a: b.node("Sub", xs, name)))
DIV = register(OpSchema(
    "div", broadcast, inputs=2, constants=True,
    capture=Capture(("operator.truediv", "operator.itruediv", "torch.div", "Tensor.div"), _binary),
    numpy=lambda xs, a: divide(xs[0], xs[1]), torch=lambda t, xs, a: xs[0] / xs[1],
    onnx=lambda b, name, xs, a: b.node("Div", xs, name)))
