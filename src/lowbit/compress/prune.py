"""Magnitude pruning with masks (Han, Pool, Tran, Dally, NIPS 2015; Deep Compression, ICLR 2016, Sec. 2).

A weight is pruned when ``|w| <= t``, with the threshold ``t`` of a layer set either

- by a sparsity target ``s`` (the fraction of the layer's weights that are zero afterwards):
  ``t`` = the ``round(s n)``-th smallest ``|w|`` of the ``n`` weights, or
- by the paper's quality parameter ``q``: ``t = q * std(w)`` over the layer's surviving weights.

Pruning is iterative: prune, retrain the survivors, prune again. Each pruned layer holds its
mask as a bool buffer ``weight_mask`` (True = kept), so masks travel in the state_dict and in
Trainer checkpoints. :class:`Pruner` keeps pruned weights exactly zero during retraining: a
gradient hook zeroes their gradients, and as a Trainer callback (``on_step_end``) it writes +0.0
into them again after every optimizer step and clears the optimizer state (momentum, Adam
moments) they hold, so neither momentum nor weight decay moves them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..train import Callback

MASK = "weight_mask"
PRUNABLE = (nn.Linear, nn.Conv2d)


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The Linear and Conv2d layers (quantized subclasses included) of ``model`` by dotted name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PRUNABLE)}


def sparsity_threshold(weight: torch.Tensor, sparsity: float) -> float:
    """The threshold ``t`` for which ``|w| <= t`` prunes ``round(sparsity * n)`` weights (-1 for none)."""
    count = round(float(sparsity) * weight.numel())
    if count == 0:
        return -1.0
    return float(weight.detach().abs().flatten().kthvalue(count).values)


def quality_threshold(weight: torch.Tensor, quality: float) -> float:
    """The paper's threshold ``q * std`` of the non-zero (surviving) weights of a layer."""
    alive = weight.detach()[weight.detach() != 0]
    return float(quality * alive.std()) if alive.numel() > 1 else -1.0


def layer_table(value: Any, names: list[str], what: str) -> dict[str, Any]:
    """``{layer: value}`` from one value for every layer in ``names`` or a dict naming some of them."""
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ConfigError(f"{what} names unknown layer(s) {unknown}; layers: {', '.join(names)}")
        return dict(value)
    return {name: value for name in names}


def check_number(value: Any, what: str, low: float, high: float = math.inf) -> float:
    """``value`` as a float if it is a finite number from ``low`` to ``high``, else ConfigError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high \
            or not math.isfinite(value):
        valid = f">= {low}" if high == math.inf else f"from {low} to {high}"
        raise ConfigError(f"{what} must be a finite number {valid}, got {value!r}")
    return float(value)


def _per_layer(value: float | Mapping[str, float] | None, names: list[str], what: str, high: float) -> dict[str, float]:
    """A per-layer dict of numbers in [0, high] from one number for all layers or a dict naming some of them."""
    if value is None:
        return {}
    table = layer_table(value, names, what)
    return {name: check_number(number, f"{what} of layer {name!r}", 0, high) for name, number in table.items()}


def parse_layer_values(text: str, what: str) -> float | dict[str, float]:
    """Parse ``"0.9"`` or ``"ip1=0.92,ip2=0.91"`` (the command line's per-layer syntax)."""
    try:
        if "=" not in text:
            return float(text)
        pairs = (item.split("=", 1) for item in text.split(",") if item.strip())
        return {name.strip(): float(number) for name, number in pairs}
    except ValueError:
        raise ConfigError(f"{what} must be a number or NAME=NUMBER pairs joined by commas, got {text!r}") from None


def sparsity_schedule(final: float, rounds: int) -> list[float]:
    """Sparsity after each of ``rounds`` prune rounds, ending at ``final``: each round removes the same
    fraction of the weights still alive, ``s_r = 1 - (1 - final) ** (r / rounds)``."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"prune rounds must be an integer >= 1, got {rounds!r}")
    final = check_number(final, "sparsity", 0, 1)
    return [1 - (1 - final) ** (r / rounds) for r in range(1, rounds + 1)]


class Pruner(Callback):
    """Masks for the prunable layers of ``model`` (default: all Linear/Conv2d; ``layers`` picks some).

    A layer without a ``weight_mask`` buffer gets one that keeps its non-zero weights; one that has
    it (a resumed or reloaded model) keeps it. ``prune(sparsity=..., quality=...)`` lowers the masks; pass the Pruner to a
    :class:`~lowbit.train.Trainer` as a callback while retraining. ``remove()`` detaches the hooks
    and the ``weight_mask`` buffers (the zeros stay in the weights).
    """

    def __init__(self, model: nn.Module, layers: list[str] | None = None) -> None:
        available = prunable_layers(model)
        names = list(available) if layers is None else list(layers)
        unknown = [name for name in names if name not in available]
        if unknown:
            raise ConfigError(f"cannot prune {unknown}: not Linear/Conv2d layers; prunable: {', '.join(available)}")
        self.model = model
        self.layers = {name: available[name] for name in names}
        self._hooks = []
        for layer in self.layers.values():
            if not isinstance(getattr(layer, MASK, None), torch.Tensor):
                layer.register_buffer(MASK, layer.weight.detach() != 0)
            self._hooks.append(layer.weight.register_hook(self._gradient_hook(layer)))

    @staticmethod
    def _gradient_hook(layer: nn.Module):
        def zero_pruned(grad: torch.Tensor) -> torch.Tensor:
            return grad.masked_fill(~getattr(layer, MASK), 0.0)

        return zero_pruned

    def masks(self) -> dict[str, torch.Tensor]:
        """The current masks (True = kept) by layer name."""
        return {name: getattr(layer, MASK) for name, layer in self.layers.items()}

    @torch.no_grad()
    def prune(
        self,
        sparsity: float | Mapping[str, float] | None = None,
        quality: float | Mapping[str, float] | None = None,
    ) -> dict[str, float]:
        """Prune by per-layer ``sparsity`` targets or ``quality`` (threshold = quality * std);
        a layer named in neither keeps its mask. Masks only ever shrink. Returns the kept fraction per layer."""
        names = list(self.layers)
        targets = _per_layer(sparsity, names, "sparsity", 1)
        qualities = _per_layer(quality, names, "quality", math.inf)
        both = sorted(set(targets) & set(qualities))
        if both:
            raise ConfigError(f"layer(s) {both} got both a sparsity target and a quality; give one per layer")
        for name, layer in self.layers.items():
            if name in targets:
                threshold = sparsity_threshold(layer.weight, targets[name])
            elif name in qualities:
                threshold = quality_threshold(layer.weight, qualities[name])
            else:
                continue
            getattr(layer, MASK).logical_and_(layer.weight.abs() > threshold)
        self.apply()
        return self.kept()

    def kept(self) -> dict[str, float]:
        """The fraction of weights kept per layer."""
        return {name: float(mask.float().mean()) for name, mask in self.masks().items()}

    @torch.no_grad()
    def apply(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Write +0.0 into every pruned weight and into the optimizer state it holds."""
        for layer in self.layers.values():
            pruned = ~getattr(layer, MASK)
            layer.weight.masked_fill_(pruned, 0.0)
            state: dict[str, Any] = optimizer.state.get(layer.weight, {}) if optimizer is not None else {}
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.shape == layer.weight.shape:
                    value.masked_fill_(pruned, 0.0)

    def on_fit_start(self, trainer: Any) -> None:
        self.apply(trainer.optimizer)

    def on_step_end(self, trainer: Any) -> None:
        self.apply(trainer.optimizer)

    def remove(self) -> None:
        """Detach the gradient hooks and delete the ``weight_mask`` buffers (the weights keep their zeros)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for layer in self.layers.values():
            if MASK in layer._buffers:
                del layer._buffers[MASK]
