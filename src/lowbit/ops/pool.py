"""Pooling and resampling (NCHW): maxpool2d (padding with -inf; floor or ceil mode), avgpool2d (floor or ceil
mode, ``count_include_pad`` as torch: a window's divisor counts the padding, never the part of a ceil-mode window
past it), adaptive_avgpool2d and adaptive_maxpool2d, whose bin i spans
``[floor(i H / oh), ceil((i + 1) H / oh))`` (bins overlap where they do not divide the input, and an output larger
than the input repeats values), upsample (nearest, by whole factors) and upsample_bilinear (torch's bilinear
interpolation, ``align_corners`` either way, by a size or by scale factors).

Output size per axis: floor mode ``floor((H + 2 p - k) / s) + 1``; ceil mode ``ceil((H + 2 p - k) / s) + 1``,
less one where the last window would start in the right padding (torch's rule).

As torch requires, a pool's padding is at most half its kernel; an adaptive pool has at most :data:`MAX_BINS`
bins (its numpy half loops over them).

ONNX: adaptive pools to 1x1 are GlobalAveragePool / GlobalMaxPool, to bins that divide the input evenly
AveragePool / MaxPool; any other adaptive average is two MatMuls with the bins' averaging matrices (rows, then
columns), any other adaptive max a Slice and ReduceMax per bin, concatenated, along each axis that needs it.
Bilinear upsampling is Resize (mode linear; coordinate_transformation_mode half_pixel, or align_corners) with the
output sizes, or with the scale factors where the model gave those (torch then maps coordinates by them).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import UnsupportedLayerError
from .schema import (MAX_SPATIAL, Bool, Capture, Ints, Node, Nullable, Numbers, OpSchema, Shape, argument, pair,
                     register)

#: the most output positions of an adaptive pool
MAX_BINS = 2**12


def pool_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """Output size of a pool along one axis (see the module docstring); < 1 where the kernel does not fit."""
    span = size + 2 * padding - kernel
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1
    return out - 1 if (out - 1) * stride >= size + padding else out


def _ceil_widths(shape: tuple[int, ...], kernel: list[int], stride: list[int], padding: list[int],
                 ceil_mode: bool) -> tuple[list[int], tuple]:
    """Output sizes and the np.pad widths of an NCHW map: the padding, plus on the right what the last ceil-mode
    windows need beyond it."""
    out = [pool_size(size, k, s, p, ceil_mode) for size, k, s, p in zip(shape[2:], kernel, stride, padding)]
    extra = [max(0, (o - 1) * s + k - (size + 2 * p)) for o, size, k, s, p in zip(out, shape[2:], kernel, stride,
                                                                                  padding)]
    return out, ((0, 0), (0, 0), (padding[0], padding[0] + extra[0]), (padding[1], padding[1] + extra[1]))


def _window_views(padded: np.ndarray, kernel: list[int], stride: list[int], out: list[int]):
    """The kernel's strided views of a padded NCHW map, one per window position, each [N, C, out_h, out_w]."""
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            yield padded[:, :, i: i + stride[0] * (out[0] - 1) + 1: stride[0],
                         j: j + stride[1] * (out[1] - 1) + 1: stride[1]]


def _reduce_windows(padded: np.ndarray, kernel: list[int], stride: list[int], out: list[int], ufunc) -> np.ndarray:
    """``ufunc`` folded over the window positions in row-major order (one pass over the map per position, not a
    reduction over a 6-D window view: 15x faster for a 2x2 max pool at 64x32x24x24)."""
    views = _window_views(padded, kernel, stride, out)
    result = np.array(next(views))
    for view in views:
        ufunc(result, view, out=result)
    return result


def maxpool2d(x: np.ndarray, kernel: list[int], stride: list[int], padding: list[int],
              ceil_mode: bool = False) -> np.ndarray:
    """torch.nn.functional.max_pool2d (padding with -inf); in ceil mode the last windows run past the right
    padding, which pads with -inf too."""
    out, widths = _ceil_widths(x.shape, kernel, stride, padding, ceil_mode)
    padded = np.pad(x, widths, constant_values=-np.inf) if any(map(any, widths)) else x
    return _reduce_windows(padded, kernel, stride, out, np.maximum)


def avgpool2d(x: np.ndarray, kernel: list[int], stride: list[int], padding: list[int],
              count_include_pad: bool = True, ceil_mode: bool = False) -> np.ndarray:
    """torch.nn.functional.avg_pool2d: window sums over the zero-padded map divided by the window's size, or, where
    the window overlaps the padding (``count_include_pad=False``) or runs past it (ceil mode), by the number of
    positions it covers in the input (plus the padding with ``count_include_pad``)."""
    out, widths = _ceil_widths(x.shape, kernel, stride, padding, ceil_mode)
    padded = np.pad(x, widths) if any(map(any, widths)) else x
    sums = _reduce_windows(padded.astype(np.float32, copy=False), kernel, stride, out, np.add)
    if widths[2][1] == widths[2][0] and widths[3][1] == widths[3][0] and (count_include_pad or padding == [0, 0]):
        return sums / np.float32(kernel[0] * kernel[1])
    masks = []
    for size, p, (left, right) in zip(x.shape[2:], padding, widths[2:]):
        mask = np.zeros(left + size + right, np.float32)
        mask[slice(0, size + 2 * p) if count_include_pad else slice(p, p + size)] = 1
        masks.append(mask)
    counts = _reduce_windows(np.outer(*masks)[None, None], kernel, stride, out, np.add)
    return (sums / counts).astype(np.float32)


def bins(size: int, out: int) -> list[tuple[int, int]]:
    """The [start, end) of each of the ``out`` bins of an adaptive pool over ``size`` positions."""
    return [((i * size) // out, -(-((i + 1) * size) // out)) for i in range(out)]


def adaptive_avgpool2d(x: np.ndarray, output_size: list[int]) -> np.ndarray:
    """torch.nn.functional.adaptive_avg_pool2d: bin i spans [floor(i H / oh), ceil((i + 1) H / oh))."""
    return _adaptive(x, output_size, lambda window: window.mean(axis=(2, 3), dtype=np.float32))


def adaptive_maxpool2d(x: np.ndarray, output_size: list[int]) -> np.ndarray:
    """torch.nn.functional.adaptive_max_pool2d (without indices), over the same bins."""
    return _adaptive(x, output_size, lambda window: window.max(axis=(2, 3)))


def _adaptive(x: np.ndarray, output_size: list[int], reduce) -> np.ndarray:
    rows, columns = bins(x.shape[2], output_size[0]), bins(x.shape[3], output_size[1])
    out = np.empty(x.shape[:2] + tuple(output_size), dtype=np.float32)
    for i, (y0, y1) in enumerate(rows):
        for j, (x0, x1) in enumerate(columns):
            out[:, :, i, j] = reduce(x[:, :, y0:y1, x0:x1])
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
    if oh * ow > MAX_BINS:
        raise node.fail(f"adaptive pool output {[oh, ow]} must have at most {MAX_BINS} bins")
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
    if divisor is not None:
        raise UnsupportedLayerError(f"{where}: average pooling with divisor_override cannot be captured")
    return {**_window(kernel, stride, padding, 1, where), "count_include_pad": bool(count_include_pad),
            "ceil_mode": bool(ceil_mode)}


def _average_call(args: list, kwargs: dict, shape: list[int], where: str) -> tuple[dict, list]:
    values = [argument(args, kwargs, i, k, d) for i, (k, d) in
              enumerate([("kernel_size", None), ("stride", None), ("padding", 0), ("ceil_mode", False),
                         ("count_include_pad", True), ("divisor_override", None)], start=1)]
    return _average(*values, where), args[:1]


def _pool_onnx(op: str):
    def emit(b, name: str, xs: list[str], a: dict) -> str:
        extra = {"ceil_mode": int(a["ceil_mode"])}
        if op == "AveragePool":
            extra["count_include_pad"] = int(a["count_include_pad"])
        return b.node(op, xs, name, kernel_shape=a["kernel"], strides=a["stride"], pads=a["padding"] * 2, **extra)
    return emit


def _adaptive_onnx(kind: str):
    """Adaptive average (``kind`` "Average") or max pooling (see the module docstring)."""
    def emit(b, name: str, xs: list[str], a: dict) -> str:
        (h, w), (oh, ow) = b.shapes[xs[0]][-2:], a["output_size"]
        if [oh, ow] == [1, 1]:
            return b.node(f"Global{kind}Pool", xs, name)
        if h % oh == 0 and w % ow == 0:
            kernel = [h // oh, w // ow]
            return b.node(f"{kind}Pool", xs, name, kernel_shape=kernel, strides=kernel)
        if kind == "Average":
            rows = b.node("MatMul", [xs[0], b.const(f"{name}.columns", _averaging(w, ow).T)], f"{name}.columns")
            return b.node("MatMul", [b.const(f"{name}.rows", _averaging(h, oh)), rows], name)
        y = xs[0]
        for axis, size, out in [(3, w, ow), (2, h, oh)]:
            if size != out:
                y = _max_bins(b, name, y, axis, bins(size, out))
        return y
    return emit


def _averaging(size: int, out: int) -> np.ndarray:
    """The [out, size] matrix whose row i averages bin i of an adaptive pool."""
    matrix = np.zeros((out, size), np.float32)
    for i, (start, end) in enumerate(bins(size, out)):
        matrix[i, start:end] = np.float32(1) / np.float32(end - start)
    return matrix


def _max_bins(b, name: str, x: str, axis: int, spans: list[tuple[int, int]]) -> str:
    """The max over each span of ``axis`` (Slice, ReduceMax), concatenated along it."""
    axes = b.const(f"{name}.axis", np.array([axis], np.int64))
    pieces = []
    for i, (start, end) in enumerate(spans):
        piece = b.node("Slice", [x, b.const(f"{name}.start", np.array([start], np.int64)),
                                 b.const(f"{name}.end", np.array([end], np.int64)), axes], f"{name}.bin{i}")
        if end - start > 1:
            reduce = {"axes": [axis]} if b.opset < 18 else {}
            piece = b.node("ReduceMax", [piece, axes] if b.opset >= 18 else [piece], f"{name}.max{i}", **reduce)
        pieces.append(piece)
    return b.node("Concat", pieces, name, axis=axis)


_WINDOW = {"kernel": Ints(2, 1, MAX_SPATIAL), "stride": Ints(2, 1, MAX_SPATIAL), "padding": Ints(2, 0, MAX_SPATIAL)}


def _adaptive_max_call(args: list, kwargs: dict, shape: list[int], where: str) -> tuple[dict, list]:
    if argument(args, kwargs, 2, "return_indices", False):
        raise UnsupportedLayerError(f"{where}: adaptive max pooling that returns indices cannot be captured")
    return {"output_size": shape[-2:]}, args[:1]


def _adaptive_max_module(m, shape: list[int], where: str) -> dict:
    return _adaptive_max_call([None, None, m.return_indices], {}, shape, where)[0]


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
    "avgpool2d", _pool_shape, attrs={**_WINDOW, "count_include_pad": Bool(), "ceil_mode": Bool()},
    defaults={"count_include_pad": True, "ceil_mode": False},
    capture=Capture(("torch.nn.functional.avg_pool2d",), _average_call, ("torch.nn.AvgPool2d",),
                    lambda m, shape, where: _average(m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                                     m.count_include_pad, m.divisor_override, where)),
    numpy=lambda xs, a: avgpool2d(xs[0], a["kernel"], a["stride"], a["padding"], a["count_include_pad"],
                                  a["ceil_mode"]),
    torch=lambda t, xs, a: t.nn.functional.avg_pool2d(xs[0], a["kernel"], a["stride"], a["padding"], a["ceil_mode"],
                                                      a["count_include_pad"]),
    onnx=_pool_onnx("AveragePool")))
ADAPTIVE_AVGPOOL2D = register(OpSchema(
    "adaptive_avgpool2d", _adaptive_shape, attrs={"output_size": Ints(2, 1, MAX_SPATIAL)}, capture=_ADAPTIVE,
    numpy=lambda xs, a: adaptive_avgpool2d(xs[0], a["output_size"]),
    torch=lambda t, xs, a: t.nn.functional.adaptive_avg_pool2d(xs[0], a["output_size"]),
    onnx=_adaptive_onnx("Average")))
ADAPTIVE_MAXPOOL2D = register(OpSchema(
    "adaptive_maxpool2d", _adaptive_shape, placement="moves", attrs={"output_size": Ints(2, 1, MAX_SPATIAL)},
    capture=Capture(("torch.nn.functional.adaptive_max_pool2d",), _adaptive_max_call,
                    ("torch.nn.AdaptiveMaxPool2d",), _adaptive_max_module),
    numpy=lambda xs, a: adaptive_maxpool2d(xs[0], a["output_size"]),
    torch=lambda t, xs, a: t.nn.functional.adaptive_max_pool2d(xs[0], a["output_size"]),
    onnx=_adaptive_onnx("Max")))


# ---------------------------------------------------------------- upsampling: nearest by whole factors, bilinear


def _upsample_shape(node: Node) -> Shape:
    c, h, w = node.rank(3)
    oh, ow = node.attrs["size"]
    if oh % h or ow % w:
        raise node.fail(f"nearest upsampling to {[oh, ow]} must scale {[h, w]} by whole factors")
    return c, oh, ow


def _mode(args: list, kwargs: dict) -> str:
    return argument(args, kwargs, 3, "mode", "nearest")


def _upsample_call(args: list, kwargs: dict, shape: list[int], where: str) -> tuple[dict, list]:
    mode = _mode(args, kwargs)
    if mode != "nearest" or argument(args, kwargs, 6, "antialias", False):
        raise UnsupportedLayerError(f"{where}: interpolation is captured in mode 'nearest' or 'bilinear' (without "
                                    f"antialias), got {mode!r}")
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
    capture=Capture(("torch.nn.functional.interpolate",), _upsample_call, ("torch.nn.Upsample",), _upsample_module,
                    when=lambda args, kwargs: _mode(args, kwargs) == "nearest",
                    module_when=lambda m: m.mode == "nearest"),
    numpy=lambda xs, a: upsample_nearest(xs[0], a["size"]),
    torch=lambda t, xs, a: t.nn.functional.interpolate(xs[0], size=a["size"], mode="nearest"), onnx=_upsample_onnx))


def _bilinear_shape(node: Node) -> Shape:
    c, h, w = node.rank(3)
    size, scales = node.attrs["size"], node.attrs["scales"]
    if scales is not None and node.attrs["align_corners"]:
        raise node.fail("scales map coordinates only without align_corners")
    if scales is not None and [math.floor(n * s) for n, s in zip((h, w), scales)] != size:
        raise node.fail(f"bilinear upsampling of {[h, w]} by scales {scales} gives {size} only where the sizes are "
                        "floor(input size * scale)")
    return c, *size


def _bilinear_call(args: list, kwargs: dict, shape: list[int], where: str) -> tuple[dict, list]:
    if argument(args, kwargs, 6, "antialias", False):
        raise UnsupportedLayerError(f"{where}: bilinear interpolation with antialias cannot be captured")
    if len(shape) != 4:
        raise UnsupportedLayerError(f"{where}: bilinear interpolation is captured on NCHW maps")
    align = bool(argument(args, kwargs, 4, "align_corners", None))
    factor = argument(args, kwargs, 2, "scale_factor", None)
    scales = None  # torch maps coordinates by given scale factors, unless recomputed from the sizes
    if factor is not None and not align and not argument(args, kwargs, 5, "recompute_scale_factor", None):
        scales = [float(f) for f in (factor if isinstance(factor, (list, tuple)) else (factor, factor))]
    return {"size": shape[-2:], "align_corners": align, "scales": scales}, args[:1]


def _bilinear_module(m, shape: list[int], where: str) -> dict:
    return _bilinear_call([None, m.size, m.scale_factor, m.mode, m.align_corners, m.recompute_scale_factor], {},
                          shape, where)[0]


def _source(size: int, out: int, align_corners: bool, scale: float | None) -> tuple[np.ndarray, ...]:
    """(first index, second index, weight of the second) of each output position along an axis, in float32 as
    torch's kernel computes them (the same size is a copy)."""
    position = np.arange(out, dtype=np.float32)
    if size == out:
        return np.arange(out), np.arange(out), np.zeros(out, np.float32)
    if align_corners:
        source = position * (np.float32(size - 1) / np.float32(out - 1) if out > 1 else np.float32(0))
    else:
        ratio = np.float32(1.0 / scale) if scale is not None and scale > 0 else np.float32(size) / np.float32(out)
        source = np.maximum(ratio * (position + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    first = np.minimum(np.floor(source).astype(np.int64), size - 1)
    weight = np.clip(source - first.astype(np.float32), np.float32(0), np.float32(1))
    return first, np.minimum(first + 1, size - 1), weight


def upsample_bilinear(x: np.ndarray, size: list[int], align_corners: bool,
                      scales: list[float] | None = None) -> np.ndarray:
    """torch.nn.functional.interpolate(mode="bilinear") to ``size``: along the width, then along the height."""
    for axis, out in ((3, size[1]), (2, size[0])):
        first, second, weight = _source(x.shape[axis], out, align_corners, scales[axis - 2] if scales else None)
        shape = (-1, 1) if axis == 2 else (-1,)
        x = (np.take(x, first, axis=axis) * (np.float32(1) - weight).reshape(shape)
             + np.take(x, second, axis=axis) * weight.reshape(shape))
    return x.astype(np.float32, copy=False)


def _bilinear_onnx(b, name: str, xs: list[str], a: dict) -> str:
    """Resize (mode linear) of the two spatial axes (opset 18: ``axes``), by the model's scale factors (1 where an
    axis keeps its size, which torch copies) or to ``size``."""
    if b.opset < 18:
        raise UnsupportedLayerError(f"node {name!r}: upsampling is exported with opset >= 18")
    if a["scales"] is not None:
        kept = [n == s for n, s in zip(b.shapes[xs[0]][-2:], a["size"])]
        scales = b.const(f"{name}.scales", np.array([1.0 if k else s for k, s in zip(kept, a["scales"])], np.float32))
        inputs = [xs[0], "", scales]
    else:
        inputs = [xs[0], "", "", b.const(f"{name}.sizes", np.array(a["size"], np.int64))]
    mode = "align_corners" if a["align_corners"] else "half_pixel"
    return b.node("Resize", inputs, name, axes=[2, 3], mode="linear", coordinate_transformation_mode=mode)


def _bilinear_torch(t, xs: list, a: dict):
    if a["scales"] is not None:
        return t.nn.functional.interpolate(xs[0], scale_factor=a["scales"], mode="bilinear", align_corners=False)
    return t.nn.functional.interpolate(xs[0], size=a["size"], mode="bilinear", align_corners=a["align_corners"])


UPSAMPLE_BILINEAR = register(OpSchema(
    "upsample_bilinear", _bilinear_shape,
    attrs={"size": Ints(2, 1, MAX_SPATIAL), "align_corners": Bool(), "scales": Nullable(Numbers(2, 0, MAX_SPATIAL))},
    defaults={"scales": None},
    capture=Capture(("torch.nn.functional.interpolate",), _bilinear_call, ("torch.nn.Upsample",), _bilinear_module,
                    when=lambda args, kwargs: _mode(args, kwargs) == "bilinear",
                    module_when=lambda m: m.mode == "bilinear"),
    numpy=lambda xs, a: upsample_bilinear(xs[0], a["size"], a["align_corners"], a["scales"]),
    torch=_bilinear_torch, onnx=_bilinear_onnx))
