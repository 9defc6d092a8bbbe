"""Save quantized models as .lowbit files and load them back: the torch side of :mod:`lowbit.format.container`.

``save(model, path)`` stores every state_dict tensor of a model made by
:func:`lowbit.quantize` (or of a plain float model):

- the weight of each QuantLinear / QuantConv2d whose weight quantizer has
  integer codes as ``quantizer.encode(weight)`` (affine, log, binary,
  ternary or codebook codec; a k-means weight stores its codebook and indices
  once, as the weight's codes, and not again as quantizer state);
- everything else (biases, batch-norm parameters and statistics, each
  quantizer's own parameters and buffers: observed ranges, LSQ steps, PACT
  alphas) raw in its dtype (float32, int64, bool, ...).

The document also records, under ``model``: ``layers`` (module path ->
``{"type": "QuantLinear" | "QuantConv2d", "weight": spec, "input": spec,
"output": spec}`` or ``{"type": "QuantAct", "quantizer": spec}``), ``config``
(a :class:`~lowbit.config.QuantConfig` dict with one rule per quantized layer
and a final skip rule, which converts the float architecture back into the
same layers; ``load`` rebuilds it from ``layers``, whose specs it validates)
and ``input_shape``; and under ``graph`` the model's graph IR
(:func:`lowbit.export.graph.capture`) when an example input is known: the
``example_input`` argument, else a zero batch of ``model.lowbit_input_shape``
(a shape tuple, batch axis first) when the model carries one; otherwise no
graph is stored and loading needs the architecture.

``load(path)`` rebuilds the quantized model from the graph IR alone
(:class:`GraphModel`: QuantLinear / QuantConv2d / BatchNorm / QuantAct
modules at their original module paths, run in IR order, so no Python class
of the model is needed); ``load(path, model=float_arch)`` converts the given
float architecture with the stored config instead. Either way the tensors are
loaded with ``strict=True`` and the loaded model, in eval mode, computes the
saved model's outputs bit for bit: a coded weight is held in ``weight`` as
its decoded float32 values, and its quantizer is frozen, i.e. passes them
through unchanged in eval mode (quantizing an already-quantized weight again
is not exact when the range comes from the tensor: min/max scales, log fsr,
XNOR means, DoReFa's tanh). The first forward in training mode unfreezes it
for good, so fine-tuning quantizes as usual. ``save`` of a loaded model
writes the stored codes again while the quantizer is frozen.

``load_state_dict(path)`` returns the dequantized tensors without any
quantizer state: float tensors as float32, integer buffers
(``num_batches_tracked``) in their dtype, ready for
``float_model.load_state_dict(sd, strict=True)``.

Loading never executes code from the file (no pickle, no ``torch.load``).
Malformed files raise :class:`~lowbit.errors.FormatError`; tensors that do
not fit the architecture raise :class:`~lowbit.errors.ShapeMismatchError`
naming each of them.
"""

from __future__ import annotations

import copy
import glob
import os
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import QuantConfig
from .errors import ConfigError, FormatError, ShapeMismatchError, UnsupportedLayerError
from .export.graph import capture
from .format.codecs import NumpyEncoded, values
from .format.container import LowbitFile, format_inspect, inspect_file, raw, read_file, write_file
from .nn import QuantAct, QuantConv2d, QuantLinear, named_modules_without_quantizers
from .quantizers import Encoded, Quantizer, get, names

__all__ = ["GraphModel", "format_inspect", "inspect_file", "load", "load_state_dict", "save", "weight_encoding"]

#: model attribute read when no example input is given: the shape of one input batch
INPUT_SHAPE_ATTR = "lowbit_input_shape"
#: quantizer attribute holding the stored Encoded of a loaded (frozen) weight
STORED_ATTR = "lowbit_stored"
#: Deep Compression's relative-index widths for ``sparse=True``: conv layers 8 bits, others 5
SPARSE_INDEX_BITS = {"conv": 8, "other": 5}
#: quantizer state that a weight's codebook codes already hold: quantizer name -> (state name -> source)
DERIVED_STATE = {"kmeans": ("codebook", "indices", "fitted")}
_LAYER_TYPES = {"QuantLinear": QuantLinear, "QuantConv2d": QuantConv2d}
_RAW_KINDS = ("float32", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")


# ---------------------------------------------------------------------------- save


def _layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Module path -> type and quantizer specs of every quantized layer and QuantAct."""
    layers: dict[str, dict[str, Any]] = {}
    for name, m in named_modules_without_quantizers(model):
        if isinstance(m, (QuantLinear, QuantConv2d)):
            specs = {slot: _spec(getattr(m, f"{slot}_quantizer")) for slot in ("weight", "input", "output")}
            layers[name] = {"type": "QuantLinear" if isinstance(m, QuantLinear) else "QuantConv2d", **specs}
        elif isinstance(m, QuantAct):
            layers[name] = {"type": "QuantAct", "quantizer": _spec(m.quantizer)}
    return layers


def _spec(q: Quantizer | None) -> dict[str, Any] | None:
    return None if q is None else q.spec()


def _config(layers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A config that converts the float architecture into exactly these layers."""
    rules = [{"pattern": glob.escape(name), "weight": e["weight"], "input": e["input"], "output": e["output"]}
             for name, e in layers.items() if e["type"] != "QuantAct"]
    return QuantConfig.from_dict({"first": "same", "last": "same", "rules": [*rules, {"pattern": "*", "skip": True}]}
                                 ).to_dict()


def _numpy(enc: Encoded) -> NumpyEncoded:
    params = {k: v.detach().cpu().numpy() for k, v in enc.params.items()}
    return NumpyEncoded(enc.kind, enc.codes.detach().cpu().numpy(), enc.bits, params, dict(enc.meta))


def _has_codes(q: Quantizer | None) -> bool:
    return q is not None and type(q).encode is not Quantizer.encode


def weight_encoding(layer: nn.Module) -> Encoded:
    """The weight's codes: the stored ones of a frozen (loaded) quantizer, else a fresh encode."""
    q = layer.weight_quantizer
    stored = getattr(q, STORED_ATTR, None)
    if stored is not None:
        return stored
    with torch.no_grad():
        return q.encode(layer.weight.detach())


def _raw(name: str, t: torch.Tensor) -> NumpyEncoded:
    array = t.detach().cpu().numpy() if t.dtype != torch.bfloat16 else None
    if array is None or array.dtype.name not in _RAW_KINDS:
        raise UnsupportedLayerError(f"tensor {name!r} has dtype {t.dtype}, which cannot be saved; "
                                    f"valid: {', '.join(_RAW_KINDS)}")
    return raw(np.array(array, order="C", copy=True))


def _index_bits(sparse: bool | int | dict[str, int], tensors: dict[str, NumpyEncoded]) -> dict[str, int]:
    """Per coded weight, its relative-index width, from ``sparse`` (False, True, an int or a dict)."""
    coded = [n for n, e in tensors.items() if e.kind in ("affine", "log", "ternary", "codebook")]
    if sparse is False:
        return {}
    if sparse is True:
        return {n: SPARSE_INDEX_BITS["conv" if tensors[n].codes.ndim == 4 else "other"] for n in coded}
    if isinstance(sparse, int) and not isinstance(sparse, bool):
        return {n: sparse for n in coded}
    if isinstance(sparse, dict):
        unknown = sorted(set(sparse) - set(coded))
        if unknown:
            raise ConfigError(f"sparse index bits for {unknown}, which are not coded weights; coded weights: {coded}")
        return dict(sparse)
    raise ConfigError(f"sparse must be False, True, an int (index bits) or a dict of tensor -> bits, got {sparse!r}")


def _example(model: nn.Module, example_input: torch.Tensor | None) -> tuple[torch.Tensor | None, list[int] | None]:
    if example_input is not None:
        return example_input, [int(d) for d in example_input.shape]
    shape = getattr(model, INPUT_SHAPE_ATTR, None)
    if shape is None:
        return None, None
    if not isinstance(shape, (tuple, list, torch.Size)) or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ConfigError(f"model.{INPUT_SHAPE_ATTR} must be a tuple of positive ints (batch first), got {shape!r}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return torch.zeros((1, *shape[1:]), device=device), [int(d) for d in shape]


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_input: torch.Tensor | None = None,
    *,
    entropy: str | None = None,
    sparse: bool | int | dict[str, int] = False,
) -> None:
    """Write ``model`` (quantized or float) to the .lowbit file ``path``, atomically and deterministically.

    ``example_input`` (a batch) lets the graph IR be captured; without it
    ``model.lowbit_input_shape`` is used if set, else no graph is stored.
    ``entropy`` ("huffman" or "ans") entropy-codes every coded weight's code
    stream; ``sparse`` stores coded weights with Deep Compression's relative
    index: True (8-bit gaps for conv weights, 5-bit for others), an int (the
    gap width for all) or a dict ``{tensor name: bits}``.
    """
    layers = _layers(model)
    tensors: dict[str, NumpyEncoded] = {}
    derived: set[str] = set()
    for name, entry in layers.items():
        layer = model.get_submodule(name) if name else model
        if entry["type"] == "QuantAct" or not _has_codes(layer.weight_quantizer):
            continue
        tensors[_key(name, "weight")] = _numpy(weight_encoding(layer))
        derived |= {_key(name, f"weight_quantizer.{s}") for s in DERIVED_STATE.get(entry["weight"]["name"], ())}
    for name, t in model.state_dict().items():
        if name not in tensors and name not in derived:
            tensors[name] = _raw(name, t)
    example, shape = _example(model, example_input)
    graph = copy.deepcopy(model.ir) if isinstance(model, GraphModel) else None
    if example is not None and graph is None:
        try:
            graph = capture(model, example)
        except UnsupportedLayerError as exc:
            if example_input is not None:
                raise
            warnings.warn(f"lowbit.save stores no graph (load will need the architecture): {exc}", UserWarning,
                          stacklevel=2)
    document_model = {"layers": layers, "config": _config(layers), "input_shape": shape}
    write_file(path, tensors, graph=graph, model=document_model, entropy=entropy,
               index_bits=_index_bits(sparse, tensors))


def _key(module: str, name: str) -> str:
    return f"{module}.{name}" if module else name


# ---------------------------------------------------------------------------- reading the document


def _quantizer(spec: object, where: str) -> Quantizer | None:
    """The quantizer of a stored spec (None or a dict with a registered ``name``); FormatError otherwise."""
    if spec is None:
        return None
    name = spec.get("name") if isinstance(spec, dict) else None
    if not isinstance(name, str):
        raise FormatError("bad-spec", f"{where}: a stored spec is null or an object with a name, got {spec!r}")
    if name not in names():
        raise FormatError("unknown-quantizer", f"{where}: unknown quantizer {name!r}; known: {', '.join(names())}")
    try:
        return get(spec)
    except (ConfigError, TypeError, ValueError) as exc:  # constructors check their own arguments
        raise FormatError("bad-spec", f"{where}: {exc}") from None


def _read_layers(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The validated ``model.layers`` of a document (every spec builds a quantizer)."""
    model = document["model"]
    layers = model.get("layers", {})
    if set(model) - {"layers", "config", "input_shape"} or not isinstance(layers, dict):
        raise FormatError("bad-document", "document 'model' holds layers, config and input_shape only")
    shape = model.get("input_shape")
    if shape is not None and not (isinstance(shape, list) and shape
                                  and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise FormatError("bad-document", f"document 'model' input_shape must be null or a list of positive ints, "
                                          f"got {shape!r}")
    for name, entry in layers.items():
        where = f"layer {name!r}"
        if not isinstance(entry, dict) or entry.get("type") not in (*_LAYER_TYPES, "QuantAct"):
            raise FormatError("bad-document", f"{where}: type must be QuantLinear, QuantConv2d or QuantAct")
        slots = ("quantizer",) if entry["type"] == "QuantAct" else ("weight", "input", "output")
        if set(entry) != {"type", *slots}:
            raise FormatError("bad-document", f"{where}: a {entry['type']} entry holds type and {', '.join(slots)}")
        for slot in slots:
            _quantizer(entry[slot], f"{where} {slot} quantizer")
    return layers


def _tensor(enc: NumpyEncoded) -> torch.Tensor:
    array = enc.codes if enc.kind in _RAW_KINDS else values(enc)
    return torch.from_numpy(np.array(array, copy=True))


def _state(lowbit_file: LowbitFile, layers: dict[str, dict[str, Any]]) -> tuple[dict[str, torch.Tensor], dict]:
    """The state_dict of the stored model, and module path -> stored weight Encoded of each coded weight."""
    state = {name: _tensor(enc) for name, enc in lowbit_file.tensors.items()}
    frozen = {}
    for name, entry in layers.items():
        enc = lowbit_file.tensors.get(_key(name, "weight"))
        if entry["type"] == "QuantAct" or enc is None or enc.kind in _RAW_KINDS:
            continue
        if entry["weight"] is None:
            raise FormatError("bad-document", f"tensor {_key(name, 'weight')!r} is stored as {enc.kind} codes "
                                              f"but layer {name!r} has no weight quantizer")
        params = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in enc.params.items()}
        frozen[name] = Encoded(enc.kind, torch.from_numpy(np.array(enc.codes, copy=True)), enc.bits, params,
                               dict(enc.meta))
        if entry["weight"]["name"] in DERIVED_STATE:
            if enc.kind != "codebook":
                raise FormatError("bad-document", f"tensor {_key(name, 'weight')!r}: a k-means weight is stored "
                                                  f"as codebook codes, not {enc.kind!r}")
            prefix = _key(name, "weight_quantizer.")
            state[prefix + "codebook"] = frozen[name].params["codebook"].clone()
            state[prefix + "indices"] = frozen[name].codes.clone()
            state[prefix + "fitted"] = torch.tensor(True)
    return state, frozen


def _quantizer_prefixes(layers: dict[str, dict[str, Any]]) -> tuple[str, ...]:
    prefixes = []
    for name, entry in layers.items():
        slots = ("quantizer",) if entry["type"] == "QuantAct" else ("weight_quantizer", "input_quantizer",
                                                                   "output_quantizer")
        prefixes += [_key(name, f"{slot}.") for slot in slots]
    return tuple(prefixes)


# ---------------------------------------------------------------------------- loading


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The dequantized tensors of the float architecture (float32; integer buffers keep their dtype)."""
    lowbit_file = read_file(path)
    layers = _read_layers(lowbit_file.document)
    skip = _quantizer_prefixes(layers)
    state = {}
    for name, enc in sorted(lowbit_file.tensors.items()):
        if name.startswith(skip):
            continue
        t = _tensor(enc)
        state[name] = t.float() if t.is_floating_point() else t
    return state


def _load_into(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict(state, strict=True)``, with every mismatch named in a ShapeMismatchError.

    A model tensor with no elements yet (an unobserved range, an unfitted
    k-means index, unset per-channel steps) takes the stored shape.
    """
    own = model.state_dict()
    problems = [f"{k} (missing from the file)" for k in sorted(set(own) - set(state))]
    problems += [f"{k} (not in the model)" for k in sorted(set(state) - set(own))]
    problems += [f"{k} (file {list(state[k].shape)}, model {list(own[k].shape)})" for k in sorted(set(own) & set(state))
                 if own[k].numel() and own[k].shape != state[k].shape]
    if problems:
        raise ShapeMismatchError(f"the file does not fit the architecture: {'; '.join(problems)}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # torch reports any remaining mismatch this way
        raise ShapeMismatchError(f"the file does not fit the architecture: {exc}") from None


def _pass_stored_weight(quantizer: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
    """Forward hook of a frozen weight quantizer: return the stored (already quantized) weight in eval mode;
    the first training-mode call unfreezes it for good."""
    if quantizer.training:
        setattr(quantizer, STORED_ATTR, None)
        return None
    return args[0] if getattr(quantizer, STORED_ATTR, None) is not None else None


def _freeze(model: nn.Module, frozen: dict[str, Encoded]) -> None:
    for name, enc in frozen.items():
        quantizer = (model.get_submodule(name) if name else model).weight_quantizer
        setattr(quantizer, STORED_ATTR, enc)
        quantizer.register_forward_hook(_pass_stored_weight)


def load(path: str | os.PathLike[str], model: nn.Module | None = None) -> nn.Module:
    """Rebuild the saved quantized model, in eval mode (see the module docstring).

    Without ``model`` the file's graph IR is used (ConfigError if the file
    has none); with ``model`` (the float architecture) it is converted with
    the stored config. The given model itself is not changed.
    """
    lowbit_file = read_file(path)
    layers = _read_layers(lowbit_file.document)
    state, frozen = _state(lowbit_file, layers)
    if model is None:
        graph = lowbit_file.document["graph"]
        if graph is None:
            raise ConfigError(f"{os.fspath(path)!r} stores no graph; load it with load(path, model=float_arch)")
        shapes = {name: tuple(t.shape) for name, t in state.items()}
        built: nn.Module = GraphModel(graph, layers, shapes)
    else:
        built = _convert(model, layers)
    _load_into(built, state)
    _freeze(built, frozen)
    shape = lowbit_file.document["model"].get("input_shape")  # validated by _read_layers
    if shape is not None:
        setattr(built, INPUT_SHAPE_ATTR, tuple(shape))
    return built.eval()


def _convert(model: nn.Module, layers: dict[str, dict[str, Any]]) -> nn.Module:
    """Quantize the float architecture with the config of the (validated) stored layers; check the result."""
    from .api import quantize

    built = quantize(model, QuantConfig.from_dict(_config(layers)))
    mine = _layers(built)
    wrong = sorted(n for n in set(mine) | set(layers) if mine.get(n) != layers.get(n))
    if wrong:
        raise ShapeMismatchError(f"layers {wrong} of the architecture do not match the file's quantized layers")
    return built


# ---------------------------------------------------------------------------- the model rebuilt from the graph IR


def _fail(node: str, message: str) -> FormatError:
    return FormatError("bad-graph", f"graph node {node!r}: {message}")


#: the keys of a graph node and their JSON types (``module`` is optional, ``shape`` may be null)
_NODE_KEYS = {"name": str, "op": str, "inputs": list, "attrs": dict, "params": dict, "quant": dict, "shape": list}


def _check_node(node: object) -> None:
    """Raise FormatError("bad-graph") unless ``node`` has the keys and types of a graph IR node."""
    if not isinstance(node, dict) or not isinstance(node.get("name"), str):
        raise FormatError("bad-graph", f"a graph node must be an object with a name, got {str(node)[:80]}")
    name = node["name"]
    if not set(_NODE_KEYS) <= set(node) <= {*_NODE_KEYS, "module"}:
        raise _fail(name, f"a node holds the keys {sorted(_NODE_KEYS)} and optionally module, got {sorted(node)}")
    for key, kind in _NODE_KEYS.items():
        if not isinstance(node[key], kind) and not (key == "shape" and node[key] is None):
            raise _fail(name, f"{key} must be a {kind.__name__}, got {node[key]!r}")
    if not all(isinstance(a, str) for a in node["inputs"]):
        raise _fail(name, f"inputs must be node names, got {node['inputs']!r}")


def _ints(value: object, count: int, node: str, what: str) -> list[int]:
    if (not isinstance(value, list) or len(value) != count
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise _fail(node, f"{what} must be a list of {count} ints, got {value!r}")
    return value


class GraphModel(nn.Module):
    """A model rebuilt from lowbit's graph IR: layers at their original module paths, run in IR order.

    ``ir`` keeps the graph (``save`` stores it again). Parameter-free ops
    (relu, pooling, reshape, add, ...) run as torch functions; linear / conv2d / batchnorm / quant_act nodes run their
    modules, built from the node's attributes, the stored tensors' shapes
    and the layer specs of the document.
    """

    def __init__(self, graph: dict[str, Any], layers: dict[str, dict[str, Any]], shapes: dict[str, tuple[int, ...]]):
        super().__init__()
        if not isinstance(graph, dict) or not isinstance(graph.get("nodes"), list):
            raise FormatError("bad-graph", "the graph must be an object with a list of nodes")
        inputs, outputs = graph.get("inputs"), graph.get("outputs")
        if not isinstance(inputs, list) or not all(isinstance(i, dict) and isinstance(i.get("name"), str) for i in inputs):
            raise FormatError("bad-graph", "graph inputs must be a list of objects with a name")
        self.ir = copy.deepcopy(graph)
        self._inputs = [i["name"] for i in inputs]
        known = set(self._inputs)
        self._steps: list[tuple[str, str, list[str], dict[str, Any], str | None]] = []
        for node in graph["nodes"]:
            _check_node(node)
            name, op, args, attrs = node["name"], node["op"], node["inputs"], node["attrs"]
            if not all(a in known for a in args):
                raise _fail(name, f"inputs {args!r} must name earlier nodes or graph inputs")
            path = self._module(node, op, layers, shapes)
            self._check(name, op, attrs, args)
            self._steps.append((name, op, args, attrs, path))
            known.add(name)
        if not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) and o in known for o in outputs):
            raise FormatError("bad-graph", f"graph outputs {outputs!r} must name nodes or inputs")
        self._outputs = outputs

    def _module(self, node: dict[str, Any], op: object, layers: dict, shapes: dict) -> str | None:
        """Build (or reuse) the module of a linear / conv2d / batchnorm / quant_act node; return its path."""
        if op not in ("linear", "conv2d", "batchnorm", "quant_act"):
            return None
        name, path = node["name"], node.get("module")
        if not isinstance(path, str) or not path or any(not part for part in path.split(".")):
            raise _fail(name, f"a {op} node needs the dotted path of its module, got {path!r}")
        try:
            return path if self.get_submodule(path) is not None else None
        except AttributeError:
            pass
        params = node["params"]
        entry = layers.get(path)
        if op == "quant_act":
            if entry is None or entry["type"] != "QuantAct":
                raise _fail(name, f"module {path!r} is not a QuantAct of the document's layers")
            module: nn.Module = QuantAct(_quantizer(entry["quantizer"], f"layer {path!r}"))
        elif op == "batchnorm":
            module = self._batchnorm(name, path, node, params, shapes)
        else:
            module = self._layer(name, path, op, node, entry, shapes)
        parent: nn.Module = self
        *parents, last = path.split(".")
        try:
            for part in parents:
                if part not in parent._modules:
                    parent.add_module(part, nn.Module())
                parent = parent._modules[part]  # type: ignore[assignment]
            parent.add_module(last, module)
        except (KeyError, TypeError) as exc:
            raise _fail(name, f"module path {path!r} cannot be used: {exc}") from None
        return path

    @staticmethod
    def _batchnorm(name: str, path: str, node: dict, params: dict, shapes: dict) -> nn.Module:
        mean = shapes.get(f"{path}.running_mean")
        out_shape = node.get("shape")
        if mean is None or len(mean) != 1 or not isinstance(out_shape, list):
            raise _fail(name, f"batch norm {path!r} needs a stored 1-D running_mean and an output shape")
        eps = node["attrs"].get("eps")
        if not isinstance(eps, float) or not eps > 0:
            raise _fail(name, f"batch norm eps must be a float > 0, got {eps!r}")
        cls = nn.BatchNorm1d if len(out_shape) in (2, 3) else nn.BatchNorm2d
        return cls(mean[0], eps=eps, affine="weight" in params)

    @staticmethod
    def _layer(name: str, path: str, op: str, node: dict, entry: dict | None, shapes: dict) -> nn.Module:
        weight = shapes.get(f"{path}.weight")
        rank = 2 if op == "linear" else 4
        if weight is None or len(weight) != rank:
            raise _fail(name, f"{op} {path!r} needs a stored {rank}-D weight {path}.weight")
        quant = node["quant"]
        if entry is not None and entry["type"] != ("QuantLinear" if op == "linear" else "QuantConv2d"):
            raise _fail(name, f"module {path!r} is a {entry['type']} in the document's layers, not a {op}")
        stored = {} if entry is None else {k: v for k, v in entry.items() if k != "type" and v is not None}
        if quant != stored:
            raise _fail(name, f"quantizers {quant!r} differ from the document's layer specs {stored!r}")
        specs = {f"{slot}_quantizer": _quantizer(spec, f"layer {path!r} {slot} quantizer")
                 for slot, spec in stored.items()}
        bias = f"{path}.bias" in shapes
        if op == "linear":
            cls = QuantLinear if entry is not None else nn.Linear
            return cls(weight[1], weight[0], bias, **specs)
        attrs = node["attrs"]
        groups = attrs.get("groups")
        if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1 or weight[0] % groups:
            raise _fail(name, f"conv groups must be an int >= 1 dividing {weight[0]}, got {groups!r}")
        geometry = {k: _ints(attrs.get(k), 2, name, k) for k in ("stride", "padding", "dilation")}
        cls = QuantConv2d if entry is not None else nn.Conv2d
        try:
            return cls(weight[1] * groups, weight[0], tuple(weight[2:]), bias=bias, groups=groups, **geometry, **specs)
        except ValueError as exc:  # torch's own geometry checks
            raise _fail(name, str(exc)) from None

    @staticmethod
    def _check(name: str, op: object, attrs: dict[str, Any], args: list[str]) -> None:
        """Validate a functional node's attributes (module nodes were validated when built)."""
        arity = {"add": 2, "mul": 2}.get(op, None if op == "concat" else 1)  # type: ignore[arg-type]
        if op not in _FUNCTIONAL and op not in ("linear", "conv2d", "batchnorm", "quant_act"):
            raise _fail(name, f"unknown op {op!r}; valid: {', '.join(sorted([*_FUNCTIONAL, 'linear', 'conv2d']))}, "
                              "batchnorm, quant_act")
        if arity is not None and len(args) != arity or not args:
            raise _fail(name, f"op {op!r} takes {arity or 'one or more'} input(s), got {len(args)}")
        if op in ("maxpool2d", "avgpool2d"):
            for key in ("kernel", "stride", "padding"):
                _ints(attrs.get(key), 2, name, key)
        elif op == "adaptive_avgpool2d":
            _ints(attrs.get("output_size"), 2, name, "output_size")
        elif op == "reshape":
            shape = attrs.get("shape")
            _ints(shape, len(shape) if isinstance(shape, list) else -1, name, "shape")
        elif op == "concat":
            _ints([attrs.get("axis")], 1, name, "axis")
        elif op == "hardtanh" and not all(isinstance(attrs.get(k), (int, float)) for k in ("min", "max")):
            raise _fail(name, f"hardtanh min and max must be numbers, got {attrs!r}")

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if len(inputs) != len(self._inputs):
            raise ConfigError(f"the model takes {len(self._inputs)} input(s) ({', '.join(self._inputs)}), "
                              f"got {len(inputs)}")
        env = dict(zip(self._inputs, inputs))
        for name, op, args, attrs, path in self._steps:
            xs = [env[a] for a in args]
            if path is not None:
                env[name] = self.get_submodule(path)(xs[0])
            else:
                env[name] = _FUNCTIONAL[op](xs, attrs)
        outs = tuple(env[o] for o in self._outputs)
        return outs[0] if len(outs) == 1 else outs


_FUNCTIONAL = {
    "relu": lambda xs, a: F.relu(xs[0]),
    "tanh": lambda xs, a: torch.tanh(xs[0]),
    "hardtanh": lambda xs, a: F.hardtanh(xs[0], a["min"], a["max"]),
    "maxpool2d": lambda xs, a: F.max_pool2d(xs[0], a["kernel"], a["stride"], a["padding"]),
    "avgpool2d": lambda xs, a: F.avg_pool2d(xs[0], a["kernel"], a["stride"], a["padding"],
                                            count_include_pad=a.get("count_include_pad", True)),
    "adaptive_avgpool2d": lambda xs, a: F.adaptive_avg_pool2d(xs[0], a["output_size"]),
    "reshape": lambda xs, a: xs[0].reshape(a["shape"]),
    "add": lambda xs, a: xs[0] + xs[1],
    "mul": lambda xs, a: xs[0] * xs[1],
    "concat": lambda xs, a: torch.cat(xs, a["axis"]),
}
