"""What the post-training methods share: the quantized layers in run order, a float view of the
quantized model, and the inputs a layer sees on calibration data.

- :func:`quantized_layers` lists the layers with a weight quantizer in the order the graph calls them
  (first call of a shared layer), so methods that go layer by layer (AdaRound, GPTQ, bias correction)
  see each layer's inputs after the layers before it are final.
- :func:`quantizers_off` makes every quantizer of a model the identity for a while: the model then
  computes its float function (batch norm already folded), the reference the methods reconstruct.
- :func:`select_layers` picks the layers a rounding method changes (all it can round, or the ones named).
- :func:`layer_inputs` runs batches through the model and keeps what one layer receives (before its
  input quantizer); each forward stops right after that layer, so later layers cost nothing.
- :func:`layer_output` is the layer's own op (linear / conv / transposed conv) with any weight and no
  quantizer: ``y = op(x, W) + b``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional as F

from ..errors import ConfigError, UnsupportedLayerError
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


class _Reached(Exception):
    """Raised by the capture hook to end a forward once the layer of interest has run."""


def layer_inputs(model: nn.Module, layer: nn.Module, batches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The input ``layer`` receives (its first argument, before its input quantizer) for each batch, in eval
    mode without gradients; each forward ends once ``layer`` is reached. A layer called at several sites gives
    the input of its first call."""
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        captured.append(args[0].detach())
        raise _Reached

    handle = layer.register_forward_pre_hook(hook)
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                try:
                    model(batch)
                except _Reached:
                    pass
    finally:
        handle.remove()
        model.train(training)
    return captured


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
