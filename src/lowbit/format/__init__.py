"""Byte-level codecs of the .lowbit format: numpy only, never imports torch.

- :mod:`.bitpack`: dense k-bit code packing (``ceil(n*k/8)`` bytes, LSB
  first) and sign rows in uint64 words for binary layers.
- :mod:`.codecs`: one codec per stored tensor representation (float32,
  float16, affine, log, binary, ternary, codebook): ``encode(NumpyEncoded)
  -> (arrays, meta)``, ``decode(arrays, meta) -> NumpyEncoded``,
  ``values(NumpyEncoded)`` (float32, bit for bit as
  ``lowbit.quantizers.base.decode``).
- :mod:`.sparse`: Deep Compression relative-index coding with filler zeros.
- :mod:`.huffman`: canonical length-limited Huffman coding.
- :mod:`.ans`: ANS entropy coding (optional ``constriction``).

Every malformed input raises ``lowbit.errors.FormatError`` with a stable
``code`` and a message naming the tensor or stream. docs/format.md specifies
the .lowbit file, its caps and the atomic writer.
"""

from .ans import AnsStream, ans_decode, ans_encode
from .bitpack import (
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
from .codecs import Codec, NumpyEncoded, codec_names, decode, encode, get_codec, values
from .huffman import HuffmanStream, canonical_codes, code_lengths, huffman_decode, huffman_encode
from .sparse import decode_relative, encode_relative

__all__ = [
    "AnsStream",
    "Codec",
    "HuffmanStream",
    "NumpyEncoded",
    "ans_decode",
    "ans_encode",
    "canonical_codes",
    "code_lengths",
    "codec_names",
    "decode",
    "decode_relative",
    "encode",
    "encode_relative",
    "from_reduction_rows",
    "get_codec",
    "huffman_decode",
    "huffman_encode",
    "pack_codes",
    "pack_rows",
    "pack_signs",
    "packed_size",
    "reduction_shape",
    "to_reduction_rows",
    "unpack_codes",
    "unpack_rows",
    "values",
]
