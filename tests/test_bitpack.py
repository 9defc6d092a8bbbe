"""Dense k-bit packing and sign rows, against hand-worked bytes and a bit-matrix reference."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import ConfigError, FormatError
from lowbit.format.bitpack import (
    from_reduction_rows,
    pack_codes,
    pack_rows,
    pack_signs,
    packed_size,
    reduction_shape,
    to_reduction_rows,
    unpack_codes,
    unpack_rows,
)

F32 = np.finfo(np.float32)


def reference_pack(codes: list[int], bits: int) -> bytes:
    """Bit by bit: code i's bit b is stream bit i*bits + b; stream bit j is bit j%8 of byte j//8."""
    out = bytearray((len(codes) * bits + 7) // 8)
    for i, code in enumerate(codes):
        for b in range(bits):
            j = i * bits + b
            out[j // 8] |= ((code >> b) & 1) << (j % 8)
    return bytes(out)


def test_two_bit_codes_by_hand():
    # 1 -> bits 0-1 = 01, 2 -> bits 2-3 = 10, 3 -> bits 4-5 = 11: 0b00_11_10_01
    assert pack_codes(np.array([1, 2, 3]), 2).tolist() == [0b00111001]


def test_three_bit_codes_cross_a_byte_by_hand():
    # 5 = 101 at bits 0-2, 1 = 001 at bits 3-5, 7 = 111 at bits 6-8 -> 0b11_001_101, then 0b1
    assert pack_codes(np.array([5, 1, 7]), 3).tolist() == [0b11001101, 0b00000001]


@st.composite
def codes_and_bits(draw):
    bits = draw(st.integers(1, 32))
    top = (1 << bits) - 1
    codes = draw(st.lists(st.one_of(st.integers(0, top), st.just(top), st.just(0)), max_size=150))
    return codes, bits


@settings(max_examples=200, deadline=None)
@given(codes_and_bits())
def test_pack_matches_reference_and_round_trips(case):
    codes, bits = case
    packed = pack_codes(np.array(codes, dtype=np.int64), bits)
    assert packed.dtype == np.uint8
    assert packed.size == packed_size(len(codes), bits) == -(-len(codes) * bits // 8)
    assert packed.tobytes() == reference_pack(codes, bits)
    assert unpack_codes(packed, len(codes), bits).tolist() == codes


@pytest.mark.parametrize("bits", range(1, 17))
def test_every_width_round_trips_lengths_off_the_byte_and_word(bits):
    rng = np.random.default_rng(bits)
    for n in (0, 1, 7, 63, 65, 200_003):
        codes = rng.integers(0, 1 << bits, n)
        codes[: min(n, 2)] = (1 << bits) - 1
        packed = pack_codes(codes, bits)
        assert packed.size == (n * bits + 7) // 8
        assert np.array_equal(unpack_codes(packed, n, bits), codes)


def test_unpack_rejects_wrong_length_and_padding():
    packed = pack_codes(np.array([5, 1, 7]), 3)
    with pytest.raises(FormatError) as err:
        unpack_codes(packed[:1], 3, 3, "layer.weight")
    assert err.value.code == "bad-length" and "layer.weight" in str(err.value)
    with pytest.raises(FormatError) as err:
        unpack_codes(np.append(packed, np.uint8(0)), 3, 3)
    assert err.value.code == "bad-length"
    dirty = packed.copy()
    dirty[-1] |= 0b10
    with pytest.raises(FormatError) as err:
        unpack_codes(dirty, 3, 3)
    assert err.value.code == "bad-padding"
    with pytest.raises(FormatError) as err:
        unpack_codes(packed.astype(np.int16), 3, 3)
    assert err.value.code == "bad-dtype"
    with pytest.raises(FormatError) as err:
        unpack_codes(packed, 3, 0)
    assert err.value.code == "bad-bits"


def test_pack_rejects_codes_out_of_range_and_bad_widths():
    with pytest.raises(FormatError) as err:
        pack_codes(np.array([0, 8]), 3)
    assert err.value.code == "bad-code"
    with pytest.raises(FormatError):
        pack_codes(np.array([-1]), 3)
    with pytest.raises(ConfigError):
        pack_codes(np.array([1]), 33)
    with pytest.raises(ConfigError):
        pack_codes(np.array([1.0]), 3)


def test_sign_rows_by_hand():
    # row 0: +1 -1 +1 (0 and -0.0 are +1: sign(0) = +1) -> bits 1,0,1 = 5; row 1: -0.0, NaN, -inf -> bit 0 only
    x = np.array([[0.5, -2.0, 0.0], [-0.0, np.nan, -np.inf]], dtype=np.float32)
    words = pack_signs(x)
    assert words.dtype == np.uint64 and words.shape == (2, 1)
    assert words[:, 0].tolist() == [0b101, 0b001]


def test_sign_rows_span_words_with_zero_tail():
    k = 130
    bits = np.zeros((1, k), dtype=bool)
    bits[0, [0, 63, 64, 129]] = True
    words = pack_rows(bits)
    assert words.shape == (1, 3)
    assert words[0].tolist() == [1 | (1 << 63), 1, 1 << 1]  # bit 129 is bit 1 of word 2, bits 130..191 zero
    assert np.array_equal(unpack_rows(words, k), bits)


special_floats = st.one_of(
    st.floats(width=32, allow_subnormal=True),
    st.sampled_from([0.0, -0.0, float(F32.smallest_subnormal), -float(F32.smallest_subnormal), np.inf, -np.inf]),
)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 4), st.integers(0, 140), st.data())
def test_sign_rows_match_reference_and_round_trip(rows, k, data):
    x = np.array(data.draw(st.lists(special_floats, min_size=rows * k, max_size=rows * k)), dtype=np.float32)
    x = x.reshape(rows, k)
    words = pack_signs(x)
    assert words.shape == (rows, (k + 63) // 64)
    for r in range(rows):
        expected = sum(1 << j for j in range(k) if x[r, j] >= 0)
        got = sum(int(w) << (64 * i) for i, w in enumerate(words[r]))
        assert got == expected  # also says that the tail bits are zero
    assert np.array_equal(unpack_rows(words, k), x >= 0)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 200), st.integers(0, 2**32 - 1))
def test_binary_dot_product_ignores_the_tail(k, seed):
    # K - 2 popcount(a XOR w) equals the dot product of the +-1 vectors for any K, tail included in the XOR
    rng = np.random.default_rng(seed)
    a, w = rng.standard_normal((2, k)).astype(np.float32)
    xor = pack_signs(a[None]) ^ pack_signs(w[None])
    popcount = int(np.unpackbits(xor.view(np.uint8)).sum())
    assert k - 2 * popcount == int(np.dot(np.where(a >= 0, 1, -1), np.where(w >= 0, 1, -1)))


def test_unpack_rows_rejects_bad_shape_and_tail_bits():
    words = pack_rows(np.ones((2, 70), dtype=bool))
    with pytest.raises(FormatError) as err:
        unpack_rows(words, 130)
    assert err.value.code == "bad-shape"
    with pytest.raises(FormatError) as err:
        unpack_rows(words.astype(np.int64), 70)
    assert err.value.code == "bad-shape"
    dirty = words.copy()
    dirty[1, 1] |= np.uint64(1 << 10)  # bit 74 of a 70-bit row
    with pytest.raises(FormatError) as err:
        unpack_rows(dirty, 70)
    assert err.value.code == "bad-padding"


def test_conv_reduction_order_is_input_channel_fastest():
    c_out, c_in, kh, kw = 2, 3, 2, 4
    w = np.arange(c_out * c_in * kh * kw).reshape(c_out, c_in, kh, kw)
    rows = to_reduction_rows(w)
    assert rows.shape == reduction_shape(w.shape) == (c_out, c_in * kh * kw)
    for o in range(c_out):
        for c in range(c_in):
            for y in range(kh):
                for x in range(kw):
                    assert rows[o, (y * kw + x) * c_in + c] == w[o, c, y, x]
    assert np.array_equal(from_reduction_rows(rows, w.shape), w)


@pytest.mark.parametrize("shape", [(), (5,), (3, 7), (0, 4), (4, 0, 3, 3), (2, 3, 1, 5, 2)])
def test_reduction_rows_round_trip_every_rank(shape):
    x = np.arange(int(np.prod(shape))).reshape(shape)
    rows = to_reduction_rows(x)
    assert rows.shape == reduction_shape(shape)
    assert np.array_equal(from_reduction_rows(rows, shape), x)
