"""Shape ops: reshape to a recorded shape (batch axis -1 kept; flatten, view, reshape) and concat along a
non-batch axis."""

from __future__ import annotations

import math

import numpy as np

from .schema import MAX_RANK, Capture, ExampleShape, Int, Node, OpSchema, Shape, argument, register


def _reshape_shape(node: Node) -> Shape:
    target = tuple(node.attrs["shape"][1:])
    if math.prod(target) != math.prod(node.inputs[0]):
        raise node.fail(f"cannot reshape {[-1, *node.inputs[0]]} to {node.attrs['shape']}: the sizes differ")
    return target


def _concat_shape(node: Node) -> Shape:
    first = node.inputs[0]
    rank = len(first) + 1
    axis = node.attrs["axis"]
    if not -rank < axis < rank or axis == 0:
        raise node.fail(f"concat axis must lie in [{-rank + 1}, {rank - 1}] and not be 0 (the batch), got {axis}")
    axis = (axis % rank) - 1
    for shape in node.inputs[1:]:
        if len(shape) != len(first) or any(a != b for i, (a, b) in enumerate(zip(first, shape)) if i != axis):
            raise node.fail(f"concatenated inputs must match except on axis {node.attrs['axis']}, got "
                            f"{[[-1, *s] for s in node.inputs]}")
    return (*first[:axis], sum(s[axis] for s in node.inputs), *first[axis + 1 :])


def _reshape(b, name: str, xs: list[str], a: dict) -> str:
    return b.node("Reshape", [xs[0], b.const(f"{name}.shape", np.array([-1, *a["shape"][1:]], np.int64))], name)


RESHAPE = register(OpSchema(
    "reshape", _reshape_shape, attrs={"shape": ExampleShape()},
    capture=Capture(("torch.flatten", "torch.reshape", "Tensor.view", "Tensor.reshape", "Tensor.flatten"),
                    lambda args, kwargs, shape, where: ({"shape": shape}, args[:1]), ("torch.nn.Flatten",),
                    lambda m, shape, where: {"shape": shape}),
    numpy=lambda xs, a: xs[0].reshape([xs[0].shape[0], *a["shape"][1:]]),
    torch=lambda t, xs, a: xs[0].reshape(a["shape"]), onnx=_reshape))
CONCAT = register(OpSchema(
    "concat", _concat_shape, inputs=None, attrs={"axis": Int(-MAX_RANK, MAX_RANK)},
    capture=Capture(("torch.cat", "torch.concat"),
                    lambda args, kwargs, shape, where: ({"axis": int(argument(args, kwargs, 1, "dim", 0))},
                                                        list(args[0]))),
    numpy=lambda xs, a: np.concatenate(xs, axis=a["axis"]), torch=lambda t, xs, a: t.cat(xs, a["axis"]),
    onnx=lambda b, name, xs, a: b.node("Concat", xs, name, axis=a["axis"])))
