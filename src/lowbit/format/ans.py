"""Asymmetric numeral systems (ANS) entropy coding of integer symbols with ``constriction``.

ANS (Duda 2009, arXiv:0902.0271) spends ``-log2 p(s)`` bits per symbol up
to a fixed-point rounding of ``p`` (24-bit probabilities), so a stream of
``n`` symbols takes about ``n * H`` bits plus one or two 32-bit words, where
Huffman needs at least one whole bit per symbol. The coder is the stack
coder ``constriction.stream.stack.AnsCoder`` (Bamler 2022), an optional
dependency imported on first use: ``pip install constriction``.

The model is a categorical distribution over the symbols that occur, with
``p_i = counts_i / sum(counts)``, quantized by
``constriction.stream.model.Categorical(p, perfect=False)``. That
quantization is a deterministic function of the stored counts, so decoding
rebuilds exactly the encoder's model. A stream with one distinct symbol
stores no words (its model is certain); an empty stream has no symbols.

Stored form (:class:`AnsStream`): ``symbols`` int64 [m] (the distinct symbol
values, increasing), ``counts`` uint32 [m] (how often each occurs, all > 0;
their sum is the symbol count) and ``words`` uint32 (the compressed data).

``ans_decode`` raises ``FormatError`` with code ``bad-dtype``,
``bad-table`` (symbols not increasing or negative, lengths differ, a zero
count), ``bad-count`` (more than ``MAX_ELEMENTS`` symbols), ``bad-length``
(words left over after the last symbol, or words for a stream that needs
none) or ``bad-stream`` (the words are not an ANS stream of this model, or
decode to other symbol counts than stored).

A very peaked model codes millions of symbols in a few words, so the word
count does not bound the symbol count: a reader should compare
``stream.count`` with the number of symbols it expects (for example the
tensor's element count) before decoding.

Public API: ``ans_encode(symbols) -> AnsStream``, ``ans_decode(stream, name)``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from ..errors import ConfigError, FormatError
from .bitpack import MAX_ELEMENTS

#: symbol values below this are counted with a table rather than sorted
_DENSE_LIMIT = 1 << 24


@dataclass
class AnsStream:
    """An ANS-coded symbol stream; see the module docstring for each field."""

    symbols: np.ndarray
    counts: np.ndarray
    words: np.ndarray

    @property
    def count(self) -> int:
        """Number of symbols in the stream."""
        return int(self.counts.sum(dtype=np.int64))


def _constriction() -> ModuleType:
    try:
        return importlib.import_module("constriction")
    except ImportError:
        raise ConfigError(
            "ANS coding needs the optional package constriction: pip install constriction (or lowbit[entropy])"
        ) from None


def _model(counts: np.ndarray) -> object:
    return _constriction().stream.model.Categorical(counts.astype(np.float64), perfect=False)


def ans_encode(symbols: np.ndarray) -> AnsStream:
    """ANS-code a flat array of non-negative integer symbols."""
    symbols = np.asarray(symbols).reshape(-1)
    if symbols.size and (symbols.dtype.kind not in "iu" or int(symbols.min()) < 0):
        raise ConfigError(f"ANS symbols must be non-negative integers, got a {symbols.dtype} array")
    if symbols.size > MAX_ELEMENTS:
        raise ConfigError(f"ANS streams hold at most {MAX_ELEMENTS} symbols, got {symbols.size}")
    symbols = symbols.astype(np.int64)
    if symbols.size == 0 or int(symbols.max()) < _DENSE_LIMIT:  # counting beats sorting
        full = np.bincount(symbols)
        values = np.flatnonzero(full)
        index = (np.cumsum(full > 0) - 1)[symbols]
        counts = full[values].astype(np.uint32)
    else:
        values, index, counts = np.unique(symbols, return_inverse=True, return_counts=True)
        counts = counts.astype(np.uint32)
    words = np.zeros(0, dtype=np.uint32)
    if values.size > 1:
        coder = _constriction().stream.stack.AnsCoder()
        coder.encode_reverse(index.astype(np.int32), _model(counts))
        words = np.asarray(coder.get_compressed(), dtype=np.uint32)
    return AnsStream(values, counts, words)


def _check_array(x: object, dtype: type, where: str, what: str) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype != np.dtype(dtype) or x.ndim != 1:
        raise FormatError("bad-dtype", f"{where}: {what} must be a 1-D {np.dtype(dtype).name} array")
    return x


def ans_decode(stream: AnsStream, name: str = "ans stream") -> np.ndarray:
    """Decode ``stream`` into its int64 symbols, validating it (see the module docstring)."""
    values = _check_array(stream.symbols, np.int64, name, "symbols")
    counts = _check_array(stream.counts, np.uint32, name, "counts")
    words = _check_array(stream.words, np.uint32, name, "words")
    if values.size != counts.size:
        raise FormatError("bad-table", f"{name}: {values.size} symbols but {counts.size} counts")
    if values.size and (int(values[0]) < 0 or (np.diff(values) <= 0).any()):
        raise FormatError("bad-table", f"{name}: symbol values must be non-negative and strictly increasing")
    if (counts == 0).any():
        raise FormatError("bad-table", f"{name}: every listed symbol must occur (count > 0)")
    count = stream.count
    if count > MAX_ELEMENTS:
        raise FormatError("bad-count", f"{name}: {count} symbols, more than the cap {MAX_ELEMENTS}")
    if values.size <= 1:
        if words.size:
            raise FormatError("bad-length", f"{name}: a stream of one distinct symbol stores no words")
        return np.full(count, values[0] if values.size else 0, dtype=np.int64)
    try:
        coder = _constriction().stream.stack.AnsCoder(words)
        index = np.asarray(coder.decode(_model(counts), count), dtype=np.int64)
    except ConfigError:
        raise
    except Exception as exc:  # constriction reports corrupt data with its own exception types
        raise FormatError("bad-stream", f"{name}: the words are not a valid ANS stream ({exc})") from exc
    if not coder.is_empty():
        raise FormatError("bad-length", f"{name}: words are left over after {count} symbols")
    if not np.array_equal(np.bincount(index, minlength=values.size), counts):
        raise FormatError("bad-stream", f"{name}: the decoded symbols do not match the stored counts")
    return values[index]
