"""Cross-layer equalization with high-bias absorption (Nagel et al., ICCV 2019, "Data-Free Quantization Through
Weight Equalization and Bias Correction", Sections 4.1-4.2).

**Equalization.** Two layers in a row, ``y = W2 f(W1 x + b1) + b2``, where ``f`` is positively homogeneous
(``f(s x) = s f(x)`` for ``s > 0``: ReLU, leaky ReLU, nothing, and ops that move or average values within a
channel: max / average pooling, padding, nearest upsampling, flattening for a linear layer 2), compute the same
function after ``W1[i] /= s_i, b1[i] /= s_i, W2[:, i] *= s_i``. With ``r1_i = max |W1[i]|`` (output channel i of
layer 1) and ``r2_i = max |W2[:, i]|`` (input channel i of layer 2), ``s_i = sqrt(r1_i / r2_i)`` makes both ranges
``sqrt(r1_i r2_i)``, so one per-tensor grid fits every channel. Grouped and depthwise layer 2: input channel i is
read only by the output channels of its group (depthwise: channel i to channel i). A chain (conv -> depthwise ->
conv, as in MobileNet) is equalized pair by pair, the passes repeated until every scale is 1 to 1e-9 (at most
``iterations`` passes). A zero range (a dead channel) keeps ``s_i = 1``.

**ReLU6** (``hardtanh(0, t)``) is not positively homogeneous: ``relu6(x / s) != relu6(x) / s``. Three policies:

- ``relu6="exact"`` (the default): the clip stays where it was in the original units. The graph computes
  ``relu6(s * h') / s`` with ``h' = h / s`` the equalized layer's output (a per-channel ``mul`` before the clip
  and ``div`` after it, by a buffer ``cle_scales.<clip node>`` that save, the Engine and the ONNX export carry as
  a constant), so the float model is unchanged (to rounding) while both weights and the tensor layer 2 reads are
  equalized. Nothing is absorbed through such a clip. The price is in the activations: a channel scaled up by
  ``1 / s`` widens the per-tensor range of the tensor layer 2 reads (EfficientNet-Lite1, per-tensor 8-bit weights:
  logits cosine 0.81 -> 0.98 with float activations, 0.81 -> 0.93 with 8-bit ones).
- ``relu6="replace"`` (the paper's and AIMET's practice for MobileNetV2): the clip becomes a ReLU, which changes
  the float model wherever a pre-activation exceeded it; the result says ``"activation": "relu6 -> relu"``. On
  EfficientNet-Lite1 (ImageNet weights, crops of real photos) this alone drops the float model's top-1 agreement
  with itself to about 41% (logits cosine 0.69), although under 0.1% of the clipped inputs exceed 6 at the median
  clip: never use it on a net trained with ReLU6 without checking.
- ``relu6="skip"``: such pairs are left alone and listed.

**High-bias absorption.** For a pair through ReLU whose layer 1 had its batch norm folded, the pre-activation of
channel i is about ``N(beta_i, gamma_i^2)`` (the batch norm's shift and scale), so it stays above
``c_i = max(0, beta_i - 3 |gamma_i|)`` almost always. Moving ``c_i`` out of ``b1`` (``b1[i] -= c_i``) and into
``b2`` (``b2 += sum over i and kernel positions of W2[:, i] c_i``) leaves the float output unchanged wherever the
pre-activation is >= ``c_i`` (``relu(h - c) = relu(h) - c`` for ``h >= c``) and shrinks the range of the
activations that are quantized. Zero padding between the layers (a pad op, or layer 2's own) pads 0 where the
shifted activation would be ``-c``: absorption is then exact only away from the borders (``"padded": True``),
as in the paper. The batch-norm statistics come from the fold: :func:`lowbit.quantize` records ``(beta, |gamma|)``
per folded layer in ``model.meta[FOLDED_BATCHNORM]`` (see :func:`batchnorm_statistics`); equalization keeps
that record true (divided by the scales, less the absorbed amount), so the analytic bias correction can read it
afterwards. A pair without a record is equalized without absorption (its result says why).

Pairs are found in the ``fx.GraphModule`` that :func:`lowbit.quantize` returns: layer 1's output reaches nothing
but layer 2. Look-alikes that cannot be equalized (a SiLU between them, a transposed conv, a shared layer, a
weight already rounded, an activation range already calibrated) are returned as results with ``"skipped"``.
"""

from __future__ import annotations

import math
import operator
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.nn import functional as F

from ..errors import ConfigError
from ..export.graph import node_schema
from ..nn import STORED_ATTR, QuantAct
from .result import LayerResult

__all__ = ["FOLDED_BATCHNORM", "RELU6_POLICIES", "Link", "batchnorm_statistics", "equalize", "links"]

#: key of ``model.meta`` holding, per layer path whose batch norm was folded, the batch norm's output mean and
#: standard deviation per channel (``beta``, ``|gamma|``)
FOLDED_BATCHNORM = "lowbit_folded_batchnorm"
#: what equalization does with a ReLU6 / hardtanh(0, t) between two layers
RELU6_POLICIES = ("exact", "replace", "skip")
#: pre-activations are taken to stay above ``beta - ABSORB_SIGMAS |gamma|`` (the paper's 3 standard deviations)
ABSORB_SIGMAS = 3.0
#: the passes stop once every scale of a pass is within this of 1
TOLERANCE = 1e-9
#: the submodule holding the per-channel scales around the clips kept by relu6="exact"
SCALES = "cle_scales"

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
#: ops between the layers that commute with a positive per-channel scale and keep the channel axis of a conv
_SPATIAL = ("maxpool2d", "adaptive_maxpool2d", "upsample", "pad", "avgpool2d", "adaptive_avgpool2d")
#: activations that are not positively homogeneous: a pair through them is listed as skipped
_CURVED = ("silu", "gelu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "softmax")


def batchnorm_statistics(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, standard deviation) per channel of an eval-mode batch norm's output: ``(beta, |gamma|)`` (0 and 1
    for a norm without affine parameters), float64 copies. What the fold records in ``model.meta``."""
    with torch.no_grad():
        channels = bn.running_mean.numel()
        mean = bn.bias.double().clone() if bn.bias is not None else torch.zeros(channels, dtype=torch.float64)
        std = bn.weight.double().abs() if bn.weight is not None else torch.ones(channels, dtype=torch.float64)
    return mean, std


@dataclass
class Link:
    """Layer 1 -> ops -> layer 2 in the graph. ``activations``: the activations between them in order;
    ``clips``: the ReLU6 / hardtanh(0, t) nodes, ``top`` their lowest upper bound and ``clip_dims`` the axes after
    the channel axis at each (-1: the channels are flattened into blocks of ``block``), ``clip_scale`` the scales
    an earlier equalization put around them (relu6="exact"); ``kinds``: each op's graph
    op name ("flatten", "identity" for dropout and copies); ``block``: input features of a linear layer 2 per
    channel of layer 1 (a flattened conv output; else 1); ``padded``: zero padding between or in layer 2;
    ``skipped``: why the pair cannot be equalized (empty when it can)."""

    first: str
    second: str
    first_node: fx.Node
    second_node: fx.Node
    ops: list[fx.Node] = field(default_factory=list)
    activations: list[str] = field(default_factory=list)
    clips: list[fx.Node] = field(default_factory=list)
    clip_dims: list[int] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    top: float = math.inf
    clip_scale: torch.Tensor | None = None
    block: int = 1
    padded: bool = False
    skipped: str = ""

    @property
    def activation(self) -> str:
        return ", ".join(self.activations) or "none"


def _is_layer(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return node.op == "call_module" and isinstance(modules[node.target], (*_LAYERS, nn.ConvTranspose2d))


def _readers(node: fx.Node) -> list[fx.Node]:
    """The nodes that use ``node``'s value (not those that only read its size)."""
    return [u for u in node.users if not (u.op == "call_method" and u.target in ("size", "dim")
                                          or u.op == "call_function" and u.target in (getattr, torch._assert))]


def _argument(node: fx.Node, index: int, name: str, default):
    return node.kwargs.get(name, node.args[index] if len(node.args) > index else default)


def _is_identity(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Dropout (in eval mode), identity modules and copies: the identity at inference."""
    if node.op == "call_module":
        return isinstance(modules[node.target], (nn.Identity, nn.modules.dropout._DropoutNd))
    if node.op == "call_method":
        return node.target in ("contiguous", "clone", "detach")
    dropouts = (F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout)
    return node.op == "call_function" and node.target in dropouts and not _argument(node, 2, "training", True)


def _flattens(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` flattens all axes after the batch axis (channel-major, as ``x.view(x.size(0), -1)``)."""
    if node.op == "call_module":
        m = modules[node.target]
        return isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1
    if node.target in (torch.flatten, "flatten"):
        return _argument(node, 1, "start_dim", 0) == 1 and _argument(node, 2, "end_dim", -1) == -1
    if node.target in (torch.reshape, "view", "reshape"):
        shape = node.args[1:] if node.op == "call_method" else node.args[1]
        if node.op == "call_method" and len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = shape[0]
        if len(shape) != 2 or shape[1] != -1:
            return False
        batch = shape[0]
        return isinstance(batch, int) or isinstance(batch, fx.Node) and batch.op == "call_method" and \
            batch.target == "size" and tuple(batch.args[1:]) == (0,)
    return False


def _clip_scaling(node: fx.Node) -> bool:
    """Whether ``node`` multiplies or divides by the scales an earlier equalization put around a kept clip."""
    factor = node.args[1] if node.op == "call_function" and len(node.args) == 2 else None
    return node.target in (operator.mul, operator.truediv) and isinstance(factor, fx.Node) and \
        factor.op == "get_attr" and str(factor.target).startswith(f"{SCALES}.")


def _clip_bounds(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[float, float]:
    if node.op == "call_module":
        m = modules[node.target]
        return float(m.min_val), float(m.max_val)
    if node.target is F.relu6:
        return 0.0, 6.0
    return float(_argument(node, 1, "min_val", -1.0)), float(_argument(node, 2, "max_val", 1.0))


def _calibrated(quantizer: nn.Module | None) -> bool:
    """Whether a static quantizer holds an observed range (which the equalized values would no longer fit)."""
    return quantizer is not None and not getattr(quantizer, "dynamic", True) and bool(getattr(quantizer, "observed",
                                                                                             False))


def _walk(layer2: fx.Node, modules: dict[str, nn.Module]) -> Link | None:
    """The link ending at ``layer2``: back from its input through the ops between, to the layer that produced it;
    None where no layer feeds it through such ops alone."""
    ops: list[fx.Node] = []
    blocked = ""
    node = layer2.args[0] if layer2.args else None
    while isinstance(node, fx.Node) and not _is_layer(node, modules):
        schema = node_schema(node, modules)
        name = schema.name if schema is not None else ""
        if name in _CURVED:
            blocked = blocked or f"{name} between them is not positively homogeneous (f(s x) != s f(x))"
        elif name == "batchnorm":
            blocked = blocked or "a batch norm between them is not folded (quantize the model in eval mode)"
        elif name == "hardtanh" and _clip_bounds(node, modules)[0] != 0:
            blocked = blocked or f"hardtanh{_clip_bounds(node, modules)} between them is not positively homogeneous"
        elif not (name in ("relu", "hardtanh", "leaky_relu", "quant_act", "mean", *_SPATIAL)
                  or _is_identity(node, modules) or _flattens(node, modules) or _clip_scaling(node)):
            return None
        ops.append(node)
        node = node.args[0] if node.args else None
    if not isinstance(node, fx.Node):
        return None
    return Link(node.target, layer2.target, node, layer2, ops[::-1], skipped=blocked)



def _pool_padded(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether an average pool pads (and so averages in zeros at the borders)."""
    padding = modules[node.target].padding if node.op == "call_module" else _argument(node, 3, "padding", 0)
    return padding not in (0, (0, 0), [0, 0])


def _describe(link: Link, modules: dict[str, nn.Module], calls: dict[str, int], exclusive: bool) -> Link | None:
    """Fill in ``link``'s activations, block and padding and why it cannot be equalized; None where it is no
    channel pair (layer 2 does not read layer 1's channel axis; with ``exclusive``, layer 1's output reaches
    more than layer 2)."""
    first, second = modules[link.first], modules[link.second]
    if exclusive and any(len(_readers(n)) != 1 for n in [link.first_node, *link.ops]):
        return None
    conv_first = not isinstance(first, nn.Linear)
    flat = False  # a conv's channels have become the last axis
    for node in link.ops:
        schema = node_schema(node, modules)
        name = "flatten" if _flattens(node, modules) else "clip_scale" if _clip_scaling(node) else \
            schema.name if schema is not None else "identity"
        link.kinds.append(name)
        if name in ("relu", "leaky_relu"):
            link.activations.append(name)
        elif name == "clip_scale" and node.target is operator.mul:
            link.clip_scale = modules[SCALES].get_buffer(node.args[1].target.split(".", 1)[1]).reshape(-1)
        elif name == "hardtanh" and _clip_bounds(node, modules)[0] == 0:
            top = _clip_bounds(node, modules)[1]
            link.activations.append("relu6" if top == 6 else "hardtanh(0, t)")
            link.clips.append(node)
            link.clip_dims.append(-1 if flat else first.weight.dim() - 2 if conv_first else 0)
            link.top = min(link.top, top)
        elif name in (*_SPATIAL, "mean", "flatten"):
            if not conv_first or flat:
                return None  # pooling a linear layer's features mixes them
            if name == "mean":
                axes = _argument(node, 1, "dim", None)
                axes = [axes] if isinstance(axes, int) else list(axes or [])
                if not axes or any(a % first.weight.dim() in (0, 1) for a in axes):
                    return None  # averages over channels
                flat = not _argument(node, 2, "keepdim", False)
            elif name in _SPATIAL:
                link.padded = link.padded or name == "pad" or name == "avgpool2d" and _pool_padded(node, modules)
            else:
                flat = True
    if isinstance(second, nn.Linear):
        if conv_first and not flat:
            return None  # a linear layer reads the last (spatial) axis of a conv's output
        link.block = max(second.in_features // first.weight.shape[0], 1)
    elif flat or not conv_first or first.weight.dim() != second.weight.dim():
        return None
    else:
        padding = second.padding
        link.padded = link.padded or second.padding_mode == "zeros" and (
            padding != "valid" if isinstance(padding, str) else any(p != 0 for p in padding))
    link.skipped = link.skipped or _obstacle(link, modules, calls)
    return link


def _obstacle(link: Link, modules: dict[str, nn.Module], calls: dict[str, int]) -> str:
    """Why a channel pair cannot be equalized, or ""."""
    first, second = modules[link.first], modules[link.second]
    if isinstance(first, nn.ConvTranspose2d) or isinstance(second, nn.ConvTranspose2d):
        return "transposed convolutions are not equalized"
    if "clip_scale" in link.kinds:
        return "already equalized: its clip is kept exact by scales around it"
    if calls[link.first] > 1 or calls[link.second] > 1:
        return "a layer of the pair is called at several sites"
    channels = first.weight.shape[0]
    reads = second.in_features if isinstance(second, nn.Linear) else second.in_channels
    if reads != channels * link.block:
        return f"{link.second} reads {reads} input channels, not {link.first}'s {channels} (or a multiple)"
    for path, layer in ((link.first, first), (link.second, second)):
        q = getattr(layer, "weight_quantizer", None)
        if q is not None and getattr(q, STORED_ATTR, None) is not None:
            return f"{path}'s weight is already rounded and frozen: equalize before rounding"
    quantizers = [getattr(first, "output_quantizer", None), getattr(second, "input_quantizer", None),
                  getattr(first, "weight_quantizer", None), getattr(second, "weight_quantizer", None),
                  *(modules[n.target].quantizer for n in link.ops
                    if n.op == "call_module" and isinstance(modules[n.target], QuantAct))]
    if any(_calibrated(q) for q in quantizers):
        return "a range between them is already calibrated: equalize before lowbit.calibrate"
    return ""


def links(model: fx.GraphModule, *, exclusive: bool = True) -> list[Link]:
    """The layer pairs of ``model`` in graph order: those to equalize (``skipped`` empty) and the look-alikes.
    ``exclusive=False`` also gives the links whose layer 1 output reaches other nodes too (for statistics of
    layer 2's input)."""
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in model.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    found = []
    for node in model.graph.nodes:
        if _is_layer(node, modules):
            link = _walk(node, modules)
            link = _describe(link, modules, calls, exclusive) if link is not None else None
            if link is not None:
                found.append(link)
    return found


def input_view(weight: torch.Tensor, groups: int, block: int) -> torch.Tensor:
    """Layer 2's weight as ``[groups, outputs per group, input channels per group, values per input channel]``
    (a view): input channel ``g * (C / groups) + j`` of layer 1 is ``[g, :, j, :]``. A linear layer reads ``block``
    features per channel (a flattened conv output, channel-major)."""
    if weight.dim() == 2:
        return weight.view(1, weight.shape[0], weight.shape[1] // block, block)
    return weight.view(groups, weight.shape[0] // groups, weight.shape[1], -1)


def input_shift(view: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per output channel of layer 2, ``sum_i sum_k W2[:, i, k] values_i``: its output change when every input
    value of channel i grows by ``values_i`` (away from zero padding)."""
    groups, _, per_group, _ = view.shape
    return (view * values.reshape(groups, 1, per_group, 1)).sum((2, 3)).reshape(-1)


def _scales(out_weight: torch.Tensor, in_view: torch.Tensor) -> torch.Tensor:
    """``s_i = sqrt(r1_i / r2_i)``, 1 where a range is 0."""
    r1 = out_weight.abs().amax(1)
    r2 = in_view.abs().amax((1, 3)).reshape(-1)
    live = (r1 > 0) & (r2 > 0)
    return torch.where(live, torch.sqrt(r1 / torch.where(live, r2, 1)), torch.ones_like(r1))


def _replace_clips(model: fx.GraphModule, nodes: list[fx.Node]) -> None:
    """Make each ReLU6 / hardtanh(0, t) node a ReLU."""
    for node in nodes:
        with model.graph.inserting_after(node):
            relu = model.graph.call_function(F.relu, (node.args[0],))
        node.replace_all_uses_with(relu)
        model.graph.erase_node(node)


def _keep_clips(model: fx.GraphModule, link: Link, scale: torch.Tensor) -> None:
    """Make each clip of ``link`` compute ``clip(x * s) / s`` per channel, with ``s`` layer 1's total scale."""
    if not hasattr(model, SCALES):
        model.add_module(SCALES, nn.Module())
    holder = getattr(model, SCALES)
    for node, dims in zip(link.clips, link.clip_dims):
        shaped = scale.repeat_interleave(link.block) if dims < 0 else scale.reshape(-1, *[1] * dims)
        holder.register_buffer(node.name, shaped.to(model.get_submodule(link.first).weight.dtype))
        with model.graph.inserting_before(node):
            factor = model.graph.get_attr(f"{SCALES}.{node.name}")
            up = model.graph.call_function(operator.mul, (node.args[0], factor))
        node.update_arg(0, up)
        with model.graph.inserting_after(node):
            down = model.graph.call_function(operator.truediv, (node, factor))
        node.replace_all_uses_with(down, delete_user_cb=lambda user: user is not down)


def equalize(model: fx.GraphModule, *, iterations: int = 100, absorb_bias: bool = True,
             relu6: str = "exact") -> list[LayerResult]:
    """Cross-layer equalization, then high-bias absorption, of every layer pair of ``model`` (module docstring),
    in place.

    ``model``: the ``fx.GraphModule`` of :func:`lowbit.quantize` (batch norms folded, activation ranges not yet
    calibrated). ``iterations``: at most this many passes over the pairs (chains need several). ``absorb_bias``:
    move ``max(0, beta - 3 |gamma|)`` of each ReLU pair's bias into the next layer. ``relu6``: "exact" (scale
    around the clip), "replace" (make it a ReLU) or "skip" (leave such pairs): see the module docstring.
    Returns one result per equalized pair (layer 1's path; details: ``next``, ``activation``, ``scale_min`` /
    ``scale_max``, ``passes``, ``absorbed_channels`` / ``absorbed_max`` or why nothing was absorbed, ``padded``)
    and one per look-alike left alone (``skipped``: why). A model without pairs is left unchanged, with a warning.
    """
    if not isinstance(model, fx.GraphModule):
        raise ConfigError(f"equalize works on the fx.GraphModule lowbit.quantize returns, got {type(model).__name__}")
    if relu6 not in RELU6_POLICIES:
        raise ConfigError(f"equalize relu6={relu6!r} is not valid; valid: {', '.join(RELU6_POLICIES)}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ConfigError(f"equalize iterations must be an int >= 1, got {iterations!r}")
    found = links(model)
    if relu6 == "skip":
        for link in found:
            if link.clips and not link.skipped:
                link.skipped = f"{link.activation} between them is not positively homogeneous (relu6='skip')"
    pairs = [link for link in found if not link.skipped]
    if not found:
        warnings.warn("equalize found no pair of linear / conv layers joined by ReLU, ReLU6, pooling or nothing; "
                      "the model is unchanged", UserWarning, stacklevel=2)
    modules = dict(model.named_modules())
    work: dict[str, list[torch.Tensor | None]] = {}
    for link in pairs:
        for path in (link.first, link.second):
            layer = modules[path]
            work.setdefault(path, [layer.weight.detach().double().clone(),
                                   None if layer.bias is None else layer.bias.detach().double().clone()])
    seconds = {link.first: 0.0 for link in pairs}
    total = {link.first: torch.ones(work[link.first][0].shape[0], dtype=torch.float64) for link in pairs}
    passes = 0
    while pairs and passes < iterations:
        passes += 1
        worst = 0.0
        for link in pairs:
            start = time.perf_counter()
            w1, b1 = work[link.first]
            out_view = w1.view(w1.shape[0], -1)
            in_view = input_view(work[link.second][0], getattr(modules[link.second], "groups", 1), link.block)
            s = _scales(out_view, in_view)
            out_view /= s[:, None]
            if b1 is not None:
                b1 /= s
            in_view *= s.reshape(in_view.shape[0], 1, in_view.shape[2], 1)
            total[link.first] *= s
            worst = max(worst, float((s - 1).abs().max()))
            seconds[link.first] += time.perf_counter() - start
        if worst < TOLERANCE:
            break
    for link in pairs:
        if relu6 == "exact":
            _keep_clips(model, link, total[link.first])
        else:
            _replace_clips(model, link.clips)
    if any(link.clips for link in pairs):
        model.graph.lint()
        model.recompile()
    statistics = model.meta.get(FOLDED_BATCHNORM, {})
    for link in pairs:
        if link.first in statistics:
            mean, std = statistics[link.first]
            statistics[link.first] = (mean / total[link.first], std / total[link.first])
    results = []
    for link in found:
        if link.skipped:
            results.append(LayerResult("cle", link.first, 0.0, details={"next": link.second, "skipped": link.skipped}))
            continue
        start = time.perf_counter()
        activation = link.activation if relu6 == "exact" else \
            link.activation.replace("relu6", "relu6 -> relu").replace("hardtanh(0, t)", "hardtanh(0, t) -> relu")
        details = {"next": link.second, "activation": activation,
                   "scale_min": float(total[link.first].min()), "scale_max": float(total[link.first].max()),
                   "passes": passes}
        if absorb_bias:
            details.update(_absorb(link, work, statistics, modules, relu6))
        seconds[link.first] += time.perf_counter() - start
        results.append(LayerResult("cle", link.first, seconds[link.first], details=details))
    with torch.no_grad():
        for path, (weight, bias) in work.items():
            layer = modules[path]
            layer.weight.copy_(weight.to(layer.weight.dtype))
            if bias is not None:
                layer.bias.copy_(bias.to(layer.bias.dtype))
    return results


def _absorb(link: Link, work: dict[str, list[torch.Tensor | None]], statistics: dict[str, tuple[torch.Tensor,
            torch.Tensor]], modules: dict[str, nn.Module], relu6: str) -> dict:
    """Move ``c = max(0, mean - 3 std)`` of layer 1's bias into layer 2's (through a ReLU); the details."""
    b1, b2 = work[link.first][1], work[link.second][1]
    if link.clips and relu6 == "exact":
        return {"absorption": "nothing passes the clip kept by relu6='exact'"}
    if not any(a in ("relu", "relu6", "hardtanh(0, t)") for a in link.activations):
        return {"absorption": "no ReLU between the layers"}
    if link.first not in statistics:
        return {"absorption": f"no batch-norm statistics recorded for {link.first} (no batch norm folded into it)"}
    if b1 is None or b2 is None:
        return {"absorption": f"{link.first if b1 is None else link.second} has no bias"}
    mean, std = statistics[link.first]
    c = torch.clamp(mean - ABSORB_SIGMAS * std, min=0)
    b1 -= c
    view = input_view(work[link.second][0], getattr(modules[link.second], "groups", 1), link.block)
    b2 += input_shift(view, c)
    statistics[link.first] = (mean - c, std)
    return {"absorbed_channels": int((c > 0).sum()), "absorbed_max": float(c.max()) if c.numel() else 0.0,
            "padded": link.padded}
