"""Canonical, length-limited Huffman coding of non-negative integer symbols (numpy only).

Deep Compression (Han, Mao, Dally, ICLR 2016, Sec. 4) Huffman-codes the
weight indices and relative-index gaps. Code lengths are optimal under the
cap ``max_length`` (at most :data:`MAX_CODE_LENGTH` = 16 bits): they come
from package-merge (Larmore & Hirschberg 1990), which gives a prefix code of
least total length among those with no code longer than the cap; without a
binding cap that is the plain Huffman code, so the mean length ``L`` obeys
``H <= L < H + 1`` for the symbol entropy ``H``.

Codes are canonical (DEFLATE, RFC 1951 Sec. 3.2.2): ordered by (length,
symbol), so the table is just the length of each symbol. In the bit stream
(LSB-first, little-endian, as bitpack) each code is written first bit first,
i.e. bit-reversed, so a decoder reads a code as the low bits of the next
``max(lengths)`` stream bits and looks it up in a table of
``2**max(lengths)`` entries. A stream with a single distinct symbol gives it
the 1-bit code ``0`` (``n`` zero bits); an empty stream has no bits.

Stored form (:class:`HuffmanStream`):

- ``lengths`` uint8 [alphabet]: code length of each symbol value, 0 = absent;
- ``data`` uint8: the bit stream, zero bits after the last code;
- ``offsets`` uint64 [ceil(count / block)]: stream bit offset of symbols
  ``0, block, 2 block, ...``; a Huffman stream is sequential, so these let
  the decoder step through all blocks at once with numpy (10M symbols in
  well under a second) at a cost of 8 bytes per ``block`` symbols;
- ``count`` (int) and ``block`` (int, :data:`BLOCK` when encoded here).

``huffman_decode`` validates everything and raises ``FormatError`` with code
``bad-table`` (length over 16, Kraft sum of ``2**-length`` not 1 unless one
symbol of length 1, alphabet too large),
``bad-count`` (count or block not a valid int, offsets of the wrong length),
``bad-offsets`` (offsets not starting at 0, decreasing, past the stream, or a
block not ending where the next starts: bits missing or left over inside),
``bad-length`` (``count`` times the shortest code length is more than the
data bits, so a stream decodes to at most 8 symbols per data byte; the last
code runs past the data, or whole bytes are left over: the stream does not
hold exactly ``count`` symbols), ``bad-padding`` (bits after the last code not zero),
``bad-symbol``
(a bit pattern that is no code), ``bad-dtype``.

Public API: ``code_lengths``, ``canonical_codes``, ``huffman_encode``,
``huffman_decode``, ``HuffmanStream``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, FormatError
from .bitpack import MAX_ELEMENTS, write_fields

#: longest code length a stream may use
MAX_CODE_LENGTH = 16
#: most symbol values (the table has one length per value)
MAX_ALPHABET = 1 << MAX_CODE_LENGTH
#: symbols per independently decodable block
BLOCK = 1024
#: largest block a stream may declare
MAX_BLOCK = 1 << 20

_LENGTH_BITS = 5  # a decode-table entry is (symbol << 5) | length


@dataclass
class HuffmanStream:
    """A Huffman-coded symbol stream; see the module docstring for each field."""

    lengths: np.ndarray
    data: np.ndarray
    offsets: np.ndarray
    count: int
    block: int = BLOCK


def code_lengths(counts: np.ndarray, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Optimal prefix-code lengths (uint8) for symbol ``counts``, none over ``max_length``.

    Package-merge: starting from the leaves (symbols sorted by count), pair
    adjacent items into packages and merge them with the leaves again,
    ``max_length - 1`` times; the first ``2 m - 2`` items of the last list
    (``m`` symbols in use) form the optimal code, and a symbol's length is the
    number of lists in which its leaf is among the chosen items. Absent
    symbols get length 0; a lone symbol gets length 1.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or not 1 <= max_length <= MAX_CODE_LENGTH:
        raise ConfigError(f"max_length must be an int from 1 to {MAX_CODE_LENGTH}, got {max_length!r}")
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.zeros(counts.size, dtype=np.uint8)
    used = np.flatnonzero(counts)
    if used.size <= 1:
        lengths[used] = 1
        return lengths
    if used.size > 1 << max_length:
        raise ConfigError(f"{used.size} distinct symbols do not fit codes of at most {max_length} bits")
    order = used[np.argsort(counts[used], kind="stable")]
    leaves = counts[order]
    items, chosen_leaf_flags = leaves, [np.ones(leaves.size, dtype=bool)]
    for _ in range(max_length - 1):
        pairs = items.size // 2 * 2
        packages = items[0:pairs:2] + items[1:pairs:2]
        merged = np.concatenate([leaves, packages])
        rank = np.argsort(merged, kind="stable")
        items = merged[rank]
        chosen_leaf_flags.append(rank < leaves.size)
    depth = np.zeros(leaves.size, dtype=np.int64)
    take = 2 * used.size - 2
    for is_leaf in reversed(chosen_leaf_flags):
        n_leaves = int(is_leaf[:take].sum())
        depth[:n_leaves] += 1
        take = 2 * (take - n_leaves)
    lengths[order] = depth
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical codes (uint32, most significant bit first) for code ``lengths`` (RFC 1951 3.2.2)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(lengths.size, dtype=np.uint32)
    per_length = np.bincount(lengths, minlength=MAX_CODE_LENGTH + 1)
    per_length[0] = 0
    code = 0
    for length in range(1, MAX_CODE_LENGTH + 1):
        code = (code + int(per_length[length - 1])) << 1
        symbols = np.flatnonzero(lengths == length)
        codes[symbols] = code + np.arange(symbols.size)
    return codes


def _reverse_bits(codes: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Each code's low ``length`` bits in reverse order (the stream writes codes first bit first)."""
    codes, lengths = codes.astype(np.int64), lengths.astype(np.int64)
    out = np.zeros(codes.size, dtype=np.int64)
    for bit in range(MAX_CODE_LENGTH):
        inside = bit < lengths
        out[inside] |= ((codes[inside] >> bit) & 1) << (lengths[inside] - 1 - bit)
    return out


def huffman_encode(symbols: np.ndarray, max_length: int = MAX_CODE_LENGTH) -> HuffmanStream:
    """Huffman-code a flat array of integer symbols in ``[0, MAX_ALPHABET)``."""
    symbols = np.asarray(symbols).reshape(-1)
    if symbols.size and not (
        symbols.dtype.kind in "iu" and int(symbols.min()) >= 0 and int(symbols.max()) < MAX_ALPHABET
    ):
        raise ConfigError(f"Huffman symbols must be integers in [0, {MAX_ALPHABET}), got {symbols.dtype} array")
    if symbols.size > MAX_ELEMENTS:
        raise ConfigError(f"Huffman streams hold at most {MAX_ELEMENTS} symbols, got {symbols.size}")
    lengths = code_lengths(np.bincount(symbols), max_length) if symbols.size else np.zeros(0, dtype=np.uint8)
    reversed_codes = _reverse_bits(canonical_codes(lengths), lengths).astype(np.uint32)
    widths = lengths[symbols]
    ends = np.cumsum(widths, dtype=np.int64)
    starts = ends - widths
    data = write_fields(reversed_codes[symbols], widths, starts, int(ends[-1]) if ends.size else 0)
    return HuffmanStream(lengths, data, starts[::BLOCK].astype(np.uint64), int(symbols.size), BLOCK)


def _decode_table(lengths: np.ndarray, where: str) -> tuple[np.ndarray, int]:
    """Validate the code lengths; return the decode table and its index width."""
    if lengths.size > MAX_ALPHABET:
        raise FormatError("bad-table", f"{where}: {lengths.size} symbols, more than {MAX_ALPHABET}")
    if lengths.size and int(lengths.max()) > MAX_CODE_LENGTH:
        raise FormatError("bad-table", f"{where}: code length {int(lengths.max())} over the limit {MAX_CODE_LENGTH}")
    used = np.flatnonzero(lengths)
    width = int(lengths.max()) if used.size else 0
    kraft = int(np.sum(np.left_shift(1, MAX_CODE_LENGTH - lengths[used].astype(np.int64))))
    single = used.size == 1 and width == 1
    if not single and used.size and kraft != 1 << MAX_CODE_LENGTH:
        state = "over-full" if kraft > 1 << MAX_CODE_LENGTH else "incomplete"
        raise FormatError("bad-table", f"{where}: the code table is {state} (Kraft sum {kraft / 2**MAX_CODE_LENGTH})")
    table = np.full(1 << width, (-1 << _LENGTH_BITS) | 1, dtype=np.int64)  # no code here: symbol -1, one bit
    codes = _reverse_bits(canonical_codes(lengths), lengths)
    for length in range(1, width + 1):
        symbols = used[lengths[used] == length]
        slots = codes[symbols][:, None] + (np.arange(1 << (width - length)) << length)[None, :]
        table[slots] = ((symbols << _LENGTH_BITS) | length)[:, None]
    return table, width


def _check_int(value: object, low: int, high: int, where: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise FormatError("bad-count", f"{where}: {what} must be an int from {low} to {high}, got {value!r}")
    return int(value)


def _check_array(x: object, dtype: type, where: str, what: str) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype != np.dtype(dtype) or x.ndim != 1:
        raise FormatError("bad-dtype", f"{where}: {what} must be a 1-D {np.dtype(dtype).name} array")
    return x


def huffman_decode(stream: HuffmanStream, name: str = "huffman stream") -> np.ndarray:
    """Decode ``stream`` into its int64 symbols, validating it (see the module docstring)."""
    lengths = _check_array(stream.lengths, np.uint8, name, "lengths")
    data = _check_array(stream.data, np.uint8, name, "data")
    offsets = _check_array(stream.offsets, np.uint64, name, "offsets")
    count = _check_int(stream.count, 0, MAX_ELEMENTS, name, "count")
    block = _check_int(stream.block, 1, MAX_BLOCK, name, "block")
    table, width = _decode_table(lengths, name)
    n_blocks = -(-count // block)
    if offsets.size != n_blocks:
        raise FormatError("bad-count", f"{name}: {offsets.size} block offsets, {n_blocks} expected for {count} symbols")
    if count == 0:
        if data.size:
            raise FormatError("bad-length", f"{name}: an empty stream must have no data, got {data.size} bytes")
        return np.zeros(0, dtype=np.int64)
    if width == 0:
        raise FormatError("bad-table", f"{name}: {count} symbols but no symbol has a code")
    total_bits = 8 * data.size
    shortest = int(lengths[lengths > 0].min())
    if count * shortest > total_bits:  # every code takes at least `shortest` bits; this bounds the work below
        raise FormatError("bad-length", f"{name}: {count} symbols of at least {shortest} bits need "
                                        f"{count * shortest} bits, the data has {total_bits}")
    starts = offsets.astype(np.int64)
    if starts[0] != 0 or (np.diff(starts) < 0).any() or int(starts[-1]) > total_bits:
        raise FormatError("bad-offsets", f"{name}: block offsets must rise from 0 and stay within {total_bits} bits")
    # every 4-byte little-endian window of the stream, padded so that lanes running past the end read zeros
    padded = np.zeros(data.size + 2 * block + 8, dtype=np.uint32)
    padded[: data.size] = data
    windows = padded[:-3] | (padded[1:-2] << 8) | (padded[2:-1] << 16) | (padded[3:] << 24)
    table = table.astype(np.int32)
    mask = np.uint32((1 << width) - 1)
    steps = block if n_blocks > 1 else count
    in_last = count - (n_blocks - 1) * block
    out = np.empty((steps, n_blocks), dtype=np.int32)  # row t: symbol t of every block
    position = starts.copy()
    byte, shift = np.empty_like(position), np.empty(n_blocks, dtype=np.uint32)
    window, entry = np.empty(n_blocks, dtype=np.uint32), np.empty(n_blocks, dtype=np.int32)
    end = 0
    for step in range(steps):  # one symbol of every block per step, in place to keep the loop light
        if step == in_last:
            end = int(position[-1])
        np.right_shift(position, 3, out=byte)
        np.bitwise_and(position, 7, out=shift, casting="unsafe")
        np.take(windows, byte, out=window)
        np.right_shift(window, shift, out=window)
        np.bitwise_and(window, mask, out=window)
        np.take(table, window, out=entry)
        np.right_shift(entry, _LENGTH_BITS, out=out[step])
        np.bitwise_and(entry, (1 << _LENGTH_BITS) - 1, out=entry)
        position += entry
    if in_last == steps:
        end = int(position[-1])
    if (position[:-1] != starts[1:]).any():
        raise FormatError("bad-offsets", f"{name}: a block's codes do not end where the next block starts")
    blocks = np.empty((n_blocks, steps), dtype=np.int64)
    blocks[...] = out.T  # one pass, no int32 copy in between
    del out
    symbols = blocks.reshape(-1)[:count]
    if (symbols < 0).any():
        raise FormatError("bad-symbol", f"{name}: the stream holds a bit pattern that is not a code")
    if end > total_bits:
        raise FormatError("bad-length", f"{name}: {count} symbols need {end} bits, the data holds {total_bits}")
    if (end + 7) // 8 != data.size:
        raise FormatError("bad-length", f"{name}: {data.size - (end + 7) // 8} bytes left over after {count} symbols")
    if end % 8 and int(data[-1]) >> (end % 8):
        raise FormatError("bad-padding", f"{name}: bits after the last code are not zero")
    return symbols
