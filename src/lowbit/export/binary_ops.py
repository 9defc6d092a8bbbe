"""ONNX custom-domain ops for binary-weight layers: the weights travel as sign bits, 1 bit per weight.

``to_onnx(..., binary_ops="custom")`` writes every conv / linear layer whose weight
quantizer is ``binary`` or ``xnor`` as one of two ops of domain ``ai.lowbit``,
version 1 (docs/onnx.md, "Custom ops for binary layers"):

- ``BinaryGemm(X, W, scale[, B]) -> Y``: X float (N, K); Y (N, O) with
  ``Y[n, o] = scale[o] * sum_k X[n, k] * s[o, k] + B[o]``;
- ``BinaryConv(X, W, scale[, B]) -> Y``: X float NCHW; Y the 2-D convolution of X
  with the +-1 kernel ``s`` reshaped to (O, C / group, kh, kw), times ``scale[o]``,
  plus ``B[o]``; attributes ``kernel_shape``, ``strides``, ``pads``, ``dilations``,
  ``group`` as ONNX ``Conv``.

``W`` is uint8 (O, ceil(K / 8)): bit j of byte i of row o (least significant
first) is ``s[o, 8 i + j] = +1`` when set and -1 when clear, over the row-major
flattening of the kernel (K = C / group * kh * kw for conv); the ``k`` attribute
is K, and padding bits past it are 0. ``scale`` is float32 (O,): XNOR-Net's
alpha per output channel, 1 for plain binary weights. Binary activations stay
standard ops (``Where``), so X is already +-1 where the layer's input is binary.

onnxruntime has no kernel for these ops; :func:`reference_ops` are numpy
implementations for ``onnx.reference.ReferenceEvaluator(model, new_ops=...)``,
the executable definition that runtimes implementing the domain can check
against.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from onnx.reference.op_run import OpRun

__all__ = ["DOMAIN", "VERSION", "pack_signs", "reference_ops", "unpack_signs"]

#: the ops' domain and its version
DOMAIN = "ai.lowbit"
VERSION = 1


def pack_signs(positive: np.ndarray) -> np.ndarray:
    """(O, K) booleans (True: +1) -> uint8 (O, ceil(K / 8)), least significant bit first."""
    return np.packbits(np.asarray(positive, dtype=bool), axis=1, bitorder="little")


def unpack_signs(packed: np.ndarray, k: int) -> np.ndarray:
    """uint8 (O, ceil(K / 8)) -> float32 (O, K) of +-1; the inverse of :func:`pack_signs`."""
    bits = np.unpackbits(packed, axis=1, count=k, bitorder="little")
    return bits.astype(np.float32) * 2 - 1


class BinaryGemm(OpRun):
    op_domain = DOMAIN

    def _run(self, x, w, scale, bias=None, k=None):  # onnx.reference passes inputs, then attributes
        y = (x.astype(np.float32) @ unpack_signs(w, k).T) * scale
        return ((y if bias is None else y + bias).astype(np.float32),)


class BinaryConv(OpRun):
    op_domain = DOMAIN

    def _run(self, x, w, scale, bias=None, k=None, kernel_shape=None, strides=None, pads=None,
             dilations=None, group=None):
        channels = k // int(np.prod(kernel_shape))
        kernel = torch.from_numpy(unpack_signs(w, k).reshape(len(scale), channels, *kernel_shape))
        top, left, bottom, right = pads
        padded = F.pad(torch.from_numpy(np.ascontiguousarray(x, np.float32)), (left, right, top, bottom))
        y = F.conv2d(padded, kernel, stride=tuple(strides), dilation=tuple(dilations), groups=group).numpy()
        y = y * scale[None, :, None, None]
        return ((y if bias is None else y + bias[None, :, None, None]).astype(np.float32),)


def reference_ops() -> list[type[OpRun]]:
    """The numpy implementations of the domain's ops, for ``ReferenceEvaluator(model, new_ops=...)``."""
    return [BinaryGemm, BinaryConv]
