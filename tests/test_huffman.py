"""Canonical length-limited Huffman coding: RFC 1951's example, optimality oracles, entropy bound, rejections."""

import heapq
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import ConfigError, FormatError
from lowbit.format.huffman import (
    BLOCK,
    MAX_CODE_LENGTH,
    HuffmanStream,
    canonical_codes,
    code_lengths,
    huffman_decode,
    huffman_encode,
)


def huffman_cost(counts: list[int]) -> int:
    """Total bits of an unconstrained optimal code (classic heap merge: cost = sum of merged weights)."""
    heap = [c for c in counts if c > 0]
    if len(heap) == 1:
        return heap[0]
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        cost += merged
        heapq.heappush(heap, merged)
    return cost


def brute_force_cost(counts: list[int], max_length: int) -> int:
    """Least total bits over every length vector with lengths <= max_length and Kraft sum <= 1."""
    best = None
    for lengths in itertools.product(range(1, max_length + 1), repeat=len(counts)):
        if sum(2.0**-l for l in lengths) <= 1:
            cost = sum(c * l for c, l in zip(counts, lengths))
            best = cost if best is None else min(best, cost)
    return best


def entropy_bits(symbols: np.ndarray) -> float:
    p = np.bincount(symbols) / symbols.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def test_canonical_codes_of_rfc_1951():
    # RFC 1951 3.2.2: lengths (3, 3, 3, 3, 3, 2, 4, 4) for A..H give 010 011 100 101 110 00 1110 1111
    codes = canonical_codes(np.array([3, 3, 3, 3, 3, 2, 4, 4]))
    assert codes.tolist() == [0b010, 0b011, 0b100, 0b101, 0b110, 0b00, 0b1110, 0b1111]


def test_textbook_huffman_lengths():
    # CLRS 16.3: frequencies a:45 b:13 c:12 d:16 e:9 f:5 -> codeword lengths 1 3 3 3 4 4 (224 bits per 100)
    lengths = code_lengths(np.array([45, 13, 12, 16, 9, 5]))
    assert lengths.tolist() == [1, 3, 3, 3, 4, 4]


def test_stream_bits_by_hand():
    # counts 0:2, 1:1, 2:1 -> lengths 1, 2, 2 -> canonical codes 0, 10, 11, written first bit first
    stream = huffman_encode(np.array([1, 0, 2, 0]))
    assert stream.lengths.tolist() == [1, 2, 2]
    # stream bits 0..5 in order: 1 0 | 0 | 1 1 | 0 -> bits 0, 3 and 4 set: 1 + 8 + 16
    assert stream.data.tolist() == [0b011001]
    assert huffman_decode(stream).tolist() == [1, 0, 2, 0]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 1000), min_size=2, max_size=6), st.integers(3, 5))
def test_package_merge_is_optimal_under_the_cap(counts, max_length):
    lengths = code_lengths(np.array(counts), max_length).astype(int)
    assert lengths.max() <= max_length
    assert sum(2.0**-l for l in lengths) == 1.0
    assert int(np.dot(lengths, counts)) == brute_force_cost(counts, max_length)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=40))
def test_lengths_match_plain_huffman_when_the_cap_does_not_bind(counts):
    lengths = code_lengths(np.array(counts), MAX_CODE_LENGTH).astype(int)
    used = [c for c in counts if c > 0]
    if len(used) >= 2 and lengths.max() < MAX_CODE_LENGTH:
        assert int(np.dot(lengths, counts)) == huffman_cost(counts)
    assert all((length == 0) == (c == 0) for length, c in zip(lengths, counts))


def test_the_cap_binds_on_fibonacci_counts():
    counts = np.array([1, 1, 2, 3, 5, 8, 13, 21, 34, 55])  # plain Huffman depth 9
    assert code_lengths(counts, 16).max() == 9
    capped = code_lengths(counts, 5)
    assert capped.max() == 5 and np.sum(2.0 ** -capped.astype(float)) == 1.0
    with pytest.raises(ConfigError):
        code_lengths(np.ones(9), 3)  # 9 symbols do not fit 3-bit codes


symbol_lists = st.one_of(
    st.lists(st.integers(0, 20), max_size=400),
    st.lists(st.sampled_from([0, 1, 2**16 - 1]), max_size=50),  # the largest symbol
    st.lists(st.integers(0, 300), max_size=100),
)


@settings(max_examples=150, deadline=None)
@given(symbol_lists, st.sampled_from([9, 12, 16]))
def test_round_trip_is_exact(symbols, max_length):
    symbols = np.array(symbols, dtype=np.int64)
    stream = huffman_encode(symbols, max_length)
    assert stream.lengths.dtype == np.uint8 and stream.data.dtype == np.uint8 and stream.offsets.dtype == np.uint64
    assert stream.lengths.size == 0 or stream.lengths.max() <= max_length
    bits = int(stream.lengths[symbols].astype(np.int64).sum())
    assert stream.data.size == (bits + 7) // 8
    assert np.array_equal(huffman_decode(stream), symbols)


@pytest.mark.parametrize("n", [BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17])
def test_round_trip_across_blocks(n):
    symbols = np.random.default_rng(n).geometric(0.3, n) - 1
    stream = huffman_encode(symbols)
    assert stream.offsets.size == -(-n // BLOCK)
    assert np.array_equal(huffman_decode(stream), symbols)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 100), min_size=2, max_size=16), st.integers(0, 2**32 - 1))
def test_mean_code_length_within_one_bit_of_entropy(counts, seed):
    # at most 16 symbols: plain Huffman depth <= 15, so the 16-bit cap never binds and H <= L < H + 1
    symbols = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(counts)), counts))
    stream = huffman_encode(symbols)
    mean = stream.lengths[symbols].astype(np.int64).sum() / symbols.size
    h = entropy_bits(symbols)
    assert h - 1e-9 <= mean < h + 1


def test_single_symbol_stream_uses_one_zero_bit_per_symbol():
    stream = huffman_encode(np.full(10, 7))
    assert stream.lengths.tolist() == [0] * 7 + [1]
    assert stream.data.tolist() == [0, 0]  # 10 bits
    assert huffman_decode(stream).tolist() == [7] * 10
    one = huffman_encode(np.array([0]))
    assert one.data.tolist() == [0] and huffman_decode(one).tolist() == [0]


def test_empty_stream():
    stream = huffman_encode(np.zeros(0, dtype=np.int64))
    assert stream.count == 0 and stream.data.size == 0 and stream.offsets.size == 0
    assert huffman_decode(stream).size == 0


def test_encode_rejects_bad_symbols():
    with pytest.raises(ConfigError):
        huffman_encode(np.array([-1, 2]))
    with pytest.raises(ConfigError):
        huffman_encode(np.array([2**16]))
    with pytest.raises(ConfigError):
        huffman_encode(np.array([0.5]))


# ---------------------------------------------------------------------------- malformed streams


def sample_stream():
    return huffman_encode(np.array([0, 1, 2, 0, 0, 3, 0, 1]))  # counts 4, 2, 1, 1 -> lengths 1, 2, 3, 3


def replaced(stream, **changes):
    fields = dict(lengths=stream.lengths, data=stream.data, offsets=stream.offsets, count=stream.count,
                  block=stream.block)
    return HuffmanStream(**{**fields, **changes})


def rejects(code, stream):
    with pytest.raises(FormatError) as err:
        huffman_decode(stream, "conv1.weight indices")
    assert err.value.code == code and "conv1.weight indices" in str(err.value)


def test_rejects_incomplete_over_full_and_over_long_tables():
    stream = sample_stream()
    assert stream.lengths.tolist() == [1, 2, 3, 3]
    rejects("bad-table", replaced(stream, lengths=np.array([1, 2, 3, 4], np.uint8)))  # Kraft 15/16
    rejects("bad-table", replaced(stream, lengths=np.array([1, 2, 2, 3], np.uint8)))  # Kraft 9/8
    rejects("bad-table", replaced(stream, lengths=np.array([1, 2, 3, 17], np.uint8)))
    rejects("bad-table", replaced(stream, lengths=np.array([2], np.uint8)))  # a lone symbol's code is 1 bit
    rejects("bad-table", replaced(stream, lengths=np.zeros(4, np.uint8)))


def test_rejects_wrong_counts_and_bit_budgets():
    stream = sample_stream()
    rejects("bad-length", replaced(stream, count=stream.count + 5))  # needs more bits than stored
    rejects("bad-padding", replaced(stream, count=stream.count - 1))  # 14 bits stored, 12 used: 2 left over
    rejects("bad-length", replaced(stream, count=stream.count - 3))  # 8 bits used: a whole byte left over
    rejects("bad-length", replaced(stream, data=np.append(stream.data, np.uint8(0))))
    rejects("bad-count", replaced(stream, count=-1))
    rejects("bad-count", replaced(stream, count=BLOCK + 1))  # would need two block offsets
    rejects("bad-count", replaced(stream, block=0))
    padded = stream.data.copy()
    padded[-1] |= np.uint8(0x80)
    rejects("bad-padding", replaced(stream, data=padded))


def test_count_is_capped_by_the_shortest_code_before_decoding():
    stream = huffman_encode(np.arange(64) % 4)  # four 2-bit codes: 128 bits
    assert stream.data.size == 16 and huffman_decode(stream).size == 64
    for count in (65, 128):  # 128 would pass a 1-bit-per-symbol bound
        with pytest.raises(FormatError, match="of at least 2 bits need") as caught:
            huffman_decode(replaced(stream, count=count))
        assert caught.value.code == "bad-length"
    single = huffman_encode(np.zeros(16, np.int64))  # one symbol: 1-bit codes, 8 per byte
    assert huffman_decode(single).size == 16
    rejects("bad-length", replaced(single, count=17))


def test_rejects_a_bit_pattern_that_is_no_code():
    single = huffman_encode(np.zeros(5, dtype=np.int64))
    rejects("bad-symbol", replaced(single, data=np.array([0b00100], np.uint8)))


def test_rejects_bad_block_offsets():
    symbols = np.random.default_rng(0).integers(0, 5, 2 * BLOCK + 3)
    stream = huffman_encode(symbols)
    moved = stream.offsets.copy()
    moved[1] += np.uint64(1)
    rejects("bad-offsets", replaced(stream, offsets=moved))
    rejects("bad-offsets", replaced(stream, offsets=stream.offsets[::-1].copy()))
    rejects("bad-offsets", replaced(stream, offsets=stream.offsets + np.uint64(8 * stream.data.size + 8)))
    rejects("bad-count", replaced(stream, offsets=stream.offsets[:2]))


def test_rejects_wrong_dtypes():
    stream = sample_stream()
    rejects("bad-dtype", replaced(stream, lengths=stream.lengths.astype(np.int32)))
    rejects("bad-dtype", replaced(stream, data=stream.data.astype(np.int8)))
    rejects("bad-dtype", replaced(stream, offsets=stream.offsets.astype(np.int64)))
