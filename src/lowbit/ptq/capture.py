"""What the post-training methods share: the quantized layers in run order, a float view of the
quantized model, and the inputs a layer sees on calibration data.

- :func:`quantized_layers` lists the layers with a weight quantizer in the order the graph calls them
  (first call of a shared layer), so methods that go layer by layer (AdaRound, GPTQ, bias correction)
  see each layer's inputs after the layers before it are final.
- :func:`quantizers_off` makes every quantizer of a model the identity for a while: the model then
  computes its float function (batch norm already folded), the reference the methods reconstruct.
- :func:`select_layers` picks the layers a rounding method changes (all it can round, or the ones named).
- :func:`walk` runs batches through the model's graph node by node, the quantized and the float model side by
  side, and hands each chosen layer what it receives in both just before it runs, so a method can change the
  layer (round its weight, correct its bias) before later layers see its output: one forward of each model in
  all, whatever the depth.
- :func:`layer_output` is the layer's own op (linear / conv / transposed conv) with any weight and no
  quantizer: ``y = op(x, W) + b``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional as F

from ..errors import CalibrationError, ConfigError, UnsupportedLayerError
from ..nn import QUANT_LAYERS
from ..quantizers import Quantizer


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, layer) of each quantized layer with a weight quantizer, in the order the model runs them:
    graph order for an ``fx.GraphModule``, registration order otherwise."""
    modules = dict(model.named_modules())
    if isinstance(model, fx.GraphModule):
        order = [n.target for n in model.graph.nodes if n.op == "call_module"]
        order += list(modules)  # layers the graph reaches only inside a leaf module
    else:
        order = list(modules)
    seen: set[str] = set()
    layers = []
    for name in order:
        layer = modules.get(name)
        if name in seen or not isinstance(layer, QUANT_LAYERS) or layer.weight_quantizer is None:
            continue
        seen.add(name)
        layers.append((name, layer))
    return layers


def select_layers(model: nn.Module, layers: Sequence[str] | None, method: str,
                  unsupported: Callable[[nn.Module], str | None], works: str,
                  ) -> tuple[list[tuple[str, nn.Module]], dict[str, str]]:
    """The layers a rounding ``method`` changes, in run order, and the ones it skips with the reason.

    ``layers`` None: every quantized layer ``unsupported`` (why a layer cannot be rounded, or None) lets through;
    the others are skipped, ``works`` (what the method can round) added to their reason. A list of paths: exactly
    those, each of which must be a quantized layer the method can round (ConfigError for an unknown path,
    UnsupportedLayerError naming the layer otherwise).
    """
    ordered = quantized_layers(model)
    if layers is None:
        reasons = {name: unsupported(m) for name, m in model.named_modules() if isinstance(m, QUANT_LAYERS)}
        skipped = {name: f"{reason}; {works}" for name, reason in reasons.items() if reason}
        return [(name, m) for name, m in ordered if name not in skipped], skipped
    if isinstance(layers, str) or not all(isinstance(name, str) for name in layers):
        raise ConfigError(f"{method} layers must be a list of layer paths, got {layers!r}")
    modules = dict(model.named_modules())
    for name in layers:
        if name not in modules:
            known = ", ".join(n for n, _ in ordered[:20]) + (", ..." if len(ordered) > 20 else "")
            raise ConfigError(f"{method}: the model has no layer {name!r}; its quantized layers: {known}")
        if not isinstance(modules[name], QUANT_LAYERS):
            raise UnsupportedLayerError(f"{method}: layer {name!r} is a {type(modules[name]).__name__}, not a "
                                        f"quantized linear or conv layer; {works}")
        reason = unsupported(modules[name])
        if reason:
            raise UnsupportedLayerError(f"{method}: layer {name!r} cannot be rounded: {reason}; {works}")
    wanted = set(layers)
    return [(name, m) for name, m in ordered if name in wanted], {}


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@contextmanager
def quantizers_off(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every quantizer of ``model`` returns its input unchanged (float reference)."""
    quantizers = [q for q in model.modules() if isinstance(q, Quantizer)]
    for q in quantizers:
        q.forward = _identity
    try:
        yield model
    finally:
        for q in quantizers:
            del q.forward


def _run(node: fx.Node, env: dict[fx.Node, list], modules: dict[str, nn.Module], owner: nn.Module, index: int,
         batch: torch.Tensor) -> Any:
    """The value of ``node`` for batch ``index`` from the values of its inputs in ``env``."""
    args = fx.node.map_arg(node.args, lambda n: env[n][index])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n][index])
    if node.op == "placeholder":
        return batch
    if node.op == "get_attr":
        return operator.attrgetter(node.target)(owner)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return modules[node.target](*args, **kwargs)


def graph_of(model: nn.Module) -> fx.GraphModule:
    """``model`` itself when it is an ``fx.GraphModule``, else its trace with the quantized layers kept whole (the
    same layer objects, so what a method changes in them changes ``model``)."""
    if isinstance(model, fx.GraphModule):
        return model
    from ..export.graph import trace

    return trace(model, leaves=tuple(QUANT_LAYERS))


Visit = Callable[[str, nn.Module, list[torch.Tensor], "list[torch.Tensor] | None"], None]


def walk(model: nn.Module, batches: Sequence[torch.Tensor], layers: Sequence[tuple[str, nn.Module]], visit: Visit,
         *, reference: fx.GraphModule | None = None, floats: bool = True) -> None:
    """Run ``batches`` through ``model``'s graph node by node, every batch at each node, and call
    ``visit(name, layer, inputs, float_inputs)`` at the first call of each of ``layers`` (in run order), before
    that call runs, so what the visit changes in the layer reaches every later layer.

    ``inputs``: what the layer receives in the quantized model (before its input quantizer), one tensor per batch.
    ``float_inputs`` (None without ``floats``): what it receives in the float model, every quantizer off and every
    layer of ``layers`` computing ``op(x, W) + b`` with the weight and bias it had when the walk began, or with
    ``reference``'s layer of that path (a copy of the model taken before its weights were rounded). The live values
    of all batches are held (twice with ``floats``), so the walk costs about one forward of each model, not one per
    layer. It ends after the last visit; the model is in eval mode meanwhile and values carry no gradient (a visit
    may compute its own). CalibrationError for no batches, a model with several inputs, or a layer the graph never
    calls (one inside a module kept whole).
    """
    batches = list(batches)
    if not batches:
        raise CalibrationError("post-training methods need at least one calibration batch")
    if not layers:
        return
    graph_module = graph_of(model)
    nodes = list(graph_module.graph.nodes)
    if sum(node.op == "placeholder" for node in nodes) > 1:
        raise CalibrationError("the model takes several inputs; calibration batches hold one tensor")
    chosen = dict(layers)
    first_calls: dict[str, fx.Node] = {}
    for node in nodes:
        if node.op == "call_module" and node.target in chosen:
            first_calls.setdefault(node.target, node)
    for name in chosen:
        if name not in first_calls:
            raise CalibrationError(f"layer {name!r} is not called by the model's graph (it runs inside a module "
                                   "kept whole), so its inputs cannot be captured")
    float_model = graph_module if reference is None else reference
    float_layers = {name: float_model.get_submodule(name) for name in chosen}
    float_params = {name: (layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone())
                    for name, layer in float_layers.items()}
    last = max(nodes.index(node) for node in first_calls.values())
    last_use = {inp: node for node in nodes for inp in node.all_input_nodes}
    modules, float_modules = dict(graph_module.named_modules()), dict(float_model.named_modules())
    env: dict[fx.Node, list] = {}
    float_env: dict[fx.Node, list] = {}
    modes = [(m, m.training) for m in (model, graph_module, float_model)]
    try:
        for m in (graph_module, float_model):
            m.eval()
        for node in nodes[:last + 1]:
            name = node.target if node.op == "call_module" and node.target in chosen else None
            if name is not None and first_calls[name] is node:
                visit(name, chosen[name], env[node.args[0]], float_env[node.args[0]] if floats else None)
            with torch.no_grad():
                if floats:
                    with quantizers_off(float_model):
                        float_env[node] = [
                            layer_output(float_layers[name], float_env[node.args[0]][i], *float_params[name])
                            if name is not None else _run(node, float_env, float_modules, float_model, i, batch)
                            for i, batch in enumerate(batches)]
                env[node] = [_run(node, env, modules, graph_module, i, batch) for i, batch in enumerate(batches)]
            for used in node.all_input_nodes:
                if last_use[used] is node:
                    env.pop(used, None)
                    float_env.pop(used, None)
    finally:
        for m, training in reversed(modes):  # the model's own modes last (a traced graph shares its layers)
            m.train(training)


def layer_output(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor | None = None,
                 bias: torch.Tensor | None | bool = True) -> torch.Tensor:
    """``op(x, weight) + bias`` of a linear, conv1d/2d or transposed-conv layer without its quantizers.

    ``weight`` defaults to the layer's weight; ``bias=True`` uses the layer's bias, None or False none.
    """
    weight = layer.weight if weight is None else weight
    bias = layer.bias if bias is True else None if bias is None or bias is False else bias
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(layer, nn.ConvTranspose2d):
        return F.conv_transpose2d(x, weight, bias, layer.stride, layer.padding, layer.output_padding, layer.groups,
                                  layer.dilation)
    return layer._conv_forward(x, weight, bias)
