"""batchnorm: eval-mode batch norm over axis 1, ``(x - mean) / sqrt(var + eps) * weight + bias`` (Ioffe & Szegedy
2015); BatchNorm1d on [N, C] or [N, C, L], BatchNorm2d on [N, C, H, W]."""

from __future__ import annotations

import numpy as np

from ..errors import UnsupportedLayerError
from .schema import Capture, Node, Number, OpSchema, Shape, register


def batchnorm(x: np.ndarray, mean: np.ndarray, var: np.ndarray, weight: np.ndarray | None,
              bias: np.ndarray | None, eps: float) -> np.ndarray:
    """Eval-mode batch norm over axis 1: ``(x - mean) / sqrt(var + eps) * weight + bias``."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    factor = (np.float32(1) / np.sqrt(var + np.float32(eps))).astype(np.float32)
    if weight is not None:
        factor = factor * weight
    shift = -mean * factor + (bias if bias is not None else np.float32(0))
    y = (x * factor.reshape(shape)).astype(np.float32, copy=False)
    y += shift.reshape(shape)
    return y


def _shape(node: Node) -> Shape:
    x = node.rank(1, 2, 3)
    if ("weight" in node.tensors) != ("bias" in node.tensors):
        raise node.fail("an affine batch norm stores both weight and bias, a plain one neither")
    wrong = {k: list(s) for k, s in node.tensors.items() if s != x[:1]}
    if wrong:
        raise node.fail(f"its tensors must have shape [{x[0]}] (the input's channels), got {wrong}")
    return x


def _module(m, shape: list[int], where: str) -> dict:
    if not m.track_running_stats:
        raise UnsupportedLayerError(f"{where}: batch norm without running statistics cannot be captured")
    return {"eps": m.eps}


BATCHNORM = register(OpSchema(
    "batchnorm", _shape, tensors=("running_mean", "running_var"), optional=("weight", "bias"),
    attrs={"eps": Number(0, open_low=True)}, module=True,
    capture=Capture(modules=("torch.nn.BatchNorm1d", "torch.nn.BatchNorm2d"), module=_module)))
