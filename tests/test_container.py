"""The .lowbit container (numpy only): safetensors interop, code chains, every rejection."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import ConfigError, FormatError
from lowbit.format.bitpack import unpack_codes
from lowbit.format.codecs import NumpyEncoded
from lowbit.format import container
from lowbit.format.container import (
    MAX_HEADER_BYTES,
    MAX_JSON_DEPTH,
    MIN_ELEMENT_BUDGET,
    json_depth,
    format_inspect,
    inspect_file,
    pack_file,
    pack_safetensors,
    parse_safetensors,
    raw,
    read_file,
    unpack_file,
    write_file,
)

CHAINS = [(None, None), (None, 1), (None, 3), (None, 8), ("huffman", None), ("ans", None), ("huffman", 5), ("ans", 4)]


def affine(codes, bits=8, scale=0.5):
    """Per-tensor affine codes in [0, 2**bits - 1] with zero point 0."""
    params = {"scale": np.array(scale, dtype=np.float32), "zero_point": np.array(0, dtype=np.int64)}
    return NumpyEncoded("affine", np.asarray(codes, dtype=np.int64), bits, params, {"qmin": 0, "qmax": 2**bits - 1})


def codebook(codes, book):
    return NumpyEncoded("codebook", np.asarray(codes, dtype=np.int64), 2, {"codebook": np.asarray(book, np.float32)})


def small_tensors():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (6, 7))
    codes[:, ::2] = 3
    return {"w": affine(codes, bits=4), "k": codebook(rng.integers(0, 3, 10), [0.0, -1.5, 2.0]),
            "b": raw(np.arange(4, dtype=np.float32))}


def header_and_data(blob: bytes):
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def with_header(header, data: bytes, text: bytes | None = None) -> bytes:
    """A file from a header dict (or raw header text) and data bytes, as a careless writer would make it."""
    text = json.dumps(header).encode() if text is None else text
    return len(text).to_bytes(8, "little") + text + data


def with_document(blob: bytes, edit) -> bytes:
    """Re-pack ``blob`` after ``edit(document, arrays)`` changed its document or arrays."""
    arrays, metadata, _ = parse_safetensors(blob)
    arrays = {k: v.copy() for k, v in arrays.items()}
    document = json.loads(metadata["lowbit"])
    edit(document, arrays)
    return pack_safetensors(arrays, {"lowbit": json.dumps(document)})


def rejects(blob: bytes, code: str, *names: str):
    with pytest.raises(FormatError) as err:
        unpack_file(blob)
    assert err.value.code == code, str(err.value)
    for name in names:
        assert name in str(err.value)


# ---------------------------------------------------------------------------- safetensors interop


def test_common_tools_open_the_file_and_see_codes(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    path = tmp_path / "m.lowbit"
    write_file(path, small_tensors())
    loaded = load_file(path)
    assert loaded["w:codes"].dtype == np.uint8 and loaded["w:codes"].size == math.ceil(42 * 4 / 8)
    assert np.array_equal(unpack_codes(loaded["w:codes"], 42, 4), small_tensors()["w"].codes.reshape(-1))
    with safe_open(path, "np") as f:
        document = json.loads(f.metadata()["lowbit"])
    assert document["format"] == "lowbit" and document["version"] == 1
    assert document["tensors"]["w"] == {"codec": "affine", "shape": [6, 7], "bits": 4, "qmin": 0, "qmax": 15}


def test_reads_files_written_by_safetensors(tmp_path):
    from safetensors.numpy import save_file

    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 2], dtype=np.int64),
              "empty": np.zeros((0, 3), dtype=np.uint8)}
    save_file(arrays, tmp_path / "x.safetensors", metadata={"k": "v"})
    got, metadata, _ = parse_safetensors((tmp_path / "x.safetensors").read_bytes())
    assert metadata == {"k": "v"} and got.keys() == arrays.keys()
    for key in arrays:
        assert got[key].dtype == arrays[key].dtype and np.array_equal(got[key], arrays[key])


def test_layout_is_aligned_and_deterministic():
    tensors = small_tensors()
    blob = pack_file(tensors)
    assert blob == pack_file(dict(reversed(list(tensors.items()))))  # insertion order does not matter
    header, _ = header_and_data(blob)
    assert int.from_bytes(blob[:8], "little") % 8 == 0
    for name, info in header.items():
        if name != "__metadata__":
            itemsize = np.dtype({"F32": "f4", "I64": "i8", "U8": "u1"}[info["dtype"]]).itemsize
            assert info["data_offsets"][0] % itemsize == 0


# ---------------------------------------------------------------------------- codec chains


@st.composite
def code_tensors(draw):
    """Codes of every coded codec, skewed towards one value as pruned weights are."""
    kind = draw(st.sampled_from(["affine", "log", "ternary", "codebook"]))
    shape = tuple(draw(st.lists(st.integers(0, 9), min_size=1, max_size=3)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    bits = {"ternary": 2, "codebook": draw(st.integers(1, 4))}.get(kind, draw(st.integers(1, 16)))
    high = {"ternary": 1, "codebook": 2**bits - 1}.get(kind, 2**bits - 1)
    low = -1 if kind == "ternary" else 0
    codes = rng.integers(low, high + 1, shape)
    codes[rng.random(shape) < draw(st.floats(0, 1))] = draw(st.integers(low, high))
    if kind == "affine":
        return affine(codes, bits)
    if kind == "log":
        sign = rng.choice(np.array([-1, 1], dtype=np.int8), shape)
        return NumpyEncoded("log", codes, bits, {"sign": sign}, {"fsr": 0, "signed": True})
    if kind == "ternary":
        return NumpyEncoded("ternary", codes, 2, {"scale": np.array(0.25, np.float32)}, {"axis": None})
    return NumpyEncoded("codebook", codes, bits, {"codebook": np.linspace(-1, 1, 2**bits, dtype=np.float32)})


@settings(max_examples=60, deadline=None)
@given(code_tensors(), st.sampled_from(CHAINS))
def test_every_chain_round_trips_bit_exactly(enc, chain):
    entropy, index_bits = chain
    blob = pack_file({"t": enc}, entropy=entropy, index_bits=None if index_bits is None else {"t": index_bits})
    got = unpack_file(blob).tensors["t"]
    assert got.kind == enc.kind and got.bits == enc.bits and np.array_equal(got.codes, enc.codes)
    assert got.codes.shape == enc.codes.shape
    for key in enc.params:
        assert got.params[key].tobytes() == enc.params[key].tobytes()


special_floats = st.one_of(st.floats(width=32), st.sampled_from([0.0, -0.0, math.nan, math.inf, -math.inf, 1e-45]))


@settings(max_examples=40, deadline=None)
@given(st.lists(special_floats, max_size=20), st.sampled_from(["float32", "float16", "float64"]))
def test_raw_floats_keep_every_bit(xs, dtype):
    with np.errstate(over="ignore"):  # float32 values past float16's range become inf
        x = np.array(xs, dtype=dtype)
    got = unpack_file(pack_file({"x": raw(x)})).tensors["x"].codes
    assert got.dtype == x.dtype and got.tobytes() == x.tobytes()  # NaN payloads and -0.0 included


@pytest.mark.parametrize("bits", range(1, 17))
def test_packed_length_is_ceil_n_k_over_8(bits):
    n = 37
    arrays, _, _ = parse_safetensors(pack_file({"w": affine(np.arange(n) % 2**bits, bits)}))
    assert arrays["w:codes"].size == math.ceil(n * bits / 8)


def test_sparse_matches_deep_compression_figure_2():
    """Han et al. 2016, Fig. 2 with a 3-bit index: non-zeros at 1, 4, 15 of 16 give gaps 1, 2, 7 (filler), 2."""
    codes = np.zeros(16, dtype=np.int64)
    codes[[1, 4, 15]] = [3, 1, 2]
    blob = pack_file({"w": affine(codes, 2)}, index_bits={"w": 3})
    arrays, metadata, _ = parse_safetensors(blob)
    assert unpack_codes(arrays["w:gaps"], 4, 3).tolist() == [1, 2, 7, 2]
    assert unpack_codes(arrays["w:values"], 4, 2).tolist() == [3, 1, 0, 2]
    assert json.loads(metadata["lowbit"])["tensors"]["w"]["stream"] == {
        "sparse": {"index_bits": 3, "zero": 0, "count": 4}, "entropy": None}


def test_sparse_swaps_the_most_frequent_code_with_zero_and_bounds_the_tail():
    codes = np.full(40, 5, dtype=np.int64)
    codes[2] = 0
    blob = pack_file({"w": affine(codes, 3)}, index_bits={"w": 2})
    arrays, metadata, _ = parse_safetensors(blob)
    sparse = json.loads(metadata["lowbit"])["tensors"]["w"]["stream"]["sparse"]
    assert sparse["zero"] == 5
    gaps = unpack_codes(arrays["w:gaps"], sparse["count"], 2)
    assert 40 - (1 << 2) < int(np.sum(gaps + 1)) <= 40  # fillers run to within 2**index_bits of the end
    assert np.array_equal(unpack_file(blob).tensors["w"].codes, codes)


def test_huffman_beats_packing_on_skewed_codes():
    codes = np.zeros(4096, dtype=np.int64)
    codes[::50] = 200
    plain, huff = pack_file({"w": affine(codes)}), pack_file({"w": affine(codes)}, entropy="huffman")
    assert unpack_file(huff).stored_bytes["w"] < unpack_file(plain).stored_bytes["w"] / 4


def test_chain_options_are_checked():
    with pytest.raises(ConfigError):
        pack_file(small_tensors(), entropy="zip")
    with pytest.raises(ConfigError):
        pack_file(small_tensors(), index_bits={"w": 17})
    with pytest.raises(ConfigError):
        pack_file(small_tensors(), index_bits={"nope": 3})


# ---------------------------------------------------------------------------- malformed files


def test_truncated_files():
    blob = pack_file(small_tensors())
    rejects(blob[:5], "truncated")
    rejects(blob[:20], "truncated")
    rejects(blob[:-1], "truncated")


def test_header_length_beyond_file_or_cap():
    blob = pack_file(small_tensors())
    rejects((len(blob)).to_bytes(8, "little") + blob[8:], "truncated")
    rejects((MAX_HEADER_BYTES + 1).to_bytes(8, "little") + blob[8:], "header-too-large")
    rejects((2**64 - 1).to_bytes(8, "little") + blob[8:], "header-too-large")


def test_header_not_utf8_or_not_json():
    rejects(with_header(None, b"", text=b'{"a": "\xff\xfe"}'), "bad-header")
    rejects(with_header(None, b"", text=b'{"a": '), "bad-json")
    rejects(with_header(None, b"", text=b"[1, 2]"), "bad-header")
    rejects(with_header(None, b"", text=b'{"x": NaN}'), "bad-json")
    rejects(with_header(None, b"", text=b"[" * 100_000 + b"]" * 100_000), "too-deep")


def test_metadata_that_is_not_a_lowbit_document():
    rejects(with_header({"__metadata__": {"lowbit": "{not json"}}, b""), "bad-json")
    rejects(with_header({"__metadata__": {"other": "x"}}, b""), "not-lowbit")
    rejects(with_header({"__metadata__": {"lowbit": 3}}, b""), "bad-header")


def test_duplicate_tensor_names():
    blob = pack_file({"b": raw(np.zeros(1, np.float32))})
    header, data = header_and_data(blob)
    entry = json.dumps(header["b:data"])
    text = ('{"__metadata__": %s, "b:data": %s, "b:data": %s}' % (json.dumps(header["__metadata__"]), entry, entry))
    rejects(with_header(None, data, text.encode()), "duplicate-name", "b:data")


def _two_arrays(offsets_a, offsets_b, data_len, shape=(2,)):
    header = {"a": {"dtype": "U8", "shape": list(shape), "data_offsets": offsets_a},
              "b": {"dtype": "U8", "shape": [2], "data_offsets": offsets_b}}
    return with_header(header, bytes(data_len))


def test_bad_offsets():
    rejects(_two_arrays([0, 2], [1, 3], 3), "bad-offsets", "'b'")  # overlap
    rejects(_two_arrays([2, 0], [2, 4], 4, shape=(0,)), "bad-offsets")  # backwards
    rejects(_two_arrays([0, 2], [3, 5], 5), "bad-offsets", "'b'")  # gap
    rejects(_two_arrays([0, 2], [2, 4], 6), "trailing-bytes")
    rejects(_two_arrays([0, 2], [2, 4], 3), "truncated")
    rejects(_two_arrays([0, 2], [2, "4"], 4), "bad-offsets")


def test_shape_product_overflow_or_byte_mismatch():
    rejects(_two_arrays([0, 2], [2, 4], 4, shape=(2**62, 2**62)), "bad-shape", "'a'")
    rejects(_two_arrays([0, 2], [2, 4], 4, shape=(3,)), "bad-length", "'a'")
    rejects(_two_arrays([0, 2], [2, 4], 4, shape=(-2,)), "bad-shape", "'a'")
    header = {"a": {"dtype": "X9", "shape": [2], "data_offsets": [0, 2]}}
    rejects(with_header(header, bytes(2)), "bad-dtype", "'a'")


def test_packed_length_must_be_ceil_n_k_over_8():
    blob = pack_file(small_tensors())

    def longer(document, arrays):
        arrays["w:codes"] = np.concatenate([arrays["w:codes"], np.zeros(1, np.uint8)])

    rejects(with_document(blob, longer), "bad-length", "'w'")

    def bigger_shape(document, arrays):
        document["tensors"]["w"]["shape"] = [6, 9]

    rejects(with_document(blob, bigger_shape), "bad-length", "'w'")


def test_unknown_codec_version_or_document_keys():
    blob = pack_file(small_tensors())
    rejects(with_document(blob, lambda d, a: d["tensors"]["w"].update(codec="zstd")), "unknown-codec", "'w'")
    rejects(with_document(blob, lambda d, a: d.update(version=2)), "unknown-version")
    rejects(with_document(blob, lambda d, a: d.update(version=True)), "unknown-version")
    rejects(with_document(blob, lambda d, a: d.update(extra=1)), "bad-document")
    rejects(with_document(blob, lambda d, a: a.update({"stray:data": np.zeros(1, np.float32)})), "bad-arrays")
    rejects(with_document(blob, lambda d, a: a.pop("b:data")), "bad-arrays", "'b'")


def test_codebook_index_out_of_range():
    blob = pack_file({"k": codebook([0, 1, 2], [0.0, 1.0, 2.0])})
    rejects(with_document(blob, lambda d, a: a.update({"k:codebook": a["k:codebook"][:2].copy()})), "bad-index", "'k'")


@pytest.mark.parametrize("scale", [math.nan, math.inf, 0.0, -1.0])
def test_bad_scales(scale):
    blob = pack_file({"w": affine([1, 2, 3])})
    rejects(with_document(blob, lambda d, a: a.update({"w:scale": np.array(scale, np.float32)})), "bad-scale", "'w'")


def _huffman_file():
    codes = np.array([0, 0, 0, 1, 1, 2, 3, 0] * 4, dtype=np.int64)
    return pack_file({"w": affine(codes, 2)}, entropy="huffman")


def test_huffman_incomplete_or_overlong_table():
    def lengths(values):
        return lambda d, a: a.update({"w:codes.lengths": np.array(values, np.uint8)})

    rejects(with_document(_huffman_file(), lengths([1, 2, 3, 4])), "bad-table", "'w'")  # Kraft sum 15/16
    rejects(with_document(_huffman_file(), lengths([1, 2, 17, 17])), "bad-table", "'w'")


def test_huffman_count_or_leftover_bits():
    def shape(n):
        return lambda d, a: d["tensors"]["w"].update(shape=[n])

    rejects(with_document(_huffman_file(), shape(31)), "bad-count", "'w'")  # a 1-bit zero code left over
    rejects(with_document(_huffman_file(), shape(30)), "bad-padding", "'w'")  # bits left over
    rejects(with_document(_huffman_file(), shape(33)), "bad-length", "'w'")  # one symbol short
    rejects(with_document(_huffman_file(), shape(10_000)), "bad-count", "'w'")

    def extra_byte(document, arrays):
        arrays["w:codes.data"] = np.concatenate([arrays["w:codes.data"], np.zeros(1, np.uint8)])

    rejects(with_document(_huffman_file(), extra_byte), "bad-length", "'w'")


def test_ans_words_must_end_after_numel_symbols():
    blob = pack_file({"w": affine([1, 2, 2, 3] * 8, 2)}, entropy="ans")
    for n in (31, 33, 64):
        rejects(with_document(blob, lambda d, a: d["tensors"]["w"].update(shape=[n])), "bad-length", "'w'")


def test_ans_model_entry_and_table_are_validated():
    blob = pack_file({"w": affine([1, 2, 2, 3] * 8, 2)}, entropy="ans", index_bits={"w": 2})
    stream = json.loads(parse_safetensors(blob)[1]["lowbit"])["tensors"]["w"]["stream"]
    assert set(stream["ans_model"]) == {"gaps", "values"}
    fine = {"low": 0, "precision": 3}
    for bad in ({"gaps": fine}, {"gaps": fine, "values": {"low": -1, "precision": 3}},
                {"gaps": fine, "values": {"low": 0, "precision": 25}}, {"gaps": fine, "values": {"low": 0}},
                {"gaps": fine, "values": {"low": 2**16, "precision": 3}}, [0, 3]):
        rejects(with_document(blob, lambda d, a: d["tensors"]["w"]["stream"].update(ans_model=bad)),
                "bad-stream", "'w'")
    rejects(with_document(blob, lambda d, a: d["tensors"]["w"]["stream"].pop("ans_model")), "bad-stream", "'w'")

    def shift_precision(document, arrays):
        document["tensors"]["w"]["stream"]["ans_model"]["values"]["precision"] += 1

    rejects(with_document(blob, shift_precision), "bad-table", "'w'", "values")

    def widen_table(document, arrays):
        arrays["w:values.freqs"] = arrays["w:values.freqs"].astype(np.int16)

    rejects(with_document(blob, widen_table), "bad-dtype", "'w'", "values")


def test_claims_that_would_allocate_huge_arrays_are_rejected_first():
    constant = pack_file({"w": affine(np.ones(8, np.int64), 2)}, entropy="ans")  # one symbol: no ANS words

    def huge(document, arrays):
        document["tensors"]["w"]["shape"] = [2**31]  # a one-symbol ANS stream: its table does not bound the count

    rejects(with_document(constant, huge), "too-large")

    sparse = pack_file({"w": affine(np.zeros(8, np.int64), 2)}, index_bits={"w": 16})
    rejects(with_document(sparse, lambda d, a: d["tensors"]["w"].update(shape=[2**30])), "too-large")


def test_sparse_length_beyond_the_entries():
    blob = pack_file({"w": affine(np.arange(40) % 3, 2)}, index_bits={"w": 2})
    rejects(with_document(blob, lambda d, a: d["tensors"]["w"].update(shape=[400])), "bad-length", "'w'")


def test_stream_entry_is_validated():
    blob = pack_file({"w": affine([1, 2, 3])}, entropy="huffman")
    rejects(with_document(blob, lambda d, a: d["tensors"]["w"].update(stream={"entropy": "lz4", "sparse": None})),
            "bad-stream", "'w'")
    rejects(with_document(blob, lambda d, a: d["tensors"]["w"].update(stream=[1])), "bad-stream", "'w'")
    raw_blob = pack_file({"b": raw(np.zeros(2, np.float32))})
    rejects(with_document(raw_blob, lambda d, a: d["tensors"]["b"].update(stream={"entropy": "ans", "sparse": None})),
            "bad-stream", "'b'")


# ---------------------------------------------------------------------------- caps against hostile files


@pytest.mark.parametrize("dtype", [["F32"], {"F32": 1}, 5, None, True, "f32"])
def test_a_dtype_that_is_not_a_dtype_name(dtype):
    rejects(with_header({"a": {"dtype": dtype, "shape": [2], "data_offsets": [0, 2]}}, bytes(2)), "bad-dtype", "'a'")


@pytest.mark.parametrize("field, value, code", [
    ("shape", "2", "bad-shape"), ("shape", [2.0], "bad-shape"), ("shape", [True, 2], "bad-shape"),
    ("shape", {"0": 2}, "bad-shape"), ("shape", [[2]], "bad-shape"), ("shape", None, "bad-shape"),
    ("data_offsets", ["0", 2], "bad-offsets"), ("data_offsets", [0.0, 2], "bad-offsets"),
    ("data_offsets", [0], "bad-offsets"), ("data_offsets", None, "bad-offsets"),
    ("data_offsets", {"0": 2}, "bad-offsets"),
    ("data_offsets", [0, 2, 4], "bad-offsets"), ("data_offsets", [False, 2], "bad-offsets"),
])
def test_wrongly_typed_header_fields(field, value, code):
    entry = {"dtype": "U8", "shape": [2], "data_offsets": [0, 2], field: value}
    rejects(with_header({"a": entry}, bytes(2)), code, "'a'")


def test_wrongly_typed_header_entries_and_metadata():
    for entry in ([1], "U8", None, {"dtype": "U8", "shape": [2]}, {"dtype": "U8", "shape": [2], "data_offsets": [0, 2],
                                                                    "extra": 1}):
        rejects(with_header({"a": entry}, bytes(2)), "bad-header")
    for metadata in ([], "x", {"lowbit": ["{}"]}, {"lowbit": None}, None):
        rejects(with_header({"__metadata__": metadata}, b""), "bad-header")


@pytest.mark.parametrize("shape", [[0, 2**63], [0, 2**31 + 1], [0, 2**31, 2**31], [0, *[2**16] * 31], [2**64, 0]])
def test_zero_size_arrays_with_absurd_dims(shape):
    rejects(with_header({"a": {"dtype": "U8", "shape": shape, "data_offsets": [0, 0]}}, b""), "bad-shape", "'a'")
    blob = pack_file({"b": raw(np.zeros((0, 3), np.float32)), "w": affine(np.zeros((0, 2), np.int64), 2)})
    for tensor in ("b", "w"):
        rejects(with_document(blob, lambda d, a: d["tensors"][tensor].update(shape=shape)), "bad-shape", repr(tensor))
    coded = pack_file({"w": affine(np.zeros((0, 2), np.int64), 2)}, entropy="huffman")
    rejects(with_document(coded, lambda d, a: d["tensors"]["w"].update(shape=shape)), "bad-shape", "'w'")


def test_zero_size_arrays_round_trip():
    tensors = {"b": raw(np.zeros((0, 3), np.float32)), "w": affine(np.zeros((4, 0, 2), np.int64), 2)}
    for chain in CHAINS:
        got = unpack_file(pack_file(tensors, entropy=chain[0], index_bits={"w": chain[1]} if chain[1] else None))
        assert got.tensors["w"].codes.shape == (4, 0, 2) and got.tensors["b"].codes.shape == (0, 3)


def nested(depth, leaf=1):
    for _ in range(depth):
        leaf = [leaf]
    return leaf


def with_deep_attrs(blob: bytes, depth: int) -> bytes:
    """``blob`` with ``"attrs": {"x": [[...]]}`` (a list nested ``depth`` deep) in its graph."""
    arrays, metadata, _ = parse_safetensors(blob)
    text = metadata["lowbit"].replace('"graph":{', '"graph":{"attrs":{"x":' + "[" * depth + "]" * depth + "},", 1)
    return pack_safetensors(dict(arrays), {"lowbit": text})


def test_json_nesting_is_capped():
    blob = pack_file(small_tensors(), graph={"nodes": []})
    # the document is depth 1, "graph" 2, its "attrs" 3: the list may nest MAX_JSON_DEPTH - 3 deep
    assert unpack_file(with_deep_attrs(blob, MAX_JSON_DEPTH - 3)).document["graph"]["attrs"]["x"]
    for depth in (MAX_JSON_DEPTH - 2, 700, 100_000):
        with pytest.raises(FormatError, match=f"at most {MAX_JSON_DEPTH}") as caught:
            unpack_file(with_deep_attrs(blob, depth))
        assert caught.value.code == "too-deep" and "lowbit document" in str(caught.value)
    rejects(with_header({"a": nested(MAX_JSON_DEPTH)}, b""), "too-deep")
    with pytest.raises(ConfigError, match="nests"):  # never written
        pack_file(small_tensors(), graph={"x": nested(MAX_JSON_DEPTH)})


def test_numbers_beyond_the_float_range_are_rejected():
    blob = pack_file(small_tensors())
    arrays, metadata, _ = parse_safetensors(blob)
    text = metadata["lowbit"].replace('"model":{}', '"model":{"x":1e999}')
    rejects(pack_safetensors(dict(arrays), {"lowbit": text}), "bad-json")


def json_values():
    leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                       st.text(alphabet='ab"\\[]{}\n', max_size=6))
    keys = st.text('a"[{\\', max_size=3)
    return st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(keys, inner, max_size=3)), max_leaves=30)


def reference_depth(value):
    if isinstance(value, (list, dict)):
        children = value.values() if isinstance(value, dict) else value
        return 1 + max((reference_depth(c) for c in children), default=0)
    return 0


@settings(max_examples=300, deadline=None)
@given(json_values(), st.booleans())
def test_json_depth_is_the_nesting_of_the_parsed_value(value, wrapped):
    text = json.dumps(value)
    if wrapped:  # as the header holds the document: a string full of escaped quotes and brackets
        text, value = json.dumps({"doc": text}), {"doc": text}
    assert json_depth(text) == reference_depth(value)


def _constant_ans_file(n, padding=0):
    """A one-symbol ANS tensor (a 1-byte table, no words) claiming ``n`` codes, beside ``padding`` raw floats."""
    tensors = {"w": affine(np.ones(8, np.int64), 2), "pad": raw(np.zeros(padding, np.float32))}
    return with_document(pack_file(tensors, entropy="ans"), lambda d, a: d["tensors"]["w"].update(shape=[n]))


def test_an_ans_stream_decodes_to_at_most_2_20_plus_256_symbols_per_stored_byte():
    assert unpack_file(_constant_ans_file(MIN_ELEMENT_BUDGET + 256)).tensors["w"].codes.size == MIN_ELEMENT_BUDGET + 256
    # the file's 1 MB of floats would admit 2**28 elements; the stream's own single byte admits 2**20 + 256
    with pytest.raises(FormatError, match="stream 'codes'") as caught:
        unpack_file(_constant_ans_file(MIN_ELEMENT_BUDGET + 257, padding=2**18))
    assert caught.value.code == "too-large" and "'w'" in str(caught.value)
    with pytest.raises(ConfigError, match="reader accepts"):  # never written
        pack_file({"w": affine(np.ones(MIN_ELEMENT_BUDGET + 257, np.int64), 2)}, entropy="ans")


def test_a_sparse_stream_decodes_to_at_most_its_gaps_reach_and_2_20_plus_256_codes_per_stored_byte():
    codes = np.zeros(2**20, np.int64)
    codes[2**16 - 1 :: 2**16] = 1  # 16 entries of 16-bit gaps and 2-bit values: 36 bytes of streams
    padding = raw(np.zeros(2**18, np.float32))  # 1 MB, so the whole file's budget is not what binds
    blob = pack_file({"w": affine(codes, 2), "pad": padding}, index_bits={"w": 16})

    def shape(n):
        return with_document(blob, lambda d, a: d["tensors"]["w"].update(shape=[n]))

    assert np.array_equal(unpack_file(blob).tensors["w"].codes, codes)
    assert unpack_file(shape(2**20 + 9216)).tensors["w"].codes.size == 2**20 + 9216  # 2**20 + 256 x 36
    with pytest.raises(FormatError, match="sparse streams") as caught:
        unpack_file(shape(2**20 + 9217))
    assert caught.value.code == "too-large" and "'w'" in str(caught.value)
    rejects(shape(17 * 2**16), "bad-length", "'w'")  # 16 gaps and a tail reach 17 x 2**16 - 1 codes at most
    with pytest.raises(ConfigError, match="reader accepts"):  # never written
        pack_file({"w": affine(np.zeros(2**21, np.int64), 2)}, index_bits={"w": 16})


def test_a_huffman_stream_decodes_to_at_most_8_symbols_per_byte():
    blob = pack_file({"w": affine(np.arange(64) % 4, 2)}, entropy="huffman")  # 2-bit codes: 16 bytes
    for n in (65, 128):  # 8 per byte would admit 128: the shortest code, 2 bits, admits 64
        rejects(with_document(blob, lambda d, a: d["tensors"]["w"].update(shape=[n])), "bad-length", "at least 2 bits")
    rejects(with_document(blob, lambda d, a: d["tensors"]["w"].update(shape=[129])), "bad-count", "'w'")


def test_the_whole_file_budget_is_checked_before_decoding(monkeypatch):
    one = affine(np.ones(MIN_ELEMENT_BUDGET, np.int64), 2)
    with pytest.raises(ConfigError, match="reader accepts"):  # each stream fits its own cap, the file does not
        pack_file({"a": one, "b": one}, entropy="ans")

    def copies(document, arrays):  # four more tensors sharing the stored form of "a"
        for i in range(4):
            document["tensors"][f"t{i}"] = dict(document["tensors"]["a"])
            arrays.update({f"t{i}:{k[2:]}": v for k, v in list(arrays.items()) if k.startswith("a:")})

    blob = with_document(pack_file({"a": one}, entropy="ans"), copies)
    monkeypatch.setattr(container, "decode_tensor", lambda *args: pytest.fail("decoded before the budget check"))
    rejects(blob, "too-large")


# ---------------------------------------------------------------------------- inspection (writes: test_writes.py)


def test_inspect_counts_bits_per_weight(tmp_path):
    path = tmp_path / "m.lowbit"
    write_file(path, {"w": affine(np.zeros((10, 10), np.int64), 4), "b": raw(np.zeros(10, np.float32))})
    info = inspect_file(path)
    rows = {r["name"]: r for r in info["tensors"]}
    assert rows["w"]["bytes"] == 100 * 4 // 8 + 4 + 8  # codes + float32 scale + int64 zero point
    assert rows["w"]["bits_per_weight"] == pytest.approx(8 * 62 / 100)
    assert rows["b"]["bits_per_weight"] == 32.0
    assert info["stored_bytes"] == 62 + 40 and info["float32_bytes"] == 440
    assert info["file_bytes"] == path.stat().st_size and not info["has_graph"]
    table = format_inspect(info)
    assert "affine" in table and "w" in table and "440" in table
    assert read_file(path).stored_bytes == {"w": 62, "b": 40}


def test_a_malformed_file_is_named_in_the_error(tmp_path):
    path = tmp_path / "broken.lowbit"
    path.write_bytes(b"12345")
    with pytest.raises(FormatError, match=r"^\[truncated\] .*broken\.lowbit: the file holds 5 bytes") as caught:
        read_file(path)
    assert caught.value.code == "truncated" and caught.value.message.startswith(str(path))
