"""One validation of a stored document: its layer specs and its graph IR, against the op schema.

``validate_document(document, shapes)`` is what ``lowbit.load``, the
torch-free Engine, ``lowbit inspect``, ``run``, ``eval`` and ONNX export of a
loaded model all run, so a file one of them accepts is accepted by all, and
they read the same numbers: attributes with their defaults filled in,
quantizer specs completed by :func:`lowbit.ops.specs.check_spec`, and every
node's output shape inferred from the recorded input shape and checked
against the shape the node records (see :mod:`lowbit.ops.schema` for the
caps). A constant (a stored tensor read as a node) records its own shape
without the batch axis, feeds only ops that take constants, is no graph
output, and is stored at a dotted path that lies in no module op's module
and holds none. Everything malformed is a :class:`FormatError` (code ``bad-graph``,
``bad-document``, ``bad-spec`` or ``unknown-quantizer``) naming the node,
layer or tensor at fault.

This module imports no torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import FormatError
from ..format.container import LowbitFile
from .conv import transposed_weight_refusal
from .schema import MAX_ELEMENTS, MAX_NODES, MAX_SPATIAL, REGISTRY, ExampleShape, Node, OpSchema, Shape, fail
from .specs import check_spec

#: the keys of a graph node and their JSON types (``module`` is optional, ``shape`` is checked on its own)
NODE_KEYS = {"name": str, "op": str, "inputs": list, "attrs": dict, "params": dict, "quant": dict, "shape": object}
#: a module path's parts: identifiers (not dunder names), or indices
_PART = re.compile(r"(?!__)[A-Za-z_][A-Za-z0-9_]*|[0-9]+\Z")
#: attribute names of a torch module and of the model lowbit rebuilds, which a module path part cannot take (a test
#: keeps this current)
RESERVED_PARTS = frozenset({
    "_apply", "_backward_hooks", "_backward_pre_hooks", "_buffers", "_call_impl", "_compiled_call_impl",
    "_forward_hooks", "_forward_hooks_always_called", "_forward_hooks_with_kwargs", "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs", "_get_backward_hooks", "_get_backward_pre_hooks", "_get_name", "_inputs",
    "_is_full_backward_hook", "_load_from_state_dict", "_load_state_dict_post_hooks", "_load_state_dict_pre_hooks",
    "_maybe_warn_non_full_backward_hook", "_modules", "_named_members", "_non_persistent_buffers_set", "_outputs",
    "_parameters", "_reads", "_register_load_state_dict_pre_hook", "_register_state_dict_hook", "_replicate_for_data_parallel",
    "_save_to_state_dict", "_slow_forward", "_state_dict_hooks", "_state_dict_pre_hooks", "_steps", "_tensor_at",
    "_version", "_wrapped_call_impl",
    "T_destination", "add_module", "apply", "bfloat16", "buffers", "call_super_init", "children", "compile", "cpu",
    "cuda", "double", "dump_patches", "eval", "extra_repr", "float", "forward", "get_buffer", "get_extra_state",
    "get_parameter", "get_submodule", "graph", "half", "ipu", "ir", "load_state_dict", "modules", "mtia",
    "named_buffers", "named_children", "named_modules", "named_parameters", "parameters", "register_backward_hook",
    "register_buffer", "register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook",
    "register_full_backward_pre_hook", "register_load_state_dict_post_hook", "register_load_state_dict_pre_hook",
    "register_module", "register_parameter", "register_state_dict_post_hook", "register_state_dict_pre_hook",
    "requires_grad_", "set_extra_state", "set_submodule", "share_memory", "state_dict", "to", "to_empty", "train",
    "training", "type", "xpu", "zero_grad"})
#: the document's layer types of the quantized layers -> their ops
LAYER_TYPES = {"QuantLinear": "linear", "QuantConv1d": "conv1d", "QuantConv2d": "conv2d",
               "QuantConvTranspose2d": "conv_transpose2d", "QuantEmbedding": "embedding"}
#: the document's layer types of the quantized recurrent layers -> their ops (a weight slot only: every weight
#: matrix quantized with its spec; input and output stay null)
RNN_TYPES = {"QuantLSTM": "lstm", "QuantGRU": "gru"}
#: the element types of a graph input (an optional ``dtype`` key; float32 where it has none)
INPUT_DTYPES = ("float32", "int64")
#: the ops of the quantized layers (a weight, quantized input and output), which readers build, run and emit alike
LAYER_OPS = tuple(LAYER_TYPES.values())
LAYER_SLOTS = ("weight", "input", "output")


@dataclass(frozen=True)
class GraphNode:
    """A validated node: attributes with defaults, complete quantizer specs, its example output shape."""

    name: str
    op: str
    inputs: list[str]
    attrs: dict[str, Any]
    params: dict[str, str]
    quant: dict[str, dict[str, Any]]
    shape: Shape
    module: str | None

    @property
    def schema(self) -> OpSchema:
        return REGISTRY[self.op]


@dataclass(frozen=True)
class Graph:
    """A validated graph IR: named inputs with example shapes, nodes in order, output names."""

    inputs: dict[str, Shape]
    nodes: list[GraphNode]
    outputs: list[str]
    #: each input's element type: "float32", or "int64" for token indices (read by ``indices`` ops only)
    dtypes: dict[str, str] = field(default_factory=dict)


def _document_error(message: str) -> FormatError:
    return FormatError("bad-document", message)


def validate_layers(model: object) -> dict[str, dict[str, Any]]:
    """The document's ``model.layers`` with complete specs (module path -> type and specs); checks ``model``."""
    if not isinstance(model, dict) or set(model) - {"layers", "config", "fold_bn", "input_shape", "attention"}:
        raise _document_error("document 'model' is an object holding layers, config, fold_bn, input_shape and "
                              "attention only")
    attention = model.get("attention", [])
    if not isinstance(attention, list) or len(attention) > MAX_NODES or not all(_is_path(p) for p in attention):
        raise _document_error(f"document 'model' attention must be a list of module paths, got {str(attention)[:80]}")
    if not isinstance(model.get("fold_bn", False), bool):
        raise _document_error(f"document 'model' fold_bn must be true or false, got {str(model['fold_bn'])[:80]}")
    layers = model.get("layers", {})
    if not isinstance(layers, dict):
        raise _document_error("document 'model' layers must be an object of module path -> layer")
    shape = model.get("input_shape")
    if shape is not None and not (isinstance(shape, list) and 1 <= len(shape) <= 8
                                  and all(type(d) is int and 1 <= d <= MAX_ELEMENTS for d in shape)):
        raise _document_error(f"document 'model' input_shape must be null or a list of at most 8 ints from 1 to "
                              f"{MAX_ELEMENTS}, got {str(shape)[:80]}")
    full = {}
    for name, entry in layers.items():
        where = f"layer {name[:80]!r}"
        if not isinstance(entry, dict) or entry.get("type") not in (*LAYER_TYPES, *RNN_TYPES, "QuantAct"):
            raise _document_error(f"{where}: type must be {', '.join((*LAYER_TYPES, *RNN_TYPES))} or QuantAct")
        slots = ("quantizer",) if entry["type"] == "QuantAct" else LAYER_SLOTS
        if set(entry) != {"type", *slots}:
            raise _document_error(f"{where}: a {entry['type']} entry holds type and {', '.join(slots)}")
        full[name] = {"type": entry["type"], **{s: check_spec(entry[s], f"{where} {s} quantizer") for s in slots}}
        if entry["type"] in RNN_TYPES and (full[name]["input"] or full[name]["output"]):
            raise _document_error(f"{where}: a {entry['type']} quantizes its weights only (input and output null)")
        refusal = transposed_weight_refusal(full[name]["weight"]) if entry["type"] == "QuantConvTranspose2d" else None
        if refusal is not None:
            raise FormatError("bad-spec", f"{where}: {refusal}")
    return full


def validate_document(document: dict[str, Any], shapes: dict[str, Shape]) -> tuple[dict[str, dict], Graph | None]:
    """(layers, graph or None) of a read document whose tensors have the decoded ``shapes``."""
    layers = validate_layers(document.get("model"))
    graph = document.get("graph")
    if graph is None:
        return layers, None
    return layers, validate_graph(graph, layers, shapes, document["model"].get("input_shape"))


def validate_file(lowbit_file: LowbitFile) -> tuple[dict[str, dict], Graph | None]:
    """:func:`validate_document` of a file read by :func:`lowbit.format.container.read_file`."""
    shapes = {name: tuple(enc.codes.shape) for name, enc in lowbit_file.tensors.items()}
    return validate_document(lowbit_file.document, shapes)


def _check_keys(node: object, index: int) -> dict[str, Any]:
    if not isinstance(node, dict) or not isinstance(node.get("name"), str) or not node["name"]:
        raise FormatError("bad-graph", f"graph node {index} must be an object with a non-empty name, "
                                       f"got {str(node)[:80]}")
    where = f"graph node {node['name'][:80]!r}"
    if not set(NODE_KEYS) <= set(node) <= {*NODE_KEYS, "module"}:
        raise fail(where, f"a node holds the keys {sorted(NODE_KEYS)} and optionally module, got {sorted(node)[:12]}")
    for key, kind in NODE_KEYS.items():
        if not isinstance(node[key], kind):
            raise fail(where, f"{key} must be a {kind.__name__}, got {str(node[key])[:80]}")
    if node["op"] not in REGISTRY:
        raise fail(where, f"unknown op {node['op'][:80]!r}; valid: {', '.join(sorted(REGISTRY))}")
    return node


def _is_path(path: object) -> bool:
    """Whether ``path`` is a dotted module (or tensor) path: parts that are identifiers (not dunder names) or
    indices, and no torch module attribute names."""
    parts = path.split(".") if isinstance(path, str) else []
    return bool(parts) and all(_PART.match(p) and p not in RESERVED_PARTS for p in parts)


def _module(node: dict[str, Any], schema: OpSchema, where: str) -> str | None:
    """The path of the module a module op calls; other ops may record theirs, which nothing reads."""
    path = node.get("module")
    if path is None and not schema.module:
        return None
    if not _is_path(path):
        raise fail(where, f"module must be the dotted path of a module (parts: identifiers that are not "
                          f"dunder names, or indices; no torch module attribute names), got {str(path)[:80]!r}")
    return path if schema.module else None


def _attrs(node: dict[str, Any], schema: OpSchema, where: str) -> dict[str, Any]:
    attrs = node["attrs"]
    required = set(schema.attrs) - set(schema.defaults)
    if not required <= set(attrs) <= set(schema.attrs):
        raise fail(where, f"a {schema.name} node has the attributes {sorted(required)}"
                          f"{' and optionally ' + ', '.join(sorted(schema.defaults)) if schema.defaults else ''}, "
                          f"got {sorted(attrs)[:12]}")
    values = {**schema.defaults, **attrs}
    return {k: kind.check(values[k], k, where) for k, kind in schema.attrs.items()}


def _params(node: dict[str, Any], schema: OpSchema, module: str | None, shapes: dict[str, Shape],
            where: str) -> dict[str, Shape]:
    """Check the node's params; return local name -> stored shape of the op's own tensors."""
    params = node["params"]
    state = tuple(f"{s}." for s in schema.state)
    tensors = {}
    for local, key in params.items():
        if local not in (*schema.tensors, *schema.optional) and not local.startswith(state):
            own = [*schema.tensors, *schema.optional]
            reads = f"the tensors {', '.join(own)}" if own else "no tensors"
            reads += f" and the state of {', '.join(schema.state)}" if state else ""
            raise fail(where, f"a {schema.name} node reads {reads}, not {local[:80]!r}")
        if schema.module and key != f"{module}.{local}":
            raise fail(where, f"tensor {local!r} must be stored as {module}.{local}, got {str(key)[:80]!r}")
        if not schema.module and not _is_path(key):
            raise fail(where, f"tensor {local!r} must be stored at a dotted path (parts: identifiers that are "
                              f"not dunder names, or indices; no torch module attribute names), got "
                              f"{str(key)[:80]!r}")
        if key not in shapes:
            raise fail(where, f"tensor {key!r} is not stored in the file")
        if local in (*schema.tensors, *schema.optional):
            tensors[local] = tuple(shapes[key])
    missing = [t for t in schema.tensors if t not in tensors]
    if missing:
        raise fail(where, f"a {schema.name} node needs the tensors {', '.join(missing)}")
    return tensors


def _quant(node: dict[str, Any], schema: OpSchema, module: str | None, layers: dict[str, dict],
           where: str) -> dict[str, dict[str, Any]]:
    quant = node["quant"]
    if not set(quant) <= set(schema.quant):
        raise fail(where, f"a {schema.name} node has the quantizer slots {', '.join(schema.quant) or 'none'}, "
                          f"got {sorted(quant)[:8]}")
    specs = {slot: check_spec(spec, f"{where} {slot} quantizer") for slot, spec in quant.items()}
    if None in specs.values():
        raise fail(where, "a quantizer slot left empty is left out, not null")
    entry = layers.get(module) if module is not None else None
    if schema.name in (*LAYER_OPS, *RNN_TYPES.values()):
        if entry is not None and {**LAYER_TYPES, **RNN_TYPES}.get(entry["type"]) != schema.name:
            raise fail(where, f"module {module!r} is a {entry['type']} in the document's layers, not a {schema.name}")
        stored = {} if entry is None else {s: entry[s] for s in LAYER_SLOTS if entry[s] is not None}
    elif schema.name == "quant_act":
        if entry is None or entry["type"] != "QuantAct":
            raise fail(where, f"module {module!r} is not a QuantAct of the document's layers")
        stored = {} if entry["quantizer"] is None else {"output": entry["quantizer"]}
    else:
        if entry is not None:
            raise fail(where, f"module {module!r} is a {entry['type']} in the document's layers, not a "
                              f"{schema.name}")
        stored = {}
    if specs != stored:
        raise fail(where, f"quantizers {str(quant)[:160]} differ from the document's layer specs {str(stored)[:160]}")
    return specs


def validate_graph(graph: object, layers: dict[str, dict], shapes: dict[str, Shape],
                   input_shape: list[int] | None = None) -> Graph:
    """The validated graph IR (see the module docstring); ``shapes``: stored tensor name -> decoded shape."""
    if not isinstance(graph, dict) or not set(graph) <= {"version", "inputs", "outputs", "nodes"}:
        raise FormatError("bad-graph", "the graph is an object with version, inputs, outputs and nodes")
    if graph.get("version") != 1:
        raise FormatError("bad-graph", f"graph version must be 1, got {str(graph.get('version'))[:20]}")
    inputs, outputs, nodes = graph.get("inputs"), graph.get("outputs"), graph.get("nodes")
    if not isinstance(nodes, list) or len(nodes) > MAX_NODES:
        raise FormatError("bad-graph", f"graph nodes must be a list of at most {MAX_NODES} nodes")
    if not isinstance(inputs, list) or not inputs or not all(
            isinstance(i, dict) and {"name", "shape"} <= set(i) <= {"name", "shape", "dtype"}
            and isinstance(i["name"], str) for i in inputs):
        raise FormatError("bad-graph", "graph inputs must be a non-empty list of objects with a name, a shape and "
                                       "optionally a dtype")
    known: dict[str, Shape] = {}
    dtypes: dict[str, str] = {}
    for entry in inputs:
        dtypes[entry["name"]] = entry.get("dtype", "float32")
        if dtypes[entry["name"]] not in INPUT_DTYPES:
            raise FormatError("bad-graph", f"graph input {entry['name'][:80]!r} dtype must be one of "
                                           f"{', '.join(INPUT_DTYPES)}, got {str(entry['dtype'])[:40]}")
        shape = ExampleShape().check(entry["shape"], "its shape", f"graph input {entry['name'][:80]!r}")
        if math.prod(shape[1:]) > MAX_ELEMENTS:
            raise FormatError("bad-graph", f"graph input {entry['name'][:80]!r} exceeds {MAX_ELEMENTS} elements")
        if entry["name"] in known:
            raise FormatError("bad-graph", f"graph input {entry['name'][:80]!r} is named twice")
        known[entry["name"]] = tuple(shape[1:])
    if input_shape is not None and len(inputs) == 1 and list(known.values())[0] != tuple(input_shape[1:]):
        raise FormatError("bad-graph", f"the graph input {inputs[0]['shape']} does not match the document's "
                                       f"input_shape {input_shape}")
    graph_inputs = dict(known)
    validated: list[GraphNode] = []
    first_use: dict[str, GraphNode] = {}
    containers: set[str] = set()
    #: the constants' node names and stored keys
    constants: set[str] = set()
    constant_keys: set[str] = set()
    for index, raw in enumerate(nodes):
        node = _check_keys(raw, index)
        name, schema = node["name"], REGISTRY[node["op"]]
        where = f"graph node {name[:80]!r} ({schema.name})"
        if name in known:
            raise fail(where, "its name is used twice")
        args = node["inputs"]
        if not all(isinstance(a, str) and a in known for a in args):
            raise fail(where, f"inputs {str(args)[:80]} must name earlier nodes or graph inputs")
        if (len(args) != schema.inputs) if schema.inputs is not None else not args:
            raise fail(where, f"takes {'one or more' if schema.inputs is None else schema.inputs} input(s), "
                              f"got {len(args)}")
        if schema.indices != any(dtypes.get(a) == "int64" for a in args) or \
                schema.indices and not all(dtypes.get(a) == "int64" for a in args):
            raise fail(where, "reads token indices from an int64 graph input" if schema.indices else
                       f"reads int64 token indices ({[a for a in args if dtypes.get(a) == 'int64'][0][:80]!r}), "
                       "which only an embedding reads")
        module = _module(node, schema, where)
        attrs = _attrs(node, schema, where)
        tensors = _params(node, schema, module, shapes, where)
        quant = _quant(node, schema, module, layers, where)
        constant = [a in constants for a in args]
        if any(constant) and not schema.constants:
            raise fail(where, f"input {args[constant.index(True)][:80]!r} is a constant (a stored tensor without the "
                              f"batch axis); a {schema.name} node computes on batched tensors")
        view = Node(name, schema.name, attrs, [known[a] for a in args], tensors, constant)
        shape = schema.shape(view)
        _check_output(shape, node["shape"], schema.name, where, schema.batchless)
        checked = GraphNode(name, schema.name, list(args), attrs, dict(node["params"]), quant, shape, module)
        if module is not None:
            _check_module(checked, first_use, containers, where, constant_keys)
        if schema.batchless:
            _check_constant(checked.params["value"], first_use, containers, where)
            constants.add(name)
            constant_keys.add(checked.params["value"])
        validated.append(checked)
        known[name] = shape
    if not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) and o in known for o in outputs):
        raise FormatError("bad-graph", f"graph outputs {str(outputs)[:80]} must be a non-empty list of node or "
                                       f"input names")
    if constants & set(outputs):
        raise FormatError("bad-graph", f"graph output {sorted(constants & set(outputs))[0][:80]!r} is a constant; "
                                       "outputs carry the batch axis")
    if any(dtypes[o] == "int64" for o in outputs if o in dtypes):
        raise FormatError("bad-graph", "a graph output is an int64 input; outputs are float32")
    return Graph(graph_inputs, validated, list(outputs), dtypes)


def _check_output(shape: Shape, recorded: object, op: str, where: str, batchless: bool = False) -> None:
    if not all(1 <= d for d in shape):
        raise fail(where, f"its output {[-1, *shape]} has an empty axis")
    if math.prod(shape) > MAX_ELEMENTS:
        raise fail(where, f"its output {[-1, *shape]} exceeds {MAX_ELEMENTS} elements per example")
    spatial = ("conv1d", "conv2d", "conv_transpose2d", "maxpool2d", "avgpool2d", "adaptive_avgpool2d")
    if op in spatial and max(shape[1:]) > MAX_SPATIAL:
        raise fail(where, f"its output {[-1, *shape]} exceeds the spatial size cap {MAX_SPATIAL}")
    expected = list(shape) if batchless else [-1, *shape]
    if recorded != expected:
        raise fail(where, f"records the output shape {str(recorded)[:80]}, but its inputs give {expected}")


def _check_module(node: GraphNode, first_use: dict[str, GraphNode], containers: set[str], where: str,
                  constant_keys: set[str] = frozenset()) -> None:
    """A module called twice is the same layer both times; no module path lies inside another, nor holds a
    constant's tensor or lies inside one."""
    path = node.module
    clash = next((k for k in constant_keys if k == path or k.startswith(f"{path}.") or path.startswith(f"{k}.")),
                 None)
    if clash is not None:
        raise fail(where, f"module {path!r} clashes with the constant stored as {clash!r}: a constant's tensor lies "
                          "in no module op's module")
    earlier = first_use.get(path)
    if earlier is not None:
        same = (earlier.op, earlier.attrs, earlier.params, earlier.quant) == (node.op, node.attrs, node.params,
                                                                              node.quant)
        if not same:
            raise fail(where, f"calls module {path!r} as node {earlier.name!r} does, with other op, attributes, "
                              f"tensors or quantizers")
        return
    parts = path.split(".")
    outer = [".".join(parts[:i]) for i in range(1, len(parts))]
    inside = next((p for p in outer if p in first_use), None)
    if inside is not None or path in containers:
        raise fail(where, f"module {path!r} lies inside module {inside!r}" if inside is not None
                   else f"module {path!r} holds other modules")
    containers.update(outer)
    first_use[path] = node


def _check_constant(key: str, first_use: dict[str, GraphNode], containers: set[str], where: str) -> None:
    """A constant's tensor is not a module op's module, nor holds one, nor lies inside one (``GraphModel``
    registers it at its key beside the modules)."""
    parts = key.split(".")
    inside = next((p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if p in first_use), None)
    if inside is not None or key in containers:
        raise fail(where, f"constant {key!r} lies in module {inside!r}, which a module op calls" if inside is not None
                   else f"constant {key!r} is a path that holds modules")
