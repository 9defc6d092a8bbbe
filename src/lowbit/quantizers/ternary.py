"""Ternary weights (TWN: Li & Liu 2016, "Ternary Weight Networks").

    delta = threshold * mean(|W|)                       (threshold = 0.7 in the paper)
    t_i   = sign(W_i) if |W_i| > delta else 0           (t_i in {-1, 0, +1})
    alpha = mean of |W_i| over the i with |W_i| > delta
    W_t   = alpha * t

``per_channel=True`` takes delta and alpha per output channel (axis 0). Where no
weight exceeds delta (an all-zero tensor or channel, or a threshold >= 1 on a
constant one) every code is 0, the output is exactly 0 and alpha is the scale
floor EPS. The gradient passes straight through to W (identity), as in TWN's
training. delta and alpha are computed in float64 and alpha rounded once to
float32, so a constant tensor c with |c| >= EPS quantizes to itself. NaN/Inf in W raises
CalibrationError.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import ConfigError
from .base import EPS, Encoded, Quantizer, along, check_axis, check_finite, register
from .ste import straight_through


def twn_codes_and_scale(w: torch.Tensor, threshold: float = 0.7,
                        per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """TWN codes (int64, {-1, 0, 1}, shape of ``w``) and alpha (float32, scalar or [C])."""
    w = w.detach()
    rows = w.abs().reshape(w.shape[0] if per_channel else 1, -1).double()  # rounded once, below
    delta = threshold * rows.mean(dim=1, keepdim=True)
    kept = rows > delta
    alpha = (rows * kept).sum(dim=1) / kept.sum(dim=1).clamp_min(1)
    alpha = alpha.clamp_min(EPS).float()
    codes = torch.sign(w).long() * kept.reshape(w.shape)
    return codes, alpha if per_channel else alpha.reshape(())


def twn_values(codes: torch.Tensor, alpha: torch.Tensor, axis: int | None) -> torch.Tensor:
    """W_t = codes * alpha in float32, the arithmetic of ``decode`` for kind ``ternary``."""
    return codes.float() * along(alpha, axis, codes.dim())


@register("ternary")
class TernaryQuantizer(Quantizer):
    """TWN ternary weights alpha * {-1, 0, +1}; encodes as kind ``ternary`` (2 bits)."""

    bits = 2

    def __init__(self, threshold: float = 0.7, per_channel: bool = False) -> None:
        super().__init__()
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
                or not math.isfinite(threshold) or threshold < 0:
            raise ConfigError(f"ternary threshold must be a finite number >= 0 (TWN uses 0.7), got {threshold!r}")
        if not isinstance(per_channel, bool):
            raise ConfigError(f"ternary per_channel must be True or False, got {per_channel!r}")
        self.threshold = float(threshold)
        self.per_channel = per_channel

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "threshold": self.threshold, "per_channel": self.per_channel}

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        enc = self.encode(w)
        return straight_through(w, twn_values(enc.codes, enc.params["scale"], enc.meta["axis"]).to(w.dtype))

    def encode(self, w: torch.Tensor) -> Encoded:
        if self.per_channel:
            check_axis(w, 0, self.where())
        check_finite(w, self.where())
        codes, alpha = twn_codes_and_scale(w, self.threshold, self.per_channel)
        return Encoded("ternary", codes, 2, {"scale": alpha}, {"axis": 0 if self.per_channel else None})
