"""Shape ops: reshape to a recorded shape (batch axis -1 kept; flatten, view, reshape), concat along a non-batch
axis, transpose (permute, transpose; the batch axis stays first), mean over non-batch axes, constant pad, and
slice (``x[:, a:b]``; the pieces of chunk and split, which :mod:`lowbit.export.graph` captures as slices)."""

from __future__ import annotations

import math

import numpy as np

from ..errors import UnsupportedLayerError
from .schema import (MAX_RANK, Bool, Capture, ExampleShape, Int, Ints, Node, Number, OpSchema, Shape, argument,
                     fail, register)


def _reshape_shape(node: Node) -> Shape:
    target = tuple(node.attrs["shape"][1:])
    if math.prod(target) != math.prod(node.inputs[0]):
        raise node.fail(f"cannot reshape {[-1, *node.inputs[0]]} to {node.attrs['shape']}: the sizes differ")
    return target


def _concat_shape(node: Node) -> Shape:
    first = node.inputs[0]
    rank = len(first) + 1
    axis = node.attrs["axis"]
    if not -rank < axis < rank or axis == 0:
        raise node.fail(f"concat axis must lie in [{-rank + 1}, {rank - 1}] and not be 0 (the batch), got {axis}")
    axis = (axis % rank) - 1
    for shape in node.inputs[1:]:
        if len(shape) != len(first) or any(a != b for i, (a, b) in enumerate(zip(first, shape)) if i != axis):
            raise node.fail(f"concatenated inputs must match except on axis {node.attrs['axis']}, got "
                            f"{[[-1, *s] for s in node.inputs]}")
    return (*first[:axis], sum(s[axis] for s in node.inputs), *first[axis + 1 :])


def _reshape(b, name: str, xs: list[str], a: dict) -> str:
    return b.node("Reshape", [xs[0], b.const(f"{name}.shape", np.array([-1, *a["shape"][1:]], np.int64))], name)


RESHAPE = register(OpSchema(
    "reshape", _reshape_shape, placement="moves", attrs={"shape": ExampleShape()},
    capture=Capture(("torch.flatten", "torch.reshape", "Tensor.view", "Tensor.reshape", "Tensor.flatten"),
                    lambda args, kwargs, shape, where: ({"shape": shape}, args[:1]), ("torch.nn.Flatten",),
                    lambda m, shape, where: {"shape": shape}),
    numpy=lambda xs, a: xs[0].reshape([xs[0].shape[0], *a["shape"][1:]]),
    torch=lambda t, xs, a: xs[0].reshape(a["shape"]), onnx=_reshape))
CONCAT = register(OpSchema(
    "concat", _concat_shape, placement="joins", inputs=None, attrs={"axis": Int(-MAX_RANK, MAX_RANK)},
    capture=Capture(("torch.cat", "torch.concat"),
                    lambda args, kwargs, shape, where: ({"axis": int(argument(args, kwargs, 1, "dim", 0))},
                                                        list(args[0]))),
    numpy=lambda xs, a: np.concatenate(xs, axis=a["axis"]), torch=lambda t, xs, a: t.cat(xs, a["axis"]),
    onnx=lambda b, name, xs, a: b.node("Concat", xs, name, axis=a["axis"])))


# ---------------------------------------------------------------- transpose, mean, pad


class Axes:
    """Distinct axes of a tensor, never the batch axis: counted from the end (-1 is the last), or with
    ``permutation`` a permutation of all axes that keeps the batch (0) first."""

    def __init__(self, permutation: bool = False):
        self.permutation = permutation

    def check(self, value: object, what: str, where: str) -> list[int]:
        ok = (isinstance(value, list) and 1 <= len(value) <= MAX_RANK and all(type(v) is int for v in value)
              and len(set(value)) == len(value))
        if ok and self.permutation:
            ok = sorted(value) == list(range(len(value))) and value[0] == 0
        elif ok:
            ok = all(-MAX_RANK <= v <= -1 for v in value)
        if not ok:
            kind = "a permutation of 0 .. rank - 1 starting at 0 (the batch)" if self.permutation else \
                f"a list of distinct axes from {-MAX_RANK} to -1 (counted from the end; not the batch)"
            raise fail(where, f"{what} must be {kind}, got {str(value)[:80]}")
        return list(value)


def _negative(dims: list[int], rank: int, where: str) -> list[int]:
    """``dims`` counted from the end of a tensor of ``rank`` axes; UnsupportedLayerError for the batch axis."""
    axes = sorted({d - rank if d >= 0 else d for d in dims})
    if -rank in axes:
        raise UnsupportedLayerError(f"{where}: an op over the batch axis cannot be captured")
    return axes


def _transpose_call(args: list, kwargs: dict, shape: list[int], where: str) -> tuple[dict, list]:
    """transpose(x, dim0, dim1): the two axes swapped."""
    perm = list(range(len(shape)))
    i, j = (argument(args, kwargs, k, name, None) % len(shape) for k, name in ((1, "dim0"), (2, "dim1")))
    perm[i], perm[j] = perm[j], perm[i]
    return _kept_batch(perm, where), args[:1]


def _permute_call(args: list, kwargs: dict, shape: list[int], where: str) -> tuple[dict, list]:
    """permute(x, dims) or x.permute(*dims)."""
    dims = kwargs.get("dims", list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:])
    return _kept_batch([d % len(shape) for d in dims], where), args[:1]


def _kept_batch(perm: list[int], where: str) -> dict:
    if perm[0] != 0:
        raise UnsupportedLayerError(f"{where}: a transpose that moves the batch axis cannot be captured")
    return {"perm": perm}


def _transpose_shape(node: Node) -> Shape:
    perm, x = node.attrs["perm"], node.inputs[0]
    if len(perm) != len(x) + 1:
        raise node.fail(f"perm {perm} must order all {len(x) + 1} axes of {[-1, *x]}")
    return tuple(x[p - 1] for p in perm[1:])


def _mean_call(args: list, kwargs: dict, shape: list[int], where: str) -> tuple[dict, list]:
    dims = argument(args, kwargs, 1, "dim", None)
    if dims is None or argument(args, kwargs, 3, "dtype", None) is not None:
        raise UnsupportedLayerError(f"{where}: a mean is captured over given axes, without dtype")
    keep = bool(argument(args, kwargs, 2, "keepdim", False))
    rank = len(shape) + (0 if keep else len([dims] if isinstance(dims, int) else dims))
    return {"axes": _negative([dims] if isinstance(dims, int) else list(dims), rank, where), "keepdim": keep}, args[:1]


def _mean_shape(node: Node) -> Shape:
    x, axes = node.inputs[0], node.attrs["axes"]
    if -len(x) > min(axes):
        raise node.fail(f"mean axes {axes} must name non-batch axes of {[-1, *x]}")
    kept = [1 if i - len(x) in axes else d for i, d in enumerate(x)]
    return tuple(kept) if node.attrs["keepdim"] else tuple(d for i, d in enumerate(x) if i - len(x) not in axes)


def _mean_onnx(b, name: str, xs: list[str], a: dict) -> str:
    keep = int(a["keepdim"])
    if b.opset >= 18:
        return b.node("ReduceMean", [xs[0], b.const(f"{name}.axes", np.array(a["axes"], np.int64))], name,
                      keepdims=keep)
    return b.node("ReduceMean", xs, name, axes=a["axes"], keepdims=keep)


def _pad_call(args: list, kwargs: dict, shape: list[int], where: str) -> tuple[dict, list]:
    pads = list(argument(args, kwargs, 1, "pad", ()))
    mode, value = argument(args, kwargs, 2, "mode", "constant"), argument(args, kwargs, 3, "value", None)
    if mode != "constant" or len(pads) % 2 or len(pads) // 2 >= len(shape) or min(pads, default=0) < 0:
        raise UnsupportedLayerError(f"{where}: pad is captured in constant mode, with pads >= 0 for non-batch "
                                    f"axes, got mode {mode!r} and pads {pads}")
    return {"pads": [int(p) for p in pads], "value": float(value or 0.0)}, args[:1]


def _pad_widths(pads: list[int], rank: int) -> list[tuple[int, int]]:
    """Per axis (batch first) of a rank-``rank`` tensor, (before, after) from torch's last-axis-first pads."""
    widths = [(0, 0)] * rank
    for i in range(len(pads) // 2):
        widths[rank - 1 - i] = (pads[2 * i], pads[2 * i + 1])
    return widths


def _pad_shape(node: Node) -> Shape:
    x, pads = node.inputs[0], node.attrs["pads"]
    if len(pads) % 2 or len(pads) // 2 > len(x):
        raise node.fail(f"pads {pads} must come in (before, after) pairs for at most the {len(x)} non-batch axes")
    return tuple(d + sum(w) for d, w in zip(x, _pad_widths(pads, len(x) + 1)[1:]))


def _pad_onnx(b, name: str, xs: list[str], a: dict) -> str:
    """Pad with ``axes`` (opset 18): the padded axes counted from the end, so the input's rank is not needed."""
    if b.opset < 18:
        raise UnsupportedLayerError(f"node {name!r}: pad is exported with opset >= 18")
    count = len(a["pads"]) // 2
    pads = np.array(a["pads"][0::2] + a["pads"][1::2], np.int64)
    axes = np.arange(-1, -count - 1, -1, dtype=np.int64)
    inputs = [xs[0], b.const(f"{name}.pads", pads), b.const(f"{name}.value", np.array(a["value"], np.float32)),
              b.const(f"{name}.axes", axes)]
    return b.node("Pad", inputs, name)


TRANSPOSE = register(OpSchema(
    "transpose", _transpose_shape, placement="moves", attrs={"perm": Axes(permutation=True)},
    capture=Capture(("torch.transpose", "Tensor.transpose"), _transpose_call,
                    calls={"torch.permute": _permute_call, "Tensor.permute": _permute_call}),
    numpy=lambda xs, a: np.transpose(xs[0], a["perm"]), torch=lambda t, xs, a: xs[0].permute(a["perm"]),
    onnx=lambda b, name, xs, a: b.node("Transpose", xs, name, perm=a["perm"])))
MEAN = register(OpSchema(
    "mean", _mean_shape, attrs={"axes": Axes(), "keepdim": Bool()},
    capture=Capture(("torch.mean", "Tensor.mean"), _mean_call),
    numpy=lambda xs, a: xs[0].mean(axis=tuple(a["axes"]), keepdims=a["keepdim"], dtype=np.float32),
    torch=lambda t, xs, a: xs[0].mean(a["axes"], keepdim=a["keepdim"]), onnx=_mean_onnx))
def _pad_module(m, shape: list[int], where: str) -> dict:
    return {"pads": [int(p) for p in m.padding], "value": float(m.value)}


def _pads_zero(args: list, kwargs: dict, m) -> bool:
    value = m.value if m is not None else argument(args, kwargs, 3, "value", None)
    return not value


PAD = register(OpSchema(
    "pad", _pad_shape, placement="moves", attrs={"pads": Ints(None, 0, 2**16), "value": Number()},
    capture=Capture(("torch.nn.functional.pad",), _pad_call,
                    ("torch.nn.ZeroPad1d", "torch.nn.ZeroPad2d", "torch.nn.ConstantPad1d", "torch.nn.ConstantPad2d"),
                    _pad_module, moves=_pads_zero),
    numpy=lambda xs, a: np.pad(xs[0], _pad_widths(a["pads"], xs[0].ndim), constant_values=np.float32(a["value"])),
    torch=lambda t, xs, a: t.nn.functional.pad(xs[0], a["pads"], value=a["value"]), onnx=_pad_onnx))


# ---------------------------------------------------------------- slice (tensor[..., a:b], chunk, split)


def _slice_shape(node: Node) -> Shape:
    x, a = node.inputs[0], node.attrs
    if not -len(x) <= a["axis"] <= -1 or not 0 <= a["start"] < a["end"] <= x[a["axis"]]:
        raise node.fail(f"slice [{a['start']}:{a['end']}] along axis {a['axis']} must lie within {[-1, *x]} "
                        "(a non-batch axis, counted from the end)")
    shape = list(x)
    shape[a["axis"]] = a["end"] - a["start"]
    if a["squeeze"]:  # an integer index (x[:, -1]): the axis goes
        if a["end"] - a["start"] != 1:
            raise node.fail("a squeezed slice takes one element of its axis")
        del shape[a["axis"]]
    return tuple(shape)


def _slice_call(args: list, kwargs: dict, shape: list[int], where: str) -> tuple[dict, list]:
    """tensor[index] where index slices one non-batch axis with step 1 and a start >= 0 (the others whole), or
    takes one integer position of it (``x[:, -1]``: the last step of a sequence; a slice of one, squeezed)."""
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    meta = getattr(args[0], "meta", {}).get("tensor_meta")
    integers = [axis for axis, s in enumerate(index) if isinstance(s, int) and not isinstance(s, bool)]
    if len(integers) == 1 and integers[0] > 0 and hasattr(meta, "shape") and \
            all(s == slice(None) for axis, s in enumerate(index) if axis != integers[0]):
        axis, rank = integers[0], len(meta.shape)
        size = int(meta.shape[axis])
        if -size <= index[axis] < size:
            start = index[axis] % size
            return {"axis": axis - rank, "start": start, "end": start + 1, "squeeze": True}, args[:1]
    cut = [(axis, s) for axis, s in enumerate(index) if s != slice(None)]
    ok = len(cut) == 1 and isinstance(cut[0][1], slice) and cut[0][0] > 0 and cut[0][1].step in (None, 1)
    ok = ok and all(isinstance(s, slice) for s in index) and (cut[0][1].start or 0) >= 0
    if not ok:
        raise UnsupportedLayerError(f"{where}: indexing is captured as one slice of a non-batch axis with step 1 "
                                    f"and a start >= 0, got {index!r}")
    axis, piece = cut[0]
    start = piece.start or 0
    return {"axis": axis - len(shape), "start": start, "end": start + shape[axis]}, args[:1]


#: functions whose pieces are captured as slices
SPLITS = ("torch.chunk", "torch.split", "Tensor.chunk", "Tensor.split")


def slices(sizes: list[int], axis: int, rank: int) -> list[dict]:
    """The slice attributes of consecutive pieces of ``sizes`` along ``axis`` (chunk and split)."""
    bounds = np.cumsum([0, *sizes]).tolist()
    return [{"axis": axis - rank if axis >= 0 else axis, "start": a, "end": b} for a, b in zip(bounds, bounds[1:])]


def _slice_onnx(b, name: str, xs: list[str], a: dict) -> str:
    inputs = [xs[0], *(b.const(f"{name}.{k}", np.array([a[k]], np.int64)) for k in ("start", "end", "axis"))]
    if a["squeeze"]:
        cut = b.node("Slice", inputs, f"{name}.slice")
        return b.node("Squeeze", [cut, b.const(f"{name}.axes", np.array([a["axis"]], np.int64))], name)
    return b.node("Slice", inputs, name)


def _slice_numpy(xs: list, a: dict) -> np.ndarray:
    y = xs[0][(Ellipsis, slice(a["start"], a["end"])) + (slice(None),) * (-1 - a["axis"])]
    return np.squeeze(y, a["axis"]) if a["squeeze"] else y


def _slice_torch(t, xs: list, a: dict):
    y = xs[0].narrow(a["axis"], a["start"], a["end"] - a["start"])
    return y.squeeze(a["axis"]) if a["squeeze"] else y


SLICE = register(OpSchema(
    "slice", _slice_shape, placement="moves",
    attrs={"axis": Int(-MAX_RANK, -1), "start": Int(0, 2**31), "end": Int(1, 2**31), "squeeze": Bool()},
    defaults={"squeeze": False}, capture=Capture(("operator.getitem",), _slice_call),
    numpy=_slice_numpy, torch=_slice_torch, onnx=_slice_onnx))
