"""ANS entropy coding: exact round trips, size near n * entropy, better than Huffman when peaked, rejections."""

import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import ConfigError, FormatError
from lowbit.format.ans import AnsStream, ans_decode, ans_encode
from lowbit.format.huffman import huffman_encode


def entropy_bits(symbols: np.ndarray) -> float:
    _, counts = np.unique(symbols, return_counts=True)
    p = counts / symbols.size
    return float(-(p * np.log2(p)).sum())


symbol_lists = st.one_of(
    st.lists(st.integers(0, 20), max_size=300),
    st.lists(st.sampled_from([0, 5, 2**31 - 1, 2**40]), max_size=40),  # sparse and very large symbol values
    st.lists(st.just(3), max_size=5),
)


@settings(max_examples=150, deadline=None)
@given(symbol_lists)
def test_round_trip_is_exact(symbols):
    symbols = np.array(symbols, dtype=np.int64)
    stream = ans_encode(symbols)
    assert stream.symbols.dtype == np.int64 and stream.counts.dtype == np.uint32 and stream.words.dtype == np.uint32
    assert stream.count == symbols.size
    assert np.array_equal(stream.symbols, np.unique(symbols))
    assert np.array_equal(ans_decode(stream), symbols)


def test_size_is_close_to_n_times_entropy():
    rng = np.random.default_rng(0)
    p = np.array([0.5, 0.25, 0.125, 0.0625, 0.0625])
    symbols = rng.choice(p.size, 100_000, p=p)
    stream = ans_encode(symbols)
    bits = 32 * stream.words.size
    ideal = symbols.size * entropy_bits(symbols)
    assert ideal - 64 <= bits <= 1.002 * ideal + 64  # 24-bit probabilities lose a fraction of a percent at most
    assert np.array_equal(ans_decode(stream), symbols)


def test_beats_huffman_on_a_peaked_distribution():
    # p0 = 0.95: entropy ~0.34 bit, but a Huffman code spends at least one bit per symbol
    rng = np.random.default_rng(1)
    symbols = rng.choice(4, 50_000, p=[0.95, 0.03, 0.01, 0.01])
    ans_bits = 32 * ans_encode(symbols).words.size
    huffman_bits = 8 * huffman_encode(symbols).data.size
    assert huffman_bits >= symbols.size
    assert ans_bits < 0.5 * huffman_bits
    assert ans_bits <= symbols.size * entropy_bits(symbols) * 1.01 + 64


def test_single_symbol_and_empty_streams_store_no_words():
    stream = ans_encode(np.full(7, 9))
    assert stream.words.size == 0 and stream.symbols.tolist() == [9] and stream.counts.tolist() == [7]
    assert ans_decode(stream).tolist() == [9] * 7
    empty = ans_encode(np.zeros(0, dtype=np.int64))
    assert empty.count == 0 and ans_decode(empty).size == 0


def test_encode_rejects_bad_symbols():
    with pytest.raises(ConfigError):
        ans_encode(np.array([3, -1]))
    with pytest.raises(ConfigError):
        ans_encode(np.array([0.5]))


def sample_stream():
    return ans_encode(np.random.default_rng(2).choice(3, 2000, p=[0.7, 0.2, 0.1]))


def rejects(codes, stream):
    with pytest.raises(FormatError) as err:
        ans_decode(stream, "fc2.weight indices")
    assert err.value.code in codes and "fc2.weight indices" in str(err.value)


def test_rejects_corrupt_words():
    stream = sample_stream()
    rejects({"bad-stream", "bad-length"}, AnsStream(stream.symbols, stream.counts, stream.words[:-2].copy()))
    rejects({"bad-stream", "bad-length"}, AnsStream(stream.symbols, stream.counts, stream.words[2:].copy()))
    rejects({"bad-length"}, AnsStream(stream.symbols, stream.counts, np.append(stream.words, np.uint32(7))))
    flipped = stream.words.copy()
    flipped[len(flipped) // 2] ^= np.uint32(1 << 7)
    rejects({"bad-stream", "bad-length"}, AnsStream(stream.symbols, stream.counts, flipped))


def test_rejects_a_table_that_does_not_match_the_words():
    stream = sample_stream()
    counts = stream.counts.copy()
    counts[0] += 1
    counts[1] -= 1
    rejects({"bad-stream", "bad-length"}, AnsStream(stream.symbols, counts, stream.words))
    rejects({"bad-table"}, AnsStream(stream.symbols[::-1].copy(), stream.counts, stream.words))
    rejects({"bad-table"}, AnsStream(stream.symbols - 5, stream.counts, stream.words))
    rejects({"bad-table"}, AnsStream(stream.symbols[:2].copy(), stream.counts, stream.words))
    rejects({"bad-table"}, AnsStream(stream.symbols, np.array([5, 0, 3], np.uint32), stream.words))
    rejects({"bad-length"}, AnsStream(np.array([4]), np.array([3], np.uint32), np.array([1], np.uint32)))
    rejects({"bad-count"}, AnsStream(np.array([0, 1]), np.array([2**31, 2**31], np.uint32), stream.words))


def test_rejects_wrong_dtypes():
    stream = sample_stream()
    rejects({"bad-dtype"}, AnsStream(stream.symbols.astype(np.int32), stream.counts, stream.words))
    rejects({"bad-dtype"}, AnsStream(stream.symbols, stream.counts.astype(np.int64), stream.words))
    rejects({"bad-dtype"}, AnsStream(stream.symbols, stream.counts, stream.words.view(np.int32)))


def test_missing_constriction_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "constriction", None)  # makes `import constriction` fail
    with pytest.raises(ConfigError, match="pip install constriction"):
        ans_encode(np.array([0, 1, 1]))
