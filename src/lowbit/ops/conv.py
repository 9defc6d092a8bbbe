"""conv2d: 2-D convolution with zero padding (torch.nn.functional.conv2d), NCHW; weight [O, C / groups, kh, kw].

Output size per axis ``floor((H + 2 p - d (k - 1) - 1) / s) + 1``.
"""

from __future__ import annotations

import numpy as np

from ..errors import UnsupportedLayerError
from .schema import MAX_ELEMENTS, MAX_SPATIAL, Capture, Int, Ints, Node, OpSchema, Shape, pair, register, window_size


def windows(x: np.ndarray, kernel: tuple[int, int], stride: list[int], dilation: list[int] = (1, 1)) -> np.ndarray:
    """Sliding windows ``[N, C, Ho, Wo, kh, kw]`` of a (padded) NCHW array."""
    (kh, kw), (dh, dw) = kernel, dilation
    span = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
    view = np.lib.stride_tricks.sliding_window_view(x, span, axis=(2, 3))
    return view[:, :, :: stride[0], :: stride[1], ::dh, ::dw]


def pad(x: np.ndarray, padding: list[int], value: float = 0.0) -> np.ndarray:
    ph, pw = padding
    if ph == 0 and pw == 0:
        return x
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=value)


def conv2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, stride: list[int], padding: list[int],
           dilation: list[int], groups: int) -> np.ndarray:
    """torch.nn.functional.conv2d (zero padding), NCHW, by im2col and one matmul per group and image batch:
    ``W_g [O/g, C/g kh kw] @ cols [N, C/g kh kw, Ho Wo]`` lands in NCHW order directly."""
    o, cg, kh, kw = weight.shape
    cols_all = windows(pad(x, padding), (kh, kw), stride, dilation)  # [N, C, Ho, Wo, kh, kw]
    n, _, ho, wo = cols_all.shape[:4]
    y = np.empty((n, o, ho * wo), dtype=np.float32)
    og = o // groups
    for g in range(groups):
        cols = cols_all[:, g * cg : (g + 1) * cg].transpose(0, 1, 4, 5, 2, 3).reshape(n, cg * kh * kw, ho * wo)
        np.matmul(weight[g * og : (g + 1) * og].reshape(og, -1), cols, out=y[:, g * og : (g + 1) * og])
    if bias is not None:
        y += bias.reshape(1, -1, 1)
    return y.reshape(n, o, ho, wo)


def _shape(node: Node) -> Shape:
    c, h, w = node.rank(3)
    weight, bias, a = node.tensors["weight"], node.tensors.get("bias"), node.attrs
    groups = a["groups"]
    if len(weight) != 4 or weight[0] % groups or weight[1] * groups != c:
        raise node.fail(f"its weight must be [O, C / groups, kh, kw] with O divisible by groups {groups} and "
                        f"C = {c} input channels, got {list(weight)}")
    if bias is not None and bias != weight[:1]:
        raise node.fail(f"its bias must have shape [{weight[0]}], got {list(bias)}")
    out = [window_size(size, k, s, p, d, node, axis) for size, k, s, p, d, axis
           in zip((h, w), weight[2:], a["stride"], a["padding"], a["dilation"], ("height", "width"))]
    padded = c * (h + 2 * a["padding"][0]) * (w + 2 * a["padding"][1])
    columns = weight[1] * weight[2] * weight[3] * out[0] * out[1]
    if max(padded, columns) > MAX_ELEMENTS:
        raise node.fail(f"its padded input ({padded} elements) or its windows ({columns} elements) exceed "
                        f"{MAX_ELEMENTS} per example")
    return (weight[0], *out)


def _module(m, shape: list[int], where: str) -> dict:
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise UnsupportedLayerError(f"{where}: conv padding {m.padding!r} with padding_mode {m.padding_mode!r} "
                                    "cannot be captured; use integer zero padding")
    return {"stride": pair(m.stride), "padding": pair(m.padding), "dilation": pair(m.dilation), "groups": m.groups}


CONV2D = register(OpSchema(
    "conv2d", _shape, tensors=("weight",), optional=("bias",), quant=("weight", "input", "output"),
    state=("input_quantizer", "output_quantizer"), module=True,
    capture=Capture(modules=("torch.nn.Conv2d",), module=_module),
    attrs={"stride": Ints(2, 1, MAX_SPATIAL), "padding": Ints(2, 0, MAX_SPATIAL),
           "dilation": Ints(2, 1, MAX_SPATIAL), "groups": Int(1, MAX_SPATIAL)}))
