"""Bit packing: dense k-bit codes and sign bits in 64-bit words (numpy only).

Dense codes
    ``pack_codes(codes, bits)`` stores ``n`` unsigned codes of ``bits`` bits
    (1..32) in exactly ``ceil(n * bits / 8)`` bytes. The bytes form one
    little-endian bit stream, LSB first: code ``i`` occupies stream bits
    ``[i * bits, (i + 1) * bits)`` and its least significant bit comes first.
    The unused high bits of the last byte are zero; ``unpack_codes`` checks
    that (``FormatError`` code ``"bad-padding"``) as well as the length
    (``"bad-length"``).

Sign bits for binary layers
    A binary weight or activation is +1 where the value is ``>= 0`` (so
    sign(0) = sign(-0.0) = +1, and NaN, which is not ``>= 0``, packs as -1) and
    bit 1 stands for +1. Each row of ``K`` bits (one output channel of a
    weight, one patch of an activation) is packed little-endian, LSB first,
    into ``ceil(K / 64)`` uint64 words: element ``j`` is bit ``j % 64`` of word
    ``j // 64``. The tail of the last word (bits ``K % 64`` .. 63 when ``K`` is
    not a multiple of 64) is zero. It never changes a result because ``K`` is
    always known: ``K - 2 * popcount(a XOR w)`` counts only the first ``K``
    bits when both operands have zero tails (0 XOR 0 = 0).

Reduction order
    ``to_reduction_rows`` turns a weight ``[C_out, C_in, *kernel]`` into rows
    ``[C_out, K]`` with ``K = C_in * prod(kernel)`` ordered "input channels,
    then kernel positions": the input channel varies fastest, so for a conv
    weight ``[C_out, C_in, kh, kw]`` element ``(o, c, y, x)`` sits at
    ``k = (y * kw + x) * C_in + c`` of row ``o``. A linear weight ``[out, in]``
    is already in rows; a 1-D tensor is one row; a scalar is one row of one.

Public API: ``packed_size``, ``pack_codes``, ``unpack_codes``,
``pack_rows``, ``unpack_rows``, ``pack_signs``, ``to_reduction_rows``,
``reduction_shape``, ``from_reduction_rows``; ``write_fields`` is the
shared bit writer; ``element_budget`` is the decoded-size cap shared by the
entropy coders and the container.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ConfigError, FormatError

#: most elements (codes, symbols) one tensor or stream may hold; also the largest dimension
MAX_ELEMENTS = 2**31
#: a coded stream (ANS, sparse) and a whole file decode to at most MIN_ELEMENT_BUDGET + MAX_EXPANSION x their bytes
MAX_EXPANSION = 256
MIN_ELEMENT_BUDGET = 1 << 20
#: widest code that :func:`pack_codes` stores
MAX_CODE_BITS = 32
#: bits in one word of packed sign rows
WORD_BITS = 64

_LE_U64 = np.dtype("<u8")
#: codes per packing step: a multiple of 8, so each step starts on a byte; small enough to stay in cache
_CHUNK = 1 << 16


def packed_size(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take: ``ceil(n * bits / 8)`` (Python ints)."""
    return (int(n) * int(bits) + 7) // 8


def element_budget(nbytes: int) -> int:
    """Most elements that ``nbytes`` stored bytes may decode to: ``MIN_ELEMENT_BUDGET + MAX_EXPANSION * nbytes``."""
    return MIN_ELEMENT_BUDGET + MAX_EXPANSION * int(nbytes)


def _check_bits(bits: object, error: type[Exception], what: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= MAX_CODE_BITS:
        message = f"{what}: code width must be an integer from 1 to {MAX_CODE_BITS} bits, got {bits!r}"
        raise FormatError("bad-bits", message) if error is FormatError else ConfigError(message)
    return int(bits)


def write_fields(
    values: np.ndarray, widths: np.ndarray | int, offsets: np.ndarray | None, total_bits: int
) -> np.ndarray:
    """Write unsigned ``values`` (each below ``2**width``, width <= 32) at bit ``offsets``.

    ``widths`` is one int or one per value; ``offsets=None`` with an int width
    means back to back from bit 0. Fields must not overlap and offsets must
    be non-decreasing. Returns ``ceil(total_bits / 8)`` bytes of an LSB-first
    little-endian stream. Shared by the dense packer and the Huffman encoder.
    """
    words = np.zeros((total_bits + WORD_BITS - 1) // WORD_BITS + 1, dtype=np.uint64)
    for start in range(0, values.size, _CHUNK):
        value = values[start : start + _CHUNK].astype(np.uint64)
        if offsets is None:
            offset = np.arange(start, start + value.size, dtype=np.int64) * int(widths)  # type: ignore[arg-type]
            width = np.uint64(widths)
        else:
            offset = offsets[start : start + _CHUNK]
            width = np.asarray(widths)[start : start + _CHUNK].astype(np.uint64)
        word = offset >> 6
        shift = (offset & 63).astype(np.uint64)
        firsts = np.flatnonzero(np.diff(word, prepend=-1))
        words[word[firsts]] |= np.bitwise_or.reduceat(value << shift, firsts)
        spill = shift + width > WORD_BITS
        words[word[spill] + 1] |= value[spill] >> (np.uint64(WORD_BITS) - shift[spill])
    return words.astype(_LE_U64, copy=False).view(np.uint8)[: (total_bits + 7) // 8].copy()


def _as_words(data: np.ndarray) -> np.ndarray:
    """Bytes as little-endian uint64 words, zero-padded with one spare word."""
    padded = np.zeros(((data.size + 7) // 8 + 1) * 8, dtype=np.uint8)
    padded[: data.size] = data
    return padded.view(_LE_U64).astype(np.uint64, copy=False)


def _check_bytes(data: object, expected: int, name: str) -> np.ndarray:
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 1:
        raise FormatError("bad-dtype", f"{name}: packed data must be a 1-D uint8 array, got {_describe(data)}")
    if data.size != expected:
        raise FormatError("bad-length", f"{name}: packed data holds {data.size} bytes, expected {expected}")
    return data


def _describe(x: object) -> str:
    if isinstance(x, np.ndarray):
        return f"{x.dtype} array of shape {x.shape}"
    return type(x).__name__


def pack_codes(codes: np.ndarray, bits: int, name: str = "codes") -> np.ndarray:
    """Pack unsigned integer codes (each in ``[0, 2**bits)``) densely, LSB first.

    Returns ``ceil(codes.size * bits / 8)`` uint8 bytes; raises ``FormatError``
    ``"bad-code"`` for a code out of range and ``ConfigError`` for a bad width.
    """
    bits = _check_bits(bits, ConfigError, name)
    codes = np.asarray(codes).reshape(-1)
    if codes.size and codes.dtype.kind not in "iu":
        raise ConfigError(f"{name}: codes must be integers, got dtype {codes.dtype}")
    if codes.size and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise FormatError(
            "bad-code", f"{name}: codes span [{int(codes.min())}, {int(codes.max())}], valid is [0, {(1 << bits) - 1}]"
        )
    return write_fields(codes, bits, None, codes.size * bits)


def unpack_codes(data: np.ndarray, n: int, bits: int, name: str = "codes") -> np.ndarray:
    """Inverse of :func:`pack_codes`: ``n`` codes of ``bits`` bits as int64.

    Raises ``FormatError`` when ``data`` is not ``ceil(n * bits / 8)`` uint8
    bytes (``"bad-length"``) or the unused bits of the last byte are not zero
    (``"bad-padding"``).
    """
    bits = _check_bits(bits, FormatError, name)
    total_bits = int(n) * bits
    data = _check_bytes(data, packed_size(n, bits), name)
    if total_bits % 8 and int(data[-1]) >> (total_bits % 8):
        raise FormatError("bad-padding", f"{name}: unused bits after the last code are not zero")
    out = np.empty(int(n), dtype=np.int64)
    offsets = np.arange(min(int(n), _CHUNK), dtype=np.int64) * bits
    mask = np.uint64((1 << bits) - 1)
    for start in range(0, int(n), _CHUNK):
        count = min(_CHUNK, int(n) - start)
        words = _as_words(data[start * bits // 8 : (start + count) * bits // 8 + 8])
        word = offsets[:count] >> 6
        shift = (offsets[:count] & 63).astype(np.uint64)
        value = (words[word] >> shift) | (words[word + 1] << (np.uint64(WORD_BITS) - shift))
        out[start : start + count] = value & mask
    return out


def pack_rows(bits: np.ndarray) -> np.ndarray:
    """Pack a boolean matrix ``[rows, K]`` into uint64 words ``[rows, ceil(K / 64)]``.

    Element ``j`` of a row is bit ``j % 64`` of word ``j // 64``; the tail of
    the last word is zero.
    """
    bits = np.asarray(bits, dtype=bool)
    if bits.ndim != 2:
        raise ConfigError(f"sign rows must be a 2-D [rows, K] array, got shape {bits.shape}")
    rows, k = bits.shape
    n_words = (k + WORD_BITS - 1) // WORD_BITS
    padded = np.zeros((rows, n_words * WORD_BITS), dtype=bool)
    padded[:, :k] = bits
    packed = np.packbits(padded, axis=1, bitorder="little")
    return np.ascontiguousarray(packed).view(_LE_U64).astype(np.uint64, copy=False).reshape(rows, n_words)


def unpack_rows(words: np.ndarray, k: int, name: str = "sign bits") -> np.ndarray:
    """Inverse of :func:`pack_rows`: a boolean ``[rows, k]`` matrix.

    Raises ``FormatError`` if ``words`` is not a uint64 ``[rows, ceil(k / 64)]``
    array (``"bad-shape"``) or a tail bit is set (``"bad-padding"``).
    """
    n_words = (int(k) + WORD_BITS - 1) // WORD_BITS
    if not isinstance(words, np.ndarray) or words.dtype != np.uint64 or words.ndim != 2 or words.shape[1] != n_words:
        raise FormatError(
            "bad-shape", f"{name}: expected a uint64 array [rows, {n_words}] for K={k}, got {_describe(words)}"
        )
    raw = np.ascontiguousarray(words.astype(_LE_U64, copy=False)).view(np.uint8)
    bits = np.unpackbits(raw, axis=1, bitorder="little").astype(bool)
    if bits[:, k:].any():
        raise FormatError("bad-padding", f"{name}: bits past K={k} in the last word of a row are not zero")
    return bits[:, :k]


def pack_signs(x: np.ndarray) -> np.ndarray:
    """Sign-pack real rows ``[rows, K]``: bit 1 where ``x >= 0`` (+1), else bit 0 (-1)."""
    return pack_rows(np.asarray(x) >= 0)


def reduction_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(rows, K)`` of a tensor of ``shape`` seen as reduction rows (Python ints)."""
    shape = tuple(int(d) for d in shape)
    if len(shape) <= 1:
        return 1, math.prod(shape)
    return shape[0], math.prod(shape[1:])


def to_reduction_rows(x: np.ndarray) -> np.ndarray:
    """View a tensor ``[C_out, C_in, *kernel]`` as rows ``[C_out, K]``, input channel fastest."""
    x = np.asarray(x)
    rows_shape = reduction_shape(x.shape)
    if x.ndim > 2:
        x = np.moveaxis(x, 1, -1)
    return x.reshape(rows_shape)


def from_reduction_rows(rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`to_reduction_rows` for a tensor of ``shape``."""
    shape = tuple(int(d) for d in shape)
    if len(shape) <= 2:
        return rows.reshape(shape)
    moved = rows.reshape((shape[0], *shape[2:], shape[1]))
    return np.ascontiguousarray(np.moveaxis(moved, -1, 1))
