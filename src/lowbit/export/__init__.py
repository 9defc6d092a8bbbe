"""Model export: lowbit's graph IR (:mod:`.graph`) and ONNX QDQ graphs (:mod:`.onnx`).

``capture`` is imported eagerly; the ONNX exporter (which needs the ``onnx``
package) on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .graph import GRAPH_VERSION, capture

_LAZY = {"export_onnx": "lowbit.export.onnx", "to_onnx": "lowbit.export.onnx"}

__all__ = ["GRAPH_VERSION", "capture", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lowbit.export' has no attribute {name!r}")
