"""Binary layers on packed bits: linear and conv2d with binary weights and binary (sign) inputs.

Both compute, exactly as lowbit's QuantLinear / QuantConv2d with a
``binary`` input quantizer and a binary weight (``binary`` or ``xnor``)::

    y = (sign(x) (*) sign(W)) * scale[o] + bias[o]

where (*) is the matmul or the convolution of +-1 tensors, done as XNOR +
popcount (:func:`lowbit.runtime.kernels.gemm`), ``scale`` the weight's
per-output-channel factor (XNOR-Net's alpha; 1 for plain ``binary``) and
sign(0) = +1.

Convolution layout: NCHW float in and out (as torch). Inside, the input's
sign bits are packed straight from NCHW into per-pixel channel words (NHWC
words) and a direct convolution (:func:`lowbit.runtime.kernels.conv`: the
binary GEMM of the bit-packed im2col rows against the packed weight rows,
without forming those rows; the weights laid out once as a panel of 8
output channels side by side) gives every output channel through the GEMM
epilogue, which writes NCHW. ``forward_packed`` takes and (with a folded
:class:`~lowbit.runtime.threshold.Threshold`) returns packed pixel words
``[N, H, W, ceil(C / 64)]``, so activations stay packed between binary layers.

Padding equals training: QuantConv2d binarizes the input and then zero-pads
the +-1 tensor, so a padded position contributes 0. A padded pixel packs as
all-zero words, i.e. as -1 values, which contribute ``-S[o, p]`` with
``S[o, p] = sum_c W[o, c, p]`` the weight sum at kernel position ``p``; the
kernel adds back ``S[o, p]`` for every padded position of an output pixel
(a per-position correction table, computed once per input size).
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .kernels import (MAX_INT, WORD_BITS, check_array, check_threads, conv, conv_panel, gemm, int_pair, pack_nchw,
                      pack_signs, pack_weight_rows, select_kernel, unpack_signs)
from .threshold import Threshold


def _channel_vector(values: np.ndarray | float | None, channels: int, name: str) -> np.ndarray | None:
    """A per-output-channel float32 vector (a scalar is broadcast), or None."""
    if values is None:
        return None
    array = np.asarray(values, dtype=np.float32)
    if array.size == 1:
        return np.full(channels, array.reshape(()), dtype=np.float32)
    if array.shape != (channels,):
        raise ConfigError(f"{name} must be a scalar or hold one value per output channel ({channels}), "
                          f"got shape {array.shape}")
    return np.array(array, order="C")  # an aligned copy


def _weight_bits(weight: np.ndarray, ndim: int, name: str) -> np.ndarray:
    if not isinstance(weight, np.ndarray) or weight.ndim != ndim or weight.dtype.kind not in "fiub":
        raise ConfigError(f"{name} must be a real {ndim}-D numpy array (its signs are used), got "
                          f"{getattr(weight, 'dtype', type(weight).__name__)} {getattr(weight, 'shape', '')}")
    return weight >= 0


class BinaryLinear:
    """``y = (sign(x) sign(W)^T) * scale + bias`` for ``x [N, in]`` float32, ``W [out, in]`` (signs used)."""

    def __init__(self, weight: np.ndarray, scale: np.ndarray | float | None = None, bias: np.ndarray | None = None):
        bits = _weight_bits(weight, 2, "linear weight")
        self.out_features, self.in_features = bits.shape
        if not 1 <= self.in_features <= MAX_INT:
            raise ConfigError(f"a binary linear layer needs 1 .. 2**31 - 1 input features (int32 dot products), "
                              f"got {self.in_features}")
        self.rows = pack_weight_rows(bits[:, :, None])
        self.scale = _channel_vector(scale, self.out_features, "scale")
        self.bias = _channel_vector(bias, self.out_features, "bias")

    def __call__(self, x: np.ndarray, *, kernel: str | None = None, threads: int | None = None) -> np.ndarray:
        x = check_array(x, "binary linear input", 2, (np.float32,))
        if x.shape[1] != self.in_features:
            raise ConfigError(f"binary linear input has {x.shape[1]} features, the layer takes {self.in_features}")
        name, threads = select_kernel(kernel), check_threads(threads)
        return self.forward_packed(pack_signs(x, kernel=name, threads=threads), name, threads)

    def forward_packed(self, bits: np.ndarray, kernel: str, threads: int, threshold: Threshold | None = None,
                       rows: np.ndarray | None = None) -> np.ndarray:
        """Packed input rows ``[N, words]`` -> float32 ``[N, out]``, or packed signs ``[N, ceil(out / 64)]``
        through ``threshold``. ``rows``: the weight rows laid out for the input's bit order (default: its own)."""
        rows = self.rows if rows is None else rows
        return _gemm_out(bits, rows, self.in_features, kernel, threads, self.scale, self.bias, threshold)

    def rows_for_map(self, channels: int, h: int, w: int) -> np.ndarray:
        """Weight rows for a flattened NCHW map given as packed pixel words ``[N, h, w, ceil(channels / 64)]``."""
        if channels * h * w != self.in_features:
            raise ConfigError(f"a {channels}x{h}x{w} map does not flatten to the {self.in_features} inputs of the layer")
        signs = np.where(unpack_signs(self.rows, self.in_features) > 0, True, False)
        return pack_weight_rows(signs.reshape(self.out_features, channels, h, w))


def _gemm_out(bits: np.ndarray, rows: np.ndarray, k: int, kernel: str, threads: int, scale: np.ndarray | None,
              bias: np.ndarray | None, threshold: Threshold | None) -> np.ndarray:
    """One binary GEMM of packed input rows against weight rows: float32 ``[M, O]``, or packed signs
    ``[M, ceil(O / 64)]`` through a folded threshold."""
    m, o = bits.shape[0], rows.shape[0]
    if threshold is not None:
        out = np.empty((m, (o + WORD_BITS - 1) // WORD_BITS), dtype=np.uint64)
        gemm(bits, rows, k, out, kernel, threads, threshold=threshold.threshold, direction=threshold.direction)
        return out
    out = np.empty((m, o), dtype=np.float32)
    gemm(bits, rows, k, out, kernel, threads, scale, bias)
    return out


class BinaryConv2d:
    """``y = conv2d(zero_pad(sign(x)), sign(W), stride) * scale + bias``, NCHW; ``W [out, in, kh, kw]``."""

    def __init__(self, weight: np.ndarray, stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                 scale: np.ndarray | float | None = None, bias: np.ndarray | None = None):
        bits = _weight_bits(weight, 4, "conv weight")
        self.out_channels, self.in_channels, kh, kw = bits.shape
        if min(bits.shape) < 1:
            raise ConfigError(f"conv weight shape {bits.shape} has an empty axis")
        if kh * kw * self.in_channels > MAX_INT:
            raise ConfigError(f"conv weight shape {bits.shape} has more than 2**31 - 1 inputs per output "
                              f"(int32 dot products)")
        self.kernel_size = (kh, kw)
        self.stride = int_pair(stride, "stride", 1)
        self.padding = int_pair(padding, "padding", 0)
        self.rows = pack_weight_rows(bits)
        self.panel = conv_panel(self.rows)
        #: S[o, y, x]: the sum of the +-1 weights over the input channels at each kernel position
        self.position_sums = (2 * bits.sum(axis=1, dtype=np.int64) - self.in_channels).astype(np.int32)
        self.scale = _channel_vector(scale, self.out_channels, "scale")
        self.bias = _channel_vector(bias, self.out_channels, "bias")
        self._corrections: dict[tuple[int, int], np.ndarray | None] = {}

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """``(Ho, Wo)``; ConfigError when the kernel does not fit the padded input or Ho Wo > 2**31 - 1."""
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        if h + 2 * ph < kh or w + 2 * pw < kw:
            raise ConfigError(f"binary conv input {h}x{w} with padding {self.padding} is smaller than the "
                              f"kernel {self.kernel_size}")
        ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        if ho * wo > MAX_INT:
            raise ConfigError(f"binary conv output of {ho}x{wo} pixels (input {h}x{w}, padding {self.padding}, "
                              f"stride {self.stride}) is more than 2**31 - 1 pixels")
        return ho, wo

    def correction(self, h: int, w: int) -> np.ndarray | None:
        """int32 ``[Ho Wo, out]``: sum of ``S[o, p]`` over the kernel positions ``p`` that fall in the padding."""
        if (h, w) not in self._corrections:
            (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
            ho, wo = self.output_size(h, w)
            rows = np.arange(ho)[:, None] * sh - ph + np.arange(kh)[None, :]  # [Ho, kh] input row of each tap
            cols = np.arange(wo)[:, None] * sw - pw + np.arange(kw)[None, :]
            outside = ((rows < 0) | (rows >= h))[:, None, :, None] | ((cols < 0) | (cols >= w))[None, :, None, :]
            table = None
            if outside.any():
                table = np.einsum("yxab,oab->yxo", outside.astype(np.int64), self.position_sums.astype(np.int64))
                table = np.ascontiguousarray(table.reshape(ho * wo, self.out_channels), dtype=np.int32)
            self._corrections[(h, w)] = table
        return self._corrections[(h, w)]

    def __call__(self, x: np.ndarray, *, kernel: str | None = None, threads: int | None = None) -> np.ndarray:
        x = check_array(x, "binary conv input", 4, (np.float32,))
        if x.shape[1] != self.in_channels:
            raise ConfigError(f"binary conv input has {x.shape[1]} channels, the layer takes {self.in_channels}")
        self.output_size(*x.shape[2:])
        name, threads = select_kernel(kernel), check_threads(threads)
        return self.forward_packed(pack_nchw(x, name, threads), name, threads)

    def forward_packed(self, bits: np.ndarray, kernel: str, threads: int,
                       threshold: Threshold | None = None) -> np.ndarray:
        """Packed pixel words ``[N, H, W, ceil(in / 64)]`` -> float32 NCHW ``[N, out, Ho, Wo]``, or packed
        pixel words ``[N, Ho, Wo, ceil(out / 64)]`` through ``threshold``."""
        bits = check_array(bits, "packed binary conv input", 4, (np.uint64,))
        n, h, w, words = bits.shape
        if words != (self.in_channels + WORD_BITS - 1) // WORD_BITS:
            raise ConfigError(f"packed binary conv input has {words} words per pixel, the layer's "
                              f"{self.in_channels} channels take {(self.in_channels + WORD_BITS - 1) // WORD_BITS}")
        ho, wo = self.output_size(h, w)
        k = self.kernel_size[0] * self.kernel_size[1] * self.in_channels
        o, correction = self.out_channels, self.correction(h, w)
        geometry = (self.kernel_size, self.stride, self.padding)
        if threshold is not None:
            out = np.empty((n, ho, wo, (o + WORD_BITS - 1) // WORD_BITS), dtype=np.uint64)
            conv(bits, self.rows, self.panel, k, *geometry, out.reshape(n * ho * wo, out.shape[3]), kernel, threads,
                 correction=correction, threshold=threshold.threshold, direction=threshold.direction)
            return out
        out = np.empty((n, o, ho, wo), dtype=np.float32)
        conv(bits, self.rows, self.panel, k, *geometry, out.reshape(n * o, ho * wo), kernel, threads, self.scale,
             self.bias, correction)
        return out


def binary_conv2d(x: np.ndarray, weight: np.ndarray, stride: int | tuple[int, int] = 1,
                  padding: int | tuple[int, int] = 0, scale: np.ndarray | float | None = None,
                  bias: np.ndarray | None = None, *, kernel: str | None = None,
                  threads: int | None = None) -> np.ndarray:
    """One-shot :class:`BinaryConv2d`: ``conv2d(zero_pad(sign(x)), sign(W)) * scale + bias`` (NCHW, float32)."""
    return BinaryConv2d(weight, stride, padding, scale, bias)(x, kernel=kernel, threads=threads)
