"""Batch norm + sign of the next binary layer folded into one integer comparison per channel.

Between two binary layers the float path is ``v = float(d) * scale + bias``
(the GEMM epilogue, ``d`` the integer XNOR-popcount dot product in
``[-K, K]``), then per-channel float32 ops (batch norm, hardtanh, relu) and
maybe a max pool, then the next layer's sign, ``+1`` iff the value is
``>= 0`` (sign(0) = +1). Every one of those steps is monotone per channel,
so the sign is a monotone function of ``d``: ``direction * d >= threshold``
with ``direction = +1`` (rising, BN gamma > 0) or ``-1`` (falling, gamma < 0)
and a constant result folded as an always/never true comparison
(gamma = 0: the sign of the BN bias). This is FINN's threshold folding
(Umuroglu et al., "FINN: A Framework for Fast, Scalable Binarized Neural
Network Inference", FPGA 2017, section 4.2).

The threshold is not solved for in real arithmetic: the float32 path is
evaluated, with the very numpy functions the unfused engine runs, at every
integer ``d`` in ``[-K, K]``, so the folded comparison equals the unfused
float32 computation bit for bit, ties included. A max pool between the
layer and the sign commutes with the sign: ``sign(max_i u_i)`` is the OR of
the ``sign(u_i)`` when the ops after the pool rise with ``u`` and the AND
when they fall (checked on every value ``u`` the pool can see). When a
check fails (a non-monotone or NaN table) nothing is folded and the engine
keeps the float path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..format.bitpack import pack_rows

#: a per-channel float32 op on arrays with channels on axis 1 (NCHW maps, [N, features] rows)
ChannelOp = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Threshold:
    """Packed sign of channel ``c``: ``direction[c] * d >= threshold[c]`` (int32); ``and_mask``: the pooled
    channels (uint64 words, bit per channel) whose pool is an AND of signs instead of an OR, or None."""

    threshold: np.ndarray
    direction: np.ndarray
    and_mask: np.ndarray | None


def _monotone(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column of a bool table ``[values, channels]``: (non-decreasing, non-increasing) down the rows."""
    step = bits[1:].astype(np.int8) - bits[:-1].astype(np.int8)
    return (step >= 0).all(axis=0), (step <= 0).all(axis=0)


def _apply(ops: Sequence[ChannelOp], x: np.ndarray) -> np.ndarray:
    for op in ops:
        x = op(x)
    return x


def fold_threshold(k: int, scale: np.ndarray | None, bias: np.ndarray | None, channels: int,
                   before_pool: Sequence[ChannelOp], after_pool: Sequence[ChannelOp],
                   pooled: bool) -> Threshold | None:
    """The folded sign of ``after_pool(maxpool(before_pool(float(d) * scale + bias))) >= 0`` for ``d`` in
    ``[-k, k]`` (``pooled=False``: no pool, ``after_pool`` follows ``before_pool``), or None if not foldable."""
    d = np.arange(-k, k + 1, dtype=np.int64)
    values = np.broadcast_to(d.astype(np.float32)[:, None], (d.size, channels)).copy()
    if scale is not None:
        values *= scale
    if bias is not None:
        values += bias
    with np.errstate(all="ignore"):
        pooled_values = _apply(before_pool, values)
        signs = _apply(after_pool, pooled_values) >= 0
    and_mask = None
    if pooled:
        if not np.isfinite(pooled_values).all():
            return None  # a NaN would poison max pooling; infinities make -0/+0 distinguishable
        order = np.argsort(pooled_values, axis=0, kind="stable")
        rising, falling = _monotone(np.take_along_axis(signs, order, axis=0))
        if not (rising | falling).all():
            return None
        and_mask = pack_rows((falling & ~rising)[None, :])[0]
    rising, falling = _monotone(signs)
    if not (rising | falling).all():
        return None
    true_count = signs.sum(axis=0)
    threshold = np.where(rising, -k + (d.size - true_count), k - true_count + 1)
    direction = np.where(rising, 1, -1)
    return Threshold(threshold.astype(np.int32), direction.astype(np.int32), and_mask)
