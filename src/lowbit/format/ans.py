"""Asymmetric numeral systems (ANS) entropy coding of integer symbols with ``constriction``.

ANS (Duda 2009, arXiv:0902.0271) spends ``-log2 p(s)`` bits per symbol, so a
stream of ``n`` symbols takes about ``n * H`` bits plus one or two 32-bit
words, where Huffman needs at least one whole bit per symbol. The coder is
the stack coder ``constriction.stream.stack.AnsCoder`` (Bamler 2022: 32-bit
words, 24-bit probabilities), an optional dependency imported on first use:
``pip install constriction``.

Model: the symbol counts ``c_s`` quantized to frequencies ``f_s`` with
``sum f = 2**precision`` and ``f_s >= 1`` exactly where ``c_s > 0``
(:func:`quantize_counts`: least ``sum c_s log2(2**precision / f_s)``, the
coded bits). The coder uses ``p_s = f_s / 2**precision`` exactly: its
24-bit cumulative table is ``f * 2**(24 - precision)``, so the stored table
is the model and decoding rebuilds what the encoder used. The encoder tries
every precision from ``ceil(log2 m)`` (``m`` distinct symbols) to
:data:`MAX_PRECISION` and keeps the one with the fewest table + word bytes
(ties: the lower precision), estimating the words from the bits above.

The coder starts from the state ``f_lo * 2**(24 - precision)`` (the scaled
frequency of the lowest symbol ``lo``) rather than 0, so every symbol moves the
state and decoding must end exactly in that start state: a stream decoded with
more or fewer symbols than were coded is caught. A stream with one distinct
symbol stores no words (its model is certain); an empty stream has no symbols.

Stored form (:class:`AnsStream`): ``freqs`` [hi - lo + 1] (the frequency of
every value from ``lo`` to ``hi``, zeros for absent ones, in the narrowest of
uint8 / uint16 / uint32 that holds the largest), ``words`` uint32 (the
compressed data), and the ints ``count`` (symbols), ``low`` (``lo``) and
``precision``. An empty stream has an empty table, ``low`` 0 and precision 0;
a one-symbol stream has ``freqs == [1]`` and precision 0.

``ans_decode`` raises ``FormatError`` with code ``bad-dtype``,
``bad-table`` (precision or ``low`` out of range, more than
:data:`MAX_ALPHABET` values, the table not starting and ending with a present
symbol, frequencies not adding up to ``2**precision``, a table for an empty
stream), ``bad-count`` (``count`` not an int from 0 to ``MAX_ELEMENTS``),
``too-large`` (``count`` over the cap below),
``bad-length`` (the words do not end after ``count`` symbols, or words for a
stream that needs none) or ``bad-stream`` (the words are not an ANS stream
of this model, or never hold a symbol the table lists).

A very peaked model codes millions of symbols in a few words (and a
one-symbol stream none at all), so the words alone do not bound the symbol
count. ``ans_decode`` therefore caps it at
:func:`~.bitpack.element_budget` of the stream's stored bytes (table plus
words): ``count <= 2**20 + 256 * (freqs.nbytes + words.nbytes)``, code
``too-large``, checked before anything is allocated. That admits every
stream that spends at least 1/32 bit per symbol beyond its first 2**20
symbols; ``ans_encode`` raises ``ConfigError`` for a stream it could not read
back.

Public API: ``quantize_counts(counts, precision)``, ``ans_encode(symbols) ->
AnsStream``, ``ans_decode(stream, name)``.
"""

from __future__ import annotations

import heapq
import importlib
import math
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from ..errors import ConfigError, FormatError
from .bitpack import MAX_ELEMENTS, element_budget

#: probability bits of the coder (constriction's default ANS coder); the highest precision
MAX_PRECISION = 24
#: most values a table spans (hi - lo + 1)
MAX_ALPHABET = 1 << 16
#: largest ``low``: the table's values stay within int64
MAX_LOW = (1 << 63) - MAX_ALPHABET
_WORD_BITS = 32
_TABLE_DTYPES = (np.uint8, np.uint16, np.uint32)


@dataclass
class AnsStream:
    """An ANS-coded symbol stream; see the module docstring for each field."""

    freqs: np.ndarray
    words: np.ndarray
    count: int
    low: int = 0
    precision: int = 0


def _constriction() -> ModuleType:
    try:
        return importlib.import_module("constriction")
    except ImportError:
        raise ConfigError(
            "ANS coding needs the optional package constriction: pip install constriction (or lowbit[entropy])"
        ) from None


def _model(present: np.ndarray, precision: int) -> object:
    """The coder's model with probabilities exactly ``present / 2**precision`` (``present`` all >= 1).

    constriction's fast quantization gives symbol ``i`` the left cumulative
    ``floor(Q_i * (2**24 - m) / sum(q)) + i`` for weights ``q`` with prefix sums
    ``Q``; the weights ``f * 2**(24 - precision) - 1`` sum to ``2**24 - m``, so
    the scale is 1, every product is an exact integer and the table is
    ``f * 2**(24 - precision)``.
    """
    weights = present.astype(np.float64) * float(1 << (MAX_PRECISION - precision)) - 1.0
    return _constriction().stream.model.Categorical(weights, perfect=False)


def _start_state(freqs: np.ndarray, precision: int) -> int:
    """The coder's state before the first symbol: the lowest symbol's 24-bit probability (module docstring)."""
    return int(freqs[0]) << (MAX_PRECISION - precision)


def quantize_counts(counts: np.ndarray, precision: int) -> np.ndarray:
    """Frequencies (int64) summing to ``2**precision``, >= 1 exactly where ``counts > 0``.

    They minimise the coded bits ``sum c_s log2(2**precision / f_s)``: start
    from ``max(1, floor(c_s 2**precision / n))``, move single units greedily
    (largest gain ``c_s log2((f_s + 1) / f_s)`` first, or smallest loss
    ``c_s log2(f_s / (f_s - 1))`` first) to reach the total, then swap units
    while a gain exceeds a loss; the objective is separable and convex, so
    no swap left to make means optimal.
    """
    if isinstance(precision, bool) or not isinstance(precision, int) or not 0 <= precision <= MAX_PRECISION:
        raise ConfigError(f"precision must be an int from 0 to {MAX_PRECISION}, got {precision!r}")
    counts = np.asarray(counts, dtype=np.int64).reshape(-1)
    present = np.flatnonzero(counts)
    total = 1 << precision
    if present.size == 0 or (counts < 0).any():
        raise ConfigError("symbol counts must be >= 0 with at least one > 0")
    if present.size > total:
        raise ConfigError(f"{present.size} distinct symbols need a precision of at least "
                          f"{(present.size - 1).bit_length()} bits, got {precision}")
    c = counts[present]
    f = np.maximum(1, c * total // int(c.sum()))
    c_list, f_list = c.tolist(), f.tolist()
    step = 1 if sum(f_list) < total else -1

    def priority(i: int) -> float:  # the heap pops the smallest: the largest gain or the smallest loss
        if step == 1:
            return -c_list[i] * math.log2((f_list[i] + 1) / f_list[i])
        return c_list[i] * math.log2(f_list[i] / (f_list[i] - 1)) if f_list[i] > 1 else math.inf

    heap = [(priority(i), i) for i in range(len(f_list))]
    heapq.heapify(heap)
    for _ in range(abs(total - sum(f_list))):
        _, i = heapq.heappop(heap)
        f_list[i] += step
        heapq.heappush(heap, (priority(i), i))
    f = np.array(f_list, dtype=np.int64)
    while f.size > 1:
        gains = c * np.log2((f + 1) / f)
        losses = np.where(f > 1, c * np.log2(f / np.maximum(f - 1, 1)), np.inf)
        buyer, seller = int(np.argmax(gains)), int(np.argmin(losses))
        if buyer == seller or gains[buyer] <= losses[seller] * (1 + 1e-12):
            break
        f[buyer] += 1
        f[seller] -= 1
    freqs = np.zeros(counts.size, dtype=np.int64)
    freqs[present] = f
    return freqs


def _table_dtype(largest: int) -> type:
    return next(d for d in _TABLE_DTYPES if largest <= np.iinfo(d).max)


def _stored_bytes(counts: np.ndarray, precision: int) -> tuple[int, np.ndarray]:
    """Estimated table + word bytes at ``precision`` (one word for the start state and the tail) and the frequencies."""
    freqs = quantize_counts(counts, precision)
    present = counts > 0
    bits = float(np.sum(counts[present] * (precision - np.log2(freqs[present]))))
    words = int(np.ceil(bits / _WORD_BITS)) + 1
    return freqs.size * np.dtype(_table_dtype(int(freqs.max()))).itemsize + 4 * words, freqs


def ans_encode(symbols: np.ndarray, name: str = "ans stream") -> AnsStream:
    """ANS-code a flat array of non-negative integer symbols spanning at most ``MAX_ALPHABET`` values.

    Raises ``ConfigError`` (naming ``name``) for a stream over ``ans_decode``'s symbol cap.
    """
    symbols = np.asarray(symbols).reshape(-1)
    if symbols.size and (symbols.dtype.kind not in "iu" or int(symbols.min()) < 0 or int(symbols.max()) > MAX_LOW):
        raise ConfigError(f"ANS symbols must be integers from 0 to {MAX_LOW}, got a {symbols.dtype} array")
    if symbols.size > MAX_ELEMENTS:
        raise ConfigError(f"ANS streams hold at most {MAX_ELEMENTS} symbols, got {symbols.size}")
    if symbols.size == 0:
        return AnsStream(np.zeros(0, dtype=np.uint8), np.zeros(0, dtype=np.uint32), 0)
    low, high = int(symbols.min()), int(symbols.max())
    if high - low >= MAX_ALPHABET:
        raise ConfigError(f"ANS symbols must span at most {MAX_ALPHABET} values, got {low} to {high}")
    offsets = (symbols - low).astype(np.int64)
    counts = np.bincount(offsets)
    present = np.flatnonzero(counts)
    if present.size == 1:
        return _readable(AnsStream(np.ones(1, dtype=np.uint8), np.zeros(0, dtype=np.uint32), int(symbols.size), low, 0),
                         name)
    lowest = (present.size - 1).bit_length()
    sizes = [_stored_bytes(counts, p) for p in range(lowest, MAX_PRECISION + 1)]
    best = min(range(len(sizes)), key=lambda i: sizes[i][0])
    precision, freqs = lowest + best, sizes[best][1]
    index = (np.cumsum(counts > 0) - 1)[offsets]
    coder = _constriction().stream.stack.AnsCoder(np.array([_start_state(freqs, precision)], dtype=np.uint32))
    coder.encode_reverse(index.astype(np.int32), _model(freqs[present], precision))
    words = np.asarray(coder.get_compressed(), dtype=np.uint32)
    return _readable(AnsStream(freqs.astype(_table_dtype(int(freqs.max()))), words, int(symbols.size), low, precision),
                     name)


def _readable(stream: AnsStream, name: str) -> AnsStream:
    stored = stream.freqs.nbytes + stream.words.nbytes
    if stream.count > element_budget(stored):
        raise ConfigError(f"{name}: ANS codes {stream.count} symbols into {stored} bytes, more than the "
                          f"{element_budget(stored)} a reader accepts; store it sparse or without ANS")
    return stream


def _check_int(value: object, low: int, high: int, code: str, where: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise FormatError(code, f"{where}: {what} must be an int from {low} to {high}, got {value!r}")
    return int(value)


def ans_decode(stream: AnsStream, name: str = "ans stream") -> np.ndarray:
    """Decode ``stream`` into its int64 symbols, validating it (see the module docstring)."""
    freqs, words = stream.freqs, stream.words
    if not isinstance(freqs, np.ndarray) or freqs.dtype not in _TABLE_DTYPES or freqs.ndim != 1:
        raise FormatError("bad-dtype", f"{name}: freqs must be a 1-D uint8, uint16 or uint32 array")
    if not isinstance(words, np.ndarray) or words.dtype != np.uint32 or words.ndim != 1:
        raise FormatError("bad-dtype", f"{name}: words must be a 1-D uint32 array")
    count = _check_int(stream.count, 0, MAX_ELEMENTS, "bad-count", name, "the symbol count")
    low = _check_int(stream.low, 0, MAX_LOW, "bad-table", name, "low")
    precision = _check_int(stream.precision, 0, MAX_PRECISION, "bad-table", name, "precision")
    if freqs.size > MAX_ALPHABET:
        raise FormatError("bad-table", f"{name}: the table spans {freqs.size} values, more than {MAX_ALPHABET}")
    stored = freqs.nbytes + words.nbytes
    if count > element_budget(stored):
        raise FormatError("too-large", f"{name}: {count} symbols from {stored} stored bytes; at most "
                                       f"{element_budget(stored)} (2**20 + 256 per byte) are accepted")
    if count == 0:
        if freqs.size or words.size:
            raise FormatError("bad-table", f"{name}: an empty stream stores no table and no words")
        return np.zeros(0, dtype=np.int64)
    if freqs.size == 0 or freqs[0] == 0 or freqs[-1] == 0:
        raise FormatError("bad-table", f"{name}: the table must start and end with a present symbol")
    if int(freqs.sum(dtype=np.int64)) != 1 << precision:
        raise FormatError("bad-table", f"{name}: the frequencies add up to {int(freqs.sum(dtype=np.int64))}, "
                                       f"not 2**{precision}")
    present = np.flatnonzero(freqs)
    if present.size == 1:
        if words.size:
            raise FormatError("bad-length", f"{name}: a stream of one distinct symbol stores no words")
        return np.full(count, low + int(present[0]), dtype=np.int64)
    try:
        coder = _constriction().stream.stack.AnsCoder(words)
        index = np.asarray(coder.decode(_model(freqs[present], precision), count))
        rest = np.asarray(coder.get_compressed(), dtype=np.uint32)
    except ConfigError:
        raise
    except Exception as exc:  # constriction reports corrupt data with its own exception types
        raise FormatError("bad-stream", f"{name}: the words are not a valid ANS stream ({exc})") from exc
    if rest.tolist() != [_start_state(freqs, precision)]:
        raise FormatError("bad-length", f"{name}: the words do not end after {count} symbols")
    if (np.bincount(index, minlength=present.size) == 0).any():
        raise FormatError("bad-stream", f"{name}: the stream never holds a symbol its table lists")
    symbols = present[index]
    symbols += low
    return symbols
