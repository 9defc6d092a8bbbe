"""Convolutions with zero padding, each a module op (its layer quantizes around it):

- conv2d (torch.nn.functional.conv2d), NCHW; weight [O, C / groups, kh, kw];
- conv1d (torch.nn.functional.conv1d), NCL; weight [O, C / groups, k]; run as conv2d on the H = 1 view;
- conv_transpose2d (torch.nn.functional.conv_transpose2d), NCHW; weight [C, O / groups, kh, kw] (input channels
  first), with ``output_padding`` (smaller than the stride or the dilation, as torch requires).

Output size per axis ``floor((H + 2 p - d (k - 1) - 1) / s) + 1``; transposed
``(H - 1) s - 2 p + d (k - 1) + output_padding + 1``. Caps besides the attributes' (at most ``MAX_SPATIAL``): an
output size of at most ``MAX_SPATIAL`` per axis, and at most ``MAX_ELEMENTS`` per example in the padded input and
the windows (a transposed conv: its output before cropping and its kernel taps, ``O / groups kh kw H W``).
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


# ---------------------------------------------------------------- conv1d: NCL, a conv2d over an H = 1 view


def conv1d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, stride: list[int], padding: list[int],
           dilation: list[int], groups: int) -> np.ndarray:
    """torch.nn.functional.conv1d (zero padding), NCL; weight [O, C / groups, k]: :func:`conv2d` on the H = 1 view."""
    y = conv2d(x[:, :, None, :], weight[:, :, None, :], bias, [1, *stride], [0, *padding], [1, *dilation], groups)
    return y[:, :, 0, :]


def _shape1d(node: Node) -> Shape:
    c, length = node.rank(2)
    weight, bias, a = node.tensors["weight"], node.tensors.get("bias"), node.attrs
    groups = a["groups"]
    if len(weight) != 3 or weight[0] % groups or weight[1] * groups != c:
        raise node.fail(f"its weight must be [O, C / groups, k] with O divisible by groups {groups} and "
                        f"C = {c} input channels, got {list(weight)}")
    if bias is not None and bias != weight[:1]:
        raise node.fail(f"its bias must have shape [{weight[0]}], got {list(bias)}")
    out = window_size(length, weight[2], a["stride"][0], a["padding"][0], a["dilation"][0], node, "length")
    if out > MAX_SPATIAL:
        raise node.fail(f"its output length {out} exceeds the spatial size cap {MAX_SPATIAL}")
    padded = c * (length + 2 * a["padding"][0])
    columns = weight[1] * weight[2] * out
    if max(padded, columns) > MAX_ELEMENTS:
        raise node.fail(f"its padded input ({padded} elements) or its windows ({columns} elements) exceed "
                        f"{MAX_ELEMENTS} per example")
    return (weight[0], out)


def _module1d(m, shape: list[int], where: str) -> dict:
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise UnsupportedLayerError(f"{where}: conv padding {m.padding!r} with padding_mode {m.padding_mode!r} "
                                    "cannot be captured; use integer zero padding")
    return {"stride": [int(m.stride[0])], "padding": [int(m.padding[0])], "dilation": [int(m.dilation[0])],
            "groups": m.groups}


CONV1D = register(OpSchema(
    "conv1d", _shape1d, tensors=("weight",), optional=("bias",), quant=("weight", "input", "output"),
    state=("input_quantizer", "output_quantizer"), module=True,
    capture=Capture(modules=("torch.nn.Conv1d",), module=_module1d),
    attrs={"stride": Ints(1, 1, MAX_SPATIAL), "padding": Ints(1, 0, MAX_SPATIAL),
           "dilation": Ints(1, 1, MAX_SPATIAL), "groups": Int(1, MAX_SPATIAL)}))


# ---------------------------------------------------------------- conv_transpose2d


def transposed_size(size: int, kernel: int, stride: int, padding: int, output_padding: int, dilation: int) -> int:
    """Output size of a transposed conv along one axis, ``(H - 1) s - 2 p + d (k - 1) + output_padding + 1``."""
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


def conv_transpose2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, stride: list[int],
                     padding: list[int], output_padding: list[int], dilation: list[int], groups: int) -> np.ndarray:
    """torch.nn.functional.conv_transpose2d, NCHW; weight [C, O / groups, kh, kw].

    Per group one matmul ``W_g^T [O/g kh kw, C/g] @ x [N, C/g, H W]`` gives every kernel tap's contribution; each
    tap is added into the uncropped output at its strided, dilated offset, which is then cropped by ``padding``.
    """
    c, og, kh, kw = weight.shape
    n, _, h, w = x.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    full_h = transposed_size(h, kh, sh, 0, output_padding[0], dh)
    full_w = transposed_size(w, kw, sw, 0, output_padding[1], dw)
    cg = c // groups
    y = np.zeros((n, og * groups, full_h, full_w), dtype=np.float32)
    for g in range(groups):
        rows = weight[g * cg : (g + 1) * cg].reshape(cg, og * kh * kw).T
        taps = np.matmul(rows, x[:, g * cg : (g + 1) * cg].reshape(n, cg, h * w)).reshape(n, og, kh, kw, h, w)
        out = y[:, g * og : (g + 1) * og]
        for i in range(kh):
            for j in range(kw):
                out[:, :, i * dh : i * dh + (h - 1) * sh + 1 : sh, j * dw : j * dw + (w - 1) * sw + 1 : sw] += \
                    taps[:, :, i, j]
    y = y[:, :, ph : full_h - ph, pw : full_w - pw]
    if bias is not None:
        y = y + bias.reshape(1, -1, 1, 1)
    return np.ascontiguousarray(y, dtype=np.float32)


def _shape_transposed(node: Node) -> Shape:
    c, h, w = node.rank(3)
    weight, bias, a = node.tensors["weight"], node.tensors.get("bias"), node.attrs
    groups = a["groups"]
    if len(weight) != 4 or weight[0] != c or c % groups:
        raise node.fail(f"its weight must be [C, O / groups, kh, kw] with C = {c} input channels divisible by "
                        f"groups {groups}, got {list(weight)}")
    channels = weight[1] * groups
    if bias is not None and bias != (channels,):
        raise node.fail(f"its bias must have shape [{channels}], got {list(bias)}")
    out = []
    for size, k, s, p, op, d, axis in zip((h, w), weight[2:], a["stride"], a["padding"], a["output_padding"],
                                          a["dilation"], ("height", "width")):
        if op >= s and op >= d:
            raise node.fail(f"its {axis} output_padding {op} must be smaller than its stride {s} or its dilation {d}")
        size_out = transposed_size(size, k, s, p, op, d)
        if size_out < 1:
            raise node.fail(f"its {axis} output (input {size}, kernel {k}, stride {s}, dilation {d}) is empty "
                            f"once cropped by padding {p}")
        if size_out > MAX_SPATIAL:
            raise node.fail(f"its {axis} output {size_out} exceeds the spatial size cap {MAX_SPATIAL}")
        out.append(size_out)
    uncropped = channels * (out[0] + 2 * a["padding"][0]) * (out[1] + 2 * a["padding"][1])
    columns = weight[1] * weight[2] * weight[3] * h * w
    if max(uncropped, columns) > MAX_ELEMENTS:
        raise node.fail(f"its uncropped output ({uncropped} elements) or its kernel taps ({columns} elements) "
                        f"exceed {MAX_ELEMENTS} per example")
    return (channels, *out)


def _module_transposed(m, shape: list[int], where: str) -> dict:
    if m.padding_mode != "zeros":
        raise UnsupportedLayerError(f"{where}: transposed conv padding_mode {m.padding_mode!r} cannot be captured")
    return {"stride": pair(m.stride), "padding": pair(m.padding), "output_padding": pair(m.output_padding),
            "dilation": pair(m.dilation), "groups": m.groups}


#: weight quantizers whose per-channel scales lie along the weight's axis 0 only, which for a transposed conv
#: ([C_in, C_out / groups, kh, kw]) is the input channel: refused there (uniform's follow the output channel, axis 1)
AXIS0_PER_CHANNEL = ("lsq", "ternary")


def transposed_weight_refusal(spec: dict | None) -> str | None:
    """Why a transposed conv cannot take weight quantizer ``spec`` (per-channel scales fixed on axis 0), or None."""
    if spec is None:
        return None
    if spec["name"] in AXIS0_PER_CHANNEL and spec.get("per_channel") or spec["name"] == "xnor" \
            and spec.get("role", "weight") == "weight":
        return (f"weight quantizer {spec['name']!r} keeps one scale per index of the weight's axis 0, which is a "
                "transposed conv's input channel; use a per-tensor quantizer, or uniform (its per-channel scales "
                "follow the output channel, axis 1)")
    return None


CONV_TRANSPOSE2D = register(OpSchema(
    "conv_transpose2d", _shape_transposed, tensors=("weight",), optional=("bias",),
    quant=("weight", "input", "output"), state=("input_quantizer", "output_quantizer"), module=True,
    capture=Capture(modules=("torch.nn.ConvTranspose2d",), module=_module_transposed),
    attrs={"stride": Ints(2, 1, MAX_SPATIAL), "padding": Ints(2, 0, MAX_SPATIAL),
           "output_padding": Ints(2, 0, MAX_SPATIAL), "dilation": Ints(2, 1, MAX_SPATIAL),
           "groups": Int(1, MAX_SPATIAL)}))
