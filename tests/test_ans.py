"""ANS entropy coding: exact round trips, the stored model is the coder's model, sizes, rejections."""

import itertools
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import ConfigError, FormatError
from lowbit.format.ans import MAX_ALPHABET, MAX_PRECISION, AnsStream, ans_decode, ans_encode, quantize_counts
from lowbit.format.bitpack import MIN_ELEMENT_BUDGET, element_budget
from lowbit.format.huffman import huffman_encode

BIG = 2**40


def entropy_bits(symbols: np.ndarray) -> float:
    _, counts = np.unique(symbols, return_counts=True)
    p = counts / symbols.size
    return float(-(p * np.log2(p)).sum())


def model_bits(symbols: np.ndarray, stream: AnsStream) -> float:
    """Bits of ``symbols`` under the stored model ``freqs / 2**precision``."""
    freqs = stream.freqs.astype(np.float64)[symbols - stream.low]
    return float(np.sum(stream.precision - np.log2(freqs)))


def reference_words(symbols: np.ndarray, stream: AnsStream) -> list[int]:
    """rANS (Duda 2009) with the coder's parameters, in plain Python ints: 64-bit state, 32-bit words,
    probabilities ``freqs * 2**(24 - precision) / 2**24``, starting from the lowest symbol's scaled frequency."""
    scale = 1 << (24 - stream.precision)
    probability = [int(f) * scale for f in stream.freqs]
    left = [0, *itertools.accumulate(probability)]
    state, words = probability[0], []
    for s in reversed((symbols - stream.low).tolist()):
        p = probability[s]
        if state >> 40 >= p:
            words.append(state & 0xFFFFFFFF)
            state >>= 32
        state = ((state // p) << 24) + left[s] + state % p
    return words + [state & 0xFFFFFFFF] + ([state >> 32] if state >> 32 else [])


symbol_lists = st.one_of(
    st.lists(st.integers(0, 20), max_size=300),
    st.lists(st.sampled_from([0, 1, 2, 3]), max_size=300).map(lambda xs: [x * 1000 for x in xs]),
    st.lists(st.sampled_from([BIG, BIG + 1, BIG + MAX_ALPHABET - 1, 2**62]), max_size=40).filter(
        lambda xs: not xs or max(xs) - min(xs) < MAX_ALPHABET),  # huge values, sparse alphabets over a wide range
    st.lists(st.sampled_from([0, MAX_ALPHABET - 1]), max_size=20),
    st.lists(st.just(3), max_size=5),
)


@settings(max_examples=150, deadline=None)
@given(symbol_lists)
def test_round_trip_is_exact_and_the_table_is_the_quantized_model(symbols):
    symbols = np.array(symbols, dtype=np.int64)
    stream = ans_encode(symbols)
    assert stream.words.dtype == np.uint32 and stream.count == symbols.size
    assert np.array_equal(ans_decode(stream), symbols)
    if symbols.size == 0:
        assert stream.freqs.size == 0 and stream.words.size == 0
        return
    values, counts = np.unique(symbols, return_counts=True)
    dense = np.zeros(int(values[-1] - values[0]) + 1, dtype=np.int64)
    dense[values - values[0]] = counts
    assert stream.low == values[0]
    assert np.array_equal(stream.freqs, quantize_counts(dense, stream.precision))
    assert int(stream.freqs.sum(dtype=np.int64)) == 2**stream.precision
    narrowest = next(d for d in (np.uint8, np.uint16, np.uint32) if np.iinfo(d).max >= stream.freqs.max())
    assert stream.freqs.dtype == narrowest
    if values.size == 1:
        assert stream.words.size == 0 and stream.precision == 0 and stream.freqs.tolist() == [1]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=1, max_size=4).filter(any), st.integers(0, 4))
def test_quantized_counts_are_optimal(counts, precision):
    counts = np.array(counts)
    present = np.flatnonzero(counts)
    if present.size > 2**precision:
        with pytest.raises(ConfigError):
            quantize_counts(counts, precision)
        return
    freqs = quantize_counts(counts, precision)
    assert freqs.sum() == 2**precision and np.array_equal(freqs > 0, counts > 0)

    def bits(f):
        return float(np.sum(counts[present] * np.log2(2**precision / np.asarray(f))))

    best = min(bits(f) for f in itertools.product(range(1, 2**precision + 1), repeat=present.size)
               if sum(f) == 2**precision)  # brute force over every admissible table
    assert bits(freqs[present]) <= best + 1e-9


def test_words_are_plain_rans_of_the_stored_table():
    # an independent rANS encoder given only the stored table reproduces the words: the coder used exactly it
    rng = np.random.default_rng(3)
    for symbols in (rng.choice(7, 3000, p=[0.4, 0.3, 0.1, 0.1, 0.05, 0.03, 0.02]) + 5,
                    np.array([1, 2, 0, 0, 0]), rng.geometric(0.05, 5000)):
        stream = ans_encode(symbols)
        assert stream.words.tolist() == reference_words(symbols, stream)


def test_size_is_the_model_bits_and_close_to_n_times_entropy():
    rng = np.random.default_rng(0)
    symbols = rng.choice(5, 100_000, p=[0.5, 0.25, 0.125, 0.0625, 0.0625])
    stream = ans_encode(symbols)
    bits = 32 * stream.words.size
    assert model_bits(symbols, stream) <= bits <= model_bits(symbols, stream) + 24 + 64  # start state and tail
    assert bits <= 1.002 * symbols.size * entropy_bits(symbols) + 96
    assert np.array_equal(ans_decode(stream), symbols)


def test_precision_minimises_table_plus_words():
    rng = np.random.default_rng(4)
    symbols = rng.choice(40, 800, p=np.arange(40, 0, -1) / 820)
    stream = ans_encode(symbols)
    counts = np.bincount(symbols)
    totals = []
    for precision in range(6, MAX_PRECISION + 1):
        freqs = quantize_counts(counts, precision)
        words = np.ceil(np.sum(counts * np.log2(2**precision / np.maximum(freqs, 1))) / 32)
        totals.append((1 if freqs.max() < 256 else 2 if freqs.max() < 65536 else 4) * freqs.size + 4 * words)
    assert stream.freqs.nbytes + stream.words.nbytes <= min(totals) + 8  # within the coder's two-word overhead


def test_peaked_five_bit_stream_is_smaller_than_huffman_with_tables():
    rng = np.random.default_rng(5)
    p = 0.6 ** np.abs(np.arange(32) - 12)
    symbols = rng.choice(32, 10_000, p=p / p.sum())
    ans, huffman = ans_encode(symbols), huffman_encode(symbols)
    ans_bytes = ans.freqs.nbytes + ans.words.nbytes
    huffman_bytes = huffman.lengths.nbytes + huffman.data.nbytes + huffman.offsets.nbytes
    assert ans_bytes < huffman_bytes
    assert np.array_equal(ans_decode(ans), symbols)


def test_beats_huffman_on_a_peaked_distribution():
    # p0 = 0.95: entropy ~0.34 bit, but a Huffman code spends at least one bit per symbol
    rng = np.random.default_rng(1)
    symbols = rng.choice(4, 50_000, p=[0.95, 0.03, 0.01, 0.01])
    ans_bits = 32 * ans_encode(symbols).words.size
    huffman_bits = 8 * huffman_encode(symbols).data.size
    assert huffman_bits >= symbols.size
    assert ans_bits < 0.5 * huffman_bits
    assert ans_bits <= symbols.size * entropy_bits(symbols) * 1.01 + 96


def test_encode_rejects_bad_symbols():
    for bad in (np.array([3, -1]), np.array([0.5]), np.array([0, MAX_ALPHABET]), np.array([2**63 - 1])):
        with pytest.raises(ConfigError):
            ans_encode(bad)
    with pytest.raises(ConfigError):
        quantize_counts(np.zeros(3), 4)
    with pytest.raises(ConfigError):
        quantize_counts(np.ones(3), MAX_PRECISION + 1)


def sample_stream():
    return ans_encode(np.random.default_rng(2).choice(3, 2000, p=[0.7, 0.2, 0.1]))


def rejects(codes, stream):
    with pytest.raises(FormatError) as err:
        ans_decode(stream, "fc2.weight indices")
    assert err.value.code in codes and "fc2.weight indices" in str(err.value)


def edit(stream, **changes):
    fields = {"freqs": stream.freqs, "words": stream.words, "count": stream.count, "low": stream.low,
              "precision": stream.precision}
    return AnsStream(**{**fields, **changes})


def test_rejects_corrupt_words():
    stream = sample_stream()
    rejects({"bad-stream", "bad-length"}, edit(stream, words=stream.words[:-2].copy()))
    rejects({"bad-stream", "bad-length"}, edit(stream, words=stream.words[2:].copy()))
    rejects({"bad-length"}, edit(stream, words=np.append(stream.words, np.uint32(7))))
    flipped = stream.words.copy()
    flipped[len(flipped) // 2] ^= np.uint32(1 << 7)
    rejects({"bad-stream", "bad-length"}, edit(stream, words=flipped))


def test_rejects_a_count_other_than_coded_even_when_the_stream_ends_in_its_lowest_symbol():
    for symbols in (np.random.default_rng(2).choice(3, 2000, p=[0.7, 0.2, 0.1]), np.array([1, 2, 0, 0, 0])):
        stream = ans_encode(symbols)
        for count in (symbols.size - 1, symbols.size + 1, 2 * symbols.size):
            rejects({"bad-length"}, edit(stream, count=count))


def test_rejects_a_table_that_does_not_match_the_words():
    stream = sample_stream()
    freqs = stream.freqs.astype(np.int64)
    freqs[0] += 1
    freqs[1] -= 1
    rejects({"bad-stream", "bad-length"}, edit(stream, freqs=freqs.astype(stream.freqs.dtype)))
    rejects({"bad-stream", "bad-length"}, edit(stream, freqs=stream.freqs[::-1].copy()))
    rejects({"bad-table"}, edit(stream, precision=stream.precision + 1))
    rejects({"bad-table"}, edit(stream, precision=MAX_PRECISION + 1))
    rejects({"bad-table"}, edit(stream, precision=True))
    rejects({"bad-table"}, edit(stream, low=-1))
    rejects({"bad-table"}, edit(stream, low=2**63))
    rejects({"bad-table"}, edit(stream, freqs=np.append(stream.freqs, np.zeros(1, stream.freqs.dtype))))
    rejects({"bad-table"}, edit(stream, freqs=np.insert(stream.freqs, 0, 0)))
    rejects({"bad-table"}, edit(stream, freqs=np.zeros(MAX_ALPHABET + 1, np.uint8)))
    rejects({"bad-table"}, edit(stream, freqs=np.zeros(0, np.uint8)))
    rejects({"bad-table"}, edit(stream, count=0))
    rejects({"bad-count"}, edit(stream, count=-1))
    rejects({"bad-count"}, edit(stream, count=2**31 + 1))
    rejects({"bad-count"}, edit(stream, count=2.0))
    rejects({"bad-length"}, AnsStream(np.array([1], np.uint8), np.array([1], np.uint32), 3, 4, 0))


def test_symbol_count_is_capped_by_the_stored_bytes_before_decoding():
    one = ans_encode(np.zeros(10, np.int64))  # one distinct symbol: a 1-byte table and no words
    assert (one.freqs.nbytes, one.words.nbytes) == (1, 0) and element_budget(1) == MIN_ELEMENT_BUDGET + 256
    assert ans_decode(edit(one, count=MIN_ELEMENT_BUDGET + 256)).size == MIN_ELEMENT_BUDGET + 256
    rejects({"too-large"}, edit(one, count=MIN_ELEMENT_BUDGET + 257))
    with pytest.raises(ConfigError, match="reader accepts"):  # never written
        ans_encode(np.zeros(MIN_ELEMENT_BUDGET + 257, np.int64), "w")
    stream = sample_stream()
    stored = stream.freqs.nbytes + stream.words.nbytes
    rejects({"too-large"}, edit(stream, count=element_budget(stored) + 1))  # rejected before 2**20 decode steps
    # a realistic peaked stream: 2M symbols, 98% of one value, about 0.15 bits each
    peaked = np.random.default_rng(0).choice(3, 2_000_000, p=[0.01, 0.98, 0.01])
    assert np.array_equal(ans_decode(ans_encode(peaked)), peaked)


def test_rejects_a_table_listing_a_symbol_the_stream_never_holds():
    symbols = np.array([0, 1, 1, 0, 1])
    unused = AnsStream(np.array([2, 1, 1], np.uint8), np.zeros(0, np.uint32), symbols.size, 0, 2)
    words = np.array(reference_words(symbols, unused), np.uint32)
    rejects({"bad-stream"}, edit(unused, words=words))


def test_rejects_wrong_dtypes():
    stream = sample_stream()
    rejects({"bad-dtype"}, edit(stream, freqs=stream.freqs.astype(np.int16)))
    rejects({"bad-dtype"}, edit(stream, freqs=stream.freqs.astype(np.uint64)))
    rejects({"bad-dtype"}, edit(stream, freqs=stream.freqs.reshape(1, -1)))
    rejects({"bad-dtype"}, edit(stream, freqs=stream.freqs.tolist()))
    rejects({"bad-dtype"}, edit(stream, words=stream.words.view(np.int32)))


def test_missing_constriction_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "constriction", None)  # makes `import constriction` fail
    with pytest.raises(ConfigError, match="pip install constriction"):
        ans_encode(np.array([0, 1, 1]))
