"""Pooling (floor mode, NCHW): maxpool2d (padding with -inf), avgpool2d (``count_include_pad`` as torch), and
adaptive_avgpool2d, whose bin i spans ``[floor(i H / oh), ceil((i + 1) H / oh))``.

As torch requires, a pool's padding is at most half its kernel; an adaptive pool's output is no larger
than its input, and has at most :data:`MAX_BINS` bins (its numpy half loops over them).
"""

from __future__ import annotations

import numpy as np

from .conv import pad, windows
from .schema import MAX_SPATIAL, Bool, Ints, Node, OpSchema, Shape, register, window_size

#: the most output positions of an adaptive pool
MAX_BINS = 2**12


def maxpool2d(x: np.ndarray, kernel: list[int], stride: list[int], padding: list[int]) -> np.ndarray:
    """torch.nn.functional.max_pool2d (padding with -inf, floor mode)."""
    return windows(pad(x, padding, -np.inf), tuple(kernel), stride).max(axis=(4, 5))


def avgpool2d(x: np.ndarray, kernel: list[int], stride: list[int], padding: list[int],
              count_include_pad: bool = True) -> np.ndarray:
    """torch.nn.functional.avg_pool2d (floor mode)."""
    sums = windows(pad(x, padding), tuple(kernel), stride).sum(axis=(4, 5), dtype=np.float32)
    if count_include_pad or padding == [0, 0]:
        return sums / np.float32(kernel[0] * kernel[1])
    ones = pad(np.ones((1, 1) + x.shape[2:], dtype=np.float32), padding)
    counts = windows(ones, tuple(kernel), stride).sum(axis=(4, 5))
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


def _pool_shape(node: Node) -> Shape:
    c, h, w = node.rank(3)
    kernel, stride, padding = node.attrs["kernel"], node.attrs["stride"], node.attrs["padding"]
    if any(p > k // 2 for p, k in zip(padding, kernel)):
        raise node.fail(f"pool padding {padding} must be at most half the kernel {kernel}")
    return (c, *(window_size(size, k, s, p, 1, node, axis) for size, k, s, p, axis
                 in zip((h, w), kernel, stride, padding, ("height", "width"))))


def _adaptive_shape(node: Node) -> Shape:
    c, h, w = node.rank(3)
    oh, ow = node.attrs["output_size"]
    if oh > h or ow > w or oh * ow > MAX_BINS:
        raise node.fail(f"adaptive pool output {[oh, ow]} must be no larger than its input {[h, w]} and have at "
                        f"most {MAX_BINS} bins")
    return c, oh, ow


_WINDOW = {"kernel": Ints(2, 1, MAX_SPATIAL), "stride": Ints(2, 1, MAX_SPATIAL), "padding": Ints(2, 0, MAX_SPATIAL)}

MAXPOOL2D = register(OpSchema("maxpool2d", _pool_shape, attrs=_WINDOW,
                              numpy=lambda xs, a: maxpool2d(xs[0], a["kernel"], a["stride"], a["padding"])))
AVGPOOL2D = register(OpSchema(
    "avgpool2d", _pool_shape, attrs={**_WINDOW, "count_include_pad": Bool()}, defaults={"count_include_pad": True},
    numpy=lambda xs, a: avgpool2d(xs[0], a["kernel"], a["stride"], a["padding"], a["count_include_pad"])))
ADAPTIVE_AVGPOOL2D = register(OpSchema("adaptive_avgpool2d", _adaptive_shape,
                                       attrs={"output_size": Ints(2, 1, MAX_SPATIAL)},
                                       numpy=lambda xs, a: adaptive_avgpool2d(xs[0], a["output_size"])))
