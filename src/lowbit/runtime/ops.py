"""Float32 numpy versions of the graph IR's layers (the torch functions they mirror are named).

Used by :class:`lowbit.runtime.Engine` for every node that is not a binary
layer: float or decoded (8-bit, k-bit) linear and conv2d, batch norm,
activations, pooling, reshape, add, mul, concat (the activation quantizers
are in :mod:`lowbit.runtime.activations`).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

#: a per-channel float32 op on arrays with channels on axis 1 (NCHW maps, [N, features] rows)
ChannelOp = Callable[[np.ndarray], np.ndarray]

def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """torch.nn.functional.linear: ``x W^T + b``."""
    y = x @ weight.T
    return y + bias if bias is not None else y


def _windows(x: np.ndarray, kernel: tuple[int, int], stride: list[int], dilation: list[int] = (1, 1)) -> np.ndarray:
    """Sliding windows ``[N, C, Ho, Wo, kh, kw]`` of a (padded) NCHW array."""
    (kh, kw), (dh, dw) = kernel, dilation
    span = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
    view = np.lib.stride_tricks.sliding_window_view(x, span, axis=(2, 3))
    return view[:, :, :: stride[0], :: stride[1], ::dh, ::dw]


def _pad(x: np.ndarray, padding: list[int], value: float = 0.0) -> np.ndarray:
    ph, pw = padding
    if ph == 0 and pw == 0:
        return x
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=value)


def conv2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, stride: list[int], padding: list[int],
           dilation: list[int], groups: int) -> np.ndarray:
    """torch.nn.functional.conv2d (zero padding), NCHW, by im2col and one matmul per group and image batch:
    ``W_g [O/g, C/g kh kw] @ cols [N, C/g kh kw, Ho Wo]`` lands in NCHW order directly."""
    o, cg, kh, kw = weight.shape
    windows = _windows(_pad(x, padding), (kh, kw), stride, dilation)  # [N, C, Ho, Wo, kh, kw]
    n, _, ho, wo = windows.shape[:4]
    y = np.empty((n, o, ho * wo), dtype=np.float32)
    og = o // groups
    for g in range(groups):
        cols = windows[:, g * cg : (g + 1) * cg].transpose(0, 1, 4, 5, 2, 3).reshape(n, cg * kh * kw, ho * wo)
        np.matmul(weight[g * og : (g + 1) * og].reshape(og, -1), cols, out=y[:, g * og : (g + 1) * og])
    if bias is not None:
        y += bias.reshape(1, -1, 1)
    return y.reshape(n, o, ho, wo)


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


def maxpool2d(x: np.ndarray, kernel: list[int], stride: list[int], padding: list[int]) -> np.ndarray:
    """torch.nn.functional.max_pool2d (padding with -inf, floor mode)."""
    return _windows(_pad(x, padding, -np.inf), tuple(kernel), stride).max(axis=(4, 5))


def avgpool2d(x: np.ndarray, kernel: list[int], stride: list[int], padding: list[int],
              count_include_pad: bool = True) -> np.ndarray:
    """torch.nn.functional.avg_pool2d (floor mode)."""
    sums = _windows(_pad(x, padding), tuple(kernel), stride).sum(axis=(4, 5), dtype=np.float32)
    if count_include_pad or padding == [0, 0]:
        return sums / np.float32(kernel[0] * kernel[1])
    ones = _pad(np.ones((1, 1) + x.shape[2:], dtype=np.float32), padding)
    counts = _windows(ones, tuple(kernel), stride).sum(axis=(4, 5))
    return (sums / counts).astype(np.float32)


def adaptive_avgpool2d(x: np.ndarray, output_size: list[int]) -> np.ndarray:
    """torch.nn.functional.adaptive_avg_pool2d: bin i spans [floor(i H / oh), ceil((i + 1) H / oh))."""
    (h, w), (oh, ow) = x.shape[2:], output_size
    out = np.empty(x.shape[:2] + (oh, ow), dtype=np.float32)
    for i in range(oh):
        y0, y1 = (i * h) // oh, -(-((i + 1) * h) // oh)
        for j in range(ow):
            x0, x1 = (j * w) // ow, -(-((j + 1) * w) // ow)
            out[:, :, i, j] = x[:, :, y0:y1, x0:x1].mean(axis=(2, 3), dtype=np.float32)
    return out


#: parameter-free ops: name -> f(inputs, attrs)
FUNCTIONAL = {
    "relu": lambda xs, a: np.maximum(xs[0], np.float32(0)),
    "tanh": lambda xs, a: np.tanh(xs[0]),
    "hardtanh": lambda xs, a: np.clip(xs[0], np.float32(a["min"]), np.float32(a["max"])),
    "maxpool2d": lambda xs, a: maxpool2d(xs[0], a["kernel"], a["stride"], a["padding"]),
    "avgpool2d": lambda xs, a: avgpool2d(xs[0], a["kernel"], a["stride"], a["padding"],
                                         a.get("count_include_pad", True)),
    "adaptive_avgpool2d": lambda xs, a: adaptive_avgpool2d(xs[0], a["output_size"]),
    "reshape": lambda xs, a: xs[0].reshape([xs[0].shape[0], *a["shape"][1:]]),
    "add": lambda xs, a: xs[0] + xs[1],
    "mul": lambda xs, a: xs[0] * xs[1],
    "concat": lambda xs, a: np.concatenate(xs, axis=a["axis"]),
}
