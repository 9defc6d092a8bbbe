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
same state_dict keys. Shapes use -1 for the batch axis.

A parameter or buffer the model reads directly (an fx ``get_attr``: a layer
scale in ``self.layer_scale * x``, the weight handed to ``F.layer_norm``),
and the weight and bias of a parameter-free op's module (``nn.LayerNorm``),
become ``constant`` nodes, one per tensor::

    {"name": "layer_scale", "op": "constant", "inputs": [], "attrs": {"parameter": true},
     "params": {"value": "features.1.0.layer_scale"}, "quant": {}, "shape": [96, 1, 1]}

``params.value`` is the tensor's state_dict key (the loader registers it
there again); ``shape`` is the tensor's own, *without* a batch axis, and
only ops declared to take constants (``OpSchema.constants``: arithmetic,
which broadcasts it against the batch as numpy does, and layer_norm) read
it. A slice of such a tensor from its start (``self.pos[:, :x.shape[1]]``,
``self.mask[:L, :L]``: float buffers are traced as proxies, as parameters
are) is a constant reading its leading corner (attribute ``crop``), or the
constant itself where it takes all; a slice past the tensor's end (a
sequence longer than the table) is a ShapeMismatchError naming the node and
the tensor. Nodes nothing reads are dropped after tracing (a causal mask
that ``is_causal`` leaves unread). A tensor that is no parameter or
persistent buffer, or an op computing on constants alone, is refused. The ops and how each
is recognised (functions, tensor methods, module classes and their
subclasses; ``Capture.when`` where several ops share a function, as the
modes of ``interpolate`` do) are declared in :mod:`lowbit.ops` (``OpSchema.capture``).
Identity-like modules (Dropout, Identity), methods (contiguous, clone,
detach) and functions in eval mode (functional dropout, torchvision's
stochastic depth) disappear; sizes and arithmetic on them are dropped (they
only feed shapes, which are recorded), and the pieces of chunk and split
become slice nodes where they are indexed. Anything else raises :class:`UnsupportedLayerError`
naming the node.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import operator
import os
import traceback
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.fx.proxy import TraceError

from ..errors import LowbitError, ShapeMismatchError, UnsupportedLayerError
from ..ops import REGISTRY, OpSchema
from ..ops.shape import SPLITS, slices
from .transformer import ATTENTION_ATTR, attention_mask, decompose, traced_forward

GRAPH_VERSION = 1

_ALIAS_MODULES = (nn.Dropout, nn.Identity)
#: functions that are the identity when their ``training`` argument is False, by qualified name (torchvision's is
#: matched without importing it) -> the position of that argument
_ALIAS_FUNCTIONS = {**dict.fromkeys([f"torch.nn.functional.{name}" for name in
                                     ("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout")], 2),
                    "torchvision.ops.stochastic_depth.stochastic_depth": 3}
#: the declared role of chunk and split: their pieces become slice nodes where they are indexed
_SPLIT = OpSchema("split", lambda node: ())
_ALIAS_METHODS = {"contiguous", "clone", "detach"}


def _resolve(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


@functools.cache
def _declared() -> tuple[dict[Any, tuple], dict[str, tuple], tuple[tuple[type, OpSchema], ...]]:
    """(function -> (op, call), tensor method name -> (op, call), (module class, op) pairs) of the declared
    captures."""
    functions, methods, modules = {}, {}, []
    for schema in REGISTRY.values():
        capture = schema.capture
        for name, call in [*((n, capture.call) for n in capture.functions), *capture.calls.items()]:
            if name.startswith("Tensor."):
                methods[name.removeprefix("Tensor.")] = schema, call
            else:
                functions[_resolve(name)] = schema, call
        modules += [(_resolve(name), schema) for name in capture.modules]
    for name in SPLITS:
        if name.startswith("Tensor."):
            methods[name.removeprefix("Tensor.")] = _SPLIT, None
        else:
            functions[_resolve(name)] = _SPLIT, None
    return functions, methods, tuple(modules)


@functools.cache
def _alternatives() -> dict[Any, list[tuple[OpSchema, Any]]]:
    """Functions (and ``Tensor.<method>`` names) that several ops declare -> (op, call) of each, in registry
    order: which op a call is depends on its arguments (``Capture.when``)."""
    declared: dict[Any, list[tuple[OpSchema, Any]]] = {}
    for schema in REGISTRY.values():
        capture = schema.capture
        for name, call in [*((n, capture.call) for n in capture.functions), *capture.calls.items()]:
            key = name if name.startswith("Tensor.") else _resolve(name)
            declared.setdefault(key, []).append((schema, call))
    return {key: choices for key, choices in declared.items() if len(choices) > 1}


def _chosen(table: dict[Any, tuple], target: Any, args: Any, kwargs: dict, method: bool = False) -> tuple | None:
    """(op, call) of a call of ``target`` (a function, or a method name when ``method``): the first op declaring it
    whose ``Capture.when`` accepts the arguments, else the first declared (whose call then says what it supports);
    None for an undeclared target."""
    for schema, call in _alternatives().get(f"Tensor.{target}" if method else target, ()):
        if schema.capture.when is None or schema.capture.when(list(args), dict(kwargs)):
            return schema, call
    return table.get(target)


@functools.cache
def _get_attr_schema() -> OpSchema:
    """The op a read of a parameter or buffer becomes (the one declaring ``Capture.get_attr``)."""
    (schema,) = [s for s in REGISTRY.values() if s.capture.get_attr is not None]
    return schema


def _eval_identity(node: fx.Node, where: str) -> bool:
    """Whether ``node`` calls one of the functions of ``_ALIAS_FUNCTIONS`` with ``training`` False (traced in eval
    mode); UnsupportedLayerError when it is True there (a random op that eval mode does not turn off)."""
    name = f"{getattr(node.target, '__module__', '')}.{getattr(node.target, '__name__', '')}"
    if name not in _ALIAS_FUNCTIONS:
        return False
    index = _ALIAS_FUNCTIONS[name]
    if node.kwargs.get("training", node.args[index] if len(node.args) > index else True):
        raise UnsupportedLayerError(f"{where}: {name} with training=True is random in eval mode too; pass "
                                    "training=self.training")
    return True


def _declared_module(m: nn.Module) -> OpSchema | None:
    """The op a module is: an instance of a declared class whose ``forward`` it keeps (lowbit's own layers
    quantize around the same computation). A subclass with its own ``forward`` is no leaf: it is traced
    through, so its custom computation (a "same" padding, a permuted norm) is never dropped."""
    for cls, schema in _declared()[2]:
        if isinstance(m, cls) and (type(m).forward is cls.forward or type(m).__module__.startswith("lowbit.nn.")) \
                and (schema.capture.module_when is None or schema.capture.module_when(m)):
            return schema
    for cls, schema in _declared()[2]:  # a module class several ops declare, in a form none accepts: the first
        if isinstance(m, cls) and type(m).forward is cls.forward:
            return schema
    return None


def _module_schema(m: nn.Module, where: str) -> OpSchema:
    schema = _declared_module(m)
    if schema is None:
        supported = ", ".join(cls.__name__ for cls, _ in _declared()[2])
        raise UnsupportedLayerError(f"{where} of type {type(m).__name__} cannot be captured in the graph IR; "
                                    f"supported: {supported} and their subclasses that keep their forward")
    return schema


class _Tracer(fx.Tracer):
    def __init__(self, leaves: tuple[str | type, ...] = ()) -> None:
        super().__init__()
        self.leaf_paths = {leaf for leaf in leaves if isinstance(leaf, str)}
        self.leaf_types = tuple(leaf for leaf in leaves if isinstance(leaf, type))

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_paths or isinstance(m, self.leaf_types):
            return True
        if traced_forward(m) is not None:  # torch's Transformer modules: traced through (their reference path)
            return False
        return (_declared_module(m) is not None or isinstance(m, _ALIAS_MODULES)
                or super().is_leaf_module(m, qualname))

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        """Float buffers the model reads itself are proxies too (as parameters are), so that it may slice them by
        the input's size (``self.mask[:L, :L]``); integer buffers (index tables) stay tensors."""
        if isinstance(attr_val, torch.Tensor) and not isinstance(attr_val, nn.Parameter) and \
                attr_val.is_floating_point():
            self.proxy_buffer_attributes = True
            try:
                return super().getattr(attr, attr_val, parameter_proxy_cache)
            finally:
                self.proxy_buffer_attributes = False
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: dict) -> Any:
        """Transformer encoders and their layers run their reference path, never the fused eval-mode one."""
        function = traced_forward(m)
        if function is not None:
            forward = functools.partial(function, m)
        return super().call_module(m, forward, args, kwargs)


def trace(model: nn.Module, leaves: tuple[str | type, ...] = ()) -> fx.GraphModule:
    """``model`` traced with ``torch.fx`` in eval mode (``self.training`` reads False), its train/eval modes kept.

    Declared layers (:mod:`lowbit.ops`) and ``leaves`` (module paths or classes the user names) stay modules;
    everything else is traced through. A model that cannot be traced raises UnsupportedLayerError naming the line
    of its own code and saying how to make the module at fault a leaf.
    """
    model = decompose(model, tuple(leaves))  # multi-head attention as linears and matmuls (in a copy of the model)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        traced = fx.GraphModule(model, _Tracer(tuple(leaves)).trace(model))
        if traced.graph.eliminate_dead_code():  # e.g. a causal mask sliced by the model that is_causal leaves unread
            traced.recompile()
        if hasattr(model, ATTENTION_ATTR):
            setattr(traced, ATTENTION_ATTR, getattr(model, ATTENTION_ATTR))
        return traced
    except (TraceError, TypeError) as exc:
        raise UnsupportedLayerError(
            f"model {type(model).__name__} cannot be traced with torch.fx: {str(exc).splitlines()[0]}"
            f"{_user_line(exc)}; or pass leaves=['path.of.module'] to keep that module whole (it then runs in "
            "float and cannot be saved with a graph)") from None
    finally:
        for module, training in modes:
            module.training = training


def is_stored(node: Any) -> bool:
    """Whether fx ``node`` is a stored tensor read as a constant: a parameter or buffer (``get_attr``), or a slice
    of one (``self.pos[:, :L]``, captured as a cropped constant)."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem and node.args:
        node = node.args[0]
    return isinstance(node, fx.Node) and node.op == "get_attr"


def node_schema(node: fx.Node, modules: dict[str, nn.Module]) -> OpSchema | None:
    """The declared op an fx node calls (module, function or tensor method), None for any other node."""
    if node.op == "call_module":
        return _declared_module(modules[node.target])
    functions, methods, _ = _declared()
    if node.op in ("call_function", "call_method"):
        method = node.op == "call_method"
        return (_chosen(methods if method else functions, node.target, node.args, node.kwargs, method) or (None,))[0]
    return None


def _module_state(m: nn.Module, target: str) -> tuple[dict[str, str], dict[str, Any]]:
    """(params, quant) of a leaf module: its state that a runtime needs (not the weight quantizer's, which the stored
    codes carry, nor num_batches_tracked) and its quantizer specs."""
    params = {k: f"{target}.{k}" for k in m.state_dict(keep_vars=True)
              if not k.startswith(("weight_quantizer.", "weight_quantizers."))
              and k.rsplit(".", 1)[-1] != "num_batches_tracked"}
    slots = {"weight": "weight_quantizer", "input": "input_quantizer", "output": "output_quantizer"}
    if not hasattr(m, "weight_quantizer"):
        slots = {"output": "quantizer"}
    quant = {slot: getattr(m, name).spec() for slot, name in slots.items() if getattr(m, name, None) is not None}
    return params, quant


def _recurrent(node: Any, modules: dict[str, nn.Module]) -> bool:
    """Whether fx ``node`` calls a recurrent layer (an LSTM / GRU, whose value is ``(output, state)``)."""
    return isinstance(node, fx.Node) and node.op == "call_module" and isinstance(modules.get(node.target),
                                                                               (nn.LSTM, nn.GRU))


def _shape(node: fx.Node) -> list[int] | None:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return None
    return [-1, *[int(d) for d in meta.shape[1:]]]


def _input_dtype(node: fx.Node) -> dict[str, str]:
    """``{"dtype": "int64"}`` for an input of token indices (an embedding's), else nothing (float32)."""
    meta = node.meta.get("tensor_meta")
    dtype = getattr(meta, "dtype", torch.float32)
    return {"dtype": "int64"} if dtype == torch.int64 else {}


def _user_line(exc: BaseException) -> str:
    """Where in the model's own code tracing failed (the last frame outside torch), for the error message."""
    torch_dir = os.path.dirname(torch.__file__)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(torch_dir)]
    if not frames:
        return ""
    frame = frames[-1]
    return (f", at {frame.filename}:{frame.lineno} in {frame.name} ({(frame.line or '').strip()!r}); a branch on "
            "tensor values cannot be captured: compute the condition outside the model, or save without a graph")


class _ShapeProp(ShapeProp):
    """ShapeProp that refuses a slice of a stored tensor reaching past its end (``pos[:, :L]`` with ``L`` above the
    table's length: a sequence longer than the model's recorded maximum), naming the node and the tensor."""

    def run_node(self, n: fx.Node) -> Any:
        source = n.args[0] if n.op == "call_function" and n.target is operator.getitem and n.args else None
        if isinstance(source, fx.Node) and source.op == "get_attr":
            table, index = self.fetch_args_kwargs_from_env(n)[0]
            index = index if isinstance(index, tuple) else (index,)
            for axis, (cut, size) in enumerate(zip(index, getattr(table, "shape", ()))):
                stop = cut.stop if isinstance(cut, slice) else None
                if isinstance(stop, int) and stop > size:
                    raise ShapeMismatchError(
                        f"node {n.name!r} slices {source.target!r} to {stop} along axis {axis}, but it holds "
                        f"{size}: the input (e.g. a sequence of {stop} tokens) is longer than the recorded maximum "
                        f"{size} of {source.target!r}")
        return super().run_node(n)


def propagate(gm: fx.GraphModule, name: str, example_input: torch.Tensor) -> None:
    """Record every node's output shape (ShapeProp); the model's own LowbitError, else ShapeMismatchError."""
    try:
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints what it raises
            _ShapeProp(gm).propagate(example_input)
    except RuntimeError as exc:  # ShapeProp names the node and keeps the model's own error as the cause
        cause = exc.__cause__ or exc
        if isinstance(cause, LowbitError):
            raise cause from None
        raise ShapeMismatchError(f"model {name} does not run on the example input of shape "
                                 f"{list(example_input.shape)}: {str(cause).splitlines()[0][:200]}") from None


def capture(model: nn.Module, example_input: torch.Tensor) -> dict[str, Any]:
    """Trace ``model`` on ``example_input`` and return its graph IR (see the module docstring)."""
    functions, methods, _ = _declared()
    traced = trace(model)
    graph = traced.graph
    modes = [(m, m.training) for m in traced.modules()]
    traced.eval()
    try:
        propagate(traced, type(model).__name__, example_input)
    finally:
        for module, training in modes:
            module.training = training
    modules = dict(traced.named_modules())
    alias: dict[str, str] = {}
    arithmetic: set[str] = set()
    #: chunk / split node -> (its input, the slice attributes of its pieces)
    pieces: dict[str, tuple[fx.Node, list[dict[str, Any]]]] = {}
    nodes: list[dict[str, Any]] = []
    inputs: list[dict[str, Any]] = []
    outputs: list[str] = []
    #: state_dict key -> the name of the constant node reading it; the constants' names
    constant_nodes: dict[str, str] = {}
    constants: set[str] = set()
    taken = {node.name for node in graph.nodes}
    state: dict[str, torch.Tensor] = {}

    def ref(a: Any, where: str = "the graph output") -> str:
        if isinstance(a, fx.Node) and a.name in arithmetic:
            raise UnsupportedLayerError(f"{where}: operand {a.name!r} is a size read off a tensor's shape (or "
                                        "arithmetic on one), which the graph IR does not compute with; use a Python "
                                        "number")
        if not isinstance(a, fx.Node) or a.name in pieces:
            raise UnsupportedLayerError(f"{where}: operand {a!r} is not a tensor")
        return alias.get(a.name, a.name)

    def constant(key: str, name: str, where: str, fresh: bool) -> str:
        """The constant node reading the model's parameter or buffer ``key``, made at its first read and named
        ``name`` (``fresh``: made unique; else the reading fx node's own name)."""
        if not state:
            state.update(model.state_dict(keep_vars=True))
        if key not in state:
            raise UnsupportedLayerError(f"{where} reads attribute {key!r}, which is no parameter or persistent buffer "
                                        "of the model (a file would not hold it); register it as one")
        if key not in constant_nodes:
            schema, tensor = _get_attr_schema(), state[key]
            while fresh and name in taken:
                name += "_"
            taken.add(name)
            nodes.append({"name": name, "op": schema.name, "inputs": [], "attrs": schema.capture.get_attr(
                tensor, key, where), "params": {"value": key}, "quant": {}, "shape": list(tensor.shape)})
            constant_nodes[key] = name
            constants.add(name)
        return constant_nodes[key]

    def cropped(node: fx.Node, where: str) -> str:
        """A slice of a stored tensor from its start (``pos[:, :L]``, ``mask[:L, :L]``): a constant node reading
        its leading corner (``crop``), or the constant itself where the slice takes it whole."""
        key, index = node.args[0].target, node.args[1]
        index = index if isinstance(index, tuple) else (index,)
        stored, shape = list(state[key].shape), [int(d) for d in node.meta["tensor_meta"].shape]
        if len(index) > len(stored) or len(shape) != len(stored) or not all(
                isinstance(i, slice) and i.start in (None, 0) and i.step in (None, 1) for i in index):
            raise UnsupportedLayerError(f"{where} indexes stored tensor {key!r} with {index!r}; the graph IR reads a "
                                        "stored tensor whole or a leading corner of it (x[:a, :b], from 0, step 1)")
        if shape == stored:
            return constant_nodes[key]
        name = node.name  # the fx node's own name, unique in the graph
        nodes.append({"name": name, "op": "constant", "inputs": [], "attrs": {
            **_get_attr_schema().capture.get_attr(state[key], key, where), "crop": shape},
            "params": {"value": key}, "quant": {}, "shape": shape})
        constants.add(name)
        return name

    for node in graph.nodes:
        if node.op == "placeholder":
            inputs.append({"name": node.name, "shape": _shape(node), **_input_dtype(node)})
            continue
        if node.op == "output":
            outs = node.args[0] if isinstance(node.args[0], (tuple, list)) else [node.args[0]]
            outputs = [ref(o) for o in outs]
            continue
        if node.op == "get_attr":
            alias[node.name] = constant(node.target, node.name, f"node {node.name!r}", fresh=False)
            continue
        target, where = node.target, f"node {node.name!r}"
        if node.op in ("call_function", "call_method") and "tensor_meta" not in node.meta:
            arithmetic.add(node.name)  # sizes and their arithmetic: they only feed arguments recorded as shapes
            continue
        if node.op == "call_function" and target is operator.getitem and \
                alias.get(getattr(node.args[0], "name", ""), "") in constants:
            alias[node.name] = cropped(node, where)
            continue
        if node.op == "call_function" and target is operator.getitem and _recurrent(node.args[0], modules):
            if node.args[1] != 0:  # (output, final state): the state is no graph value
                raise UnsupportedLayerError(f"{where} reads item {node.args[1]!r} (the final state) of recurrent "
                                            f"layer {node.args[0].target!r}; the graph IR keeps its output "
                                            "(item 0): use output[:, -1] for the last step")
            alias[node.name] = ref(node.args[0], where)
            continue
        if node.op == "call_function" and target is attention_mask:  # a check that returns the mask
            alias[node.name] = ref(node.args[0], where)
            continue
        if node.op == "call_method" and target in _ALIAS_METHODS or \
                node.op == "call_module" and isinstance(modules[target], _ALIAS_MODULES) or \
                node.op == "call_function" and _eval_identity(node, where):
            alias[node.name] = ref(node.args[0], where)
            continue
        if (methods if node.op == "call_method" else functions).get(target, (None,))[0] is _SPLIT:
            dim = int(node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0))
            metas = node.meta["tensor_meta"]
            pieces[node.name] = node.args[0], slices([int(m.shape[dim]) for m in metas], dim, len(metas[0].shape))
            continue
        params: dict[str, str] = {}
        quant: dict[str, Any] = {}
        #: the constants a module's own tensors become (inputs after ``args``)
        stored: list[str] = []
        if node.op == "call_function" and target is operator.getitem and getattr(node.args[0], "name", "") in pieces:
            source, cuts = pieces[node.args[0].name]
            schema, attrs, args = REGISTRY["slice"], cuts[node.args[1]], [source]
        elif node.op == "call_module":
            m = modules[target]
            schema = _module_schema(m, f"layer {target!r}")
            attrs, args = schema.capture.module(m, _shape(node), f"layer {target!r}"), node.args[:1]
            params, quant = _module_state(m, target)
            params = {k: v for k, v in params.items() if k not in schema.capture.module_tensors}
            stored = [constant(f"{target}.{t}", f"{node.name}_{t}", f"layer {target!r}", fresh=True)
                      for t in schema.capture.module_tensors if getattr(m, t, None) is not None]
        else:
            method = node.op == "call_method"
            declared = _chosen(methods if method else functions, target, node.args, node.kwargs, method)
            if declared is None:
                raise UnsupportedLayerError(f"{where} calls {getattr(target, '__name__', target)!r}, which the graph "
                                            f"IR does not support; ops: {', '.join(sorted(REGISTRY))}")
            schema, call = declared
            attrs, args = call(list(node.args), dict(node.kwargs), _shape(node), where)
        names = [ref(a, where) for a in args] + stored
        if names and all(n in constants for n in names):
            keys = sorted(k for k, n in constant_nodes.items() if n in names)
            raise UnsupportedLayerError(f"{where} computes on stored tensors only ({', '.join(keys)}); the graph IR "
                                        "computes on the batch: store the result as a parameter or buffer instead")
        entry = {"name": node.name, "op": schema.name, "inputs": names, "attrs": attrs,
                 "params": params, "quant": quant, "shape": _shape(node)}
        if node.op == "call_module":
            entry["module"] = target
            if _recurrent(node, modules):  # (output, state): the node's value is the output
                entry["shape"] = [-1, *[int(d) for d in node.meta["tensor_meta"][0].shape[1:]]]
        nodes.append(entry)
    read = {a for n in nodes for a in n["inputs"]} | set(outputs)
    nodes = [n for n in nodes if n["op"] != "constant" or n["name"] in read]  # a table read only in part
    return {"version": GRAPH_VERSION, "inputs": inputs, "outputs": outputs, "nodes": nodes}
