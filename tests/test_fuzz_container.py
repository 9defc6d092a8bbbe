"""Fuzzing: mutated valid .lowbit files (bit flips, truncations, header edits) load or raise FormatError only."""

import tempfile
from collections import OrderedDict
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

import lowbit
from lowbit.errors import ConfigError, FormatError, ShapeMismatchError
from lowbit.format.codecs import NumpyEncoded
from lowbit.format.container import DTYPES, pack_file, pack_safetensors, parse_safetensors, raw, unpack_file
from lowbit.serialize import load, load_state_dict, save


def numpy_files() -> list[bytes]:
    """Every codec and chain, in three small files."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 4, (5, 6))
    codes[:, :3] = 1
    scale = {"scale": np.array(0.5, np.float32)}
    tensors = {
        "affine": NumpyEncoded("affine", codes, 2, {**scale, "zero_point": np.array(1)}, {"qmin": 0, "qmax": 3}),
        "huff": NumpyEncoded("codebook", codes, 2, {"codebook": np.array([0, 1, 2, 3], np.float32)}),
        "ans": NumpyEncoded("ternary", codes % 3 - 1, 2, scale, {"axis": None}),
        "log": NumpyEncoded("log", codes, 2, {"sign": np.where(codes > 1, 1, -1).astype(np.int8)},
                            {"fsr": 1, "signed": True}),
        "binary": NumpyEncoded("binary", codes % 2, 1, scale, {"axis": None}),
        "raw": raw(np.linspace(-1, 1, 7, dtype=np.float32)),
        "steps": raw(np.array(3, np.int64)),
    }
    return [pack_file(tensors, index_bits={"affine": 3, "log": 2}),
            pack_file({"huff": tensors["huff"]}, entropy="huffman", index_bits={"huff": 2}),
            pack_file({"ans": tensors["ans"]}, entropy="ans")]


VALID = numpy_files()


@st.composite
def mutations(draw, files):
    blob = bytearray(draw(st.sampled_from(files)))
    kind = draw(st.sampled_from(["flip", "truncate", "header", "splice"]))
    n = int.from_bytes(blob[:8], "little")
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            bit = draw(st.integers(0, 8 * len(blob) - 1))
            blob[bit // 8] ^= 1 << (bit % 8)
    elif kind == "truncate":
        blob = blob[: draw(st.integers(0, len(blob) - 1))]
    elif kind == "header":  # replace one character of the JSON header with a JSON-significant one
        at = draw(st.integers(8, 8 + n - 1))
        blob[at] = ord(draw(st.sampled_from('{}[]",:0123456789-e.tfn\\ ')))
    else:  # overwrite a run of bytes anywhere with random bytes
        at = draw(st.integers(0, len(blob) - 1))
        blob[at : at + 8] = draw(st.binary(min_size=1, max_size=8))
    return bytes(blob)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations(VALID))
def test_mutated_files_decode_or_raise_format_error(blob):
    try:
        unpack_file(blob)
    except FormatError as exc:
        assert exc.code and str(exc)


def header_of(blob: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


hostile_values = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from([0, -1, 2**31, 2**63, 2**64]),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=4), st.sampled_from(list(DTYPES)),
    st.lists(st.one_of(st.integers(-3, 2**64), st.just(True), st.just("1"), st.just(1.0)), max_size=4),
    st.lists(st.sampled_from(["F32", "U8"]), max_size=2), st.just({}), st.just({"lowbit": "{}"}),
    st.just([0, 2**63]), st.just([0, 2**31, 2**31]),
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(VALID), st.integers(0, 10**6), hostile_values)
def test_edited_safetensors_headers_load_or_raise_format_error(blob, pick, value):
    """Any header field (an array entry, its dtype, shape or offsets, a dim, the metadata) replaced by any JSON."""
    header, rest = header_of(blob)
    fields = [p for p in paths(header) if p]
    path = fields[pick % len(fields)]
    parent = header
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    text = json.dumps(header).encode()
    try:
        unpack_file(len(text).to_bytes(8, "little") + text + rest)
    except FormatError as exc:
        assert exc.code and str(exc)


def tiny_float_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 2, 3), bn=nn.BatchNorm2d(2), relu=nn.ReLU(),
                                     flat=nn.Flatten(), fc=nn.Linear(32, 3)))


def tiny_model_file() -> bytes:
    quantized = lowbit.quantize(tiny_float_model(), {"weight": {"name": "kmeans", "bits": 2}, "input": {"name": "binary"},
                                        "first": "same", "last": "same"})
    x = torch.randn(2, 1, 6, 6)
    quantized.eval()(x)
    with tempfile.TemporaryDirectory() as tmp:
        save(quantized, Path(tmp) / "m.lowbit", example_input=x[:1], entropy="huffman")
        return (Path(tmp) / "m.lowbit").read_bytes()


MODEL_FILE = tiny_model_file()


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp) / "m.lowbit"


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations([MODEL_FILE]))
def test_mutated_model_files_load_or_raise_format_error(scratch, blob):
    scratch.write_bytes(blob)
    try:
        load(scratch)
        load_state_dict(scratch)
    except ShapeMismatchError:  # a consistent edit of a stored shape: the graph no longer fits the tensors
        pass
    except FormatError as exc:
        assert exc.code and str(exc)


def paths(value, prefix=()):
    """Every path into a JSON value."""
    yield prefix
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield from paths(child, (*prefix, key))


json_values = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from([0, 1, -1, 2**31, 2**63]),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=4),
                        st.lists(st.integers(-3, 40), max_size=5), st.just({}))
ARRAYS, METADATA, _ = parse_safetensors(MODEL_FILE)
DOCUMENT = json.loads(METADATA["lowbit"])
DOCUMENT_PATHS = list(paths(DOCUMENT))[1:]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(DOCUMENT_PATHS), json_values)
@example(path=("model", "input_shape"), value=False)  # once read back unchecked
@example(path=("model", "input_shape"), value=[1, 0, 8])
def test_edited_documents_load_or_raise_format_error(scratch, path, value):
    document = json.loads(METADATA["lowbit"])
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    scratch.write_bytes(pack_safetensors(dict(ARRAYS), {"lowbit": json.dumps(document)}))
    try:
        load(scratch, model=tiny_float_model())
    except ShapeMismatchError:  # a stored shape or spec that no longer fits the architecture
        pass
    except FormatError as exc:
        assert exc.code and str(exc)
    try:
        load(scratch)
        load_state_dict(scratch)
    except ShapeMismatchError:  # a stored shape or spec that no longer fits the graph's layers
        pass
    except ConfigError:  # only for a file left without a graph: it then needs the architecture
        assert document.get("graph") is None
    except FormatError as exc:
        assert exc.code and str(exc)
