"""add and mul of two tensors of the same rank, broadcast as numpy and torch do (each size equal, or 1 in one)."""

from __future__ import annotations

from .schema import Node, OpSchema, Shape, register


def broadcast(node: Node) -> Shape:
    a, b = node.inputs
    if len(a) != len(b) or any(x != y and 1 not in (x, y) for x, y in zip(a, b)):
        raise node.fail(f"its inputs {[-1, *a]} and {[-1, *b]} do not broadcast (same rank, sizes equal or 1)")
    return tuple(max(x, y) for x, y in zip(a, b))


ADD = register(OpSchema("add", broadcast, inputs=2, numpy=lambda xs, a: xs[0] + xs[1]))
MUL = register(OpSchema("mul", broadcast, inputs=2, numpy=lambda xs, a: xs[0] * xs[1]))
