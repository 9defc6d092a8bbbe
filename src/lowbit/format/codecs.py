"""Per-tensor codecs: how one tensor is stored as named arrays plus JSON meta (numpy only).

A tensor to store is a :class:`NumpyEncoded`, the numpy form of
``lowbit.quantizers.base.Encoded`` (kind, int64 codes, bits, params, meta),
or, for the raw kinds ``float32`` / ``float16``, the float array itself in
``codes`` (``NumpyEncoded.from_float``). The codec is chosen by the kind::

    arrays, meta = encode(enc, "features.0.weight")   # dict name -> ndarray, JSON-able dict
    enc2 = decode(arrays, meta, "features.0.weight")  # == enc, validated
    x = values(enc2)                                  # float32, bit for bit base.decode

``meta`` always holds ``codec`` (the kind), ``shape`` (list of ints) and
``bits``, followed by the keys of ``enc.meta`` (so those three names are
reserved there). Stored arrays per codec (all little-endian; packing as in
:mod:`.bitpack`):

- ``float32`` / ``float16``: ``data`` [shape] of that dtype; bits 32 / 16.
- ``affine``: ``codes`` uint8, ``ceil(n*bits/8)`` bytes of ``code - qmin``
  (bits 1..16); ``scale`` float32 and ``zero_point`` int64, each 0-d or 1-D
  along ``axis``; meta ``qmin``, ``qmax`` (``qmax - qmin < 2**bits``), ``axis``.
- ``log``: ``codes`` uint8 (bits 1..16 per code); when ``signed``, ``sign``
  uint8 ``ceil(n/8)`` bytes, bit 1 = +1; meta ``fsr`` (``|fsr| <= 1024``),
  ``signed``.
- ``binary``: ``signs`` uint64 [rows, ceil(K/64)], sign rows along the
  reduction axis (bit 1 = code 1 = +1); ``scale`` float32; bits 1; meta ``axis``.
- ``ternary``: ``codes`` uint8, ``code + 1`` in 2 bits (3 is invalid);
  ``scale`` float32; bits 2; meta ``axis``.
- ``codebook``: ``codes`` uint8 (bits 1..16 per index); ``codebook``
  float32 [K], finite, 1 <= K <= 2**bits.
- ``group_affine``: ``codes`` uint8 as affine (``code - qmin``, bits 1..16);
  ``scale`` float32 [O, G]; ``zero_point`` uint8, ``ceil(O G bits / 8)``
  bytes of ``zero_point - qmin`` (absent when ``symmetric``: 0); meta
  ``qmin``, ``qmax``, ``group_size`` (1 .. 2**31), ``symmetric``. The
  tensor (at least 2-D) is read as O = shape[0] rows of K = prod(shape[1:])
  values in C order; column c belongs to group c // group_size, G =
  ceil(K / group_size) (the last group may be shorter).
- ``group_binary`` / ``group_ternary``: ``codes`` uint8, the code in 1 bit
  (1 = +1) / ``code + 1`` in 2 bits (3 is invalid); ``scale`` float32
  [O, G]; meta ``group_size``; rows and groups as ``group_affine``.
- ``group_log``: ``codes`` uint8, ``code + E`` in bits 2..8 (E = 2**(bits-1)
  - 1, codes in [-E, E]); ``scale`` float32 [O, G]; meta ``group_size``.
- ``group_codebook``: ``codes`` uint8 (bits 1..8 per index); ``codebook``
  float32 [O, G, K], finite, 1 <= K <= 2**bits; meta ``group_size``.

Values (float32, the arithmetic of ``base.decode``): affine
``(codes - zero_point) * scale``; log ``sign * 2**(fsr - 2**bits + codes)``
for codes > 0, else ``sign * 0``; binary ``(2 codes - 1) * scale``; ternary
``codes * scale``; codebook ``codebook[codes]``; group_affine ``(codes -
zero_point[o, c // g]) * scale[o, c // g]`` on the [O, K] rows; group_binary
``(2 codes - 1) * scale[o, c // g]``; group_ternary ``codes * scale[o, c // g]``; group_codebook
``codebook[o, c // g, codes]``; group_log ``sign(codes) * scale[o, c // g] *
2**(|codes| - E)``.

Every decode (and encode) validates and raises ``lowbit.errors.FormatError``
naming the tensor, with these stable codes: ``unknown-codec``, ``bad-meta``
(missing/ill-typed meta key, qmin/qmax/fsr out of range), ``bad-shape``
(shape not a list of ints, a dim over ``MAX_ELEMENTS``, non-zero dims
multiplying to more than ``MAX_ELEMENTS``, more than ``MAX_NDIM`` dims, an
array or parameter whose shape does not fit),
``bad-bits``, ``bad-arrays`` (missing or unexpected array names),
``bad-dtype``, ``bad-length`` (packed length != ``ceil(n*bits/8)``),
``bad-padding`` (non-zero unused bits), ``bad-code`` (code out of range),
``bad-index`` (codebook index >= codebook size), ``bad-scale`` (scale NaN,
Inf, zero or negative), ``bad-param`` (params missing or unexpected, zero point too large, sign
not +-1),
``bad-value`` (NaN/Inf in a codebook). Meta values that are not JSON-able
raise ``ConfigError``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..errors import ConfigError, FormatError
from .bitpack import (
    MAX_ELEMENTS,
    from_reduction_rows,
    pack_codes,
    pack_rows,
    reduction_shape,
    to_reduction_rows,
    unpack_codes,
    unpack_rows,
)

#: most dimensions one tensor may have
MAX_NDIM = 32
#: largest |fsr| of a log tensor (keeps every exponent within float32's reach of 0 / inf)
MAX_FSR = 1024
#: largest |zero_point| of an affine tensor
MAX_ZERO_POINT = 2**31
#: meta keys the codecs own; an Encoded's meta must not use them
RESERVED_META = ("codec", "shape", "bits")
#: dtype each known parameter is stored in
_PARAM_DTYPES = {"scale": np.float32, "zero_point": np.int64, "sign": np.int8, "codebook": np.float32}


@dataclass
class NumpyEncoded:
    """The numpy form of ``lowbit.quantizers.base.Encoded``.

    ``kind`` is one of :func:`codec_names`; ``codes`` is int64 (for the raw
    kinds ``float32`` / ``float16`` the float array itself); ``params`` maps
    names to ndarrays; ``meta`` is JSON-able. Convert an ``Encoded`` with
    ``NumpyEncoded(e.kind, e.codes.numpy(), e.bits, {k: v.numpy() for k, v in
    e.params.items()}, dict(e.meta))``.
    """

    kind: str
    codes: np.ndarray
    bits: int
    params: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_float(cls, x: np.ndarray) -> NumpyEncoded:
        """A raw float32 or float16 tensor (kept bit for bit)."""
        x = np.asarray(x)
        if x.dtype not in (np.float32, np.float16):
            raise ConfigError(f"raw tensors are float32 or float16, got {x.dtype}")
        return cls(x.dtype.name, x, 8 * x.dtype.itemsize)


def _where(name: str) -> str:
    return f"tensor {_short(name)}" if name else "unnamed tensor"


def _fail(code: str, where: str, message: str) -> FormatError:
    return FormatError(code, f"{where}: {message}")


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _along(p: np.ndarray, axis: int | None, ndim: int) -> np.ndarray:
    """Reshape a per-channel parameter so it broadcasts along ``axis`` (as base._along)."""
    if axis is None or p.ndim == 0:
        return p
    shape = [1] * ndim
    shape[axis] = -1
    return p.reshape(shape)


def values(enc: NumpyEncoded) -> np.ndarray:
    """The float32 values ``enc`` stands for, bit for bit as ``lowbit.quantizers.base.decode``.

    Products past float32's range become +-inf, as in torch.
    """
    with np.errstate(over="ignore"):
        return _values(enc)


def _values(enc: NumpyEncoded) -> np.ndarray:
    codes, p, axis = enc.codes, enc.params, enc.meta.get("axis")
    if enc.kind in ("float32", "float16"):
        return codes.astype(np.float32)
    if enc.kind == "affine":
        scale = _along(p["scale"].astype(np.float32), axis, codes.ndim)
        zero = _along(p["zero_point"].astype(np.int64), axis, codes.ndim)
        return (codes.astype(np.int64) - zero).astype(np.float32) * scale
    if enc.kind == "log":
        exponent = (enc.meta["fsr"] - 2**enc.bits) + codes.astype(np.int64)
        mag = np.where(codes > 0, np.ldexp(np.float32(1.0), exponent), np.float32(0.0))
        return mag * p["sign"].astype(np.float32) if enc.meta.get("signed") else mag
    if enc.kind == "binary":
        scale = _along(p["scale"].astype(np.float32), axis, codes.ndim)
        return (2 * codes.astype(np.int64) - 1).astype(np.float32) * scale
    if enc.kind == "ternary":
        scale = _along(p["scale"].astype(np.float32), axis, codes.ndim)
        return codes.astype(np.float32) * scale
    if enc.kind == "codebook":
        return p["codebook"].astype(np.float32)[codes.astype(np.int64)]
    if enc.kind == "group_affine":
        rows = codes.reshape(codes.shape[0], math.prod(codes.shape[1:])).astype(np.int64)
        group = np.arange(rows.shape[1]) // enc.meta["group_size"]
        if "zero_point" in p:
            rows = rows - p["zero_point"].astype(np.int64)[:, group]
        return (rows.astype(np.float32) * p["scale"].astype(np.float32)[:, group]).reshape(codes.shape)
    if enc.kind in ("group_binary", "group_ternary"):
        rows = codes.reshape(codes.shape[0], math.prod(codes.shape[1:])).astype(np.int64)
        group = np.arange(rows.shape[1]) // enc.meta["group_size"]
        level = 2 * rows - 1 if enc.kind == "group_binary" else rows
        return (level.astype(np.float32) * p["scale"].astype(np.float32)[:, group]).reshape(codes.shape)
    if enc.kind == "group_log":
        rows = codes.reshape(codes.shape[0], math.prod(codes.shape[1:])).astype(np.int64)
        full = p["scale"].astype(np.float32)[:, np.arange(rows.shape[1]) // enc.meta["group_size"]]
        magnitude = np.ldexp(full, np.abs(rows) - (2 ** (enc.bits - 1) - 1)).astype(np.float32)
        return (np.sign(rows).astype(np.float32) * magnitude).reshape(codes.shape)
    if enc.kind == "group_codebook":
        rows = codes.reshape(codes.shape[0], math.prod(codes.shape[1:])).astype(np.int64)
        group = np.arange(rows.shape[1]) // enc.meta["group_size"]
        row = np.arange(rows.shape[0])[:, None]
        return p["codebook"].astype(np.float32)[row, group[None, :], rows].reshape(codes.shape)
    raise _unknown(enc.kind, "")


# ---------------------------------------------------------------------------- checks shared by codecs


def _short(value: object, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (hostile values can be huge)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_shape(shape: object, where: str) -> tuple[tuple[int, ...], int]:
    """A shape list as a tuple, and its element count (Python ints, capped).

    Every dim is an int from 0 to ``MAX_ELEMENTS`` and the non-zero dims
    multiply to at most ``MAX_ELEMENTS``, so zero-size shapes stay within
    numpy's reach too.
    """
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_NDIM:
        raise _fail("bad-shape", where, f"shape must be a list of at most {MAX_NDIM} ints, got {_short(shape)}")
    if not all(_is_int(d) and 0 <= d <= MAX_ELEMENTS for d in shape):
        raise _fail("bad-shape", where, f"shape dims must be ints from 0 to {MAX_ELEMENTS}, got {_short(shape)}")
    shape = tuple(int(d) for d in shape)
    nonzero = math.prod(d for d in shape if d)
    if nonzero > MAX_ELEMENTS:
        raise _fail("bad-shape", where, f"shape {_short(list(shape))}: its non-zero dims multiply to {nonzero}, "
                                        f"more than the cap {MAX_ELEMENTS}")
    return shape, math.prod(shape)


def _check_meta_int(meta: dict[str, Any], key: str, where: str, low: int, high: int) -> int:
    value = meta.get(key)
    if not _is_int(value) or not low <= value <= high:
        raise _fail("bad-meta", where, f"meta {key!r} must be an int from {low} to {high}, got {_short(value)}")
    return int(value)


def _check_axis(meta: dict[str, Any], ndim: int, where: str) -> int | None:
    axis = meta.get("axis")
    if axis is not None and not (_is_int(axis) and 0 <= axis < ndim):
        raise _fail("bad-meta", where, f"meta 'axis' must be None or an int in [0, {ndim}), got {_short(axis)}")
    return None if axis is None else int(axis)


def _describe(x: object) -> str:
    return f"{x.dtype} array" if isinstance(x, np.ndarray) else type(x).__name__


def _check_array(x: object, dtype: np.dtype | type, where: str, what: str) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype != np.dtype(dtype):
        raise _fail("bad-dtype", where, f"{what} must be a {np.dtype(dtype).name} array, got {_describe(x)}")
    return x


def _check_channel_param(p: np.ndarray, axis: int | None, shape: tuple[int, ...], where: str, what: str) -> None:
    """A per-tensor (0-d) or per-channel (1-D, length 1 or shape[axis]) parameter."""
    lengths = {1} if axis is None else {1, shape[axis]}
    if not (p.ndim == 0 or (p.ndim == 1 and p.shape[0] in lengths)):
        valid = "a 0-d array" + ("" if axis is None else f" or 1-D of length {shape[axis]} (axis {axis})")
        raise _fail("bad-shape", where, f"{what} of shape {p.shape} does not fit shape {list(shape)}; valid: {valid}")


def _check_scale(scale: np.ndarray, axis: int | None, shape: tuple[int, ...], where: str) -> None:
    _check_array(scale, np.float32, where, "scale")
    _check_channel_param(scale, axis, shape, where, "scale")
    bad = ~(np.isfinite(scale) & (scale > 0))
    if bad.any():
        raise _fail("bad-scale", where, f"scale must be finite and > 0, got {scale[bad].reshape(-1)[:4].tolist()}")


def _check_codes_range(codes: np.ndarray, low: int, high: int, where: str, code: str = "bad-code") -> None:
    if codes.size and (int(codes.min()) < low or int(codes.max()) > high):
        raise _fail(code, where, f"codes span [{int(codes.min())}, {int(codes.max())}], valid is [{low}, {high}]")


def _unknown(kind: object, where: str) -> FormatError:
    prefix = f"{where}: " if where else ""
    valid = ", ".join(codec_names())
    return FormatError("unknown-codec", f"{prefix}unknown codec {_short(kind)}; valid codecs: {valid}")


# ---------------------------------------------------------------------------- codecs


class Codec:
    """One stored representation. ``encode`` / ``decode`` are bit-exact inverses.

    Subclasses set ``name``, ``arrays`` (the stored array names), the range
    of ``bits``, and implement ``check`` (validate a NumpyEncoded), ``pack``
    (NumpyEncoded -> arrays) and ``unpack`` (arrays -> NumpyEncoded).
    """

    name: ClassVar[str]
    arrays: ClassVar[tuple[str, ...]]
    min_bits: ClassVar[int] = 1
    max_bits: ClassVar[int] = 16

    def encode(self, enc: NumpyEncoded, name: str = "") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Validate ``enc`` and return its stored arrays and JSON-able meta."""
        where = _where(name)
        bad = [k for k in RESERVED_META if k in enc.meta]
        if bad:
            raise ConfigError(f"{where}: meta keys {bad} are reserved for the stored form")
        if not _is_int(enc.bits) or not self.min_bits <= enc.bits <= self.max_bits:
            valid = f"{self.min_bits}..{self.max_bits}"
            raise _fail("bad-bits", where, f"{self.name} bits must be {valid}, got {enc.bits!r}")
        enc = self.normalize(enc, where)
        self.check(enc, where)
        _check_shape(list(enc.codes.shape), where)
        arrays = self.pack(enc)
        meta = {"codec": self.name, "shape": list(enc.codes.shape), "bits": enc.bits, **enc.meta}
        try:
            json.dumps(meta, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: meta must be JSON-able (ints, floats, str, lists, dicts): {exc}") from None
        return arrays, meta

    def decode(self, arrays: dict[str, np.ndarray], meta: dict[str, Any], name: str = "") -> NumpyEncoded:
        """Validate stored ``arrays`` / ``meta`` and rebuild the NumpyEncoded."""
        where = _where(name)
        if not isinstance(meta, dict) or not isinstance(arrays, dict):
            got = f"{type(arrays).__name__}, {type(meta).__name__}"
            raise _fail("bad-meta", where, f"arrays and meta must be dicts, got {got}")
        shape, n = _check_shape(meta.get("shape"), where)
        bits = meta.get("bits")
        if not _is_int(bits) or not self.min_bits <= bits <= self.max_bits:
            valid = f"{self.min_bits}..{self.max_bits}"
            raise _fail("bad-bits", where, f"{self.name} bits must be {valid}, got {_short(bits)}")
        if set(arrays) != set(self.arrays) - self.optional_arrays(meta):
            expected = sorted(set(self.arrays) - self.optional_arrays(meta))
            raise _fail("bad-arrays", where, f"codec {self.name!r} stores arrays {expected}, got {sorted(arrays)}")
        enc_meta = {k: v for k, v in meta.items() if k not in RESERVED_META}
        enc = self.unpack(arrays, shape, n, bits, enc_meta, where)
        self.check(enc, where)
        return enc

    def optional_arrays(self, meta: dict[str, Any]) -> set[str]:
        """Arrays of ``self.arrays`` that this ``meta`` does not store."""
        return set()

    def normalize(self, enc: NumpyEncoded, where: str) -> NumpyEncoded:
        """Coerce codes to int64 and params to their dtypes (as base.decode's ``.long()`` / ``.float()``)."""
        if not isinstance(enc.codes, np.ndarray) or enc.codes.dtype.kind not in "iu":
            raise _fail("bad-dtype", where, f"codes must be an integer ndarray, got {_describe(enc.codes)}")
        params = {k: np.asarray(v, dtype=_PARAM_DTYPES.get(k)) for k, v in enc.params.items()}
        return NumpyEncoded(enc.kind, enc.codes.astype(np.int64), int(enc.bits), params, dict(enc.meta))

    def check(self, enc: NumpyEncoded, where: str) -> None:
        raise NotImplementedError

    def pack(self, enc: NumpyEncoded) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def unpack(
        self, arrays: dict[str, np.ndarray], shape: tuple[int, ...], n: int, bits: int, meta: dict[str, Any], where: str
    ) -> NumpyEncoded:
        raise NotImplementedError

    def _check_params(self, enc: NumpyEncoded, names: set[str], where: str) -> None:
        if set(enc.params) != names:
            raise _fail("bad-param", where, f"{self.name} params must be {sorted(names)}, got {sorted(enc.params)}")

    def _unpack_codes(self, arrays: dict[str, np.ndarray], n: int, bits: int, where: str) -> np.ndarray:
        return unpack_codes(_check_array(arrays["codes"], np.uint8, where, "codes"), n, bits, where)


class FloatCodec(Codec):
    """Raw IEEE floats, kept bit for bit (NaN payloads and -0.0 included)."""

    arrays = ("data",)

    def __init__(self, dtype: type) -> None:
        self.dtype = np.dtype(dtype)
        self.name = self.dtype.name
        self.min_bits = self.max_bits = 8 * self.dtype.itemsize

    def normalize(self, enc: NumpyEncoded, where: str) -> NumpyEncoded:
        return enc

    def check(self, enc: NumpyEncoded, where: str) -> None:
        _check_array(enc.codes, self.dtype, where, "data")
        if enc.params:
            raise _fail("bad-param", where, f"raw {self.name} tensors take no params, got {sorted(enc.params)}")

    def pack(self, enc: NumpyEncoded) -> dict[str, np.ndarray]:
        return {"data": np.asarray(enc.codes, order="C")}

    def unpack(self, arrays, shape, n, bits, meta, where):  # type: ignore[no-untyped-def]
        data = _check_array(arrays["data"], self.dtype, where, "data")
        if data.shape != shape:
            raise _fail("bad-shape", where, f"data has shape {list(data.shape)}, meta says {list(shape)}")
        return NumpyEncoded(self.name, data.copy(), bits, {}, meta)


class AffineCodec(Codec):
    """k-bit affine codes: value ``(code - zero_point) * scale``, stored as ``code - qmin``."""

    name = "affine"
    arrays = ("codes", "scale", "zero_point")

    def check(self, enc: NumpyEncoded, where: str) -> None:
        self._check_params(enc, {"scale", "zero_point"}, where)
        shape = enc.codes.shape
        axis = _check_axis(enc.meta, len(shape), where)
        qmin = _check_meta_int(enc.meta, "qmin", where, -(2**31), 2**31)
        qmax = _check_meta_int(enc.meta, "qmax", where, qmin, qmin + 2**enc.bits - 1)
        _check_codes_range(enc.codes, qmin, qmax, where)
        _check_scale(enc.params["scale"], axis, shape, where)
        zero = _check_array(enc.params["zero_point"], np.int64, where, "zero_point")
        _check_channel_param(zero, axis, shape, where, "zero_point")
        if zero.size and int(np.abs(zero).max()) > MAX_ZERO_POINT:
            raise _fail("bad-param", where, f"|zero_point| must be at most {MAX_ZERO_POINT}")

    def pack(self, enc: NumpyEncoded) -> dict[str, np.ndarray]:
        zero = enc.params["zero_point"]
        if zero.size > 1 and bool((zero == zero.flat[0]).all()):
            zero = zero.reshape(-1)[:1].reshape(())  # one shared zero point (symmetric: 0) is stored once
        return {
            "codes": pack_codes(enc.codes - enc.meta["qmin"], enc.bits),
            "scale": enc.params["scale"],
            "zero_point": zero,
        }

    def unpack(self, arrays, shape, n, bits, meta, where):  # type: ignore[no-untyped-def]
        qmin = _check_meta_int(meta, "qmin", where, -(2**31), 2**31)
        codes = self._unpack_codes(arrays, n, bits, where)
        codes += qmin
        params = {"scale": arrays["scale"], "zero_point": arrays["zero_point"]}
        return NumpyEncoded(self.name, codes.reshape(shape), bits, params, meta)


class LogCodec(Codec):
    """Power-of-two codes: value ``sign * 2**(fsr - 2**bits + code)``, code 0 = zero; sign as 1 bit."""

    name = "log"
    arrays = ("codes", "sign")

    def optional_arrays(self, meta: dict[str, Any]) -> set[str]:
        return set() if meta.get("signed") else {"sign"}

    def check(self, enc: NumpyEncoded, where: str) -> None:
        signed = enc.meta.get("signed", False)
        if not isinstance(signed, bool):
            raise _fail("bad-meta", where, f"meta 'signed' must be a bool, got {_short(signed)}")
        self._check_params(enc, {"sign"} if signed else set(), where)
        _check_meta_int(enc.meta, "fsr", where, -MAX_FSR, MAX_FSR)
        _check_codes_range(enc.codes, 0, 2**enc.bits - 1, where)
        if signed:
            sign = _check_array(enc.params["sign"], np.int8, where, "sign")
            if sign.shape != enc.codes.shape:
                raise _fail("bad-shape", where, f"sign has shape {list(sign.shape)}, codes {list(enc.codes.shape)}")
            if not np.isin(sign, (-1, 1)).all():
                raise _fail("bad-param", where, "sign values must be -1 or +1")

    def pack(self, enc: NumpyEncoded) -> dict[str, np.ndarray]:
        arrays = {"codes": pack_codes(enc.codes, enc.bits)}
        if enc.meta.get("signed"):
            arrays["sign"] = pack_codes((enc.params["sign"] > 0).astype(np.uint8), 1)
        return arrays

    def unpack(self, arrays, shape, n, bits, meta, where):  # type: ignore[no-untyped-def]
        codes = self._unpack_codes(arrays, n, bits, where).reshape(shape)
        params = {}
        if meta.get("signed"):
            bit = unpack_codes(_check_array(arrays["sign"], np.uint8, where, "sign"), n, 1, where)
            params["sign"] = np.where(bit == 1, 1, -1).astype(np.int8).reshape(shape)
        return NumpyEncoded(self.name, codes, bits, params, meta)


class ScaledCodec(Codec):
    """Codes in ``[low, high]`` times a float32 scale (per tensor or along ``meta["axis"]``)."""

    arrays = ("codes", "scale")
    low: ClassVar[int]
    high: ClassVar[int]

    def check(self, enc: NumpyEncoded, where: str) -> None:
        self._check_params(enc, {"scale"}, where)
        axis = _check_axis(enc.meta, enc.codes.ndim, where)
        _check_codes_range(enc.codes, self.low, self.high, where)
        _check_scale(enc.params["scale"], axis, enc.codes.shape, where)


class BinaryCodec(ScaledCodec):
    """+-1 codes (1 = +1) as sign rows along the reduction axis (see bitpack), value ``(2 code - 1) * scale``."""

    name = "binary"
    arrays = ("signs", "scale")
    min_bits = max_bits = 1
    low, high = 0, 1

    def pack(self, enc: NumpyEncoded) -> dict[str, np.ndarray]:
        return {"signs": pack_rows(to_reduction_rows(enc.codes) == 1), "scale": enc.params["scale"]}

    def unpack(self, arrays, shape, n, bits, meta, where):  # type: ignore[no-untyped-def]
        rows, k = reduction_shape(shape)
        signs = _check_array(arrays["signs"], np.uint64, where, "signs")
        if signs.ndim != 2 or signs.shape[0] != rows:
            raise _fail("bad-shape", where, f"signs of shape {list(signs.shape)} do not hold {rows} rows")
        codes = from_reduction_rows(unpack_rows(signs, k, where).astype(np.int64), shape)
        return NumpyEncoded(self.name, codes, bits, {"scale": arrays["scale"]}, meta)


class TernaryCodec(ScaledCodec):
    """Codes in {-1, 0, +1} stored as ``code + 1`` in 2 bits, value ``code * scale``."""

    name = "ternary"
    min_bits = max_bits = 2
    low, high = -1, 1

    def pack(self, enc: NumpyEncoded) -> dict[str, np.ndarray]:
        return {"codes": pack_codes(enc.codes + 1, 2), "scale": enc.params["scale"]}

    def unpack(self, arrays, shape, n, bits, meta, where):  # type: ignore[no-untyped-def]
        codes = self._unpack_codes(arrays, n, 2, where)
        codes -= 1
        return NumpyEncoded(self.name, codes.reshape(shape), bits, {"scale": arrays["scale"]}, meta)


class CodebookCodec(Codec):
    """k-bit indices into a float32 codebook of K <= 2**bits entries, value ``codebook[code]``."""

    name = "codebook"
    arrays = ("codes", "codebook")

    def check(self, enc: NumpyEncoded, where: str) -> None:
        self._check_params(enc, {"codebook"}, where)
        book = _check_array(enc.params["codebook"], np.float32, where, "codebook")
        if book.ndim != 1 or not 1 <= book.size <= 2**enc.bits:
            raise _fail("bad-shape", where, f"codebook must be 1-D with 1..{2**enc.bits} entries, got {book.shape}")
        if not np.isfinite(book).all():
            raise _fail("bad-value", where, "codebook holds NaN or Inf")
        _check_codes_range(enc.codes, 0, book.size - 1, where, code="bad-index")

    def pack(self, enc: NumpyEncoded) -> dict[str, np.ndarray]:
        return {"codes": pack_codes(enc.codes, enc.bits), "codebook": enc.params["codebook"]}

    def unpack(self, arrays, shape, n, bits, meta, where):  # type: ignore[no-untyped-def]
        codes = self._unpack_codes(arrays, n, bits, where).reshape(shape)
        return NumpyEncoded(self.name, codes, bits, {"codebook": arrays["codebook"]}, meta)


def _groups(shape: tuple[int, ...], meta: dict[str, Any], where: str, codec: str) -> tuple[int, int]:
    """(O, G) of a group-wise tensor of ``shape``: at least 2-D, G = ceil(prod(shape[1:]) / group_size)."""
    if len(shape) < 2:
        raise _fail("bad-shape", where, f"{codec} tensors have at least 2 dims, got shape {list(shape)}")
    group_size = _check_meta_int(meta, "group_size", where, 1, 2**31)
    return shape[0], -(-math.prod(shape[1:]) // group_size)


def _check_group_scale(scale: np.ndarray, groups: tuple[int, int], where: str) -> None:
    """A float32 [O, G] scale, finite and > 0."""
    _check_array(scale, np.float32, where, "scale")
    if scale.shape != groups:
        raise _fail("bad-shape", where, f"scale of shape {list(scale.shape)} does not fit {list(groups)} "
                                        f"(output channels, groups)")
    bad = ~(np.isfinite(scale) & (scale > 0))
    if bad.any():
        raise _fail("bad-scale", where, f"scale must be finite and > 0, got {scale[bad].reshape(-1)[:4].tolist()}")


class GroupAffineCodec(Codec):
    """k-bit affine codes with a scale (and zero point) per group of ``group_size`` consecutive values of each row
    ``[O, K]``: value ``(code - zero_point[o, c // g]) * scale[o, c // g]``; codes and zero points bit-packed."""

    name = "group_affine"
    arrays = ("codes", "scale", "zero_point")

    def optional_arrays(self, meta: dict[str, Any]) -> set[str]:
        return {"zero_point"} if meta.get("symmetric") is True else set()

    def check(self, enc: NumpyEncoded, where: str) -> None:
        symmetric = enc.meta.get("symmetric")
        if not isinstance(symmetric, bool):
            raise _fail("bad-meta", where, f"meta 'symmetric' must be a bool, got {_short(symmetric)}")
        self._check_params(enc, {"scale"} if symmetric else {"scale", "zero_point"}, where)
        groups = _groups(enc.codes.shape, enc.meta, where, self.name)
        qmin = _check_meta_int(enc.meta, "qmin", where, -(2**31), 2**31)
        qmax = _check_meta_int(enc.meta, "qmax", where, qmin, qmin + 2**enc.bits - 1)
        _check_codes_range(enc.codes, qmin, qmax, where)
        _check_group_scale(enc.params["scale"], groups, where)
        if not symmetric:
            zero = _check_array(enc.params["zero_point"], np.int64, where, "zero_point")
            if zero.shape != groups:
                raise _fail("bad-shape", where, f"zero_point of shape {list(zero.shape)} does not fit "
                                                f"{list(groups)} (output channels, groups)")
            _check_codes_range(zero, qmin, qmax, where, code="bad-param")

    def pack(self, enc: NumpyEncoded) -> dict[str, np.ndarray]:
        qmin = enc.meta["qmin"]
        arrays = {"codes": pack_codes(enc.codes - qmin, enc.bits), "scale": enc.params["scale"]}
        if not enc.meta["symmetric"]:
            arrays["zero_point"] = pack_codes(enc.params["zero_point"] - qmin, enc.bits)
        return arrays

    def unpack(self, arrays, shape, n, bits, meta, where):  # type: ignore[no-untyped-def]
        qmin = _check_meta_int(meta, "qmin", where, -(2**31), 2**31)
        codes = self._unpack_codes(arrays, n, bits, where)
        codes += qmin
        params = {"scale": arrays["scale"]}
        if meta.get("symmetric") is not True:
            groups = _groups(shape, meta, where, self.name)
            packed = _check_array(arrays["zero_point"], np.uint8, where, "zero_point")
            zero = unpack_codes(packed, groups[0] * groups[1], bits, where)
            params["zero_point"] = (zero + qmin).reshape(groups)
        return NumpyEncoded(self.name, codes.reshape(shape), bits, params, meta)


class GroupScaledCodec(Codec):
    """Codes in ``[low, high]`` (stored as ``code - low``) times a float32 scale per group of ``group_size``
    consecutive values of each row ``[O, K]``, as :class:`GroupAffineCodec`."""

    arrays = ("codes", "scale")
    low: ClassVar[int]
    high: ClassVar[int]

    def check(self, enc: NumpyEncoded, where: str) -> None:
        self._check_params(enc, {"scale"}, where)
        groups = _groups(enc.codes.shape, enc.meta, where, self.name)
        _check_codes_range(enc.codes, self.low, self.high, where)
        _check_group_scale(enc.params["scale"], groups, where)

    def pack(self, enc: NumpyEncoded) -> dict[str, np.ndarray]:
        return {"codes": pack_codes(enc.codes - self.low, self.min_bits), "scale": enc.params["scale"]}

    def unpack(self, arrays, shape, n, bits, meta, where):  # type: ignore[no-untyped-def]
        codes = self._unpack_codes(arrays, n, self.min_bits, where)
        codes += self.low
        return NumpyEncoded(self.name, codes.reshape(shape), bits, {"scale": arrays["scale"]}, meta)


class GroupBinaryCodec(GroupScaledCodec):
    """Codes {0, 1} (1 = +1) in 1 bit, value ``(2 code - 1) * scale[o, c // g]``."""

    name = "group_binary"
    min_bits = max_bits = 1
    low, high = 0, 1


class GroupTernaryCodec(GroupScaledCodec):
    """Codes {-1, 0, 1} as ``code + 1`` in 2 bits (3 is invalid), value ``code * scale[o, c // g]``."""

    name = "group_ternary"
    min_bits = max_bits = 2
    low, high = -1, 1


class GroupLogCodec(Codec):
    """Signed power-of-two codes in ``[-E, E]``, E = 2**(bits-1) - 1, stored as ``code + E``; value
    ``sign(code) * scale[o, c // g] * 2**(|code| - E)`` (code 0 is 0); rows and groups as
    :class:`GroupAffineCodec`."""

    name = "group_log"
    arrays = ("codes", "scale")
    min_bits, max_bits = 2, 8

    def check(self, enc: NumpyEncoded, where: str) -> None:
        self._check_params(enc, {"scale"}, where)
        groups = _groups(enc.codes.shape, enc.meta, where, self.name)
        levels = 2 ** (enc.bits - 1) - 1
        _check_codes_range(enc.codes, -levels, levels, where)
        _check_group_scale(enc.params["scale"], groups, where)

    def pack(self, enc: NumpyEncoded) -> dict[str, np.ndarray]:
        return {"codes": pack_codes(enc.codes + 2 ** (enc.bits - 1) - 1, enc.bits), "scale": enc.params["scale"]}

    def unpack(self, arrays, shape, n, bits, meta, where):  # type: ignore[no-untyped-def]
        codes = self._unpack_codes(arrays, n, bits, where)
        codes -= 2 ** (bits - 1) - 1
        return NumpyEncoded(self.name, codes.reshape(shape), bits, {"scale": arrays["scale"]}, meta)


class GroupCodebookCodec(Codec):
    """k-bit indices into a float32 codebook per group, ``codebook`` [O, G, K] (1 <= K <= 2**bits, finite),
    value ``codebook[o, c // g, code]``; rows and groups as :class:`GroupAffineCodec`."""

    name = "group_codebook"
    arrays = ("codes", "codebook")
    max_bits = 8

    def check(self, enc: NumpyEncoded, where: str) -> None:
        self._check_params(enc, {"codebook"}, where)
        groups = _groups(enc.codes.shape, enc.meta, where, self.name)
        book = _check_array(enc.params["codebook"], np.float32, where, "codebook")
        if book.ndim != 3 or book.shape[:2] != groups or not 1 <= book.shape[2] <= 2**enc.bits:
            raise _fail("bad-shape", where, f"codebook of shape {list(book.shape)} does not fit {list(groups)} "
                                            f"(output channels, groups) x 1..{2**enc.bits} entries")
        if not np.isfinite(book).all():
            raise _fail("bad-value", where, "codebook holds NaN or Inf")
        _check_codes_range(enc.codes, 0, book.shape[2] - 1, where, code="bad-index")

    def pack(self, enc: NumpyEncoded) -> dict[str, np.ndarray]:
        return {"codes": pack_codes(enc.codes, enc.bits), "codebook": enc.params["codebook"]}

    def unpack(self, arrays, shape, n, bits, meta, where):  # type: ignore[no-untyped-def]
        codes = self._unpack_codes(arrays, n, bits, where).reshape(shape)
        return NumpyEncoded(self.name, codes, bits, {"codebook": arrays["codebook"]}, meta)


_CODECS: dict[str, Codec] = {
    codec.name: codec
    for codec in (
        FloatCodec(np.float32),
        FloatCodec(np.float16),
        AffineCodec(),
        LogCodec(),
        BinaryCodec(),
        TernaryCodec(),
        CodebookCodec(),
        GroupAffineCodec(),
        GroupBinaryCodec(),
        GroupTernaryCodec(),
        GroupCodebookCodec(),
        GroupLogCodec(),
    )
}


def codec_names() -> list[str]:
    """The codec names, sorted."""
    return sorted(_CODECS)


def get_codec(name: str, tensor: str = "") -> Codec:
    """The codec called ``name``; ``FormatError("unknown-codec")`` lists the valid ones."""
    if not isinstance(name, str) or name not in _CODECS:
        raise _unknown(name, _where(tensor) if tensor else "")
    return _CODECS[name]


def encode(enc: NumpyEncoded, name: str = "") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Store ``enc`` (tensor ``name``) with the codec of its kind: ``(arrays, meta)``."""
    return get_codec(enc.kind, name).encode(enc, name)


def decode(arrays: dict[str, np.ndarray], meta: dict[str, Any], name: str = "") -> NumpyEncoded:
    """Rebuild the NumpyEncoded of tensor ``name`` from its stored arrays and meta (validated)."""
    if not isinstance(meta, dict):
        raise _fail("bad-meta", _where(name), f"meta must be a dict, got {type(meta).__name__}")
    return get_codec(meta.get("codec"), name).decode(arrays, meta, name)
