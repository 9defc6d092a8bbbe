"""Quantized layers: drop-in subclasses of the torch layers plus a stand-alone activation quantizer."""

from .layers import (
    QUANT_LAYERS,
    QUANTIZER_SLOTS,
    STORED_ATTR,
    QuantAct,
    QuantConv1d,
    QuantConv2d,
    QuantConvTranspose2d,
    QuantEmbedding,
    QuantLinear,
    freeze_weight,
    label_quantizers,
    named_modules_without_quantizers,
)

__all__ = [
    "QUANT_LAYERS",
    "QUANTIZER_SLOTS",
    "STORED_ATTR",
    "QuantAct",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConvTranspose2d",
    "QuantEmbedding",
    "QuantLinear",
    "freeze_weight",
    "label_quantizers",
    "named_modules_without_quantizers",
]
