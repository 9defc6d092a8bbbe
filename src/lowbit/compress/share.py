"""Weight sharing and codebook fine-tuning (Deep Compression, Han, Mao, Dally, ICLR 2016, Sec. 3).

Each layer's surviving weights are clustered by 1-D k-means into ``2^bits - 1`` shared values
(code 0 stays reserved for the pruned zeros: ``KMeansQuantizer(keep_zero=True)``); every weight
then stores the index of its centroid. Fine-tuning trains the centroids with the summed gradients
of their weights, ``dL/dC_k = sum_i dL/dW_i 1(I_i = k)``, while the indices (and so the zeros)
stay fixed; the latent float weights are frozen.

The paper's bit widths: 8 bits for conv layers and 5 for fully connected layers (LeNet-5,
AlexNet, VGG-16); 6 bits for every layer of LeNet-300-100.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from ..api import quantize
from ..config import LayerRule, QuantConfig
from ..errors import ConfigError
from ..nn import QuantConv2d, QuantLinear
from ..quantizers.kmeans import INITS, KMeansQuantizer
from .prune import layer_table, prunable_layers

#: the paper's bits per shared weight index: conv layers, fully connected layers
CONV_BITS, FC_BITS = 8, 5
#: the widest k-means index (KMeansQuantizer's limit)
MAX_BITS = 8


def paper_bits(model: nn.Module) -> dict[str, int]:
    """Bits per weight index as the paper chose: 8 for Conv2d, 5 for Linear; a net without
    convolutions (LeNet-300-100) gets 6 bits everywhere."""
    layers = prunable_layers(model)
    if not any(isinstance(m, nn.Conv2d) for m in layers.values()):
        return {name: 6 for name in layers}
    return {name: CONV_BITS if isinstance(m, nn.Conv2d) else FC_BITS for name, m in layers.items()}


def share_weights(
    model: nn.Module,
    bits: int | Mapping[str, int] | None = None,
    init: str = "linear",
    iters: int = 30,
    seed: int = 0,
) -> nn.Module:
    """A copy of ``model`` whose layers named in ``bits`` (an int: every Linear/Conv2d; None:
    :func:`paper_bits`) share their weights through k-means codebooks, fitted now.

    A batch norm right after a layer is folded into it first (its running statistics, as in eval mode), so
    the codebook holds the weights the deployed layer multiplies by and the file stores no batch norm; the
    scale is per output channel, so pruned zeros stay zero. Zeros keep the reserved code 0. The latent float
    weights are frozen (``requires_grad`` False): training the copy updates only the centroids (and the
    biases, which stay float).
    """
    if init not in INITS:
        raise ConfigError(f"unknown k-means init {init!r}; valid: {', '.join(INITS)}")
    layers = prunable_layers(model)
    table = paper_bits(model) if bits is None else layer_table(bits, layers, "bits")
    rules = [
        LayerRule(
            pattern=name,
            weight={"name": "kmeans", "bits": b, "init": init, "iters": iters, "seed": seed, "keep_zero": True},
        )
        for name, b in table.items()
    ]
    shared = quantize(model, _only(rules), fold_bn=True)
    for layer in shared_layers(shared).values():
        layer.weight_quantizer.fit(layer.weight)
        layer.weight.requires_grad_(False)
    return shared


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """A float copy of ``model`` with each batch norm right after a layer folded into it, as
    :func:`share_weights` folds them: the weights the shared layers start from."""
    return quantize(model, _only([]), fold_bn=True)


def _only(rules: list[LayerRule]) -> QuantConfig:
    """A config that quantizes the layers of ``rules`` and keeps every other layer float."""
    return QuantConfig(first="same", last="same", rules=[*rules, LayerRule(pattern="*", skip=True)])


def shared_layers(model: nn.Module) -> dict[str, QuantLinear | QuantConv2d]:
    """The layers of ``model`` whose weights share a k-means codebook, by name."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, (QuantLinear, QuantConv2d)) and isinstance(m.weight_quantizer, KMeansQuantizer)
    }
