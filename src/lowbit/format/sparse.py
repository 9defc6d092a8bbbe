"""Relative-index sparse coding of Deep Compression (Han, Mao, Dally, ICLR 2016, Sec. 2, Fig. 2).

Input is a flat array of non-negative value codes where code 0 means a zero
weight (so a codebook used with it must give index 0 to the value 0). Each
stored entry is ``(gap, code)``: ``gap`` counts the zeros skipped since the
previous stored entry (before the first entry: since the start), so the
entry sits at position ``previous + gap + 1`` with ``previous = -1`` at the
start. A gap is stored in ``index_bits`` bits, at most ``2**index_bits - 1``;
when a run of zeros is longer, a filler entry with code 0 is stored after
``2**index_bits - 1`` zeros, i.e. the position difference between two stored
entries is at most ``2**index_bits`` (the paper's "8" for a 3-bit index). The
paper uses 8 bits for conv layers and 5 for fully connected layers. Zeros
after the last stored entry are not stored: ``decode_relative`` gets the
length ``n``.

Paper example (Fig. 2, 3-bit index): non-zeros at positions 1, 4 and 15 of a
16-element row are stored at positions 1, 4, 12 (filler) and 15, i.e. gaps
``[1, 2, 7, 2]`` (the figure prints the position differences ``gap + 1``
after the first entry: 3, 8, 3).

Public API: ``encode_relative(codes, index_bits) -> (gaps, codes)`` and
``decode_relative(gaps, codes, n, index_bits, name) -> codes``.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError, FormatError
from .bitpack import MAX_ELEMENTS

#: widest relative index
MAX_INDEX_BITS = 16


def _check_index_bits(index_bits: object, error: type[Exception]) -> int:
    if isinstance(index_bits, bool) or not isinstance(index_bits, (int, np.integer)):
        index_bits = -1
    if not 1 <= index_bits <= MAX_INDEX_BITS:
        message = f"index_bits must be an integer from 1 to {MAX_INDEX_BITS}, got {index_bits!r}"
        raise FormatError("bad-bits", message) if error is FormatError else ConfigError(message)
    return int(index_bits)


def encode_relative(codes: np.ndarray, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Store the non-zero codes of a flat array with ``index_bits``-bit gaps and filler zeros.

    Returns ``(gaps, codes)``, both int64 and of equal length (non-zeros plus
    fillers); ``gaps`` lie in ``[0, 2**index_bits - 1]``.
    """
    span = 1 << _check_index_bits(index_bits, ConfigError)
    codes = np.asarray(codes).reshape(-1)
    if codes.size and (codes.dtype.kind not in "iu" or int(codes.min()) < 0):
        raise ConfigError(f"sparse value codes must be non-negative integers, got {codes.dtype} min {codes.min()}")
    positions = np.flatnonzero(codes)
    zeros_before = np.diff(positions, prepend=-1) - 1
    fillers = zeros_before // span
    slots = np.arange(positions.size) + np.cumsum(fillers)
    total = positions.size + int(fillers.sum())
    gaps = np.full(total, span - 1, dtype=np.int64)
    values = np.zeros(total, dtype=np.int64)
    gaps[slots] = zeros_before % span
    values[slots] = codes[positions]
    return gaps, values


def decode_relative(gaps: np.ndarray, codes: np.ndarray, n: int, index_bits: int, name: str = "sparse") -> np.ndarray:
    """Inverse of :func:`encode_relative`: the flat int64 code array of length ``n``.

    Raises ``FormatError`` when ``gaps`` and ``codes`` differ in length
    (``"bad-length"``), a gap does not fit ``index_bits`` or a code is
    negative (``"bad-code"``), or an entry lies at or past ``n``
    (``"bad-index"``).
    """
    index_bits = _check_index_bits(index_bits, FormatError)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= MAX_ELEMENTS:
        raise FormatError("bad-shape", f"{name}: length must be an int from 0 to {MAX_ELEMENTS}, got {n!r}")
    gaps, codes = np.asarray(gaps).reshape(-1), np.asarray(codes).reshape(-1)
    for what, arr in (("gaps", gaps), ("codes", codes)):
        if arr.size and arr.dtype.kind not in "iu":
            raise FormatError("bad-dtype", f"{name}: {what} must be integers, got {arr.dtype}")
    if gaps.size != codes.size:
        raise FormatError("bad-length", f"{name}: {gaps.size} gaps but {codes.size} codes")
    if gaps.size and (int(gaps.min()) < 0 or int(gaps.max()) >= 1 << index_bits):
        raise FormatError("bad-code", f"{name}: gaps must lie in [0, {(1 << index_bits) - 1}]")
    if codes.size and int(codes.min()) < 0:
        raise FormatError("bad-code", f"{name}: value codes must be non-negative")
    positions = np.cumsum(gaps.astype(np.int64) + 1) - 1
    if positions.size and int(positions[-1]) >= n:
        raise FormatError("bad-index", f"{name}: entries reach position {int(positions[-1])}, past the length {n}")
    out = np.zeros(int(n), dtype=np.int64)
    out[positions] = codes
    return out
