"""Straight-through estimators as named autograd Functions.

Forward rounds or takes the sign; backward passes a surrogate gradient:

- ``round_ste``: round half to even forward, identity backward (Bengio et al. 2013).
- ``straight_through(x, value)``: the value of ``value`` forward, g_x = g_y backward.
- ``sign`` with ``ste="identity"``: g_x = g_y.
- ``sign`` with ``ste="clipped"``: g_x = g_y * 1{|x| <= 1} (hardtanh; Hubara/Courbariaux BNN 2016).
- ``sign`` with ``ste="approx_sign"``: g_x = g_y * (2 - 2|x|) * 1{|x| <= 1}
  (Bi-Real Net's ApproxSign, Liu et al. 2018).

sign(0) = +1 everywhere in lowbit (also sign(-0.0) = +1); sign(NaN) = NaN. A
surrogate derivative with a window is 0 outside it, and a NaN input lies outside
every window, so clipped and approx_sign give g_x = 0 there (identity passes g_y).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import ConfigError

#: a function returning (quantized x, mask of x inside the representable range)
Quantize = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def sign(x: torch.Tensor) -> torch.Tensor:
    """sign with sign(0) = +1 (and sign(-0.0) = +1); NaN stays NaN.

    Computed as sign(sign(x) + 1/2) + clamp(x, 0, 0): torch.sign maps +-0 (and NaN) to 0, which the
    outer sign sends to +1; the clamp is 0 except at NaN, which it propagates. Only arithmetic passes,
    several times faster than ``torch.where`` on large weight tensors.
    """
    if not x.is_floating_point():
        return torch.where(x >= 0, 1, -1).to(x.dtype)
    return torch.sign(x).add_(0.5).sign_().add_(x.clamp(0.0, 0.0))


def inside_unit(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """1{|x| <= 1} as ``dtype`` (0 at NaN): the window of the clipped and ApproxSign STEs."""
    return torch.le(x.abs(), 1, out=torch.empty(x.shape, dtype=dtype, device=x.device))


class RoundSTE(torch.autograd.Function):
    """round(x) (half to even) forward, identity backward."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class StraightThrough(torch.autograd.Function):
    """``value`` forward (bit for bit), g_x = g_y backward: the identity STE for any quantizer."""

    @staticmethod
    def forward(ctx, x, value):
        return value.clone()

    @staticmethod
    def backward(ctx, g):
        return g, None


class SignIdentitySTE(torch.autograd.Function):
    """sign(x) forward, g_x = g_y backward."""

    @staticmethod
    def forward(ctx, x):
        return sign(x)

    @staticmethod
    def backward(ctx, g):
        return g


class SignClippedSTE(torch.autograd.Function):
    """sign(x) forward, g_x = g_y * 1{|x| <= 1} backward (hardtanh STE, BNN)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return sign(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return inside_unit(x, g.dtype).mul_(g)


class SignApproxSTE(torch.autograd.Function):
    """sign(x) forward, Bi-Real ApproxSign backward: g_x = g_y * (2 - 2|x|) * 1{|x| <= 1}.

    That is dF/dx of F(x) = 2x + x^2 on [-1, 0), 2x - x^2 on [0, 1), +-1 outside:
    2 + 2x, 2 - 2x, 0.
    """

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return sign(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        slope = x.abs().nan_to_num_(nan=2.0).mul_(-2).add_(2).clamp_(min=0)  # 2 - 2|x| inside, 0 outside and at NaN
        return slope.to(g.dtype).mul_(g)


SIGN_STES = {"identity": SignIdentitySTE, "clipped": SignClippedSTE, "approx_sign": SignApproxSTE}


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even with an identity gradient."""
    return RoundSTE.apply(x)


def straight_through(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` exactly (same bits) with the gradient of ``x`` passed straight through."""
    return StraightThrough.apply(x, value.detach())


def sign_ste(x: torch.Tensor, ste: str = "clipped") -> torch.Tensor:
    """sign(x) with sign(0) = +1 and the named straight-through estimator."""
    return SIGN_STES[check_ste(ste)].apply(x)


def check_ste(ste: str) -> str:
    """Return ``ste`` if it names a sign estimator, else raise ConfigError listing the valid names."""
    if not isinstance(ste, str) or ste not in SIGN_STES:
        raise ConfigError(f"unknown straight-through estimator {ste!r}; valid: {', '.join(SIGN_STES)}")
    return ste


class StraightThroughInRange(torch.autograd.Function):
    """y = quantize(x) forward; g_x = g_y * 1{x inside the representable range} backward."""

    @staticmethod
    def forward(ctx, x, quantize):
        y, inside = quantize(x)
        ctx.save_for_backward(inside)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside.to(grad.dtype), None


def straight_through_in_range(x: torch.Tensor, quantize: Quantize) -> torch.Tensor:
    """Apply ``quantize`` with the straight-through gradient masked to its representable range."""
    return StraightThroughInRange.apply(x, quantize)
