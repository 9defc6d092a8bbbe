"""add, sub, mul and div of two tensors, or of a tensor and a Python number.

Two tensors broadcast as numpy and torch do: two batched tensors of the same rank (each size equal, or 1 in one),
or a batched tensor and a constant (a stored tensor without the batch axis, such as a layer scale of shape
[C, 1, 1]), aligned from the last axis; a constant as long as the batched tensor (batch axis included) has size 1
on the batch axis.

A Python number operand (``x * 0.5``, ``x + 1``, ``x / 6``, ``1 - x``, ``1 / x``) is no tensor and no node: the
node has one input, the batched tensor, and two attributes, ``scalar`` (the number, a finite float within
float32's range; null, the default, for two tensors) and ``scalar_first`` (true when the number is the left
operand, as in ``1 - x``; default false). The output has the input's shape. Every reader computes in float32 with
the number rounded once to float32, as torch does for a float32 tensor; ``s / x`` is ``reciprocal(x) * s``, which
is what torch computes for it (``Tensor.__rtruediv__``). ONNX gets the number as a 0-d float32 initializer
operand. A node with a scalar and a second input, a scalar beside a constant alone, and ``scalar_first`` without a
scalar are refused. ``torch.add`` / ``torch.sub`` with ``alpha`` other than 1 (torch fuses the multiply-add) and
``div`` with a ``rounding_mode`` are not captured (UnsupportedLayerError naming the node).
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable

import numpy as np

from ..errors import UnsupportedLayerError
from .schema import FLOAT32_MAX, Bool, Capture, Node, Nullable, Number, OpSchema, Shape, register

#: the attributes of an arithmetic node: the Python number operand (None: two tensors) and its side
ATTRS = {"scalar": Nullable(Number()), "scalar_first": Bool()}
DEFAULTS = {"scalar": None, "scalar_first": False}


def broadcast(node: Node) -> Shape:
    scalar = node.attrs.get("scalar")
    if scalar is not None or node.attrs.get("scalar_first"):
        if scalar is None:
            raise node.fail("scalar_first is set without a scalar")
        if len(node.inputs) != 1:
            raise node.fail(f"has a scalar operand and {len(node.inputs)} inputs; with a scalar it takes one tensor "
                            "input")
        if node.constant and node.constant[0]:
            raise node.fail("computes on a constant and a scalar only; one operand must be a batched tensor")
        return node.inputs[0]
    if len(node.inputs) != 2:
        raise node.fail(f"takes 2 inputs (1 with a scalar), got {len(node.inputs)}")
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


def divide(x: np.ndarray, y: Any) -> np.ndarray:
    """``x / y`` in IEEE float32 (a zero divisor gives +-inf or NaN, as in torch)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return x / y


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _capture(op: str) -> Callable[[list, dict, list[int], str], tuple[dict, list]]:
    def call(args: list, kwargs: dict, shape: list[int], where: str) -> tuple[dict, list]:
        if len(args) != 2 or set(kwargs) - {"alpha", "rounding_mode"}:
            raise UnsupportedLayerError(f"{where}: {op} is captured on two operands, without keyword arguments "
                                        f"other than alpha=1 and rounding_mode=None, got {len(args)} operand(s) "
                                        f"and {sorted(kwargs)}")
        if kwargs.get("alpha", 1) != 1:
            raise UnsupportedLayerError(f"{where}: {op} with alpha={kwargs['alpha']!r} is not supported (torch "
                                        "fuses the multiply-add); write the product out, as x + alpha * y")
        if kwargs.get("rounding_mode") is not None:
            raise UnsupportedLayerError(f"{where}: div with rounding_mode={kwargs['rounding_mode']!r} is not "
                                        "supported; only true division is captured")
        for a in args:
            if isinstance(a, (bool, complex, str)):
                raise UnsupportedLayerError(f"{where}: {op} on the operand {a!r}, which is neither a tensor nor a "
                                            "real number")
        numbers = [_is_number(a) for a in args]
        if not any(numbers):
            return {}, args
        if all(numbers):
            raise UnsupportedLayerError(f"{where}: {op} of two numbers is no tensor")
        index = numbers.index(True)
        value = args[index]
        if abs(value) > FLOAT32_MAX or not math.isfinite(value):
            raise UnsupportedLayerError(f"{where}: {op} by {value!r}, which is not a finite float32 number")
        return {"scalar": float(value), "scalar_first": index == 0}, [args[1 - index]]
    return call


def _operands(xs: list, attrs: dict[str, Any], number: Callable[[float], Any]) -> tuple[Any, Any]:
    """The two operands, in order: the inputs, or the input and the scalar (converted by ``number``)."""
    if attrs["scalar"] is None:
        return xs[0], xs[1]
    s = number(attrs["scalar"])
    return (s, xs[0]) if attrs["scalar_first"] else (xs[0], s)


def _numpy(function: Callable) -> Callable[[list[np.ndarray], dict[str, Any]], np.ndarray]:
    def run(xs: list[np.ndarray], attrs: dict[str, Any]) -> np.ndarray:
        x, y = _operands(xs, attrs, np.float32)
        if function is divide and attrs["scalar_first"]:  # torch: s / x is reciprocal(x) * s
            return divide(np.float32(1), y) * x
        return function(x, y)
    return run


def _torch(function: Callable) -> Callable[[Any, list, dict[str, Any]], Any]:
    return lambda t, xs, attrs: function(*_operands(xs, attrs, float))


def _onnx(op_type: str) -> Callable[[Any, str, list[str], dict[str, Any]], str]:
    def emit(b: Any, name: str, xs: list[str], attrs: dict[str, Any]) -> str:
        if attrs["scalar"] is None:
            return b.node(op_type, xs, name)
        s = b.const(f"{name}.scalar", np.array(attrs["scalar"], dtype=np.float32))
        if op_type == "Div" and attrs["scalar_first"]:  # as torch: reciprocal(x) * s
            return b.node("Mul", [b.node("Reciprocal", xs, f"{name}.reciprocal"), s], name)
        return b.node(op_type, [s, xs[0]] if attrs["scalar_first"] else [xs[0], s], name)
    return emit


def _declare(name: str, functions: tuple[str, ...], function: Callable, numpy: Callable, op_type: str,
             placement: str = "") -> OpSchema:
    return register(OpSchema(
        name, broadcast, placement=placement, inputs=None, constants=True, attrs=ATTRS, defaults=DEFAULTS,
        capture=Capture(functions, _capture(name)), numpy=_numpy(numpy), torch=_torch(function),
        onnx=_onnx(op_type)))


ADD = _declare("add", ("operator.add", "operator.iadd", "torch.add", "Tensor.add"), operator.add, operator.add,
               "Add", "joins")
MUL = _declare("mul", ("operator.mul", "operator.imul", "torch.mul", "Tensor.mul"), operator.mul, operator.mul,
               "Mul", "joins")
SUB = _declare("sub", ("operator.sub", "operator.isub", "torch.sub", "Tensor.sub"), operator.sub, operator.sub,
               "Sub", "joins")
DIV = _declare("div", ("operator.truediv", "operator.itruediv", "torch.div", "Tensor.div"), operator.truediv, divide,
               "Div")
