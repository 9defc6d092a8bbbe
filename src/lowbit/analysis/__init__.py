"""Model analysis. ``analysis.summary``: the per-layer table of bits, bytes, MACs and compression
(``lowbit.summary`` is its entry point)."""

from .summary import LayerSummary, Summary

__all__ = ["LayerSummary", "Summary"]
