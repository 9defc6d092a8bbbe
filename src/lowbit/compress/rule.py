"""The default per-layer Deep Compression settings: one rule for any model, no table of layer names.

Han et al. (NIPS 2015, Fig. 5; ICLR 2016, Tables 1-5) observe that the big fully connected layers, which
hold most of the parameters, tolerate the hardest pruning and the fewest bits, while the first conv layer
(few inputs per output) and the small last layers must stay denser and wider. The rule states that with
the layer's share of the prunable weights, ``p_l = n_l / sum_k n_k``, and its fan-in ``f_l`` (inputs per
output: ``in_features``, or ``in_channels / groups * kh * kw``):

- kept fraction ``k_l = min(1, max(KEPT_SCALE * p_l^(-1/3), MIN_INPUTS / f_l))``: the largest layers keep
  about 5%, a layer 1000x smaller 50%, and every output keeps about 16 inputs on average;
- k-means bits ``b_l = clamp(4 + round(log10(1 / p_l)) + [conv], 4, 8)``: 4 bits for a layer holding most of
  the weights, one more bit per tenfold smaller share, one more for a conv layer (Han et al.: conv weights need
  more bits than fully connected ones); at most ``floor(log2(kept weights / 4))``, since a codebook of 2^b
  float32 centroids is worth storing only with at least 4 kept weights per centroid;
- prune rounds ``R = ceil(log2(1 / min_l k_l))``: no round removes more than half of a layer's survivors.

On lowbit's LeNets this gives ip1 5.2%, ip2 10.4%, ip3 32% and 4 / 5 / 6 bits (LeNet-300-100), conv1 64%,
conv2 12.9%, ip1 5.1%, ip2 22% and 6 / 6 / 4 / 6 bits (LeNet-5), 5 rounds each; the paper's own choices are
:func:`~lowbit.compress.pipeline.paper_sparsity` and :func:`~lowbit.compress.share.paper_bits`.

``strength`` f (the settings search's dial, :mod:`lowbit.compress.search`) scales every kept fraction,
``min(1, f k_l)``, and shifts the bits by ``round(log2 f)`` (from 2 to 8, the cap applied to the kept weights).
"""

from __future__ import annotations

import math

from torch import nn

from .prune import prunable_layers
from .share import MAX_BITS

#: kept fraction of a layer holding all the weights; smaller layers keep more, as share^(-1/3)
KEPT_SCALE = 0.05
#: inputs each output keeps on average, at least (sets the first conv layer's density)
MIN_INPUTS = 16
#: k-means bits of a layer holding all the weights, and the widest
MIN_RULE_BITS, MAX_RULE_BITS = 4, MAX_BITS
#: kept weights per codebook centroid, at least
WEIGHTS_PER_CENTROID = 4
#: the fewest bits a strength below 1 may reach
MIN_BITS = 2


def fan_in(layer: nn.Module) -> int:
    """Inputs per output of a Linear or Conv2d layer: the weight's elements over its output count."""
    return layer.weight.numel() // layer.weight.shape[0]


def _shares(model: nn.Module) -> dict[str, tuple[nn.Module, float]]:
    layers = prunable_layers(model)
    total = sum(m.weight.numel() for m in layers.values())
    return {name: (m, m.weight.numel() / total) for name, m in layers.items()}


def rule_kept(model: nn.Module, strength: float = 1.0) -> dict[str, float]:
    """Per prunable layer: ``min(1, strength * max(KEPT_SCALE * share^(-1/3), MIN_INPUTS / fan_in))``."""
    return {name: min(1.0, strength * max(KEPT_SCALE * share ** (-1 / 3), MIN_INPUTS / fan_in(m)))
            for name, (m, share) in _shares(model).items()}


def rule_sparsity(model: nn.Module, strength: float = 1.0) -> dict[str, float]:
    """The rule's final sparsity (1 - kept) per prunable layer."""
    return {name: 1 - kept for name, kept in rule_kept(model, strength).items()}


def rule_bits(model: nn.Module, strength: float = 1.0) -> dict[str, int]:
    """Per prunable layer: ``clamp(4 + round(log10(1 / share)) + (1 if conv), 4, 8) + round(log2 strength)``
    k-means bits, at most ``floor(log2(kept weights / WEIGHTS_PER_CENTROID))``, from 2 to 8."""
    kept = rule_kept(model, strength)
    bits = {}
    for name, (m, share) in _shares(model).items():
        base = min(MAX_RULE_BITS, max(MIN_RULE_BITS, MIN_RULE_BITS + round(math.log10(1 / share))
                                      + isinstance(m, nn.Conv2d)))
        cap = math.floor(math.log2(max(kept[name] * m.weight.numel() / WEIGHTS_PER_CENTROID, 1)))
        bits[name] = min(MAX_RULE_BITS, max(MIN_BITS, min(base + round(math.log2(strength)), cap)))
    return bits


def rule_rounds(sparsity: dict[str, float]) -> int:
    """Prune rounds so that no round removes more than half of a layer's survivors: ``ceil(log2(1 / min kept))``
    (at least 1; a layer pruned to nothing counts as 1/1000 kept)."""
    kept = min((1 - s for s in sparsity.values()), default=1.0)
    return max(1, math.ceil(math.log2(1 / max(kept, 1e-3)) - 1e-9))


__all__ = ["KEPT_SCALE", "MIN_INPUTS", "WEIGHTS_PER_CENTROID", "fan_in", "rule_bits", "rule_kept", "rule_rounds",
           "rule_sparsity"]
