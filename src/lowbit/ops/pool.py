"""Pooling and resampling (NCHW): maxpool2d (padding with -inf; floor or ceil mode), avgpool2d (floor mode,
``count_include_pad`` as torch), adaptive_avgpool2d, whose bin i spans ``[floor(i H / oh), ceil((i + 1) H / oh))``,
and upsample (nearest, by whole factors).

Output size per axis: floor mode ``floor((H + 2 p - k) / s) + 1``; ceil mode ``ceil((H + 2 p - k) / s) + 1``,
less one where the last window would start in the right padding (torch's rule).

As torch requires, a pool's padding is at most half its kernel; an adaptive pool's output is no larger
than its input, and has at most :data:`MAX_BINS` bins (its numpy half loops over them).
"""

from __future__ import annotations

import numpy as np

from ..errors import UnsupportedLayerError
from .conv import pad, windows
from .schema import MAX_SPATIAL, Bool, Capture, Ints, Node, OpSchema, Shape, argument, pair, register

#: the most output positions of an adaptive pool
MAX_BINS = 2**12


def pool_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """Output size of a pool along one axis (see the module docstring); < 1 where the kernel does not fit."""
    span = size + 2 * padding - kernel
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1
    return out - 1 if (out - 1) * stride >= size + padding else out


def maxpool2d(x: np.ndarray, kernel: list[int], stride: list[int], padding: list[int],
              ceil_mode: bool = False) -> np.ndarray:
    """torch.nn.functional.max_pool2d (padding with -inf); in ceil mode the last windows run past the right
    padding, which pads with -inf too."""
    out = [pool_size(size, k, s, p, ceil_mode) for size, k, s, p in zip(x.shape[2:], kernel, stride, padding)]
    extra = [max(0, (o - 1) * s + k - (size + 2 * p)) for o, size, k, s, p in zip(out, x.shape[2:], kernel, stride,
                                                                                  padding)]
    widths = ((0, 0), (0, 0), (padding[0], padding[0] + extra[0]), (padding[1], padding[1] + extra[1]))
    padded = np.pad(x, widths, constant_values=-np.inf) if any(map(any, widths)) else x
    return windows(padded, tuple(kernel), stride).max(axis=(4, 5))[:, :, : out[0], : out[1]]


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
    out = [pool_size(size, k, s, p, node.attrs.get("ceil_mode", False)) for size, k, s, p
           in zip((h, w), kernel, stride, padding)]
    if min(out) < 1:
        raise node.fail(f"the pool window {kernel} does not fit an input of size {[h, w]} padded by {padding}")
    return c, *out


def _adaptive_shape(node: Node) -> Shape:
    c, h, w = node.rank(3)
    oh, ow = node.attrs["output_size"]
    if oh > h or ow > w or oh * ow > MAX_BINS:
        raise node.fail(f"adaptive pool output {[oh, ow]} must be no larger than its input {[h, w]} and have at "
                        f"most {MAX_BINS} bins")
    return c, oh, ow


def _window(kernel, stride, padding, dilation, where: str) -> dict:
    if pair(dilation) != [1, 1]:
        raise UnsupportedLayerError(f"{where}: dilated pooling cannot be captured")
    return {"kernel": pair(kernel), "stride": pair(stride or kernel), "padding": pair(padding)}


def _max_call(args: list, kwargs: dict, shape: list[int], where: str) -> tuple[dict, list]:
    if argument(args, kwargs, 6, "return_indices", False):
        raise UnsupportedLayerError(f"{where}: max pooling that returns indices cannot be captured")
    values = [argument(args, kwargs, i, k, d) for i, (k, d) in
              enumerate([("kernel_size", None), ("stride", None), ("padding", 0), ("dilation", 1),
                         ("ceil_mode", False)], start=1)]
    return {**_window(*values[:4], where), "ceil_mode": bool(values[4])}, args[:1]


def _max_module(m, shape: list[int], where: str) -> dict:
    if m.return_indices:
        raise UnsupportedLayerError(f"{where}: max pooling that returns indices cannot be captured")
    return {**_window(m.kernel_size, m.stride, m.padding, m.dilation, where), "ceil_mode": bool(m.ceil_mode)}


def _average(kernel, stride, padding, ceil_mode, count_include_pad, divisor, where: str) -> dict:
    if divisor is not None or ceil_mode:
        raise UnsupportedLayerError(f"{where}: average pooling with divisor_override or ceil_mode cannot be captured")
    return {**_window(kernel, stride, padding, 1, where), "count_include_pad": bool(count_include_pad)}


def _average_call(args: list, kwargs: dict, shape: list[int], where: str) -> tuple[dict, list]:
    values = [argument(args, kwargs, i, k, d) for i, (k, d) in
              enumerate([("kernel_size", None), ("stride", None), ("padding", 0), ("ceil_mode", False),
                         ("count_include_pad", True), ("divisor_override", None)], start=1)]
    return _average(*values, where), args[:1]


def _pool_onnx(op: str):
    def emit(b, name: str, xs: list[str], a: dict) -> str:
        flag = "count_include_pad" if op == "AveragePool" else "ceil_mode"
        extra = {flag: int(a[flag])}
        return b.node(op, xs, name, kernel_shape=a["kernel"], strides=a["stride"], pads=a["padding"] * 2, **extra)
    return emit


def _adaptive_onnx(b, name: str, xs: list[str], a: dict) -> str:
    if a["output_size"] != [1, 1]:
        raise UnsupportedLayerError(f"node {name!r}: adaptive average pooling to {a['output_size']} cannot be "
                                    "exported; only output size 1x1 (GlobalAveragePool)")
    return b.node("GlobalAveragePool", xs, name)


_WINDOW = {"kernel": Ints(2, 1, MAX_SPATIAL), "stride": Ints(2, 1, MAX_SPATIAL), "padding": Ints(2, 0, MAX_SPATIAL)}
#: the output size of an adaptive pool is read off the recorded output shape (a None in output_size keeps a size)
_ADAPTIVE = Capture(("torch.nn.functional.adaptive_avg_pool2d",),
                    lambda args, kwargs, shape, where: ({"output_size": shape[-2:]}, args[:1]),
                    ("torch.nn.AdaptiveAvgPool2d",), lambda m, shape, where: {"output_size": shape[-2:]})

MAXPOOL2D = register(OpSchema(
    "maxpool2d", _pool_shape, placement="moves", attrs={**_WINDOW, "ceil_mode": Bool()}, defaults={"ceil_mode": False},
    capture=Capture(("torch.nn.functional.max_pool2d",), _max_call, ("torch.nn.MaxPool2d",), _max_module),
    numpy=lambda xs, a: maxpool2d(xs[0], a["kernel"], a["stride"], a["padding"], a["ceil_mode"]),
    torch=lambda t, xs, a: t.nn.functional.max_pool2d(xs[0], a["kernel"], a["stride"], a["padding"],
                                                      ceil_mode=a["ceil_mode"]),
    onnx=_pool_onnx("MaxPool")))
AVGPOOL2D = register(OpSchema(
    "avgpool2d", _pool_shape, attrs={**_WINDOW, "count_include_pad": Bool()}, defaults={"count_include_pad": True},
    capture=Capture(("torch.nn.functional.avg_pool2d",), _average_call, ("torch.nn.AvgPool2d",),
                    lambda m, shape, where: _average(m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                                     m.count_include_pad, m.divisor_override, where)),
    numpy=lambda xs, a: avgpool2d(xs[0], a["kernel"], a["stride"], a["padding"], a["count_include_pad"]),
    torch=lambda t, xs, a: t.nn.functional.avg_pool2d(xs[0], a["kernel"], a["stride"], a["padding"],
                                                      count_include_pad=a["count_include_pad"]),
    onnx=_pool_onnx("AveragePool")))
ADAPTIVE_AVGPOOL2D = register(OpSchema(
    "adaptive_avgpool2d", _adaptive_shape, attrs={"output_size": Ints(2, 1, MAX_SPATIAL)}, capture=_ADAPTIVE,
    numpy=lambda xs, a: adaptive_avgpool2d(xs[0], a["output_size"]),
    torch=lambda t, xs, a: t.nn.functional.adaptive_avg_pool2d(xs[0], a["output_size"]), onnx=_adaptive_onnx))


# ---------------------------------------------------------------- nearest upsampling by whole factors


def _upsample_shape(node: Node) -> Shape:
    c, h, w = node.rank(3)
    oh, ow = node.attrs["size"]
    if oh % h or ow % w:
        raise node.fail(f"nearest upsampling to {[oh, ow]} must scale {[h, w]} by whole factors")
    return c, oh, ow


def _upsample_call(args: list, kwargs: dict, shape: list[int], where: str) -> tuple[dict, list]:
    mode = argument(args, kwargs, 3, "mode", "nearest")
    if mode != "nearest" or argument(args, kwargs, 6, "antialias", False):
        raise UnsupportedLayerError(f"{where}: interpolation is captured in mode 'nearest', got {mode!r}")
    return {"size": shape[-2:]}, args[:1]


def _upsample_module(m, shape: list[int], where: str) -> dict:
    return _upsample_call([None], {"mode": m.mode}, shape, where)[0]


def upsample_nearest(x: np.ndarray, size: list[int]) -> np.ndarray:
    """Nearest upsampling by whole factors: each pixel repeated ``size / input`` times along each axis."""
    return x.repeat(size[0] // x.shape[2], axis=2).repeat(size[1] // x.shape[3], axis=3)


def _upsample_onnx(b, name: str, xs: list[str], a: dict) -> str:
    """Resize of the two spatial axes to ``size`` (opset 18: ``axes``), nearest with floor, as torch."""
    if b.opset < 18:
        raise UnsupportedLayerError(f"node {name!r}: upsampling is exported with opset >= 18")
    sizes = b.const(f"{name}.sizes", np.array(a["size"], np.int64))
    return b.node("Resize", [xs[0], "", "", sizes], name, axes=[2, 3], mode="nearest",
                  coordinate_transformation_mode="asymmetric", nearest_mode="floor")


UPSAMPLE = register(OpSchema(
    "upsample", _upsample_shape, placement="moves", attrs={"size": Ints(2, 1, MAX_SPATIAL)},
    capture=Capture(("torch.nn.functional.interpolate",), _upsample_call, ("torch.nn.Upsample",), _upsample_module),
    numpy=lambda xs, a: upsample_nearest(xs[0], a["size"]),
    torch=lambda t, xs, a: t.nn.functional.interpolate(xs[0], size=a["size"], mode="nearest"), onnx=_upsample_onnx))
