"""The .lowbit container: a safetensors file of stored codes plus one JSON document (numpy only).

File layout (safetensors, https://github.com/huggingface/safetensors)::

    8 bytes   header length N, unsigned little-endian
    N bytes   JSON header, UTF-8, padded with spaces to a multiple of 8:
              {"__metadata__": {"lowbit": "<document JSON>"},
               "<array name>": {"dtype": "U8", "shape": [...], "data_offsets": [begin, end]}, ...}
    data      the arrays back to back, little-endian, C order, no gaps, nothing after

So ``safetensors.safe_open`` and ``safetensors.numpy.load_file`` open a
.lowbit file; what they see are the stored codes (bit-packed uint8, sign
words, scales), never dequantized floats. Arrays are laid out largest item
size first, then by name, so every array is aligned to its item size.

Document (``__metadata__["lowbit"]``, JSON, version :data:`FORMAT_VERSION`)::

    {"format": "lowbit", "version": 1,
     "tensors": {"<tensor>": <entry>, ...},
     "graph": <graph IR of lowbit.export.graph> | null,
     "model": {...}}                      # owned by lowbit.serialize: layer specs, config, input shape

An entry is the codec meta of :mod:`lowbit.format.codecs` (``codec``,
``shape``, ``bits`` and the codec's own keys) plus, when the integer code
stream is coded further, ``"stream": {"sparse": {"index_bits": b, "zero":
z, "count": m} | null, "entropy": null | "huffman" | "ans"}``, with
``"huffman_bits": {"<stream>": bits}`` (each Huffman stream's exact length in
bits, so a count that disagrees with the stream is always caught) when
``entropy`` is ``"huffman"``, and ``"ans_model": {"<stream>": {"low": lo,
"precision": p}}`` (the lowest symbol of each ANS stream's table and the
precision its frequencies sum to, as ``2**p``) when it is ``"ans"`` (ANS words
end exactly after their symbols, so there too a count that disagrees is caught,
unless the stream holds one distinct value and stores no words). The raw codecs
are ``float32``, ``float16`` and, for integer and boolean buffers,
``float64``, ``int64``, ``int32``, ``int16``, ``int8``, ``uint8``, ``bool``.

Array names are ``"<tensor>:<array>"`` with the codec's array names
(``codes``, ``scale``, ``zero_point``, ``sign``, ``signs``, ``codebook``,
``data``). The code chain acts on the codes of ``codes`` (the unsigned
values the codec bit-packs, ``bits`` wide) and replaces that array:

1. sparse (Deep Compression relative index, :mod:`.sparse`): the most
   frequent code ``z`` (the zero weight of a pruned tensor) swaps places with
   code 0, then the non-zero codes are stored with ``index_bits``-bit gaps as
   two streams, ``gaps`` and ``values`` of ``count`` entries; filler entries
   run to within ``2**index_bits`` of the end, so the length is bounded by
   the stored entries;
2. entropy on each stream ``S`` (``codes``, or ``gaps`` and ``values``):
   none: ``S`` bit-packed at its width; ``huffman`` (:mod:`.huffman`, blocks
   of :data:`~.huffman.BLOCK` symbols): ``S.lengths``, ``S.data``,
   ``S.offsets``; ``ans`` (:mod:`.ans`):
   ``S.freqs`` (uint8, uint16 or uint32) and ``S.words``.

Decoding inverts the chain exactly and hands the packed codes to the codec.

Reading validates everything and raises ``lowbit.errors.FormatError``
naming the tensor; codes besides those of the codecs: ``truncated``,
``header-too-large``, ``bad-header`` (not UTF-8, not a JSON object, a bad
entry), ``bad-json``, ``duplicate-name``, ``bad-dtype``, ``bad-shape``,
``bad-length`` (bytes != shape x item size), ``bad-offsets`` (overlapping,
backwards or gap-leaving), ``trailing-bytes``, ``not-lowbit``,
``unknown-version``, ``bad-document``, ``bad-arrays`` (arrays missing or
belonging to no tensor), ``bad-stream``, ``bad-count``,
``too-deep`` (JSON nested deeper than :data:`MAX_JSON_DEPTH`),
``too-large`` (the tensors would decode to more than
``MIN_ELEMENT_BUDGET + MAX_EXPANSION`` x file bytes elements, or one ANS or
sparse stream to more than that of its own stored bytes). docs/format.md
lists every cap.

Writes are atomic (:func:`write_atomic`): a temporary file in the target
directory, flushed, renamed into place.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError, FormatError
from .ans import MAX_PRECISION, AnsStream, ans_decode, ans_encode
from .atomic import write_atomic
from .bitpack import MAX_EXPANSION as MAX_EXPANSION  # re-exported: the caps of element_budget
from .bitpack import MIN_ELEMENT_BUDGET as MIN_ELEMENT_BUDGET
from .bitpack import element_budget, pack_codes, unpack_codes
from .codecs import Codec, FloatCodec, NumpyEncoded, get_codec
from .codecs import _check_shape as check_shape
from .codecs import _short
from .huffman import BLOCK, HuffmanStream, huffman_decode, huffman_encode
from .sparse import MAX_INDEX_BITS, decode_relative, encode_relative

FORMAT_NAME = "lowbit"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
#: the safetensors metadata key holding the document
METADATA_KEY = "lowbit"
#: largest JSON header accepted (safetensors itself allows 100 MB)
MAX_HEADER_BYTES = 32 << 20
#: deepest nesting of JSON arrays and objects in the header and the document
MAX_JSON_DEPTH = 64
#: a temporary file of :func:`write_atomic` untouched this long is removed by the next write to its target
ENTROPY_CODERS = ("huffman", "ans")
DOCUMENT_KEYS = ("format", "version", "tensors", "graph", "model")

#: safetensors dtype names and their little-endian numpy dtypes
DTYPES = {"BOOL": "|b1", "U8": "|u1", "I8": "|i1", "U16": "<u2", "I16": "<i2", "F16": "<f2", "U32": "<u4",
          "I32": "<i4", "F32": "<f4", "U64": "<u8", "I64": "<i8", "F64": "<f8"}
_DTYPE_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
_HEADER_ALIGN = 8
#: raw codecs for integer, boolean and float64 buffers (float32 / float16 are codecs of their own)
_RAW_EXTRA = {name: FloatCodec(np.dtype(name)) for name in ("float64", "int64", "int32", "int16", "int8", "uint8", "bool")}
_STREAM_ARRAYS = {None: ("",), "huffman": (".lengths", ".data", ".offsets"), "ans": (".freqs", ".words")}
_STREAM_META = {None: (), "huffman": ("huffman_bits",), "ans": ("ans_model",)}


def _fail(code: str, message: str) -> FormatError:
    return FormatError(code, message)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ---------------------------------------------------------------------------- safetensors


def pack_safetensors(arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """The bytes of a safetensors file holding ``arrays`` and string ``metadata`` (deterministic)."""
    order = sorted(arrays, key=lambda k: (-arrays[k].dtype.itemsize, k))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    chunks = []
    for name in order:
        array = arrays[name]
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        if dtype not in _DTYPE_NAMES:
            raise ConfigError(f"array {name!r}: dtype {array.dtype} cannot be stored; valid: {sorted(_DTYPE_NAMES)}")
        data = np.ascontiguousarray(array, dtype=dtype).tobytes()
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("ascii")
    text += b" " * (-len(text) % _HEADER_ALIGN)
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _fail("duplicate-name", f"the name {key!r} appears twice in one JSON object")
        seen[key] = value
    return seen


def _reject_constant(token: str) -> None:
    raise _fail("bad-json", f"JSON constant {token} (NaN/Infinity) is not allowed")


def _finite_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):
        raise _fail("bad-json", f"JSON number {token[:40]} is beyond the float range")
    return value


_BRACKET_STEPS = np.zeros(256, dtype=np.int8)
_BRACKET_STEPS[[ord("["), ord("{")]] = 1
_BRACKET_STEPS[[ord("]"), ord("}")]] = -1


def json_depth(text: str) -> int:
    """Deepest nesting of ``[]`` / ``{}`` outside strings in valid JSON ``text`` (``[]`` is 1; linear, numpy).

    Escaped backslashes, then escaped quotes are dropped, so every quote left opens or closes a string.
    """
    plain = text.replace("\\\\", "").replace('\\"', "").encode("utf-8", "surrogatepass")
    data = np.frombuffer(plain, dtype=np.uint8)
    in_string = np.bitwise_xor.accumulate(data == ord('"'))  # a string's characters and its opening quote
    steps = _BRACKET_STEPS[data[~in_string]]
    steps = steps[steps != 0]
    return int(np.cumsum(steps, dtype=np.int32).max()) if steps.size else 0


def loads_strict(text: str, what: str) -> Any:
    """JSON without duplicate keys, NaN/Infinity (also as ``1e999``) or nesting deeper than
    :data:`MAX_JSON_DEPTH`; any failure is ``FormatError``."""
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise _fail("too-deep", f"{what} nests arrays/objects {depth} deep; at most {MAX_JSON_DEPTH} are allowed")
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant,
                          parse_float=_finite_float)
    except FormatError:
        raise
    except (ValueError, RecursionError) as exc:  # bad syntax, over-long integers
        raise _fail("bad-json", f"{what} is not valid JSON: {str(exc)[:200]}") from None


def parse_safetensors(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, str], int]:
    """Validate a safetensors file's bytes; return (arrays, metadata, header length).

    Arrays are read-only views of ``data`` (numpy ``frombuffer``).
    """
    size = len(data)
    if size < 8:
        raise _fail("truncated", f"the file holds {size} bytes, fewer than the 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise _fail("header-too-large", f"header length {n} is over the cap of {MAX_HEADER_BYTES} bytes")
    if 8 + n > size:
        raise _fail("truncated", f"the header of {n} bytes runs past the end of the file ({size} bytes)")
    try:
        text = bytes(data[8 : 8 + n]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _fail("bad-header", f"the header is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    header = loads_strict(text, "the header")
    if not isinstance(header, dict):
        raise _fail("bad-header", f"the header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _fail("bad-header", "__metadata__ must map strings to strings")
    spans = []
    for name, info in header.items():
        dtype, shape, numel, begin, end = _check_entry(name, info)
        if numel * dtype.itemsize != end - begin:
            raise _fail("bad-length", f"array {_short(name)}: shape {list(shape)} of {dtype.name} needs "
                                      f"{numel * dtype.itemsize} bytes, its offsets span {end - begin}")
        spans.append((begin, end, name, dtype, shape))
    spans.sort(key=lambda s: s[:3])
    buffer = size - 8 - n
    position = 0
    for begin, end, name, _, _ in spans:
        if begin < position:
            raise _fail("bad-offsets", f"array {_short(name)}: bytes [{begin}, {end}) overlap the previous array")
        if begin > position:
            raise _fail("bad-offsets", f"array {_short(name)}: bytes [{position}, {begin}) before it belong to "
                                       f"no array")
        position = end
    if position > buffer:
        raise _fail("truncated", f"the arrays need {position} data bytes, the file holds {buffer}")
    if position < buffer:
        raise _fail("trailing-bytes", f"{buffer - position} bytes after the last array belong to no array")
    arrays = {name: np.frombuffer(data, dtype, math.prod(shape), 8 + n + begin).reshape(shape)
              for begin, _, name, dtype, shape in spans}
    return arrays, metadata, n


def _check_entry(name: str, info: object) -> tuple[np.dtype, tuple[int, ...], int, int, int]:
    """An array's header entry: (dtype, shape, element count, begin, end), every field type-checked."""
    where = f"array {_short(name)}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise _fail("bad-header", f"{where}: an entry holds exactly dtype, shape and data_offsets")
    dtype = info["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _fail("bad-dtype", f"{where}: dtype {_short(dtype)} is not one of {sorted(DTYPES)}")
    shape, numel = check_shape(info["shape"], where)
    offsets = info["data_offsets"]
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) and o >= 0 for o in offsets):
        raise _fail("bad-offsets", f"{where}: data_offsets must be two ints >= 0, got {_short(offsets)}")
    if offsets[0] > offsets[1]:
        raise _fail("bad-offsets", f"{where}: data_offsets {offsets} run backwards")
    return np.dtype(DTYPES[dtype]), shape, numel, offsets[0], offsets[1]


# ---------------------------------------------------------------------------- tensors and their code chain


def _codec(name: object, tensor: str) -> Codec:
    if isinstance(name, str) and name in _RAW_EXTRA:
        return _RAW_EXTRA[name]
    return get_codec(name, tensor)  # type: ignore[arg-type]


def raw(array: np.ndarray) -> NumpyEncoded:
    """A tensor stored as it is (float32, float16, float64, integer or bool)."""
    array = np.asarray(array)
    if array.dtype.name not in (*_RAW_EXTRA, "float32", "float16"):
        raise ConfigError(f"raw tensors are float16/32/64, int8/16/32/64, uint8 or bool, got {array.dtype}")
    return NumpyEncoded(array.dtype.name, array, 8 * array.dtype.itemsize)


def _encode_stream(
    symbols: np.ndarray, width: int, entropy: str | None, prefix: str, models: dict[str, dict[str, int]], tensor: str
) -> dict[str, np.ndarray]:
    """The arrays of stream ``prefix``; an ANS stream's model scalars go to ``models[prefix]``."""
    if entropy is None:
        return {prefix: pack_codes(symbols, width, prefix)}
    if entropy == "huffman":
        s = huffman_encode(symbols)
        return {f"{prefix}.lengths": s.lengths, f"{prefix}.data": s.data, f"{prefix}.offsets": s.offsets}
    s = ans_encode(symbols, f"tensor {tensor!r} stream {prefix!r}")
    models[prefix] = {"low": s.low, "precision": s.precision}
    return {f"{prefix}.freqs": s.freqs, f"{prefix}.words": s.words}


def _huffman_bits(arrays: dict[str, np.ndarray], prefix: str, symbols: np.ndarray) -> int:
    """Bits the Huffman codes of ``symbols`` take in stream ``prefix``."""
    return int(np.sum(arrays[f"{prefix}.lengths"][symbols], dtype=np.int64))


def encode_tensor(
    name: str, enc: NumpyEncoded, entropy: str | None = None, index_bits: int | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Store tensor ``name``: its arrays (named ``name:array``) and its document entry.

    ``index_bits`` (1..16) stores the codes sparse (relative index);
    ``entropy`` ("huffman" / "ans") entropy-codes the code streams. Both
    apply only to codecs with a ``codes`` array; others ignore them.
    """
    if entropy not in (None, *ENTROPY_CODERS):
        raise ConfigError(f"tensor {name!r}: entropy must be None, 'huffman' or 'ans', got {entropy!r}")
    if index_bits is not None and (not _is_int(index_bits) or not 1 <= index_bits <= MAX_INDEX_BITS):
        raise ConfigError(f"tensor {name!r}: sparse index bits must be an int from 1 to {MAX_INDEX_BITS}, "
                          f"got {index_bits!r}")
    arrays, entry = _codec(enc.kind, name).encode(enc, name)
    if "codes" in arrays and (entropy is not None or index_bits is not None):
        n, width = math.prod(entry["shape"]), entry["bits"]
        symbols = unpack_codes(arrays.pop("codes"), n, width, name)
        sparse = None
        if index_bits is None:
            streams = {"codes": (symbols, width)}
        else:
            zero = int(np.argmax(np.bincount(symbols))) if n else 0
            gaps, values = _sparse_encode(_swap(symbols, zero), index_bits)
            sparse = {"index_bits": index_bits, "zero": zero, "count": int(gaps.size)}
            streams = {"gaps": (gaps, index_bits), "values": (values, width)}
        entry["stream"] = {"sparse": sparse, "entropy": entropy}
        models: dict[str, dict[str, int]] = {}
        for stream, (stream_symbols, stream_width) in streams.items():
            arrays.update(_encode_stream(stream_symbols, stream_width, entropy, stream, models, name))
        if sparse is not None:
            stored = sum(a.nbytes for k, a in arrays.items() if k.split(".")[0] in ("gaps", "values"))
            if n > element_budget(stored):
                raise ConfigError(f"tensor {name!r}: {n} codes in {stored} bytes of sparse streams, more than the "
                                  f"{element_budget(stored)} a reader accepts; use fewer index bits or store it dense")
        if entropy == "ans":
            entry["stream"]["ans_model"] = models
        if entropy == "huffman":
            entry["stream"]["huffman_bits"] = {s: _huffman_bits(arrays, s, streams[s][0]) for s in streams}
    return {f"{name}:{k}": v for k, v in arrays.items()}, entry


def _swap(symbols: np.ndarray, zero: int) -> np.ndarray:
    """Exchange the codes ``zero`` and 0 in place (an involution, so it also undoes itself); returns ``symbols``."""
    if zero:
        at_zero = symbols == zero
        symbols[symbols == 0] = zero
        symbols[at_zero] = 0
    return symbols


def _sparse_encode(symbols: np.ndarray, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Relative-index coding with filler entries up to within ``2**index_bits`` of the end."""
    gaps, values = encode_relative(symbols, index_bits)
    span = 1 << index_bits
    fillers = (symbols.size - int(np.sum(gaps + 1))) // span
    full = np.full(fillers, span - 1, dtype=np.int64)
    return np.concatenate([gaps, full]), np.concatenate([values, np.zeros(fillers, dtype=np.int64)])


def _array(arrays: dict[str, np.ndarray], key: str, dtype: str, tensor: str) -> np.ndarray:
    array = arrays[key]
    if array.dtype != np.dtype(dtype) or array.ndim != 1:
        raise _fail("bad-dtype", f"tensor {tensor!r}: array {key!r} must be a 1-D {np.dtype(dtype).name} array, "
                                 f"got {array.dtype} of shape {list(array.shape)}")
    return array


def _decode_stream(
    arrays: dict[str, np.ndarray], prefix: str, count: int, width: int, stream_meta: dict[str, Any], tensor: str
) -> np.ndarray:
    name = prefix.rsplit(":", 1)[-1]
    where = f"tensor {tensor!r} stream {name!r}"
    entropy = stream_meta["entropy"]
    if entropy is None:
        return unpack_codes(_array(arrays, prefix, "uint8", tensor), count, width, where)
    if entropy == "huffman":
        data = _array(arrays, f"{prefix}.data", "uint8", tensor)
        if count > 8 * data.size:  # every code takes at least one bit (huffman_decode: its shortest code's bits)
            raise _fail("bad-count", f"{where}: {count} symbols cannot fit {data.size} bytes of Huffman data")
        offsets = _array(arrays, f"{prefix}.offsets", "uint64", tensor)
        if offsets.size != -(-count // BLOCK):
            raise _fail("bad-count", f"{where}: {offsets.size} block offsets for {count} symbols in blocks of {BLOCK}")
        lengths = _array(arrays, f"{prefix}.lengths", "uint8", tensor)
        symbols = huffman_decode(HuffmanStream(lengths, data, offsets, count, BLOCK), where)
        used, stored = _huffman_bits(arrays, prefix, symbols), stream_meta["huffman_bits"][name]
        if used != stored:
            raise _fail("bad-count", f"{where}: {count} symbols take {used} bits, the stream holds {stored}")
    else:
        model = stream_meta["ans_model"][name]
        symbols = ans_decode(AnsStream(arrays[f"{prefix}.freqs"], arrays[f"{prefix}.words"], count, model["low"],
                                       model["precision"]), where)
    if symbols.size and int(symbols.max()) >= 1 << width:
        raise _fail("bad-code", f"{where}: symbol {int(symbols.max())} does not fit {width} bits")
    return symbols


def _check_stream_meta(stream: object, tensor: str) -> tuple[dict[str, int] | None, str | None]:
    where = f"tensor {tensor!r}"
    entropy = stream.get("entropy") if isinstance(stream, dict) else None
    if entropy not in (None, *ENTROPY_CODERS):
        raise _fail("bad-stream", f"{where}: unknown entropy coder {entropy!r}; valid: null, {', '.join(ENTROPY_CODERS)}")
    keys = {"sparse", "entropy", *_STREAM_META[entropy]}
    if not isinstance(stream, dict) or set(stream) != keys:
        raise _fail("bad-stream", f"{where}: 'stream' must be an object with keys {sorted(keys)}, got {stream!r}")
    sparse = stream["sparse"]
    streams = ("codes",) if sparse is None else ("gaps", "values")
    if entropy == "huffman":
        bits = stream["huffman_bits"]
        if not isinstance(bits, dict) or set(bits) != set(streams) or not all(
                _is_int(b) and 0 <= b <= 2**40 for b in bits.values()):
            raise _fail("bad-stream", f"{where}: huffman_bits must give the bit length of {list(streams)}")
    if entropy == "ans":
        models = stream["ans_model"]
        if not isinstance(models, dict) or set(models) != set(streams) or not all(
                isinstance(m, dict) and set(m) == {"low", "precision"} and _is_int(m["low"]) and 0 <= m["low"] < 2**16
                and _is_int(m["precision"]) and 0 <= m["precision"] <= MAX_PRECISION for m in models.values()):
            raise _fail("bad-stream", f"{where}: ans_model must give low (0 to 65535) and precision (0 to "
                                      f"{MAX_PRECISION}) of {list(streams)}")
    if sparse is not None:
        limits = {"index_bits": (1, MAX_INDEX_BITS), "zero": (0, 2**16 - 1), "count": (0, 2**31)}
        if not isinstance(sparse, dict) or set(sparse) != set(limits):
            raise _fail("bad-stream", f"{where}: 'sparse' must hold exactly {sorted(limits)}, got {sparse!r}")
        for key, (low, high) in limits.items():
            if not _is_int(sparse[key]) or not low <= sparse[key] <= high:
                raise _fail("bad-stream", f"{where}: sparse {key} must be an int from {low} to {high}")
    if sparse is None and entropy is None:
        raise _fail("bad-stream", f"{where}: a 'stream' entry must apply sparse coding or an entropy coder")
    return sparse, entropy


def stream_arrays(entry: dict[str, Any], tensor: str) -> list[str]:
    """Names (``tensor:array``) of the arrays the entry of ``tensor`` stores (validates codec and chain)."""
    codec = _codec(entry.get("codec"), tensor)
    names = sorted(set(codec.arrays) - codec.optional_arrays(entry))
    if "stream" in entry:
        if "codes" not in names:
            raise _fail("bad-stream", f"tensor {tensor!r}: codec {codec.name!r} has no code stream to code further")
        sparse, entropy = _check_stream_meta(entry["stream"], tensor)
        streams = ("gaps", "values") if sparse is not None else ("codes",)
        names.remove("codes")
        names += [s + suffix for s in streams for suffix in _STREAM_ARRAYS[entropy]]
    return [f"{tensor}:{name}" for name in names]


def decode_tensor(tensor: str, arrays: dict[str, np.ndarray], entry: dict[str, Any]) -> NumpyEncoded:
    """Invert :func:`encode_tensor`: ``arrays`` holds this tensor's stored arrays (``tensor:array``)."""
    codec = _codec(entry.get("codec"), tensor)
    local = {k[len(tensor) + 1 :]: v for k, v in arrays.items()}
    meta = {k: v for k, v in entry.items() if k != "stream"}
    if "stream" in entry:
        codes = _decode_chain(tensor, local, entry)  # its temporaries are gone before the codec allocates
        local = {k: v for k, v in local.items() if k.split(".")[0] not in ("codes", "gaps", "values")}
        local["codes"] = codes
    return codec.decode(local, meta, tensor)


def _decode_chain(tensor: str, local: dict[str, np.ndarray], entry: dict[str, Any]) -> np.ndarray:
    """The packed codes of a tensor whose ``stream`` entry codes them further (``local``: arrays by short name)."""
    sparse, _ = _check_stream_meta(entry["stream"], tensor)
    _, n = check_shape(entry.get("shape"), f"tensor {tensor!r}")
    width = entry.get("bits")
    if not _is_int(width) or not 1 <= width <= 16:
        raise _fail("bad-bits", f"tensor {tensor!r}: a coded stream needs bits from 1 to 16, got {_short(width)}")
    if sparse is None:
        symbols = _decode_stream(local, "codes", n, width, entry["stream"], tensor)
        return pack_codes(symbols, width, f"tensor {tensor!r}")
    ib, m = sparse["index_bits"], sparse["count"]
    if n >= (m + 1) << ib:  # checked exactly below, once the gaps are known
        raise _fail("bad-length", f"tensor {tensor!r}: {m} sparse entries of {ib}-bit gaps cover fewer than "
                                  f"{(m + 1) << ib} codes, the shape holds {n}")
    stored = sum(a.nbytes for k, a in local.items() if k.split(".")[0] in ("gaps", "values"))
    if n > element_budget(stored):
        raise _fail("too-large", f"tensor {tensor!r}: {n} codes from {stored} bytes of sparse streams; at most "
                                 f"{element_budget(stored)} (2**20 + 256 per byte) are accepted")
    if sparse["zero"] >= 1 << width:
        raise _fail("bad-stream", f"tensor {tensor!r}: sparse zero code {sparse['zero']} does not fit {width} bits")
    gaps = _decode_stream(local, "gaps", m, ib, entry["stream"], tensor)
    covered = int(np.sum(gaps + 1))
    if not covered <= n < covered + (1 << ib):
        raise _fail("bad-length", f"tensor {tensor!r}: sparse entries cover {covered} of {n} codes; "
                                  f"valid is {n - (1 << ib) + 1} to {n}")
    values = _decode_stream(local, "values", m, width, entry["stream"], tensor)
    symbols = _swap(decode_relative(gaps, values, n, ib, f"tensor {tensor!r}"), sparse["zero"])
    del gaps, values
    return pack_codes(symbols, width, f"tensor {tensor!r}")


# ---------------------------------------------------------------------------- whole files


@dataclass
class LowbitFile:
    """A validated .lowbit file: its document, each tensor decoded, and byte counts."""

    document: dict[str, Any]
    tensors: dict[str, NumpyEncoded]
    stored_bytes: dict[str, int] = field(default_factory=dict)
    file_bytes: int = 0
    header_bytes: int = 0


def pack_file(
    tensors: dict[str, NumpyEncoded],
    graph: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    entropy: str | None = None,
    index_bits: dict[str, int] | None = None,
) -> bytes:
    """The bytes of a .lowbit file (same input, same bytes: sorted keys, no timestamps).

    ``index_bits`` maps tensor names to sparse index widths (tensors left out
    are stored dense).
    """
    index_bits = index_bits or {}
    unknown = sorted(set(index_bits) - set(tensors))
    if unknown:
        raise ConfigError(f"sparse index bits given for unknown tensors {unknown}")
    arrays: dict[str, np.ndarray] = {}
    entries = {}
    for name in sorted(tensors):
        stored, entries[name] = encode_tensor(name, tensors[name], entropy, index_bits.get(name))
        clash = sorted(set(stored) & set(arrays))
        if clash:
            raise ConfigError(f"tensor {name!r}: stored array names {clash} clash with another tensor's")
        arrays.update(stored)
    document = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "tensors": entries, "graph": graph,
                "model": model or {}}
    try:
        text = json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"the file document must be JSON (no NaN/Inf, only str keys): {exc}") from None
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise ConfigError(f"the file document nests arrays/objects {depth} deep; readers accept {MAX_JSON_DEPTH}")
    blob = pack_safetensors(arrays, {METADATA_KEY: text})
    total = sum(_element_count(e) for e in entries.values())
    if total > element_budget(len(blob)):
        raise ConfigError(f"the tensors decode to {total} elements from a file of {len(blob)} bytes, more than the "
                          f"{element_budget(len(blob))} a reader accepts; store the most compressible ones without "
                          f"entropy coding or sparse coding")
    return blob


def write_file(path: str | os.PathLike[str], tensors: dict[str, NumpyEncoded], **kwargs: Any) -> None:
    """:func:`pack_file` written atomically to ``path``."""
    write_atomic(path, pack_file(tensors, **kwargs))


def read_document(metadata: dict[str, str]) -> dict[str, Any]:
    """The validated top level of the document in safetensors ``metadata``."""
    if METADATA_KEY not in metadata:
        raise _fail("not-lowbit", f"the safetensors metadata has no {METADATA_KEY!r} key; this is not a .lowbit file")
    document = loads_strict(metadata[METADATA_KEY], "the lowbit document")
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise _fail("not-lowbit", f"the document must be an object with format {FORMAT_NAME!r}")
    version = document.get("version")
    if not _is_int(version) or version not in SUPPORTED_VERSIONS:
        raise _fail("unknown-version", f"format version {version!r} is not supported; supported: {SUPPORTED_VERSIONS}")
    if set(document) != set(DOCUMENT_KEYS):
        raise _fail("bad-document", f"the document holds keys {sorted(document)}; valid: {list(DOCUMENT_KEYS)}")
    if not isinstance(document["tensors"], dict) or not all(isinstance(e, dict) for e in document["tensors"].values()):
        raise _fail("bad-document", "document 'tensors' must map names to entry objects")
    if document["graph"] is not None and not isinstance(document["graph"], dict):
        raise _fail("bad-document", "document 'graph' must be an object or null")
    if not isinstance(document["model"], dict):
        raise _fail("bad-document", "document 'model' must be an object")
    return document


def _element_count(entry: dict[str, Any]) -> int:
    """Elements decoding a tensor produces: its shape's product plus both sparse streams' entries (an
    unreadable shape or count counts 0: validation rejects it before anything is allocated)."""
    shape = entry.get("shape")
    n = math.prod(shape) if isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape) else 0
    stream = entry.get("stream")
    sparse = stream.get("sparse") if isinstance(stream, dict) else None
    count = sparse.get("count", 0) if isinstance(sparse, dict) else 0
    return n + (2 * count if _is_int(count) and count > 0 else 0)


def unpack_file(data: bytes) -> LowbitFile:
    """Parse and validate a .lowbit file's bytes, decoding every tensor."""
    arrays, metadata, header_bytes = parse_safetensors(data)
    document = read_document(metadata)
    entries = document["tensors"]
    budget = element_budget(len(data))
    total = sum(_element_count(e) for e in entries.values())
    if total > budget:
        raise _fail("too-large", f"the tensors claim {total} elements, more than {budget} for a file of {len(data)} bytes")
    expected = {name: stream_arrays(entry, name) for name, entry in entries.items()}
    claimed = {a for names in expected.values() for a in names}
    for name, names in expected.items():
        missing = [a for a in names if a not in arrays]
        if missing:
            raise _fail("bad-arrays", f"tensor {name!r}: stored arrays {missing} are missing")
    extra = sorted(set(arrays) - claimed)
    if extra:
        raise _fail("bad-arrays", f"arrays {extra[:5]} belong to no tensor of the document")
    tensors = {name: decode_tensor(name, {a: arrays[a] for a in names}, entries[name])
               for name, names in expected.items()}
    stored = {name: sum(arrays[a].nbytes for a in names) for name, names in expected.items()}
    return LowbitFile(document, tensors, stored, len(data), header_bytes)


def read_file(path: str | os.PathLike[str]) -> LowbitFile:
    """Read and validate the .lowbit file at ``path`` (never executes anything from it); a FormatError
    names the file."""
    with open(path, "rb") as file:
        data = file.read()
    try:
        return unpack_file(data)
    except FormatError as exc:
        raise FormatError(exc.code, f"{os.fspath(path)}: {exc.message}") from None


# ---------------------------------------------------------------------------- inspection


def inspect_file(path: str | os.PathLike[str], lowbit_file: LowbitFile | None = None) -> dict[str, Any]:
    """Per tensor its codec chain, bits per weight and bytes; totals against float32 (``lowbit_file``: the file
    at ``path`` when the caller has read it already).

    Returns ``{"path", "version", "file_bytes", "header_bytes", "has_graph",
    "tensors": [{"name", "codec", "chain", "shape", "numel", "bytes",
    "bits_per_weight", "float32_bytes"}], "stored_bytes", "float32_bytes",
    "ratio"}`` where ``ratio`` is float32 bytes / stored bytes.
    """
    lowbit_file = read_file(path) if lowbit_file is None else lowbit_file
    rows = []
    for name, entry in sorted(lowbit_file.document["tensors"].items()):
        numel = math.prod(entry["shape"])
        stored = lowbit_file.stored_bytes[name]
        stream = entry.get("stream") or {}
        chain = [entry["codec"]]
        if stream.get("sparse"):
            chain.append(f"sparse{stream['sparse']['index_bits']}")
        if stream.get("entropy"):
            chain.append(stream["entropy"])
        rows.append({"name": name, "codec": entry["codec"], "chain": "+".join(chain), "shape": entry["shape"],
                     "numel": numel, "bytes": stored, "bits_per_weight": 8 * stored / numel if numel else 0.0,
                     "float32_bytes": 4 * numel})
    stored_total = sum(r["bytes"] for r in rows)
    float_total = sum(r["float32_bytes"] for r in rows)
    return {"path": os.fspath(path), "version": lowbit_file.document["version"], "file_bytes": lowbit_file.file_bytes,
            "header_bytes": lowbit_file.header_bytes, "has_graph": lowbit_file.document["graph"] is not None,
            "tensors": rows, "stored_bytes": stored_total, "float32_bytes": float_total,
            "ratio": float_total / stored_total if stored_total else 0.0}


def format_inspect(info: dict[str, Any]) -> str:
    """A plain-text table of :func:`inspect_file`'s result."""
    header = ("tensor", "chain", "shape", "bits/w", "bytes", "float32")
    body = [(r["name"], r["chain"], "x".join(map(str, r["shape"])) or "scalar", f"{r['bits_per_weight']:.2f}",
             str(r["bytes"]), str(r["float32_bytes"])) for r in info["tensors"]]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    line = "  ".join
    lines = [line(h.ljust(w) if i < 3 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines += [line(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in body]
    lines.append(f"{info['path']}: format v{info['version']}, {info['file_bytes']} bytes "
                 f"(header {info['header_bytes']}), graph: {'yes' if info['has_graph'] else 'no'}")
    lines.append(f"tensors: {info['stored_bytes']} bytes vs {info['float32_bytes']} as float32 "
                 f"(ratio {info['ratio']:.2f})")
    return "\n".join(lines)
