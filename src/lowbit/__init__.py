"""lowbit: quantized and binarized neural networks for PyTorch.

``import lowbit.format`` and ``import lowbit.runtime`` never import torch; the
torch-facing API below is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "quantize": "lowbit.api",
    "quantize_report": "lowbit.api",
    "calibrate": "lowbit.api",
    "summary": "lowbit.api",
    "save": "lowbit.api",
    "load": "lowbit.api",
    "load_state_dict": "lowbit.api",
    "export_onnx": "lowbit.export.onnx",
    "QuantConfig": "lowbit.config",
    "LayerRule": "lowbit.config",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
