"""embedding: ``y[..., :] = W[x[...], :]``, a lookup of rows of the weight ``[num_embeddings, dim]`` by integer
token indices (torch.nn.Embedding, Bengio et al. 2003); the input is an int64 graph input of any rank, the output
appends the embedding axis. Its weight is quantized per row (the row is the output channel, axis 0), so the Engine
gathers decoded rows and ONNX a ``Gather`` of a per-row ``DequantizeLinear``. Indices outside ``[0,
num_embeddings)`` are refused by name, as torch refuses them.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError, UnsupportedLayerError
from .schema import Capture, Node, OpSchema, Shape, register


def embedding(x: np.ndarray, weight: np.ndarray, where: str = "embedding") -> np.ndarray:
    """The rows of ``weight`` at the int indices ``x`` (shape ``[*x.shape, dim]``); ConfigError naming ``where``
    for an index outside the table."""
    if x.dtype.kind not in "iu":
        raise ConfigError(f"{where} takes integer token indices, got {x.dtype}")
    if x.size and (int(x.min()) < 0 or int(x.max()) >= weight.shape[0]):
        raise ConfigError(f"{where}: token indices must lie in [0, {weight.shape[0]}), got "
                          f"[{int(x.min())}, {int(x.max())}]")
    return weight[x]


def _shape(node: Node) -> Shape:
    weight = node.tensors["weight"]
    if len(weight) != 2:
        raise node.fail(f"its weight must be 2-D [num_embeddings, dim], got {list(weight)}")
    return (*node.inputs[0], weight[1])


def _module(m, shape: list[int], where: str) -> dict:
    if m.max_norm is not None:
        raise UnsupportedLayerError(f"{where}: an embedding with max_norm renormalizes its weight in place on every "
                                    "call and cannot be captured; leave max_norm None")
    return {}


EMBEDDING = register(OpSchema("embedding", _shape, tensors=("weight",), quant=("weight", "output"),
                              state=("output_quantizer",), module=True, indices=True,
                              capture=Capture(modules=("torch.nn.Embedding",), module=_module)))
