"""Quantized layers: drop-in subclasses of the torch layers plus a stand-alone activation quantizer."""

from .layers import (
    QUANTIZER_SLOTS,
    QuantAct,
    QuantConv2d,
    QuantLinear,
    label_quantizers,
    named_modules_without_quantizers,
)

__all__ = [
    "QUANTIZER_SLOTS",
    "QuantAct",
    "QuantConv2d",
    "QuantLinear",
    "label_quantizers",
    "named_modules_without_quantizers",
]
