"""lowbit's runtime: run .lowbit models with numpy and native XNOR + popcount kernels, without torch.

- :func:`available_kernels` (fastest first, ``"numpy"`` last), kernel forced
  by a ``kernel=`` argument or ``$LOWBIT_KERNEL`` (avx512, avx2, scalar,
  neon, numpy);
- :func:`pack_signs` / :func:`unpack_signs`: sign bits in uint64 words;
- :func:`binary_gemm`: ``K - 2 popcount(a XOR b)`` for all row pairs;
- :func:`binary_conv2d`, :class:`BinaryConv2d`, :class:`BinaryLinear`;
- :class:`Engine`: a .lowbit file's graph IR, executed.

Never imports torch.
"""

from .binary import BinaryConv2d, BinaryLinear, binary_conv2d
from .engine import Engine
from .kernels import KERNEL_ENV, available_kernels, binary_gemm, describe, native_available, pack_signs, unpack_signs

__all__ = [
    "KERNEL_ENV",
    "BinaryConv2d",
    "BinaryLinear",
    "Engine",
    "available_kernels",
    "binary_conv2d",
    "binary_gemm",
    "describe",
    "native_available",
    "pack_signs",
    "unpack_signs",
]
