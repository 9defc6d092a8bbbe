"""constant: a parameter or buffer of the model read as a tensor (``self.layer_scale * x``, the weight handed to
``F.layer_norm``), stored in the file under its state_dict key.

A constant node has no inputs; ``params`` is ``{"value": "<state_dict key>"}`` and it names no module. Its output
has no batch axis: its recorded shape is the tensor's own shape (no -1), and only ops that take constants (add, sub,
mul, div, which broadcast it against a batched tensor as numpy does; layer_norm's weight and bias) read it. Attribute
``parameter``: whether the model held it as an ``nn.Parameter`` (else a buffer), as ``GraphModel`` registers it
again at the same key. Attribute ``crop`` (optional): the node reads the leading corner ``value[:c0, :c1, ...]``
of the stored tensor (a model slicing its positional table or mask to the sequence it is given, ``pos[:, :L]``),
one size per axis, each from 1 to the stored size; the recorded shape is then ``crop``. The Engine reads the
stored tensor as float32, ONNX writes it as an initializer (a Slice of it where cropped).
"""

from __future__ import annotations

import numpy as np

from ..errors import UnsupportedLayerError
from .schema import Bool, Capture, Ints, Node, Nullable, OpSchema, Shape, register


def _shape(node: Node) -> Shape:
    stored, crop = node.tensors["value"], node.attrs["crop"]
    if crop is None:
        return stored
    if len(crop) != len(stored) or not all(1 <= c <= s for c, s in zip(crop, stored)):
        raise node.fail(f"crop {crop} must give each of the {len(stored)} axes of the stored tensor {list(stored)} a "
                        "size from 1 to that axis's size")
    return tuple(crop)


def _crop(x, crop: list[int] | None):
    return x if crop is None else x[tuple(slice(0, c) for c in crop)]


def _onnx(b, name: str, xs: list[str], a: dict) -> str:
    if a["crop"] is None:
        return xs[0]
    ints = lambda key, v: b.const(f"{name}.{key}", np.array(v, np.int64))  # noqa: E731
    crop = a["crop"]
    return b.node("Slice", [xs[0], ints("starts", [0] * len(crop)), ints("ends", crop),
                            ints("axes", list(range(len(crop))))], name)


def _get_attr(tensor, key: str, where: str) -> dict:
    """The attributes of a read of ``tensor`` (the model's parameter or buffer at ``key``)."""
    if not tensor.is_floating_point() or tensor.dtype.itemsize != 4:
        raise UnsupportedLayerError(f"{where} reads tensor {key!r} of dtype {tensor.dtype}; the graph IR computes in "
                                    "float32")
    return {"parameter": type(tensor).__name__ == "Parameter"}


CONSTANT = register(OpSchema(
    "constant", _shape, inputs=0, tensors=("value",),
    attrs={"parameter": Bool(), "crop": Nullable(Ints(None, 1, 2**31 - 1))}, defaults={"parameter": True, "crop": None},
    batchless=True, capture=Capture(get_attr=_get_attr),
    numpy=lambda xs, a: _crop(xs[0], a["crop"]), torch=lambda t, xs, a: _crop(xs[0], a["crop"]), onnx=_onnx))
