"""Save quantized models as .lowbit files and load them back: the torch side of :mod:`lowbit.format.container`.

``save(model, path)`` stores every state_dict tensor of a model made by
:func:`lowbit.quantize` (or of a plain float model):

- the weight of each quantized layer (QuantLinear, QuantConv1d, QuantConv2d,
  QuantConvTranspose2d) whose weight quantizer has
  integer codes as ``quantizer.encode(weight)`` (affine, log, binary,
  ternary or codebook codec; a k-means weight stores its codebook and indices
  once, as the weight's codes, and not again as quantizer state);
- everything else (biases, batch-norm parameters and statistics, each
  quantizer's own parameters and buffers: observed ranges, LSQ steps, PACT
  alphas) raw in its dtype (float32, int64, bool, ...).

The document also records, under ``model``: ``layers`` (module path ->
``{"type": "QuantLinear" | "QuantConv1d" | "QuantConv2d" | "QuantConvTranspose2d", "weight": spec, "input": spec,
"output": spec}`` or ``{"type": "QuantAct", "quantizer": spec}``), ``config``
and ``fold_bn`` (what :func:`lowbit.quantize` was given, which converts the
float architecture into the same layers; for a model built otherwise, a
config with one rule per quantized layer and a final skip rule) and
``input_shape``; and under ``graph`` the model's graph IR
(:func:`lowbit.export.graph.capture`) when an example input is known: the
``example_input`` argument, else a zero batch of ``model.lowbit_input_shape``
(a shape tuple, batch axis first) when the model carries one; otherwise no
graph is stored and loading needs the architecture.

``load(path)`` rebuilds the quantized model from the graph IR alone
(:class:`GraphModel`: quantized layers, BatchNorm and QuantAct
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
from torch import nn

from .config import QuantConfig
from .convert import QUANTIZED_WITH_ATTR, quantize
from .errors import CalibrationError, ConfigError, FormatError, ShapeMismatchError, UnsupportedLayerError
from .export.graph import capture
from .export.transformer import ATTENTION_ATTR, decompose, packed_state
from .format.codecs import NumpyEncoded, values
from .format import container
from .format.container import LowbitFile, format_inspect, raw, read_file, write_file
from .nn import (QUANT_LAYERS, STORED_ATTR, QuantAct, QuantConv1d, QuantConv2d, QuantConvTranspose2d, QuantEmbedding,
                 QuantLinear, freeze_weight, named_modules_without_quantizers)
from .nn.recurrent import QUANT_RNNS, QuantGRU, QuantLSTM
from .ops import Graph, GraphNode, validate_document, validate_file
from .ops.rnn import layer_names
from .ptq import PTQ_ATTR
from .quantizers import Encoded, Quantizer, get

__all__ = ["GraphModel", "captured_graph", "format_inspect", "inspect_file", "load", "load_state_dict", "save",
           "weight_encoding"]

#: model attribute read when no example input is given: the shape of one input batch
INPUT_SHAPE_ATTR = "lowbit_input_shape"
#: Deep Compression's relative-index widths for ``sparse=True``: conv layers 8 bits, others 5
SPARSE_INDEX_BITS = {"conv": 8, "other": 5}
#: quantizer state that a weight's codebook codes already hold: quantizer name -> (state name -> source)
DERIVED_STATE = {"kmeans": ("codebook", "indices", "fitted")}
#: codecs whose codes the relative index may store sparse (those with a ``codes`` array)
_SPARSE_KINDS = ("affine", "log", "ternary", "codebook", "group_affine", "group_binary", "group_ternary",
                 "group_codebook", "group_log")
_RAW_KINDS = ("float32", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")


# ---------------------------------------------------------------------------- save


def _layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Module path -> type and quantizer specs of every quantized layer and QuantAct."""
    layers: dict[str, dict[str, Any]] = {}
    for name, m in named_modules_without_quantizers(model):
        if isinstance(m, QUANT_LAYERS):
            specs = {slot: _spec(getattr(m, f"{slot}_quantizer")) for slot in ("weight", "input", "output")}
            layers[name] = {"type": next(cls.__name__ for cls in QUANT_LAYERS if isinstance(m, cls)), **specs}
        elif isinstance(m, QUANT_RNNS):  # weights only
            layers[name] = {"type": type(m).__name__, "weight": _spec(m.weight_quantizer), "input": None,
                            "output": None}
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
    coded = [n for n, e in tensors.items() if e.kind in _SPARSE_KINDS]
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
    # a model reading token indices (an embedding) takes int64 ones; index 0 is always in its table
    dtype = torch.int64 if any(isinstance(m, nn.Embedding) for m in model.modules()) else torch.float32
    return torch.zeros((1, *shape[1:]), device=device, dtype=dtype), [int(d) for d in shape]


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
    unobserved = [q.where() for q in model.modules() if isinstance(q, Quantizer) and not getattr(q, "observed", True)]
    if unobserved:
        raise CalibrationError(f"the static quantizers of {', '.join(unobserved)} observed no range: run "
                               "lowbit.calibrate(model, batches) or train before saving")
    model = decompose(model)  # a float model's multi-head attention is stored as the linears its graph reads
    layers = _layers(model)
    tensors: dict[str, NumpyEncoded] = {}
    derived: set[str] = set()
    for name, entry in layers.items():
        layer = model.get_submodule(name) if name else model
        if isinstance(layer, QUANT_RNNS):  # each weight matrix as its codes
            if _has_codes(layer.weight_quantizer):
                tensors.update({_key(name, w): _numpy(enc) for w, enc in layer.encodings().items()})
            continue
        if entry["type"] == "QuantAct" or not _has_codes(layer.weight_quantizer):
            continue
        tensors[_key(name, "weight")] = _numpy(weight_encoding(layer))
        derived |= {_key(name, f"weight_quantizer.{s}") for s in DERIVED_STATE.get(entry["weight"]["name"], ())}
    for name, t in model.state_dict().items():
        if name not in tensors and name not in derived:
            tensors[name] = _raw(name, t)
    example, shape = _example(model, example_input)
    quantized_with = getattr(model, QUANTIZED_WITH_ATTR, None) or {"config": _config(layers), "fold_bn": False}
    document_model = {"layers": layers, **quantized_with, "input_shape": shape}
    if getattr(model, ATTENTION_ATTR, None):  # decomposed multi-head attention, packed again by load_state_dict
        document_model["attention"] = list(getattr(model, ATTENTION_ATTR))
    graph = copy.deepcopy(model.ir) if isinstance(model, GraphModel) else None
    if example is not None and graph is None:
        try:
            graph = captured_graph(model, example)[0]
        except UnsupportedLayerError as exc:
            if example_input is not None:
                raise
            warnings.warn(f"lowbit.save stores no graph (load will need the architecture): {exc}", UserWarning,
                          stacklevel=2)
    write_file(path, tensors, graph=graph, model=document_model, entropy=entropy,
               index_bits=_index_bits(sparse, tensors))


def captured_graph(model: nn.Module, example: torch.Tensor) -> tuple[dict[str, Any], Graph]:
    """The model's graph IR on ``example`` and that graph as every reader validates it (UnsupportedLayerError for a
    graph no reader would accept, so none is written or exported)."""
    ir = capture(model, example)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    try:
        _, graph = validate_document({"model": {"layers": _layers(model)}, "graph": ir}, shapes)
    except FormatError as exc:
        raise UnsupportedLayerError(f"the model's graph cannot be stored: {exc.message}") from None
    return ir, graph


def _key(module: str, name: str) -> str:
    return f"{module}.{name}" if module else name


# ---------------------------------------------------------------------------- reading the document


def _quantizer(spec: dict[str, Any] | None, where: str) -> Quantizer | None:
    """The quantizer of a spec completed by :func:`lowbit.ops.check_spec` (which accepts what ``get`` builds)."""
    try:
        return get(spec)
    except ConfigError as exc:
        raise FormatError("bad-spec", f"{where}: {exc}") from None


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


def inspect_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """:func:`lowbit.format.container.inspect_file` of a file whose document passes the validation that ``load``
    and the Engine apply (``lowbit inspect`` accepts what they accept)."""
    lowbit_file = read_file(path)
    validate_file(lowbit_file)
    return container.inspect_file(path, lowbit_file)


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The dequantized tensors of the float architecture (float32; integer buffers keep their dtype)."""
    lowbit_file = read_file(path)
    layers, _ = validate_file(lowbit_file)
    skip = _quantizer_prefixes(layers)
    state = {}
    for name, enc in sorted(lowbit_file.tensors.items()):
        if name.startswith(skip):
            continue
        t = _tensor(enc)
        state[name] = t.float() if t.is_floating_point() else t
    return packed_state(state, lowbit_file.document["model"].get("attention", []))


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


def _freeze(model: nn.Module, frozen: dict[str, Encoded]) -> None:
    for name, enc in frozen.items():
        freeze_weight(model.get_submodule(name) if name else model, enc)


def load(path: str | os.PathLike[str], model: nn.Module | None = None) -> nn.Module:
    """Rebuild the saved quantized model, in eval mode (see the module docstring).

    Without ``model`` the file's graph IR is used (ConfigError if the file
    has none); with ``model`` (the float architecture) it is converted with
    the stored config. The given model itself is not changed.
    """
    lowbit_file = read_file(path)
    layers, graph = validate_file(lowbit_file)
    state, frozen = _state(lowbit_file, layers)
    if model is None:
        if graph is None:
            raise ConfigError(f"{os.fspath(path)!r} stores no graph; load it with load(path, model=float_arch)")
        shapes = {name: tuple(t.shape) for name, t in state.items()}
        built: nn.Module = GraphModel(lowbit_file.document["graph"], graph, layers, shapes)
        _keep_unread(built, state)
    else:
        built = _convert(model, lowbit_file.document["model"], layers)
        for name, layer in built.named_modules():  # bias correction gives bias-free layers a bias
            if isinstance(layer, QUANT_LAYERS) and getattr(layer, "bias", 0) is None and _key(name, "bias") in state:
                layer.bias = nn.Parameter(torch.zeros_like(state[_key(name, "bias")]))
    _load_into(built, state)
    _freeze(built, frozen)
    for name, m in built.named_modules():  # recurrent layers: each coded weight matrix
        if isinstance(m, QUANT_RNNS):
            for w in m.weight_quantizers:
                enc = lowbit_file.tensors.get(_key(name, w))
                if enc is not None and enc.kind not in _RAW_KINDS:
                    m.freeze(w, Encoded(enc.kind, torch.from_numpy(np.array(enc.codes, copy=True)), enc.bits,
                                        {k: torch.from_numpy(np.array(v, copy=True)) for k, v in enc.params.items()},
                                        dict(enc.meta)))
    setattr(built, PTQ_ATTR, [])  # what the file holds is final: calibrating it again does not rerun the methods
    document_model = lowbit_file.document["model"]
    if "config" in document_model:  # saved again, the model records the same
        setattr(built, QUANTIZED_WITH_ATTR, {"config": document_model["config"],
                                             "fold_bn": document_model.get("fold_bn", False)})
    shape = document_model.get("input_shape")  # validated by validate_file
    if shape is not None:
        setattr(built, INPUT_SHAPE_ATTR, tuple(shape))
    if document_model.get("attention") and model is None:  # saved again, the file records the same
        setattr(built, ATTENTION_ATTR, list(document_model["attention"]))
    return built.eval()


def _convert(model: nn.Module, document_model: dict[str, Any], layers: dict[str, dict[str, Any]]) -> nn.Module:
    """Quantize the float architecture as the stored model was (its config and batch-norm folding); check that
    this gives the stored layers."""
    try:
        config = QuantConfig.from_dict(document_model.get("config", _config(layers)))
    except ConfigError as exc:
        raise FormatError("bad-document", f"document 'model' config: {exc}") from None
    built = quantize(model, config, fold_bn=bool(document_model.get("fold_bn", False)))
    mine = _layers(built)
    wrong = sorted(n for n in set(mine) | set(layers) if mine.get(n) != layers.get(n))
    if wrong:
        raise ShapeMismatchError(f"layers {wrong} of the architecture do not match the file's quantized layers")
    return built


# ---------------------------------------------------------------------------- the model rebuilt from the graph IR


class GraphModel(nn.Module):
    """A model rebuilt from lowbit's graph IR: layers at their original module paths, run in IR order.

    ``ir`` keeps the stored graph (``save`` stores it again); ``graph`` is
    that graph as :func:`lowbit.ops.validate_graph` checked it. Parameter-free
    ops (relu, pooling, reshape, add, ...) run as torch functions; linear /
    conv1d / conv2d / conv_transpose2d / batchnorm / quant_act nodes run their modules, built from the
    node's attributes, the stored tensors' shapes and the document's layer specs.
    A constant's tensor is registered at its state_dict key (a parameter or a
    buffer, as the model held it), so ``load`` restores it.
    """

    def __init__(self, ir: dict[str, Any], graph: Graph, layers: dict[str, dict[str, Any]],
                 shapes: dict[str, tuple[int, ...]]):
        super().__init__()
        self.ir = copy.deepcopy(ir)
        self.graph = graph
        self._inputs = list(graph.inputs)
        self._outputs = graph.outputs
        self._steps = [(node.name, node.schema.torch, node.inputs, node.attrs, node.module) for node in graph.nodes]
        #: node name -> the state_dict keys of the tensors a non-module op reads after its inputs (constants)
        self._reads = {node.name: [node.params[t] for t in (*node.schema.tensors, *node.schema.optional)
                                   if t in node.params] for node in graph.nodes if not node.schema.module}
        built: set[str] = set()
        for node in graph.nodes:
            for key in self._reads.get(node.name, []):
                _register(self, key, shapes[key], node.attrs.get("parameter", True))
            if node.module is None or node.module in built:
                continue
            parent: nn.Module = self
            *parents, last = node.module.split(".")
            for part in parents:
                if part not in parent._modules:
                    parent.add_module(part, nn.Module())
                parent = parent._modules[part]  # type: ignore[assignment]
            parent.add_module(last, _module(node, layers.get(node.module), shapes))
            built.add(node.module)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if len(inputs) != len(self._inputs):
            raise ConfigError(f"the model takes {len(self._inputs)} input(s) ({', '.join(self._inputs)}), "
                              f"got {len(inputs)}")
        env = dict(zip(self._inputs, inputs))
        for name, function, args, attrs, path in self._steps:
            xs = [env[a] for a in args] + [self._tensor_at(key) for key in self._reads.get(name, ())]
            env[name] = self.get_submodule(path)(xs[0]) if path is not None else function(torch, xs, attrs)
            if isinstance(env[name], tuple):  # a recurrent layer's (output, state)
                env[name] = env[name][0]
        outs = tuple(env[o] for o in self._outputs)
        return outs[0] if len(outs) == 1 else outs

    def _tensor_at(self, key: str) -> torch.Tensor:
        """The parameter or buffer at state_dict key ``key``."""
        owner, _, local = key.rpartition(".")
        return getattr(self.get_submodule(owner) if owner else self, local)


def _keep_unread(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Stored float tensors the graph does not read (a causal mask the attention never adds, as it runs causal
    itself) become buffers of the rebuilt ``model`` at their keys, outside its layers, so that it holds and saves
    again what the file holds."""
    own = model.state_dict()
    modules = dict(model.named_modules())
    for key in sorted(set(state) - set(own)):
        parts = key.split(".")
        owners = [modules.get(".".join(parts[:i])) for i in range(1, len(parts))]
        if state[key].is_floating_point() and all(m is None or type(m) is nn.Module for m in owners):
            _register(model, key, tuple(state[key].shape), parameter=False)
            modules = dict(model.named_modules())


def _register(model: nn.Module, key: str, shape: tuple[int, ...], parameter: bool) -> None:
    """A float32 parameter (or buffer) of ``shape`` at state_dict key ``key``, with containers made as needed."""
    *parents, local = key.split(".")
    owner = model
    for part in parents:
        if part not in owner._modules:
            owner.add_module(part, nn.Module())
        owner = owner._modules[part]  # type: ignore[assignment]
    if local in owner._parameters or local in owner._buffers:
        return  # read by an earlier node
    tensor = torch.zeros(shape, dtype=torch.float32)
    if parameter:
        owner.register_parameter(local, nn.Parameter(tensor))
    else:
        owner.register_buffer(local, tensor)


#: layer op -> (its float torch layer, its quantized layer)
_LAYER_CLASSES: dict[str, tuple[type[nn.Module], type[nn.Module]]] = {
    "linear": (nn.Linear, QuantLinear), "conv1d": (nn.Conv1d, QuantConv1d), "conv2d": (nn.Conv2d, QuantConv2d),
    "conv_transpose2d": (nn.ConvTranspose2d, QuantConvTranspose2d), "embedding": (nn.Embedding, QuantEmbedding)}


def _module(node: GraphNode, entry: dict[str, Any] | None, shapes: dict[str, tuple[int, ...]]) -> nn.Module:
    """The torch module of a validated layer (linear, conv1d, conv2d, conv_transpose2d), batchnorm or quant_act
    node."""
    path = node.module
    where = f"layer {path!r}"
    if node.op == "quant_act":
        return QuantAct(_quantizer(entry["quantizer"], f"{where} quantizer"))
    if node.op in ("lstm", "gru"):
        cls = {"lstm": (nn.LSTM, QuantLSTM), "gru": (nn.GRU, QuantGRU)}[node.op][entry is not None]
        specs = {} if entry is None else {"weight_quantizer": _quantizer(entry["weight"], f"{where} weight quantizer")}
        layers, bias = node.attrs["num_layers"], "bias_ih_l0" in node.params
        if set(node.params) != {n for names in layer_names(layers, bias) for n in names}:
            raise FormatError("bad-graph", f"{where}: a {node.op} of {layers} layer(s) stores "
                                           f"{sorted(n for names in layer_names(layers, bias) for n in names)}")
        return cls(shapes[f"{path}.weight_ih_l0"][1], node.attrs["hidden_size"], layers, bias=bias,
                   batch_first=True, **specs)
    if node.op == "batchnorm":
        cls = nn.BatchNorm1d if len(node.shape) in (1, 2) else nn.BatchNorm2d
        return cls(shapes[f"{path}.running_mean"][0], eps=node.attrs["eps"], affine="weight" in node.params)
    weight = shapes[f"{path}.weight"]
    specs = {} if entry is None else {f"{slot}_quantizer": _quantizer(entry[slot], f"{where} {slot} quantizer")
                                      for slot in ("weight", "input", "output") if entry[slot] is not None}
    bias = "bias" in node.params
    cls = _LAYER_CLASSES[node.op][entry is not None]
    a = node.attrs
    if node.op == "linear":
        return cls(weight[1], weight[0], bias, **specs)
    if node.op == "embedding":
        return cls(weight[0], weight[1], **specs)
    geometry = {"stride": a["stride"], "padding": a["padding"], "dilation": a["dilation"], "groups": a["groups"]}
    if node.op == "conv_transpose2d":
        return cls(weight[0], weight[1] * a["groups"], tuple(weight[2:]), bias=bias,
                   output_padding=a["output_padding"], **geometry, **specs)
    return cls(weight[1] * a["groups"], weight[0], tuple(weight[2:]), bias=bias, **geometry, **specs)
