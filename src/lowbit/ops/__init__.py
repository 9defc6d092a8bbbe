"""The graph IR's ops, one file per family, each declaring its schema once (:mod:`lowbit.ops.schema`), with its
float32 numpy implementation; :func:`validate_document` checks a stored document against them. Imports no torch.
"""

# noqa: F401 below: imported to register the ops
from . import (activation, arithmetic, attention, constant, conv, embedding, linear, norm, pool,  # noqa: F401
               react, rnn, shape)
from .schema import MAX_ELEMENTS, MAX_NODES, MAX_RANK, MAX_SPATIAL, REGISTRY, OpSchema
from .specs import check_spec
from .validate import LAYER_OPS, Graph, GraphNode, validate_document, validate_file, validate_graph, validate_layers

__all__ = ["LAYER_OPS", "MAX_ELEMENTS", "MAX_NODES", "MAX_RANK", "MAX_SPATIAL", "REGISTRY", "Graph", "GraphNode",
           "OpSchema", "check_spec", "validate_document", "validate_file", "validate_graph", "validate_layers"]
