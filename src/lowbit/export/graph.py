"""Capture a model as lowbit's graph IR: a JSON-able list of ops that a runtime without torch can run.

``capture(model, example_input)`` traces the model with ``torch.fx`` (lowbit's
quantized layers and torch's layers are leaves), propagates the example's
shapes, and returns::

    {"version": 1,
     "inputs": [{"name": "x", "shape": [-1, 1, 28, 28]}],
     "outputs": ["fc2"],
     "nodes": [{"name": "conv1", "op": "conv2d", "inputs": ["x"],
                "attrs": {"stride": [1, 1], ...},
                "params": {"weight": "conv1.weight", "bias": "conv1.bias"},
                "quant": {"weight": {...spec...}},
                "shape": [-1, 20, 24, 24], "module": "conv1"}, ...]}

``params`` map each local state name of the node's module to its state_dict
key: the layer's own parameters and buffers and the state of its input /
output quantizer (observed ranges, steps, ``input_quantizer.stats.min_val``),
which a runtime needs; weight-quantizer state is left out (the stored weight
codes carry it) and so is ``num_batches_tracked``. ``module`` names the
module a node calls (``call_module`` nodes only), so a loader can rebuild the
same state_dict keys. Shapes use -1 for the batch axis. Ops:
linear, conv2d, batchnorm, relu, hardtanh, tanh, maxpool2d, avgpool2d,
adaptive_avgpool2d, reshape, add, mul, concat, quant_act. Identity-like
modules (Dropout, Identity, Flatten of a flat tensor) disappear. Anything else
raises :class:`UnsupportedLayerError` naming the node.
"""

from __future__ import annotations

import contextlib
import io
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.fx.proxy import TraceError

from ..errors import LowbitError, ShapeMismatchError, UnsupportedLayerError

GRAPH_VERSION = 1

_LEAVES = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.Hardtanh, nn.Tanh, nn.MaxPool2d,
           nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Identity)
_ALIAS_MODULES = (nn.Dropout, nn.Identity)
_RESHAPES = {torch.flatten, torch.reshape, "view", "reshape", "flatten"}
_ALIAS_METHODS = {"contiguous", "clone", "detach"}
_FUNCTIONS = {operator.add: "add", torch.add: "add", operator.iadd: "add", operator.mul: "mul", torch.mul: "mul",
              F.relu: "relu", torch.relu: "relu", "relu": "relu", "add": "add", "mul": "mul", torch.tanh: "tanh",
              "tanh": "tanh", F.hardtanh: "hardtanh", torch.cat: "concat", F.max_pool2d: "maxpool2d",
              F.avg_pool2d: "avgpool2d", F.adaptive_avg_pool2d: "adaptive_avgpool2d"}


def _is_quant_act(m: nn.Module) -> bool:
    from ..nn import QuantAct

    return isinstance(m, QuantAct)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _LEAVES) or _is_quant_act(m) or super().is_leaf_module(m, qualname)


def _pair(v: Any) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]


def _spec(q: nn.Module | None) -> dict[str, Any] | None:
    return None if q is None else q.spec()


def _module_node(m: nn.Module, target: str) -> tuple[str, dict, dict, dict]:
    """(op, attrs, params, quant) of a leaf module."""
    params = {k: f"{target}.{k}" for k in m.state_dict(keep_vars=True)
              if not k.startswith("weight_quantizer.") and k.rsplit(".", 1)[-1] != "num_batches_tracked"}
    quant = {role: _spec(getattr(m, f"{role}_quantizer", None)) for role in ("weight", "input", "output")}
    if isinstance(m, nn.Linear):
        return "linear", {}, params, quant
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise UnsupportedLayerError(f"layer {target!r}: conv padding {m.padding!r} with padding_mode "
                                        f"{m.padding_mode!r} cannot be captured; use integer zero padding")
        attrs = {"stride": _pair(m.stride), "padding": _pair(m.padding), "dilation": _pair(m.dilation),
                 "groups": m.groups}
        return "conv2d", attrs, params, quant
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if not m.track_running_stats:
            raise UnsupportedLayerError(f"layer {target!r}: batch norm without running statistics cannot be captured")
        return "batchnorm", {"eps": m.eps}, params, {}
    if isinstance(m, nn.ReLU):
        return "relu", {}, {}, {}
    if isinstance(m, nn.Hardtanh):
        return "hardtanh", {"min": m.min_val, "max": m.max_val}, {}, {}
    if isinstance(m, nn.Tanh):
        return "tanh", {}, {}, {}
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        if m.ceil_mode:
            raise UnsupportedLayerError(f"layer {target!r}: pooling with ceil_mode=True cannot be captured")
        attrs = {"kernel": _pair(m.kernel_size), "stride": _pair(m.stride or m.kernel_size), "padding": _pair(m.padding)}
        if isinstance(m, nn.MaxPool2d) and _pair(m.dilation) != [1, 1]:
            raise UnsupportedLayerError(f"layer {target!r}: dilated max pooling cannot be captured")
        if isinstance(m, nn.AvgPool2d):
            attrs["count_include_pad"] = bool(m.count_include_pad)
        return ("maxpool2d" if isinstance(m, nn.MaxPool2d) else "avgpool2d"), attrs, {}, {}
    if isinstance(m, nn.AdaptiveAvgPool2d):
        return "adaptive_avgpool2d", {"output_size": _pair(m.output_size)}, {}, {}
    if _is_quant_act(m):
        return "quant_act", {}, params, {"output": _spec(m.quantizer)}
    raise UnsupportedLayerError(f"layer {target!r} of type {type(m).__name__} cannot be captured in the graph IR; "
                                f"supported: {', '.join(t.__name__ for t in _LEAVES)}, QuantAct")


def _shape(node: fx.Node) -> list[int] | None:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return None
    return [-1, *[int(d) for d in meta.shape[1:]]]


def capture(model: nn.Module, example_input: torch.Tensor) -> dict[str, Any]:
    """Trace ``model`` on ``example_input`` and return its graph IR (see the module docstring)."""
    try:
        graph = _Tracer().trace(model)
    except TraceError as exc:
        raise UnsupportedLayerError(f"model {type(model).__name__} cannot be traced with torch.fx: {exc}") from None
    gm = fx.GraphModule(model, graph)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints what it raises
            ShapeProp(gm).propagate(example_input)
    except RuntimeError as exc:  # ShapeProp names the node and keeps the model's own error as the cause
        cause = exc.__cause__ or exc
        if isinstance(cause, LowbitError):
            raise cause from None
        raise ShapeMismatchError(f"model {type(model).__name__} does not run on the example input of shape "
                                 f"{list(example_input.shape)}: {str(cause).splitlines()[0][:200]}") from None
    finally:
        for module, training in modes:
            module.training = training
    modules = dict(model.named_modules())
    alias: dict[str, str] = {}
    nodes: list[dict[str, Any]] = []
    inputs: list[dict[str, Any]] = []
    outputs: list[str] = []

    def ref(a: Any) -> str:
        if not isinstance(a, fx.Node):
            raise UnsupportedLayerError(f"graph input {a!r} is not a tensor")
        return alias.get(a.name, a.name)

    for node in graph.nodes:
        if node.op == "placeholder":
            inputs.append({"name": node.name, "shape": _shape(node)})
            continue
        if node.op == "output":
            outs = node.args[0] if isinstance(node.args[0], (tuple, list)) else [node.args[0]]
            outputs = [ref(o) for o in outs]
            continue
        if node.op == "get_attr":
            raise UnsupportedLayerError(f"node {node.name!r} reads attribute {node.target!r} directly; "
                                        "wrap parameters in supported layers")
        target = node.target
        if node.op == "call_method" and target == "size":
            continue  # only feeds reshape arguments, which are recorded from propagated shapes
        if node.op == "call_module":
            m = modules[target]
            if isinstance(m, _ALIAS_MODULES):
                alias[node.name] = ref(node.args[0])
                continue
            if isinstance(m, nn.Flatten):
                op, attrs, params, quant = "reshape", {}, {}, {}
            else:
                op, attrs, params, quant = _module_node(m, target)
            args = [node.args[0]]
        elif node.op == "call_method" and target in _ALIAS_METHODS:
            alias[node.name] = ref(node.args[0])
            continue
        elif target in _RESHAPES:
            op, attrs, params, quant, args = "reshape", {}, {}, {}, [node.args[0]]
        elif target in _FUNCTIONS:
            op, params, quant = _FUNCTIONS[target], {}, {}
            attrs, args = _function_attrs(op, node)
        else:
            raise UnsupportedLayerError(f"node {node.name!r} calls {getattr(target, '__name__', target)!r}, "
                                        "which the graph IR does not support")
        if op == "reshape":
            attrs = {"shape": _shape(node)}
        entry = {"name": node.name, "op": op, "inputs": [ref(a) for a in args], "attrs": attrs,
                 "params": params, "quant": {k: v for k, v in quant.items() if v is not None}, "shape": _shape(node)}
        if node.op == "call_module":
            entry["module"] = target
        nodes.append(entry)
    return {"version": GRAPH_VERSION, "inputs": inputs, "outputs": outputs, "nodes": nodes}


def _function_attrs(op: str, node: fx.Node) -> tuple[dict[str, Any], list[Any]]:
    """Attributes and tensor arguments of a functional call."""
    args, kwargs = list(node.args), dict(node.kwargs)
    if op in ("add", "mul"):
        if not all(isinstance(a, fx.Node) for a in args[:2]) or len(args) != 2:
            raise UnsupportedLayerError(f"node {node.name!r}: {op} must combine two tensors")
        return {}, args[:2]
    if op == "concat":
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        return {"axis": int(dim)}, list(args[0])
    if op == "hardtanh":
        lo = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
        hi = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
        return {"min": float(lo), "max": float(hi)}, args[:1]
    if op in ("maxpool2d", "avgpool2d"):
        kernel = kwargs.get("kernel_size", args[1] if len(args) > 1 else None)
        stride = kwargs.get("stride", args[2] if len(args) > 2 else None) or kernel
        padding = kwargs.get("padding", args[3] if len(args) > 3 else 0)
        return {"kernel": _pair(kernel), "stride": _pair(stride), "padding": _pair(padding)}, args[:1]
    if op == "adaptive_avgpool2d":
        return {"output_size": _pair(kwargs.get("output_size", args[1] if len(args) > 1 else 1))}, args[:1]
    return {}, args[:1]
