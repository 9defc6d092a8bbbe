"""PACT: parameterized clipping activation (Choi et al. 2018, arXiv:1805.06085).

    y = clip(x, 0, alpha),   y_q = round(y (2^k - 1) / alpha) alpha / (2^k - 1)

with the clipping level alpha learned. Gradients, straight through the round:

    dy_q/dx = 1 for 0 <= x < alpha, else 0;      dy_q/dalpha = 1 for x >= alpha, else 0

and alpha is L2-regularised (:meth:`PACTQuantizer.regularization`). lowbit computes
y_q = round(y / scale) scale with scale = alpha / (2^k - 1) in float32, the arithmetic of decoding the
integer code; alpha is used as max(alpha, EPS), the floor passed straight through.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .base import EPS, Encoded, Quantizer, check_bits, check_finite, register


def pact_scale(alpha: torch.Tensor, bits: int) -> torch.Tensor:
    """The step alpha / (2^k - 1), alpha floored at EPS."""
    return alpha.clamp(min=EPS) / (2**bits - 1)


def pact_codes(x: torch.Tensor, alpha: torch.Tensor, bits: int) -> torch.Tensor:
    """round(clip(x, 0, alpha) / scale) as floats, codes in [0, 2^k - 1]."""
    return torch.round(torch.minimum(x.clamp(min=0), alpha.clamp(min=EPS)) / pact_scale(alpha, bits))


class PACTRound(torch.autograd.Function):
    """PACT's y_q forward and its straight-through gradients for x and alpha backward."""

    @staticmethod
    def forward(ctx, x, alpha, bits):
        ctx.save_for_backward(x, alpha)
        return pact_codes(x, alpha, bits) * pact_scale(alpha, bits)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, alpha = ctx.saved_tensors
        level = alpha.clamp(min=EPS)
        g_x = g * ((x >= 0) & (x < level))
        g_alpha = (g * (x >= level)).sum().reshape(alpha.shape)
        return g_x, g_alpha, None


def pact_quantize(x: torch.Tensor, alpha: torch.Tensor, bits: int) -> torch.Tensor:
    """PACT's k-bit y_q of clip(x, 0, alpha) with the paper's gradients (alpha a scalar tensor)."""
    return PACTRound.apply(x, alpha, bits)


@register("pact")
class PACTQuantizer(Quantizer):
    """PACT k-bit activations, ``bits`` 1 to 8, ``alpha`` the starting clipping level (> 0).

    The learned level is the nn.Parameter ``alpha`` (in the state_dict; the spec keeps the starting
    value). encode: ``affine`` with scale alpha / (2^k - 1), zero point 0, codes in [0, 2^k - 1].
    """

    def __init__(self, bits: int = 4, alpha: float = 10.0) -> None:
        super().__init__()
        self.bits = check_bits(bits, 1, 8)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (0 < alpha < math.inf):
            raise ConfigError(f"pact alpha must be a finite number > 0, got {alpha!r}")
        self.initial_alpha = float(alpha)
        self.alpha = nn.Parameter(torch.tensor(self.initial_alpha))

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "bits": self.bits, "alpha": self.initial_alpha}

    def regularization(self, lam: float) -> torch.Tensor:
        """PACT's L2 penalty on the clipping level, (lam / 2) alpha^2, to add to the loss.

        Its gradient lam * alpha is weight decay lam on alpha; ``lam`` is the trainer's choice (the
        weight decay of the network's weights is the natural one).
        """
        return 0.5 * lam * self.alpha.square()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_finite(x, self.where())
        return pact_quantize(x, self.alpha, self.bits)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> Encoded:
        check_finite(x, self.where())
        codes = pact_codes(x, self.alpha, self.bits).long()
        params = {"scale": pact_scale(self.alpha, self.bits).detach().float(), "zero_point": torch.tensor(0)}
        return Encoded("affine", codes, self.bits, params, {"qmin": 0, "qmax": 2**self.bits - 1})
