"""XNOR + popcount primitives: sign packing and the binary GEMM, native with a numpy fallback.

A binary dot product of two rows of K values in {-1, +1}, packed as bits
(bit 1 = +1, LSB first in uint64 words, zero tail; see
:mod:`lowbit.format.bitpack`), is ``K - 2 * popcount(a XOR b)``: XNOR-Net's
replacement of K multiply-accumulates (Rastegari et al., ECCV 2016,
section 3.2), accumulated in int32.

Kernels (the native module ``lowbit._native._kernels``, chosen at run time):
``avx512`` (AVX-512 VPOPCNTDQ), ``avx2`` (nibble-table popcount), ``scalar``
(POPCNT), ``neon`` (aarch64), and ``numpy`` (always there: the float64
matmul of the unpacked +-1 matrices, exact for K < 2**53).
Every function takes ``kernel`` (a name, default: the environment
variable ``LOWBIT_KERNEL``, else the fastest this CPU runs) and ``threads``
(None or 0: all cores, at most :data:`MAX_THREADS`). Inputs that are not
aligned for their dtype are copied before a native kernel reads them.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..errors import ConfigError, FormatError
from ..format.bitpack import WORD_BITS, pack_rows, pack_signs as pack_signs_numpy, unpack_rows

try:
    from .._native import _kernels as native
except ImportError:  # the extension did not build: the numpy kernels stay usable
    native = None

#: environment variable that forces a kernel
KERNEL_ENV = "LOWBIT_KERNEL"
KERNEL_NAMES = ("avx512", "avx2", "neon", "scalar", "numpy")
#: the most threads a kernel may be asked for (the native module's MAX_THREADS: OpenMP crashes on absurd counts)
MAX_THREADS = 1024
#: geometry values (kernel, stride, padding) and k are C ints in the native module
MAX_INT = 2**31 - 1
_NATIVE_IDS: dict[str, int] = dict(native.kernels()) if native is not None else {}


def available_kernels() -> list[str]:
    """Kernels this CPU runs, fastest first; the first is used unless one is forced. ``"numpy"`` is always last."""
    return [*_NATIVE_IDS, "numpy"]


def native_available() -> bool:
    """Whether the native module was built and loaded."""
    return native is not None


def select_kernel(kernel: str | None = None) -> str:
    """The kernel to run: ``kernel``, else ``$LOWBIT_KERNEL``, else the fastest available."""
    name = kernel if kernel is not None else os.environ.get(KERNEL_ENV) or available_kernels()[0]
    if name not in KERNEL_NAMES:
        raise ConfigError(f"unknown kernel {name!r} (argument or ${KERNEL_ENV}); valid: {', '.join(KERNEL_NAMES)}")
    if name not in available_kernels():
        raise ConfigError(f"kernel {name!r} does not run on this machine; available: {', '.join(available_kernels())}")
    return name


def check_threads(threads: int | None) -> int:
    """``threads`` as the native modules take it: 0 means all cores; at most :data:`MAX_THREADS`."""
    if threads is None:
        return 0
    if (isinstance(threads, bool) or not isinstance(threads, (int, np.integer))
            or not 0 <= threads <= MAX_THREADS):
        raise ConfigError(f"threads must be None or an int in 0 .. {MAX_THREADS} (0: all cores), got {threads!r}")
    return int(threads)


def aligned(x: np.ndarray) -> np.ndarray:
    """``x``, or a C-contiguous copy where its data is not aligned for its dtype (the native kernels need both)."""
    return x if x.flags.aligned and x.flags.c_contiguous else np.array(x, order="C")


def _describe(x: object) -> str:
    if isinstance(x, np.ndarray):
        return f"{x.dtype} array of shape {x.shape}{'' if x.flags.c_contiguous else ' (not C-contiguous)'}"
    return type(x).__name__


def check_array(x: object, name: str, ndim: int, dtypes: tuple[np.dtype | type, ...] | None = None) -> np.ndarray:
    """Raise ConfigError unless ``x`` is a C-contiguous ndarray of ``ndim`` dimensions (and one of ``dtypes``);
    return it, copied if misaligned."""
    ok = isinstance(x, np.ndarray) and x.ndim == ndim and x.flags.c_contiguous
    if ok and dtypes is not None:
        ok = any(x.dtype == d for d in dtypes)
    if not ok:
        kinds = "" if dtypes is None else " of " + " or ".join(np.dtype(d).name for d in dtypes)
        raise ConfigError(f"{name} must be a C-contiguous {ndim}-D numpy array{kinds}, got {_describe(x)}")
    return aligned(x)  # type: ignore[arg-type]


def pack_signs(x: np.ndarray, *, kernel: str | None = None, threads: int | None = None) -> np.ndarray:
    """Sign-pack rows ``x [rows, K]`` into uint64 words ``[rows, ceil(K / 64)]``: bit 1 where ``x >= 0``.

    Same bits as :func:`lowbit.format.bitpack.pack_signs` (sign(0) = +1, NaN
    packs as -1, zero tail); float32 rows use the native kernel.
    """
    x = check_array(x, "rows to pack", 2)
    if x.dtype.kind not in "fiub":
        raise ConfigError(f"rows to pack must hold real numbers (float, int or bool), got dtype {x.dtype}")
    name, threads = select_kernel(kernel), check_threads(threads)
    if name == "numpy" or x.dtype != np.float32:
        return pack_signs_numpy(x)
    out = np.empty((x.shape[0], (x.shape[1] + WORD_BITS - 1) // WORD_BITS), dtype=np.uint64)
    native.pack_signs(x, out, _NATIVE_IDS[name], threads)
    return out


def unpack_signs(words: np.ndarray, k: int) -> np.ndarray:
    """Inverse of :func:`pack_signs`: float32 rows of +-1 ``[rows, k]`` (FormatError on a set tail bit)."""
    return np.where(unpack_rows(words, k), np.float32(1), np.float32(-1))


def check_packed(a: object, b: object, k: object) -> int:
    """Validate two packed operands of a binary GEMM over ``k`` bits; return ``k``."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_INT:
        raise ConfigError(f"k (the bits per row) must be an int in 1 .. 2**31 - 1 (int32 dot products), got {k!r}")
    k = int(k)
    words = (k + WORD_BITS - 1) // WORD_BITS
    for name, x in (("a_packed", a), ("b_packed", b)):
        x = check_array(x, name, 2, (np.uint64,))
        if x.shape[1] != words:
            raise ConfigError(f"{name} holds {x.shape[1]} words per row; k={k} needs ceil(k / 64) = {words}")
        if k % WORD_BITS and x.shape[0] and np.any(x[:, -1] >> np.uint64(k % WORD_BITS)):
            raise FormatError("bad-padding", f"{name}: bits past k={k} in the last word of a row are not zero")
    return k


def binary_gemm(a_packed: np.ndarray, b_packed: np.ndarray, k: int, *, kernel: str | None = None,
                threads: int | None = None) -> np.ndarray:
    """``C[m, n] = k - 2 popcount(A[m] XOR B[n])``, int32 ``[M, N]``: the +-1 product ``A B^T`` of packed rows.

    ``a_packed [M, ceil(k/64)]`` and ``b_packed [N, ceil(k/64)]`` are uint64
    sign rows with zero tails (:func:`pack_signs`).
    """
    k = check_packed(a_packed, b_packed, k)
    a_packed, b_packed = aligned(a_packed), aligned(b_packed)
    out = np.empty((a_packed.shape[0], b_packed.shape[0]), dtype=np.int32)
    gemm(a_packed, b_packed, k, out, select_kernel(kernel), check_threads(threads))
    return out


def gemm(a: np.ndarray, b: np.ndarray, k: int, out: np.ndarray, kernel: str, threads: int,
         scale: np.ndarray | None = None, bias: np.ndarray | None = None,
         correction: np.ndarray | None = None, *, nchw_pixels: int = 0,
         threshold: np.ndarray | None = None, direction: np.ndarray | None = None) -> None:
    """Binary GEMM of validated operands into ``out`` through the epilogue, on ``d = dot + correction[m % R, n]``.

    ``k`` counts the meaningful bits of a row (at most 64 x its words; the
    others are zero in both operands). ``out`` int32 ``[M, N]``: ``d``;
    float32: ``d * scale[n] + bias[n]``, row-major ``[M, N]`` or, with
    ``nchw_pixels = P``, NCHW ``[M / P, N, P]``; uint64 ``[M, ceil(N / 64)]``:
    packed signs, bit ``n`` set iff ``direction[n] * d >= threshold[n]`` (int32).
    """
    if kernel != "numpy":
        a, b, scale, bias, correction, threshold, direction = (
            None if v is None else aligned(v) for v in (a, b, scale, bias, correction, threshold, direction))
        target = aligned(out)
        native.gemm(a, b, k, target, _NATIVE_IDS[kernel], threads, scale, bias, correction, nchw_pixels, threshold,
                    direction)
        if target is not out:
            out[...] = target
        return
    if a.shape[0] and b.shape[0]:
        bits = a.shape[1] * WORD_BITS
        dot = np.rint(unpack_signs(a, bits).astype(np.float64) @ unpack_signs(b, bits).astype(np.float64).T)
        dot = dot.astype(np.int64) - (bits - k)  # the zero bits beyond k each counted +1
    else:
        dot = np.zeros((a.shape[0], b.shape[0]), dtype=np.int64)
    if correction is not None:
        dot += correction[np.arange(dot.shape[0]) % correction.shape[0]]
    if out.dtype == np.uint64:
        out[...] = pack_rows(direction * dot >= threshold)
        return
    if out.dtype == np.int32:
        out[...] = dot
        return
    values = dot.astype(np.float32)
    if scale is not None:
        values *= scale
    if bias is not None:
        values += bias
    if nchw_pixels:
        values = values.reshape(-1, nchw_pixels, values.shape[1]).transpose(0, 2, 1)
    out[...] = values.reshape(out.shape)


def pack_nchw(x: np.ndarray, kernel: str, threads: int) -> np.ndarray:
    """Sign bits of a float32 NCHW tensor as pixel words ``[N, H, W, ceil(C / 64)]`` (bit 1 where ``x >= 0``)."""
    n, c, h, w = x.shape
    words = (c + WORD_BITS - 1) // WORD_BITS
    if kernel == "numpy":
        return pack_signs_numpy(x.transpose(0, 2, 3, 1).reshape(n * h * w, c)).reshape(n, h, w, words)
    out = np.empty((n, h, w, words), dtype=np.uint64)
    native.pack_nchw(aligned(x), out, threads)
    return out


def int_pair(value: object, name: str, low: int) -> tuple[int, int]:
    """``value`` (an int or a pair of them) as a pair of ints in ``low .. 2**31 - 1`` (ConfigError otherwise)."""
    pair = (value, value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else value
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and low <= v <= MAX_INT
                       for v in pair)):
        raise ConfigError(f"{name} must be an int in {low} .. 2**31 - 1 or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def max_pool_packed(bits: np.ndarray, kernel_size: tuple[int, int], stride: tuple[int, int],
                    padding: tuple[int, int], and_mask: np.ndarray, kernel: str, threads: int) -> np.ndarray:
    """Max pooling of packed +-1 pixels ``[N, H, W, words]``: OR of the window's words (AND where ``and_mask``
    is set: channels whose sign falls as the pooled value rises); padded positions are skipped (-inf padding).
    As torch: padding at most half the kernel, and the kernel within the padded input."""
    bits, threads = check_array(bits, "packed max pool input", 4, (np.uint64,)), check_threads(threads)
    n, h, w, words = bits.shape
    (kh, kw), (sh, sw) = int_pair(kernel_size, "max pool kernel", 1), int_pair(stride, "max pool stride", 1)
    ph, pw = int_pair(padding, "max pool padding", 0)
    if 2 * ph > kh or 2 * pw > kw:
        raise ConfigError(f"max pool padding {padding!r} must be at most half the kernel {kernel_size!r}")
    if h < 1 or w < 1 or h + 2 * ph < kh or w + 2 * pw < kw:
        raise ConfigError(f"max pool input {h}x{w} with padding {padding!r} is smaller than the kernel "
                          f"{kernel_size!r}")
    and_mask = check_array(and_mask, "max pool and_mask", 1, (np.uint64,))
    if and_mask.shape != (words,):
        raise ConfigError(f"max pool and_mask must hold one word per pixel word ({words}), got {and_mask.shape}")
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    if kernel != "numpy":
        out = np.empty((n, ho, wo, words), dtype=np.uint64)
        native.max_pool(bits, (kh, kw), (sh, sw), (ph, pw), and_mask, out, threads)
        return out
    any_ = np.zeros((n, ho, wo, words), dtype=np.uint64)
    all_ = np.full((n, ho, wo, words), np.iinfo(np.uint64).max, dtype=np.uint64)
    # only the taps that reach the input for some output pixel: at most 2 H rows (2 W columns) of a huge kernel
    for ky in range(max(0, ph - (ho - 1) * sh), min(kh, ph + h)):
        for kx in range(max(0, pw - (wo - 1) * sw), min(kw, pw + w)):
            rows = np.arange(ho) * sh - ph + ky
            cols = np.arange(wo) * sw - pw + kx
            valid = ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None, :]
            taps = bits[:, np.clip(rows, 0, h - 1)][:, :, np.clip(cols, 0, w - 1)]
            any_ |= np.where(valid[None, :, :, None], taps, np.uint64(0))
            all_ &= np.where(valid[None, :, :, None], taps, np.iinfo(np.uint64).max)
    return (any_ & ~and_mask) | (all_ & and_mask)


def im2col(bits: np.ndarray, kernel_size: tuple[int, int], stride: tuple[int, int],
           padding: tuple[int, int]) -> np.ndarray:
    """Bit-packed im2col (numpy): pixel words ``[N, H, W, words]`` -> rows ``[N Ho Wo, kh kw words]``, kernel
    position ``(y, x)`` at words ``[(y kw + x) words, ...)``; pixels in the padding are zero words."""
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    n, h, w, words = bits.shape
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    padded = np.zeros((n, h + 2 * ph, w + 2 * pw, words), dtype=np.uint64)
    padded[:, ph : ph + h, pw : pw + w] = bits
    windows = np.lib.stride_tricks.sliding_window_view(padded, (kh, kw), axis=(1, 2))[:, ::sh, ::sw][:, :ho, :wo]
    return np.ascontiguousarray(windows.transpose(0, 1, 2, 4, 5, 3)).reshape(n * ho * wo, kh * kw * words)


#: output channels per group of a conv weight panel (the native module's CONV_PANEL)
PANEL_CHANNELS = 8


def conv_panel(rows: np.ndarray) -> np.ndarray:
    """Weight rows ``[O, words]`` as the panel the direct conv reads, ``[ceil(O / 8), words, 8]``: word ``t`` of
    output channel ``8 g + l`` at ``[g, t, l]``, zero words for the channels past ``O``."""
    o, words = rows.shape
    groups = -(-o // PANEL_CHANNELS)
    padded = np.zeros((groups * PANEL_CHANNELS, words), dtype=np.uint64)
    padded[:o] = rows
    return np.ascontiguousarray(padded.reshape(groups, PANEL_CHANNELS, words).transpose(0, 2, 1))


def conv(bits: np.ndarray, rows: np.ndarray, panel: np.ndarray, k: int, kernel_size: tuple[int, int],
         stride: tuple[int, int], padding: tuple[int, int], out: np.ndarray, kernel: str, threads: int,
         scale: np.ndarray | None = None, bias: np.ndarray | None = None, correction: np.ndarray | None = None, *,
         threshold: np.ndarray | None = None, direction: np.ndarray | None = None) -> None:
    """Binary convolution of pixel words ``[N, H, W, words]`` with weight ``rows [O, kh kw words]`` (``panel``:
    the same as :func:`conv_panel`), as :func:`gemm` of the :func:`im2col` rows against ``rows``, through its
    epilogue with ``k = kh kw C`` and the output pixels as GEMM rows: ``out`` int32 ``[N Ho Wo, O]``, float32 NCHW
    ``[N O, Ho Wo]``, or uint64 packed signs ``[N Ho Wo, ceil(O / 64)]``. Native kernels compute it directly,
    without forming the im2col rows."""
    _, h, w, _ = bits.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    pixels = ((h + 2 * ph - kh) // sh + 1) * ((w + 2 * pw - kw) // sw + 1)
    if kernel != "numpy":
        bits, panel, scale, bias, correction, threshold, direction = (
            None if v is None else aligned(v) for v in (bits, panel, scale, bias, correction, threshold, direction))
        target = aligned(out)
        native.conv(bits, panel, kernel_size, stride, padding, rows.shape[0], k, target, _NATIVE_IDS[kernel],
                    threads, scale, bias, correction, threshold, direction)
        if target is not out:
            out[...] = target
        return
    gemm(im2col(bits, kernel_size, stride, padding), rows, k, out, kernel, threads, scale, bias, correction,
         nchw_pixels=pixels if out.dtype == np.float32 else 0, threshold=threshold, direction=direction)


def pack_weight_rows(bits: np.ndarray) -> np.ndarray:
    """Sign bits of a weight ``[O, C, *kernel]`` as rows ``[O, positions * ceil(C / 64)]``: each kernel
    position's input channels in whole words (the file's order, input channel fastest, with every position
    padded to a word boundary so that it lines up with :func:`im2col`'s rows)."""
    o, c = bits.shape[:2]
    per_position = np.moveaxis(bits.reshape(o, c, -1), 1, -1).reshape(-1, c)
    return pack_rows(per_position).reshape(o, -1)


def describe() -> dict[str, Any]:
    """The runtime's build: native module loaded, OpenMP, kernels available."""
    return {"native": native is not None, "openmp": bool(native.openmp()) if native else False,
            "kernels": available_kernels()}
