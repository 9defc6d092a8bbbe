"""Per-tensor codecs: bit-exact round trips, values equal to torch's base.decode, and every rejection."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import ConfigError, FormatError
from lowbit.format.codecs import NumpyEncoded, codec_names, decode, encode, get_codec, values
from lowbit.quantizers.base import Encoded
from lowbit.quantizers.base import decode as torch_decode

F32 = np.finfo(np.float32)
TINY = float(F32.smallest_subnormal)
KINDS = ("affine", "log", "binary", "ternary", "codebook", "group_affine", "group_binary", "group_ternary",
         "group_codebook", "group_log")

positive_scales = st.one_of(
    st.floats(min_value=TINY, max_value=float(F32.max), width=32, allow_subnormal=True),
    st.sampled_from([TINY, 2 * TINY, float(F32.tiny), float(F32.eps), 1.0, float(F32.max)]),
)
finite_floats = st.one_of(
    st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True),
    st.sampled_from([0.0, -0.0, TINY, -TINY]),
)
shapes = st.lists(st.integers(0, 4), max_size=4).map(tuple)


def channel_param(draw, strategy, shape, axis, dtype):
    """0-d, or 1-D along axis (length shape[axis])."""
    if axis is None or draw(st.booleans()):
        return np.array(draw(strategy), dtype=dtype)
    return np.array(draw(st.lists(strategy, min_size=shape[axis], max_size=shape[axis])), dtype=dtype)


def with_extremes(codes, low, high):
    """Put the smallest and largest valid code in (when there is room)."""
    flat = codes.reshape(-1)
    flat[:1] = high
    flat[1:2] = low
    return codes


@st.composite
def encodeds(draw, kind):
    shape = draw(shapes)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    axis = draw(st.one_of(st.none(), st.integers(0, len(shape) - 1))) if shape else None
    meta = {} if axis is None else {"axis": axis}
    if kind == "affine":
        bits = draw(st.integers(1, 16))
        qmin = draw(st.sampled_from([0, -(2 ** (bits - 1))]))
        qmax = qmin + 2**bits - 1 - draw(st.integers(0, min(1, 2**bits - 1)))
        codes = with_extremes(rng.integers(qmin, qmax + 1, shape), qmin, qmax)
        params = {
            "scale": channel_param(draw, positive_scales, shape, axis, np.float32),
            "zero_point": channel_param(draw, st.integers(-(2**16), 2**16), shape, axis, np.int64),
        }
        return NumpyEncoded(kind, codes, bits, params, {"qmin": qmin, "qmax": qmax, **meta})
    if kind == "group_log":
        shape = (draw(st.integers(0, 4)), *draw(st.lists(st.integers(0, 4), min_size=1, max_size=3)))
        group_size = draw(st.sampled_from([1, 2, 3, 5, 64, 2**31]))
        groups = (shape[0], -(-math.prod(shape[1:]) // group_size))
        bits = draw(st.integers(2, 8))
        levels = 2 ** (bits - 1) - 1
        scale = np.array(draw(st.lists(positive_scales, min_size=math.prod(groups), max_size=math.prod(groups))),
                         dtype=np.float32).reshape(groups)
        codes = with_extremes(rng.integers(-levels, levels + 1, shape), -levels, levels)
        return NumpyEncoded(kind, codes, bits, {"scale": scale}, {"group_size": group_size})
    if kind == "group_codebook":
        shape = (draw(st.integers(0, 4)), *draw(st.lists(st.integers(0, 4), min_size=1, max_size=3)))
        group_size = draw(st.sampled_from([1, 2, 3, 5, 64, 2**31]))
        groups = (shape[0], -(-math.prod(shape[1:]) // group_size))
        bits = draw(st.integers(1, 8))
        size = draw(st.integers(1, min(2**bits, 6)))
        book = np.array(draw(st.lists(finite_floats, min_size=math.prod(groups) * size,
                                      max_size=math.prod(groups) * size)), dtype=np.float32)
        codes = with_extremes(rng.integers(0, size, shape), 0, size - 1)
        return NumpyEncoded(kind, codes, bits, {"codebook": book.reshape(*groups, size)}, {"group_size": group_size})
    if kind in ("group_binary", "group_ternary"):
        shape = (draw(st.integers(0, 4)), *draw(st.lists(st.integers(0, 4), min_size=1, max_size=3)))
        group_size = draw(st.sampled_from([1, 2, 3, 5, 64, 2**31]))
        groups = (shape[0], -(-math.prod(shape[1:]) // group_size))
        scale = np.array(draw(st.lists(positive_scales, min_size=math.prod(groups), max_size=math.prod(groups))),
                         dtype=np.float32).reshape(groups)
        low, bits = (0, 1) if kind == "group_binary" else (-1, 2)
        codes = with_extremes(rng.integers(low, 2, shape), low, 1)
        return NumpyEncoded(kind, codes, bits, {"scale": scale}, {"group_size": group_size})
    if kind == "group_affine":
        shape = (draw(st.integers(0, 4)), *draw(st.lists(st.integers(0, 4), min_size=1, max_size=3)))
        bits = draw(st.integers(1, 16))
        qmin = draw(st.sampled_from([0, -(2 ** (bits - 1))]))
        qmax = qmin + 2**bits - 1 - draw(st.integers(0, min(1, 2**bits - 1)))
        group_size = draw(st.sampled_from([1, 2, 3, 5, 64, 2**31]))
        groups = (shape[0], -(-math.prod(shape[1:]) // group_size))
        codes = with_extremes(rng.integers(qmin, qmax + 1, shape), qmin, qmax)
        scale = np.array(draw(st.lists(positive_scales, min_size=math.prod(groups), max_size=math.prod(groups))),
                         dtype=np.float32).reshape(groups)
        symmetric = draw(st.booleans())
        params = {"scale": scale} if symmetric else {"scale": scale,
                                                     "zero_point": rng.integers(qmin, qmax + 1, groups)}
        meta = {"qmin": qmin, "qmax": qmax, "group_size": group_size, "symmetric": symmetric}
        return NumpyEncoded(kind, codes, bits, params, meta)
    if kind == "log":
        bits = draw(st.integers(1, 16))
        codes = with_extremes(rng.integers(0, 2**bits, shape), 0, 2**bits - 1)
        fsr = draw(st.one_of(st.integers(-1024, 1024), st.sampled_from([-1024, -127, 0, 1, 128, 1024])))
        signed = draw(st.booleans())
        params = {"sign": rng.choice(np.array([-1, 1], dtype=np.int8), shape)} if signed else {}
        return NumpyEncoded(kind, codes, bits, params, {"fsr": fsr, "signed": signed})
    if kind in ("binary", "ternary"):
        low, bits = (0, 1) if kind == "binary" else (-1, 2)
        codes = with_extremes(rng.integers(low, 2, shape), low, 1)
        scale = channel_param(draw, positive_scales, shape, axis, np.float32)
        return NumpyEncoded(kind, codes, bits, {"scale": scale}, meta)
    bits = draw(st.integers(1, 8))
    book = np.array(draw(st.lists(finite_floats, min_size=1, max_size=min(2**bits, 20))), dtype=np.float32)
    codes = with_extremes(rng.integers(0, book.size, shape), 0, book.size - 1)
    return NumpyEncoded(kind, codes, bits, {"codebook": book}, meta)


any_encoded = st.sampled_from(KINDS).flatmap(encodeds)


def stored(enc, name="t"):
    """Encode, then pass the meta through JSON as a container would."""
    arrays, meta = encode(enc, name)
    return arrays, json.loads(json.dumps(meta))


def assert_same(a: NumpyEncoded, b: NumpyEncoded):
    assert a.kind == b.kind and a.bits == b.bits and a.meta == b.meta
    assert a.codes.dtype == b.codes.dtype and a.codes.shape == b.codes.shape
    assert a.codes.tobytes() == b.codes.tobytes()  # bit for bit, NaN payloads and -0.0 included
    assert a.params.keys() == b.params.keys()
    for key in a.params:
        if key == "zero_point" and a.params[key].shape != b.params[key].shape:
            # a zero point shared by every channel is stored once
            shared, full = sorted((a.params[key], b.params[key]), key=np.ndim)
            assert shared.ndim == 0 and shared.dtype == full.dtype == np.int64 and (full == shared).all()
            continue
        assert a.params[key].dtype == b.params[key].dtype and a.params[key].shape == b.params[key].shape
        assert a.params[key].tobytes() == b.params[key].tobytes()


def to_torch(enc: NumpyEncoded) -> Encoded:
    params = {k: torch.from_numpy(np.asarray(v, order="C")) for k, v in enc.params.items()}
    return Encoded(enc.kind, torch.from_numpy(enc.codes), enc.bits, params, dict(enc.meta))


@settings(max_examples=300, deadline=None)
@given(any_encoded)
def test_round_trip_is_bit_exact(enc):
    arrays, meta = stored(enc)
    assert_same(decode(arrays, meta, "t"), enc)


@settings(max_examples=300, deadline=None)
@given(any_encoded)
def test_values_equal_torch_decode_bit_for_bit(enc):
    mine = values(decode(*stored(enc), "t"))
    theirs = torch_decode(to_torch(enc)).numpy()
    assert mine.dtype == theirs.dtype == np.float32
    assert mine.shape == theirs.shape
    assert np.array_equal(mine.view(np.uint32), theirs.view(np.uint32))


@settings(max_examples=100, deadline=None)
@given(any_encoded)
def test_packed_codes_take_ceil_n_bits_over_8_bytes(enc):
    arrays, meta = stored(enc)
    n = math.prod(meta["shape"])
    if "codes" in arrays:
        width = 2 if enc.kind == "ternary" else enc.bits
        assert arrays["codes"].dtype == np.uint8 and arrays["codes"].size == -(-n * width // 8)
    if "sign" in arrays:
        assert arrays["sign"].size == -(-n // 8)
    if "signs" in arrays:
        rows = meta["shape"][0] if len(meta["shape"]) >= 2 else 1
        k = n // rows if rows else math.prod(meta["shape"][1:])
        assert arrays["signs"].dtype == np.uint64 and arrays["signs"].shape == (rows, -(-k // 64))


def test_affine_bytes_by_hand():
    # the base.py example: codes 0, 128, 255 at 8 bits are the bytes themselves; values (c - 85) * 9/255
    scale = np.float32(9 / 255)
    enc = NumpyEncoded("affine", np.array([0, 128, 255]), 8, {"scale": np.array(scale), "zero_point": np.array(85)},
                       {"qmin": 0, "qmax": 255})
    arrays, meta = encode(enc)
    assert arrays["codes"].tolist() == [0, 128, 255]
    assert meta == {"codec": "affine", "shape": [3], "bits": 8, "qmin": 0, "qmax": 255}
    assert values(enc).tolist() == [np.float32(-85) * scale, np.float32(43) * scale, np.float32(170) * scale]


def test_signed_affine_codes_are_stored_offset_by_qmin():
    enc = NumpyEncoded("affine", np.array([-8, 7, 0]), 4, {"scale": np.array(1.0), "zero_point": np.array(0)},
                       {"qmin": -8, "qmax": 7})
    # stored 0, 15, 8 -> low nibble first: 0xF0, 0x08
    assert encode(enc)[0]["codes"].tolist() == [0xF0, 0x08]


def test_ternary_and_log_bytes_by_hand():
    ternary = NumpyEncoded("ternary", np.array([-1, 0, 1]), 2, {"scale": np.array(0.25, np.float32)})
    assert encode(ternary)[0]["codes"].tolist() == [0b10_01_00]  # codes + 1 = 0, 1, 2
    assert values(ternary).tolist() == [-0.25, 0.0, 0.25]
    log = NumpyEncoded("log", np.array([0, 1, 2, 3]), 2, {"sign": np.array([1, -1, 1, -1], np.int8)},
                       {"fsr": 1, "signed": True})
    arrays, _ = encode(log)
    assert arrays["codes"].tolist() == [0b11_10_01_00] and arrays["sign"].tolist() == [0b0101]
    assert values(log).tolist() == [0.0, -0.25, 0.5, -1.0]  # 2^(1 - 4 + c)


def test_binary_packs_along_the_reduction_axis():
    codes = np.zeros((2, 3, 1, 2), dtype=np.int64)  # [C_out, C_in, kh, kw]
    codes[0, 1, 0, 1] = 1  # row 0, k = (0 * 2 + 1) * 3 + 1 = 4
    codes[1, 2, 0, 0] = 1  # row 1, k = 2
    arrays, _ = encode(NumpyEncoded("binary", codes, 1, {"scale": np.ones(2, np.float32)}, {"axis": 0}))
    assert arrays["signs"][:, 0].tolist() == [1 << 4, 1 << 2]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_raw_floats_keep_every_bit(dtype):
    info = np.finfo(dtype)
    x = np.array([0.0, -0.0, info.smallest_subnormal, -info.smallest_subnormal, info.max, np.inf, -np.inf, 1.5],
                 dtype=dtype)
    x = np.concatenate([x, np.array([0x7FC0_1234], np.uint32).view(np.float32).astype(dtype)]).reshape(3, 3)
    enc = NumpyEncoded.from_float(x)
    arrays, meta = stored(enc)
    assert meta == {"codec": np.dtype(dtype).name, "shape": [3, 3], "bits": 8 * np.dtype(dtype).itemsize}
    assert_same(decode(arrays, meta), enc)
    assert np.array_equal(values(enc), x.astype(np.float32), equal_nan=True)


# ---------------------------------------------------------------------------- rejections


def good(kind="affine"):
    encs = {
        "affine": NumpyEncoded("affine", np.array([[0, 1, 2], [3, 2, 1]]), 2,
                               {"scale": np.array([0.5, 2.0], np.float32), "zero_point": np.array(1)},
                               {"qmin": 0, "qmax": 3, "axis": 0}),
        "codebook": NumpyEncoded("codebook", np.array([0, 1, 1, 0, 1]), 2,
                                 {"codebook": np.array([0.0, 1.5], np.float32)}),
        "binary": NumpyEncoded("binary", np.array([[0, 1], [1, 1]]), 1, {"scale": np.array([1.0, 2.0], np.float32)},
                               {"axis": 0}),
        "log": NumpyEncoded("log", np.array([0, 3, 1]), 2, {"sign": np.array([1, -1, 1], np.int8)},
                            {"fsr": 0, "signed": True}),
    }
    return stored(encs[kind], "fc.weight")


def rejects(code, arrays, meta):
    with pytest.raises(FormatError) as err:
        decode(arrays, meta, "fc.weight")
    assert err.value.code == code
    assert "fc.weight" in str(err.value)
    return err.value


def test_unknown_codec_lists_the_valid_ones():
    arrays, meta = good()
    err = rejects("unknown-codec", arrays, {**meta, "codec": "zip"})
    for name in codec_names():
        assert name in str(err)
    with pytest.raises(FormatError) as e:
        get_codec("zip")
    assert e.value.code == "unknown-codec"
    assert set(codec_names()) == {"float32", "float16", *KINDS}


def test_packed_length_must_be_ceil_n_bits_over_8():
    arrays, meta = good()
    rejects("bad-length", {**arrays, "codes": arrays["codes"][:-1]}, meta)
    rejects("bad-length", {**arrays, "codes": np.append(arrays["codes"], np.uint8(0))}, meta)
    rejects("bad-length", arrays, {**meta, "shape": [2, 5]})  # 20 bits need 3 bytes
    dirty = arrays["codes"].copy()
    dirty[-1] |= np.uint8(0x80)  # 6 codes of 2 bits use 12 of the 16 bits
    rejects("bad-padding", {**arrays, "codes": dirty}, meta)


def test_shape_must_be_small_non_negative_ints():
    arrays, meta = good()
    rejects("bad-shape", arrays, {**meta, "shape": [2**16, 2**16]})  # 2^32 elements, over the cap
    rejects("bad-shape", arrays, {**meta, "shape": [2**62, 2**62, 0]})  # Python-int product, no wrap to 0
    rejects("bad-shape", arrays, {**meta, "shape": [-2, -3]})
    rejects("bad-shape", arrays, {**meta, "shape": "2,3"})
    rejects("bad-shape", arrays, {**meta, "shape": [1] * 33})
    rejects("bad-shape", {**arrays, "scale": np.ones(3, np.float32)}, meta)  # per-channel length != shape[axis]
    raw_arrays, raw_meta = stored(NumpyEncoded.from_float(np.zeros((2, 3), np.float32)))
    rejects("bad-shape", raw_arrays, {**raw_meta, "shape": [3, 2]})
    b_arrays, b_meta = good("binary")
    rejects("bad-shape", {**b_arrays, "signs": b_arrays["signs"][:1]}, b_meta)


@pytest.mark.parametrize("shape", [[0, 2**63], [0, 2**31 + 1], [0, 2**31, 2**31], [2**16, 0, 2**16], [0, *[2**8] * 31]])
def test_zero_size_shapes_with_absurd_dims_are_rejected(shape):
    arrays, meta = stored(NumpyEncoded("affine", np.zeros((0, 3), np.int64), 2,
                                       {"scale": np.float32(1), "zero_point": np.int64(0)}, {"qmin": 0, "qmax": 3}))
    rejects("bad-shape", arrays, {**meta, "shape": shape})
    raw_arrays, raw_meta = stored(NumpyEncoded.from_float(np.zeros((0, 3), np.float32)))
    rejects("bad-shape", raw_arrays, {**raw_meta, "shape": shape})
    assert decode(arrays, meta, "t").codes.shape == (0, 3)


def test_codebook_index_must_be_inside_the_codebook():
    arrays, meta = good("codebook")
    rejects("bad-index", {**arrays, "codebook": arrays["codebook"][:1]}, meta)
    rejects("bad-shape", {**arrays, "codebook": np.zeros(5, np.float32)}, meta)  # 5 entries > 2^2
    rejects("bad-value", {**arrays, "codebook": np.array([0.0, np.nan], np.float32)}, meta)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 0.0, -0.0, -1.0, -TINY])
def test_scales_must_be_finite_and_positive(bad):
    arrays, meta = good()
    rejects("bad-scale", {**arrays, "scale": np.array([0.5, bad], np.float32)}, meta)
    b_arrays, b_meta = good("binary")
    rejects("bad-scale", {**b_arrays, "scale": np.array(bad, np.float32)}, b_meta)
    enc = NumpyEncoded("ternary", np.array([1, 0]), 2, {"scale": np.array(bad, np.float32)})
    with pytest.raises(FormatError) as err:
        encode(enc, "fc.weight")
    assert err.value.code == "bad-scale" and "fc.weight" in str(err.value)


def test_codes_out_of_range():
    arrays, meta = good()
    rejects("bad-code", arrays, {**meta, "qmax": 2})  # a stored 3 is past qmax
    with pytest.raises(FormatError) as err:
        encode(NumpyEncoded("ternary", np.array([2]), 2, {"scale": np.array(1.0, np.float32)}))
    assert err.value.code == "bad-code"
    ternary_arrays, ternary_meta = stored(NumpyEncoded("ternary", np.array([1, 1, 1, 1]), 2,
                                                       {"scale": np.array(1.0, np.float32)}))
    rejects("bad-code", {**ternary_arrays, "codes": np.array([0xFF], np.uint8)}, ternary_meta)  # stored 3 = code 2
    with pytest.raises(FormatError) as err:
        encode(NumpyEncoded("binary", np.array([-1, 1]), 1, {"scale": np.array(1.0, np.float32)}))
    assert err.value.code == "bad-code"


def test_meta_arrays_and_dtypes_are_checked():
    arrays, meta = good()
    rejects("bad-meta", arrays, {k: v for k, v in meta.items() if k != "qmin"})
    rejects("bad-meta", arrays, {**meta, "qmax": 4})  # 0..4 does not fit 2 bits
    rejects("bad-meta", arrays, {**meta, "axis": 2})
    rejects("bad-bits", arrays, {**meta, "bits": 17})
    rejects("bad-bits", arrays, {**meta, "bits": True})
    rejects("bad-arrays", {k: v for k, v in arrays.items() if k != "scale"}, meta)
    rejects("bad-arrays", {**arrays, "extra": np.zeros(1)}, meta)
    rejects("bad-dtype", {**arrays, "scale": arrays["scale"].astype(np.float64)}, meta)
    rejects("bad-dtype", {**arrays, "codes": arrays["codes"].astype(np.int8)}, meta)
    log_arrays, log_meta = good("log")
    rejects("bad-meta", log_arrays, {**log_meta, "fsr": 5000})
    rejects("bad-arrays", log_arrays, {**log_meta, "signed": False})
    rejects("bad-meta", log_arrays, {**log_meta, "signed": 1})
    with pytest.raises(FormatError) as err:
        decode(arrays, ["not", "a", "dict"], "fc.weight")
    assert err.value.code == "bad-meta"


def test_encode_rejects_inconsistent_encoded():
    enc = NumpyEncoded("affine", np.array([1]), 2, {"scale": np.array(1.0)}, {"qmin": 0, "qmax": 3})
    with pytest.raises(FormatError) as err:
        encode(enc)
    assert err.value.code == "bad-param"  # zero_point missing
    with pytest.raises(FormatError) as err:
        encode(NumpyEncoded("log", np.array([1]), 2, {"sign": np.array([0], np.int8)}, {"fsr": 0, "signed": True}))
    assert err.value.code == "bad-param"
    with pytest.raises(FormatError) as err:
        encode(NumpyEncoded("binary", np.array([1]), 2, {"scale": np.array(1.0)}))
    assert err.value.code == "bad-bits"
    with pytest.raises(FormatError) as err:
        encode(NumpyEncoded("codebook", np.array([1.5]), 2, {"codebook": np.zeros(2)}))
    assert err.value.code == "bad-dtype"
    with pytest.raises(ConfigError):
        encode(NumpyEncoded("codebook", np.array([1]), 2, {"codebook": np.zeros(2)}, {"shape": [1]}))
    with pytest.raises(ConfigError):
        encode(NumpyEncoded("codebook", np.array([1]), 2, {"codebook": np.zeros(2)}, {"note": object()}))
    with pytest.raises(FormatError) as err:
        encode(NumpyEncoded("gzip", np.array([1]), 2))
    assert err.value.code == "unknown-codec"
    with pytest.raises(ConfigError):
        NumpyEncoded.from_float(np.zeros(2, np.float64))


def test_params_are_coerced_like_torch_float_and_long():
    # a float64 scale is stored as float32 (what base.decode's .float() uses), an int32 zero point as int64
    enc = NumpyEncoded("affine", np.array([1, 2]), 2, {"scale": np.array(0.1), "zero_point": np.array(1, np.int32)},
                       {"qmin": 0, "qmax": 3})
    back = decode(*stored(enc))
    assert back.params["scale"].dtype == np.float32 and back.params["zero_point"].dtype == np.int64
    assert np.array_equal(values(back), values(enc))


def test_format_package_never_imports_torch():
    code = (
        "import sys, numpy as np, lowbit.format as f\n"
        "enc = f.NumpyEncoded('ternary', np.array([1, 0, -1]), 2, {'scale': np.array(0.5, np.float32)})\n"
        "f.values(f.decode(*f.encode(enc)))\n"
        "f.huffman_decode(f.huffman_encode(np.array([1, 2, 2])))\n"
        "f.ans_decode(f.ans_encode(np.array([1, 2, 2])))\n"
        "assert 'torch' not in sys.modules, 'lowbit.format imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_registered_quantizer_round_trips_through_its_codec():
    import lowbit.quantizers  # noqa: F401  (registers the quantizers)
    from lowbit.quantizers.base import get, names

    torch.manual_seed(0)
    x = torch.randn(4, 3, 3, 3)
    stored_kinds = set()
    for name in names():
        quantizer = get(name).eval()
        try:
            enc = quantizer.encode(x)
        except ConfigError:  # float-only quantizers (activations, gradients) have no codes to store
            continue
        mine = NumpyEncoded(enc.kind, enc.codes.numpy(), enc.bits,
                            {k: v.detach().numpy() for k, v in enc.params.items()}, dict(enc.meta))
        back = decode(*stored(mine, name), name)
        assert np.array_equal(values(back).view(np.uint32), torch_decode(enc).detach().numpy().view(np.uint32)), name
        stored_kinds.add(enc.kind)
    assert stored_kinds == set(KINDS)
