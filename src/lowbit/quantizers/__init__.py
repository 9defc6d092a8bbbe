"""Quantizers: one file per family, each a pure function + a registered Quantizer module.

``get(spec)`` builds one from a name, a dict ``{"name": ..., **params}``, a
Quantizer or None; ``names()`` lists the registered names.
"""

from . import abc, binary, dorefa, group, kmeans, linear, log2, lsq, pact, ternary, uniform  # noqa: F401  (register)
from .base import ENCODED_KINDS, Encoded, Quantizer, decode, get, names, register

__all__ = ["ENCODED_KINDS", "Encoded", "Quantizer", "decode", "get", "names", "register"]
