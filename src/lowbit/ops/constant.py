"""constant: a parameter or buffer of the model read as a tensor (``self.layer_scale * x``, the weight handed to
``F.layer_norm``), stored in the file under its state_dict key.

A constant node has no inputs; ``params`` is ``{"value": "<state_dict key>"}`` and it names no module. Its output
has no batch axis: its recorded shape is the tensor's own shape (no -1), and only ops that take constants (add, sub,
mul, div, which broadcast it against a batched tensor as numpy does; layer_norm's weight and bias) read it. Attribute
``parameter``: whether the model held it as an ``nn.Parameter`` (else a buffer), as ``GraphModel`` registers it
again at the same key. The Engine reads the stored tensor as float32, ONNX writes it as an initializer.
"""

from __future__ import annotations

from ..errors import UnsupportedLayerError
from .schema import Bool, Capture, Node, OpSchema, Shape, register


def _shape(node: Node) -> Shape:
    return node.tensors["value"]


def _get_attr(tensor, key: str, where: str) -> dict:
    """The attributes of a read of ``tensor`` (the model's parameter or buffer at ``key``)."""
    if not tensor.is_floating_point() or tensor.dtype.itemsize != 4:
        raise UnsupportedLayerError(f"{where} reads tensor {key!r} of dtype {tensor.dtype}; the graph IR computes in "
                                    "float32")
    return {"parameter": type(tensor).__name__ == "Parameter"}


CONSTANT = register(OpSchema(
    "constant", _shape, inputs=0, tensors=("value",), attrs={"parameter": Bool()}, defaults={"parameter": True},
    batchless=True, capture=Capture(get_attr=_get_attr),
    numpy=lambda xs, a: xs[0], torch=lambda t, xs, a: xs[0], onnx=lambda b, name, xs, a: xs[0]))
