"""Deep Compression relative-index coding: the paper's Figure 2 by hand, a loop reference, rejections."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import ConfigError, FormatError
from lowbit.format.sparse import decode_relative, encode_relative


def reference_encode(codes: list[int], index_bits: int) -> tuple[list[int], list[int]]:
    """Walk the array; a run of more than 2^b - 1 zeros stores a filler zero after 2^b - 1 of them."""
    limit = (1 << index_bits) - 1
    gaps, values, zeros = [], [], 0
    for code in codes:
        if code == 0:
            zeros += 1
            continue
        while zeros > limit:
            gaps.append(limit)
            values.append(0)
            zeros -= limit + 1  # the filler itself takes one zero's place
        gaps.append(zeros)
        values.append(code)
        zeros = 0
    return gaps, values


def test_paper_figure_2_three_bit_index():
    # Han et al. 2016, Fig. 2: non-zeros 3.4, 0.9, 1.7 at positions 1, 4, 15 with a 3-bit index; the jump
    # 4 -> 15 overflows, so a filler zero is stored at position 12 (figure's diff row: 1, 3, 8, 3).
    weights = np.zeros(16)
    weights[[1, 4, 15]] = [3.4, 0.9, 1.7]
    codebook = [0.0, 3.4, 0.9, 1.7]  # index 0 is the zero weight
    codes = np.array([codebook.index(w) for w in weights])
    gaps, values = encode_relative(codes, 3)
    assert gaps.tolist() == [1, 2, 7, 2]  # zeros skipped before each stored entry
    assert values.tolist() == [1, 2, 0, 3]  # 3.4, 0.9, filler zero, 1.7
    positions = np.cumsum(gaps + 1) - 1
    assert positions.tolist() == [1, 4, 12, 15]
    assert np.diff(positions).tolist() == [3, 8, 3]  # the figure's index differences
    assert np.array_equal(decode_relative(gaps, values, 16, 3), codes)


def test_run_needing_several_fillers():
    # 2-bit index: at most 3 zeros per gap; 9 zeros before the code 5 need two fillers (at positions 3 and 7)
    codes = np.array([0] * 9 + [5])
    gaps, values = encode_relative(codes, 2)
    assert gaps.tolist() == [3, 3, 1] and values.tolist() == [0, 0, 5]
    assert np.array_equal(decode_relative(gaps, values, 10, 2), codes)


def test_no_entries_for_all_zero_and_empty_arrays():
    for n in (0, 1, 100):
        gaps, values = encode_relative(np.zeros(n, dtype=np.int64), 5)
        assert gaps.size == values.size == 0
        assert np.array_equal(decode_relative(gaps, values, n, 5), np.zeros(n, dtype=np.int64))


@st.composite
def sparse_codes(draw):
    n = draw(st.integers(0, 300))
    density = draw(st.sampled_from([0.0, 0.02, 0.1, 0.5, 1.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    top = draw(st.sampled_from([1, 15, 255, 2**16 - 1]))
    codes = np.where(rng.random(n) < density, rng.integers(1, top + 1, n), 0)
    if n:
        codes[-1] = top  # maximum code, and a non-zero at the very end
    return codes


@settings(max_examples=200, deadline=None)
@given(sparse_codes(), st.integers(1, 8))
def test_matches_reference_and_round_trips(codes, index_bits):
    gaps, values = encode_relative(codes, index_bits)
    expected_gaps, expected_values = reference_encode(codes.tolist(), index_bits)
    assert gaps.tolist() == expected_gaps and values.tolist() == expected_values
    assert gaps.size == 0 or int(gaps.max()) <= (1 << index_bits) - 1
    assert np.array_equal(decode_relative(gaps, values, codes.size, index_bits), codes)


def test_decode_rejects_malformed_streams():
    gaps, values = encode_relative(np.array([0, 3, 0, 0, 4]), 2)
    with pytest.raises(FormatError) as err:
        decode_relative(gaps, values, 4, 2, "fc1.weight")
    assert err.value.code == "bad-index" and "fc1.weight" in str(err.value)
    with pytest.raises(FormatError) as err:
        decode_relative(gaps, values[:-1], 5, 2)
    assert err.value.code == "bad-length"
    with pytest.raises(FormatError) as err:
        decode_relative(np.array([4]), np.array([1]), 10, 2)  # a gap of 4 does not fit 2 bits
    assert err.value.code == "bad-code"
    with pytest.raises(FormatError) as err:
        decode_relative(np.array([0]), np.array([-1]), 10, 2)
    assert err.value.code == "bad-code"
    with pytest.raises(FormatError) as err:
        decode_relative(gaps, values, 5, 0)
    assert err.value.code == "bad-bits"
    with pytest.raises(FormatError) as err:
        decode_relative(gaps, values, -1, 2)
    assert err.value.code == "bad-shape"
    with pytest.raises(FormatError) as err:
        decode_relative(gaps.astype(np.float32), values, 5, 2)
    assert err.value.code == "bad-dtype"


def test_encode_rejects_bad_input():
    with pytest.raises(ConfigError):
        encode_relative(np.array([1, -2]), 5)
    with pytest.raises(ConfigError):
        encode_relative(np.array([0.5]), 5)
    with pytest.raises(ConfigError):
        encode_relative(np.array([1]), 17)
