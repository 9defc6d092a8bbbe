"""Conversion: :func:`quantize` quantizes a model's whole graph, call site by call site.

The model is traced with ``torch.fx`` (:func:`lowbit.export.graph.trace`: torch's and lowbit's layers stay
modules, everything else is traced through, a subclass with its own ``forward`` included). Then:

1. **Call sites, not module types.** Every call of ``nn.Linear`` / ``nn.Conv2d`` (grouped and depthwise
   included; a subclass that keeps the class's ``forward``) and every functional ``F.linear`` / ``F.conv2d``
   whose weight is a parameter (how a subclass with a custom ``forward``, such as a TF "same"-padding conv,
   calls it) becomes a float layer at that call: the module's own path, or for a functional call the path of
   the module owning the weight (``<owner>.<call>`` where that module has other parts in the graph). Whatever
   the subclass computed around the call (its padding) stays in the graph, bit for bit.
2. **Batch-norm folding** (``fold_bn``; on for a model in eval mode, the post-training case): a layer followed
   only by an eval-mode batch norm becomes one layer, ``W' = W g / sqrt(v + eps)``, ``b' = (b - m) g /
   sqrt(v + eps) + beta`` per output channel, computed in float64 (Jacob et al. 2018). For training (a model in
   train mode) batch norm stays; the ONNX export folds it.
3. **Weights**: each layer gets the config's specs (:mod:`lowbit.config`; the first and last layer are the
   first and last call site in graph order) and becomes :class:`~lowbit.nn.QuantLinear` /
   :class:`~lowbit.nn.QuantConv2d`, or stays float where the config says so.
4. **Activations on graph edges** (:func:`lowbit.placement.place`): each tensor entering a quantized op is
   quantized once, with one observer for all its consumers, and for int8 activation specs also at layer
   outputs and around adds, products and concatenations.

The result is an ``fx.GraphModule`` whose layers sit at the model's own module paths. Layers it cannot
quantize (modules with parameters that are not layers above, a norm kept float on purpose, or quantized
already; functional convs with a computed weight) run in float and are never skipped silently: a warning
lists them, :class:`QuantReport` holds them with the fraction of weights (and, given an example input, of
MACs) quantized, and ``strict=True`` raises UnsupportedLayerError. Re-exported by :mod:`lowbit.api`;
:mod:`lowbit.serialize` uses it to rebuild a stored model from its float architecture.
"""

from __future__ import annotations

import copy
import operator
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional as F

from . import ptq, quantizers
from .config import QuantConfig, as_config
from .errors import ConfigError, UnsupportedLayerError
from .export.graph import node_schema, propagate, trace
from .nn import (QUANT_LAYERS, QuantAct, QuantConv1d, QuantConv2d, QuantConvTranspose2d, QuantEmbedding, QuantLinear,
                 label_quantizers)
from .nn.recurrent import QUANT_RNNS, QuantGRU, QuantLSTM
from .ops.rnn import check_module
from .placement import PRODUCTS, place, reads_range_at_run_time
from .ptq.equalize import FOLDED_BATCHNORM, batchnorm_statistics
from .ptq.result import LayerResult
from .quantizers import Quantizer

__all__ = ["KEPT_FLOAT", "LAYERS", "QUANTIZED_WITH_ATTR", "QuantReport", "fold_batchnorm", "quantize",
           "quantize_report"]

#: the attribute of a quantized model recording what it was quantized with ({"config": dict, "fold_bn": bool}),
#: which :func:`lowbit.save` stores so that ``load(path, model=float_arch)`` converts the architecture alike
QUANTIZED_WITH_ATTR = "lowbit_quantized_with"


#: op -> (its float layer, its quantized layer)
LAYERS: dict[str, tuple[type[nn.Module], type[nn.Module]]] = {
    "linear": (nn.Linear, QuantLinear), "conv1d": (nn.Conv1d, QuantConv1d), "conv2d": (nn.Conv2d, QuantConv2d),
    "conv_transpose2d": (nn.ConvTranspose2d, QuantConvTranspose2d), "embedding": (nn.Embedding, QuantEmbedding)}
#: recurrent layers -> (their float layer, their quantized layer): weights quantized, the recurrence float (see
#: :mod:`lowbit.nn.recurrent`); only a dynamic input spec quantizes the input sequence before them
RNNS: dict[str, tuple[type[nn.Module], type[nn.Module]]] = {"lstm": (nn.LSTM, QuantLSTM), "gru": (nn.GRU, QuantGRU)}
#: layer ops whose input is integer token indices: no input quantizer, no multiply-accumulates (a gather)
_LOOKUPS = ("embedding",)
#: layers whose input's features are not its last axis
_CONVS = ("conv1d", "conv2d", "conv_transpose2d")
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
#: functional calls that are these ops, and their argument names in order
FUNCTIONAL: dict[Any, tuple[str, tuple[str, ...]]] = {
    F.linear: ("linear", ("input", "weight", "bias")),
    F.conv1d: ("conv1d", _CONV_ARGS),
    F.conv2d: ("conv2d", _CONV_ARGS),
    F.conv_transpose2d: ("conv_transpose2d",
                         ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")),
}
#: layers with parameters that stay float on purpose (normalisation is folded or kept float at inference)
KEPT_FLOAT = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LayerNorm, nn.GroupNorm)
#: normalisation ops, whose parameters stay float on purpose
_NORMS = ("batchnorm", "layer_norm")
#: ops whose layer folds a following batch norm (weight's axis 0 is the output channel)
_FOLDABLE = ("linear", "conv2d", "conv1d")


@dataclass
class QuantReport:
    """What :func:`quantize_report` did.

    ``converted``: layers quantized; ``kept_float``: layers the config leaves float (first/last policy "float"
    or a skip rule); ``folded``: batch norms folded into the layer before them; ``activations``: the activation
    quantizers placed on graph edges (QuantAct paths); ``unsupported``: (name, reason) of what runs in float
    although it holds weights; ``unmatched_rules``: config rules that match no layer. ``weight_fraction``: the
    share of the model's parameters (elements) in quantized weights; ``mac_fraction``: the share of the
    multiply-accumulates of all linear / conv / matmul / attention calls (inside modules left float too) run by
    quantized layers or by products of quantized operands, measured on ``example_input`` (None without one);
    ``ptq``: what the data-free post-training methods (cross-layer equalization) did; ``already_quantized``:
    layers that arrived with quantized weights (a quantization-aware checkpoint), kept as they are and counted in
    both fractions.
    """

    model: nn.Module
    converted: list[str] = field(default_factory=list)
    kept_float: list[str] = field(default_factory=list)
    folded: list[str] = field(default_factory=list)
    activations: list[str] = field(default_factory=list)
    unsupported: list[tuple[str, str]] = field(default_factory=list)
    unmatched_rules: list[str] = field(default_factory=list)
    weight_fraction: float = 0.0
    mac_fraction: float | None = None
    ptq: list[LayerResult] = field(default_factory=list)
    already_quantized: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        macs = "" if self.mac_fraction is None else f", {self.mac_fraction:.1%} of MACs"
        kept = f", {len(self.already_quantized)} already quantized" if self.already_quantized else ""
        lines = [f"quantized {len(self.converted)} layer(s){kept} ({self.weight_fraction:.1%} of weights{macs}), "
                 f"{len(self.activations)} activation quantizer(s) on graph edges, "
                 f"{len(self.folded)} batch norm(s) folded"]
        lines += [f"  kept float by the config: {name}" for name in self.kept_float]
        lines += [f"  float (cannot quantize): {name}: {reason}" for name, reason in self.unsupported]
        return "\n".join(lines)


@dataclass
class _Site:
    """A linear / conv call: its node, op, float layer and module path."""

    node: fx.Node
    op: str
    layer: nn.Module
    path: str


def fold_batchnorm(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of ``layer`` computing ``bn(layer(x))`` in eval mode (weight axis 0 = output channel)."""
    with torch.no_grad():
        std = torch.sqrt(bn.running_var.double() + bn.eps)
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(std)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(std)
        factor = gamma / std
        weight = layer.weight.double() * factor.reshape(-1, *[1] * (layer.weight.dim() - 1))
        bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(std)
        folded = copy.deepcopy(layer)
        folded.weight = nn.Parameter(weight.to(layer.weight.dtype))
        folded.bias = nn.Parameter(((bias - bn.running_mean.double()) * factor + beta).to(layer.weight.dtype))
    return folded


def _attr(gm: nn.Module, target: str) -> torch.Tensor:
    return operator.attrgetter(target)(gm)


def _explicit_padding(layer: nn.Module) -> None:
    """Turn a string padding ("valid", symmetric "same") into integers, as the graph IR stores it."""
    if not isinstance(getattr(layer, "padding", None), str) or layer.padding_mode != "zeros":
        return
    if layer.padding == "valid":
        layer.padding = (0,) * len(layer.kernel_size)
        return
    totals = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
    if all(t % 2 == 0 for t in totals):
        layer.padding = tuple(t // 2 for t in totals)


def _functional_layer(gm: fx.GraphModule, node: fx.Node, op: str, names: tuple[str, ...]) -> nn.Module | str:
    """A float layer computing this functional call, or why there is none."""
    args = {**dict(zip(names, node.args)), **node.kwargs}
    weight, bias = args["weight"], args.get("bias")
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return "its weight is computed in the graph, not a parameter"
    if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
        return "its bias is computed in the graph, not a parameter"
    w = _attr(gm, weight.target)
    kind = {"device": w.device, "dtype": w.dtype}
    groups = args.get("groups", 1)
    if op == "linear":
        layer: nn.Module = nn.Linear(w.shape[1], w.shape[0], bias is not None, **kind)
    elif op == "conv_transpose2d":
        layer = nn.ConvTranspose2d(w.shape[0], w.shape[1] * groups, tuple(w.shape[2:]), args.get("stride", 1),
                                   args.get("padding", 0), args.get("output_padding", 0), groups, bias is not None,
                                   args.get("dilation", 1), **kind)
    else:
        layer = LAYERS[op][0](w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), args.get("stride", 1),
                              args.get("padding", 0), args.get("dilation", 1), groups, bias is not None, **kind)
    with torch.no_grad():
        layer.weight.copy_(w)
        if bias is not None:
            layer.bias.copy_(_attr(gm, bias.target))
    return layer


def _free_path(owner: str, op: str, taken: set[str]) -> str:
    """The owner's path where nothing else of the graph lives in it, else ``<owner>.<op>`` (``_1``, ``_2`` ... when
    the owner makes several such calls)."""
    if owner and not any(t == owner or t.startswith(f"{owner}.") for t in taken):
        return owner
    base = f"{owner}.{op}" if owner else op
    return next(path for path in (base, *(f"{base}_{i}" for i in range(1, len(taken) + 2))) if path not in taken)


def _sites(gm: fx.GraphModule, report: QuantReport) -> list[_Site]:
    modules = dict(gm.named_modules())
    sites: list[_Site] = []
    taken = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            schema = node_schema(node, modules)
            m = modules[node.target]
            if schema is not None and schema.name in LAYERS:
                if not isinstance(m, QUANT_LAYERS):
                    sites.append(_Site(node, schema.name, m, node.target))
                elif m.weight_quantizer is not None:
                    report.already_quantized.append(node.target)
            elif type(m) in (float_cls for float_cls, _ in RNNS.values()):
                try:
                    check_module(m, f"layer {node.target!r}")
                except UnsupportedLayerError as e:  # left float; quantize(strict=True) raises it
                    report.unsupported.append((node.target, str(e)))
                    continue
                sites.append(_Site(node, "lstm" if isinstance(m, nn.LSTM) else "gru", m, node.target))
        elif node.op == "call_function" and node.target in FUNCTIONAL:
            op, names = FUNCTIONAL[node.target]
            layer = _functional_layer(gm, node, op, names)
            if isinstance(layer, str):
                report.unsupported.append((node.name, f"{op} call: {layer}"))
                continue
            weight = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
            owners = {n.target.rpartition(".")[0] for n in node.all_input_nodes if n.op == "get_attr"}
            others = taken | {n.target for n in gm.graph.nodes if n.op == "get_attr"
                              and n.target.rpartition(".")[0] in owners and n not in node.all_input_nodes}
            path = _free_path(weight.target.rpartition(".")[0], op, others)
            taken.add(path)
            sites.append(_Site(node, op, layer, path))
    return sites


def _ends(gm: fx.GraphModule, sites: list[_Site], arrived: list[str]) -> tuple[int | None, int | None]:
    """Indices of the sites that are the model's first and last layers (None where a layer that arrived
    quantized comes before the first site or after the last), for the config's first / last policies."""
    position = {node: i for i, node in enumerate(gm.graph.nodes)}
    taken = [position[n] for n in gm.graph.nodes if n.op == "call_module" and n.target in arrived]
    if not sites:
        return None, None
    first = None if any(p < position[sites[0].node] for p in taken) else 0
    last = None if any(p > position[sites[-1].node] for p in taken) else len(sites) - 1
    return first, last


def _install(gm: fx.GraphModule, site: _Site, layer: nn.Module) -> None:
    """Make ``site`` a call of ``layer`` at its path; a functional call's parameters leave the graph."""
    node = site.node
    gm.add_submodule(site.path, layer)
    if node.op == "call_module":
        return
    with gm.graph.inserting_after(node):
        call = gm.graph.call_module(site.path, (node.args[0] if node.args else node.kwargs["input"],))
    node.replace_all_uses_with(call)
    used = [n for n in node.all_input_nodes if n.op == "get_attr"]
    gm.graph.erase_node(node)
    for attr in used:
        if not attr.users:
            gm.graph.erase_node(attr)
            owner, _, name = attr.target.rpartition(".")
            holder = gm.get_submodule(owner)
            if holder is not layer and hasattr(holder, name):  # the layer holds its own copy now
                delattr(holder, name)
    site.node = call


#: F.batch_norm's arguments in order
_BATCH_NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


def _batch_norm_modules(gm: fx.GraphModule, sites: list[_Site]) -> None:
    """Make each functional ``F.batch_norm`` on parameters that follows a layer a batch-norm module there (a norm
    subclass with its own forward, such as timm's BatchNormAct2d): it folds, trains and is stored like one."""
    produced_by = {site.node: site.op for site in sites}
    taken = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not F.batch_norm:
            continue
        args = {**dict(zip(_BATCH_NORM_ARGS, node.args)), **node.kwargs}
        stats = [args.get(k) for k in ("running_mean", "running_var")]
        cls = {"conv2d": nn.BatchNorm2d, "conv1d": nn.BatchNorm1d, "linear": nn.BatchNorm1d}.get(
            produced_by.get(args["input"]))
        if cls is None or args.get("training") or not all(isinstance(a, fx.Node) and a.op == "get_attr"
                                                          for a in stats):
            continue  # left to capture, which names it
        mean, var = (_attr(gm, a.target) for a in stats)
        weight, bias = (args.get(k) for k in ("weight", "bias"))
        bn = cls(mean.numel(), eps=args.get("eps", 1e-5), momentum=args.get("momentum", 0.1),
                 affine=weight is not None, device=mean.device, dtype=mean.dtype)
        with torch.no_grad():
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            if weight is not None:
                bn.weight.copy_(_attr(gm, weight.target))
                bn.bias.copy_(_attr(gm, bias.target))
        path = _free_path(stats[0].target.rpartition(".")[0], "batch_norm", taken)
        taken.add(path)
        _install(gm, _Site(node, "batch_norm", bn, path), bn)


def _inspects(node: fx.Node) -> bool:
    """Whether ``node`` only reads a tensor's size or rank, or checks it (``x.ndim``, ``torch._assert``)."""
    return node.op == "call_function" and node.target in (getattr, torch._assert) or \
        node.op == "call_method" and node.target in ("size", "dim")


def _fold(gm: fx.GraphModule, sites: list[_Site], report: QuantReport) -> None:
    modules = dict(gm.named_modules())
    calls = [id(site.layer) for site in sites]
    for site in sites:
        users = [u for u in site.node.users if not _inspects(u)]
        if site.op not in _FOLDABLE or len(users) != 1 or users[0].op != "call_module" \
                or calls.count(id(site.layer)) > 1:
            continue
        bn = modules[users[0].target]
        schema = node_schema(users[0], modules)
        if schema is None or schema.name != "batchnorm" or bn.running_var is None \
                or bn.num_features != site.layer.weight.shape[0]:
            continue
        site.layer = fold_batchnorm(site.layer, bn)
        gm.meta.setdefault(FOLDED_BATCHNORM, {})[site.path] = batchnorm_statistics(bn)
        users[0].replace_all_uses_with(site.node)
        gm.graph.erase_node(users[0])
        report.folded.append(users[0].target)


def _call_macs(func: Any, args: tuple, kwargs: dict, out: Any) -> int:
    """Multiply-accumulates of one linear / conv / matmul call (``out.numel() / out_channels * weight.numel()``:
    every output value takes one weight row or filter; a transposed conv: every input value; a product: the
    shared axis per output value); 0 for any other call."""
    if func in _WEIGHTED_CALLS and isinstance(out, torch.Tensor):
        weight = args[1] if len(args) > 1 else kwargs["weight"]
        values = (args[0] if args else kwargs["input"]).numel() if func is F.conv_transpose2d else out.numel()
        return values // weight.shape[0] * weight.numel()
    if func in _PRODUCT_CALLS and isinstance(out, torch.Tensor):
        return out.numel() * args[0].shape[-1]
    if func is F.scaled_dot_product_attention and isinstance(out, torch.Tensor):  # q k^T, then weights v
        query = args[0] if args else kwargs["query"]
        key = args[1] if len(args) > 1 else kwargs["key"]
        return (query.numel() + out.numel()) * key.shape[-2]
    if func is F.multi_head_attention_forward:  # inside a float nn.MultiheadAttention: [L, N, E] (or [L, E])
        query, key = args[0], args[1]
        lq, lk, e = query.shape[0], key.shape[0], query.shape[-1]
        batch = query.shape[1] if query.dim() == 3 else 1
        return batch * e * ((2 * lq + 2 * lk) * e + 2 * lq * lk)  # projections of q, k, v and out; two products
    return 0


#: calls whose multiply-accumulates come from their weight, and products of two tensors
_WEIGHTED_CALLS = (F.linear, F.conv1d, F.conv2d, F.conv_transpose2d)
_PRODUCT_CALLS = (torch.matmul, torch.bmm, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.bmm)


class _CountMacs(torch.overrides.TorchFunctionMode):
    """Adds up the multiply-accumulates of the linear, conv and matmul calls made while it is active (wherever they
    run: inside modules kept whole or left float too)."""

    def __init__(self) -> None:
        super().__init__()
        self.macs = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.macs += _call_macs(func, args, kwargs, out)
        return out


class _MacInterpreter(fx.Interpreter):
    """Runs the graph node by node, recording each node's multiply-accumulates."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.macs: dict[fx.Node, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        with _CountMacs() as count:
            result = super().run_node(n)
        if count.macs:
            self.macs[n] = count.macs
        return result


def _macs(gm: fx.GraphModule, example: torch.Tensor) -> dict[fx.Node, int]:
    """Multiply-accumulates of each node on one example of ``example``'s batch: every linear / conv / matmul call
    in the graph or inside a module it calls (so float parts count too)."""
    propagate(gm, "the model", example)
    interpreter = _MacInterpreter(gm)
    with torch.no_grad():
        interpreter.run(example)
    batch = max(int(example.shape[0]), 1) if example.dim() else 1
    return {node: count // batch for node, count in interpreter.macs.items()}


def _quantized_tensor(gm: fx.GraphModule, node: Any) -> bool:
    """Whether the tensor ``node`` is an activation quantizer's output (a QuantAct, a layer's output quantizer),
    directly or through ops that only move values."""
    modules = dict(gm.named_modules())
    while isinstance(node, fx.Node):
        module = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, QuantAct) and module.quantizer is not None or \
                getattr(module, "output_quantizer", None) is not None:
            return True
        schema = node_schema(node, modules)
        if schema is None or schema.placement != "moves" or not node.args:
            return False
        node = node.args[0]
    return False


def _per_token(spec: Any) -> bool:
    return reads_range_at_run_time(spec) and quantizers.get(spec).spec().get("per_token", False)


def _convert(model: nn.Module, config: str | dict[str, Any] | QuantConfig, strict: bool,
             fold_bn: bool | None, example_input: torch.Tensor | Sequence[int] | None,
             leaves: Sequence[str | type]) -> QuantReport:
    cfg = as_config(config)
    fold = not model.training if fold_bn is None else fold_bn
    gm = trace(copy.deepcopy(model), tuple(leaves))
    report = QuantReport(model=gm)
    sites = _sites(gm, report)
    first, last = _ends(gm, sites, report.already_quantized)
    macs = None
    if example_input is not None:
        from .analysis.summary import example_tensor

        macs = _macs(gm, example_tensor(model, example_input))
    _batch_norm_modules(gm, sites)
    if fold:
        _fold(gm, sites, report)
    layers: dict[fx.Node, dict[str, Any] | None] = {}
    rnn_inputs: dict[fx.Node, Any] = {}
    quantized_macs = 0
    built: dict[int, nn.Module] = {}  # a layer called at several sites stays one layer
    for index, site in enumerate(sites):
        _explicit_padding(site.layer)
        site_macs = macs.get(site.node, 0) if macs else 0
        specs = cfg.layer_specs(site.path, site.layer, first=index == first, last=index == last)
        if specs is not None and site.op in _LOOKUPS:
            specs["input"] = None  # token indices
        if specs is None:
            _install(gm, site, site.layer)
            layers[site.node] = None
            report.kept_float.append(site.path)
            continue
        if site.op in RNNS:  # weights, and its input where the config reads ranges at run time
            if reads_range_at_run_time(specs["input"]):  # each step's input with its own range (torch's dynamic LSTM)
                rnn_inputs[site.node] = specs["input"]
            if id(site.layer) not in built:
                built[id(site.layer)] = RNNS[site.op][1].from_float(site.layer, weight_quantizer=specs["weight"])
                report.converted.append(site.path)
            gm.add_submodule(site.path, built[id(site.layer)])
            continue
        if site.op in _CONVS and _per_token(specs["input"]):  # features on axis 1: one range per sample
            specs["input"] = {**quantizers.get(specs["input"]).spec(), "token_axis": 0}
        if id(site.layer) not in built:
            built[id(site.layer)] = LAYERS[site.op][1].from_float(site.layer, weight_quantizer=specs["weight"])
            report.converted.append(site.path)
        _install(gm, site, built[id(site.layer)])
        layers[site.node] = specs
        quantized_macs += site_macs
    named = [(s.path, s.layer) for s in sites] + [(n.target, gm.get_submodule(n.target)) for n in gm.graph.nodes
                                                   if n.op == "call_module" and isinstance(gm.get_submodule(n.target),
                                                                                           QUANT_LAYERS)]
    report.unmatched_rules = [r.pattern or r.layer_type for r in cfg.rules
                              if not any(r.matches(name, layer) for name, layer in named)]
    report.activations = place(gm, layers, cfg.input, rnn_inputs)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    report.unsupported = _float_modules(gm) + report.unsupported
    if report.unsupported and strict:
        raise UnsupportedLayerError(f"cannot quantize {_listing(report)}")
    report.weight_fraction = _weight_fraction(gm)
    if macs is not None:
        modules = dict(gm.named_modules())
        products = [node for node in macs if node.op in ("call_function", "call_method")
                    and getattr(node_schema(node, modules), "name", None) in PRODUCTS]
        operands = {node: node.args[:PRODUCTS[node_schema(node, modules).name]] for node in products}
        quantized_macs += sum(macs[node] for node in products if all(_quantized_tensor(gm, a) for a in operands[node]))
        quantized_macs += sum(count for node, count in macs.items()
                              if node.op == "call_module" and node.target in report.already_quantized)
        total = sum(macs.values())
        report.mac_fraction = quantized_macs / total if total else 1.0
    label_quantizers(gm)
    gm.train(model.training)
    if "cle" in cfg.ptq:
        if not fold:
            raise ConfigError("ptq method 'cle' equalizes layers whose batch norms are folded: quantize the model "
                              "in eval mode (model.eval()) or with fold_bn=True")
        report.ptq = ptq.method("cle")(gm, **cfg.ptq_options.get("cle", {}))
    setattr(gm, QUANTIZED_WITH_ATTR, {"config": cfg.to_dict(), "fold_bn": fold})
    for attr in ("lowbit_input_shape",):
        if hasattr(model, attr):
            setattr(gm, attr, getattr(model, attr))
    return report


def _float_modules(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """Called modules that own parameters and are neither quantized layers, float layers by config, nor norms;
    parameters the graph reads directly (a layer scale, a position embedding)."""
    modules = dict(gm.named_modules())
    handled = (*KEPT_FLOAT, *QUANT_LAYERS, *QUANT_RNNS, QuantAct,
               *(float_cls for float_cls, _ in (*LAYERS.values(), *RNNS.values())))
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            m = modules[node.target]
            if _stored_as_constants(node, modules):
                continue
            if not isinstance(m, handled) and any(True for _ in m.parameters()) and node.target not in \
                    [name for name, _ in found]:
                found.append((node.target, f"{type(m).__name__} runs in float"))
        elif node.op == "get_attr" and isinstance(_attr(gm, node.target), nn.Parameter):
            readers = [node_schema(u, modules) for u in node.users]
            if all(r is not None and r.name in _NORMS for r in readers):
                continue  # a norm's own weight and bias (kept float on purpose, as KEPT_FLOAT's)
            names = ", ".join(str(getattr(u.target, "__name__", u.target)) for u in node.users)
            found.append((node.target, f"parameter read in float by {names}"))
    return found


def _stored_as_constants(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether a called module is an op other than a layer whose every parameter the graph IR stores as a constant
    (``Capture.module_tensors``: ReActNet's RSign threshold and RPReLU): float on purpose, saved and run by every
    reader, as a norm's."""
    schema = node_schema(node, modules)
    return schema is not None and not schema.module and \
        {name for name, _ in modules[node.target].named_parameters()} <= set(schema.capture.module_tensors)


def _weight_fraction(gm: nn.Module) -> float:
    inside = {id(p) for q in gm.modules() if isinstance(q, Quantizer) for p in q.parameters()}
    params = [p for p in gm.parameters() if id(p) not in inside]
    quantized = sum(m.weight.numel() for m in gm.modules()
                    if isinstance(m, QUANT_LAYERS) and m.weight_quantizer is not None)
    quantized += sum(getattr(m, name).numel() for m in gm.modules() if isinstance(m, QUANT_RNNS)
                     for name in m.weight_quantizers)
    total = sum(p.numel() for p in params)
    return quantized / total if total else 1.0


def _listing(report: QuantReport) -> str:
    return ", ".join(f"{name or '(model)'} ({reason})" for name, reason in report.unsupported)


def _warn_unsupported(report: QuantReport) -> None:
    if report.unsupported:
        count = len(report.unsupported)
        message = f"lowbit.quantize left {count} part(s) float that it cannot quantize: {_listing(report)}"
        warnings.warn(message, UserWarning, stacklevel=3)  # points at the caller of quantize / quantize_report
    if report.unmatched_rules:
        layers = ", ".join([*report.converted, *report.kept_float]) or "none"
        message = (f"lowbit.quantize: config rule(s) {report.unmatched_rules} match no linear/conv layer of the "
                   f"model (a typo?); its layers: {layers}")
        warnings.warn(message, UserWarning, stacklevel=3)


def quantize_report(
    model: nn.Module, config: str | dict[str, Any] | QuantConfig, strict: bool = False, *,
    fold_bn: bool | None = None, example_input: torch.Tensor | Sequence[int] | None = None,
    leaves: Sequence[str | type] = (),
) -> QuantReport:
    """Quantize ``model``'s graph as ``config`` (preset name, dict or QuantConfig) says; see the module docstring.

    The model itself is not changed (the result is built from a deep copy). ``fold_bn``:
    fold batch norms into the layers before them (default: when the model is in eval mode). ``example_input``
    (a tensor or an input shape) measures the MAC fraction. ``leaves``: module paths or classes to keep whole
    (run in float, listed as unsupported), for code torch.fx cannot trace. Quantizer labels are the tensor
    names (``features.0.weight``, ``quant_acts.add.output``). UnsupportedLayerError for a model that cannot be
    traced, or with ``strict`` for anything left float that holds weights.
    """
    report = _convert(model, config, strict, fold_bn, example_input, leaves)
    _warn_unsupported(report)
    return report


def quantize(
    model: nn.Module, config: str | dict[str, Any] | QuantConfig, strict: bool = False, *,
    fold_bn: bool | None = None, leaves: Sequence[str | type] = (),
) -> nn.Module:
    """:func:`quantize_report` returning the quantized model alone."""
    report = _convert(model, config, strict, fold_bn, None, leaves)
    _warn_unsupported(report)
    return report.model
