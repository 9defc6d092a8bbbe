"""Binary quantizers: plain sign (BNN) and sign with XNOR-Net scaling.

- ``binary``: y = sign(x) in {-1, +1}, sign(0) = +1, with a named straight-through
  estimator (Courbariaux, Hubara et al. 2016, "Binarized Neural Networks"):
  identity, clipped (g_x = g_y 1{|x| <= 1}) or approx_sign (Bi-Real Net, Liu et al. 2018).
- ``xnor`` (Rastegari et al. 2016, "XNOR-Net"), role ``weight`` (BWN):
  W ≈ alpha_c sign(W), alpha_c = ||W_c||_1 / n, the mean of |W| over every axis but
  the output channel (axis 0). The gradient also flows through alpha, as autograd
  computes it (magnitude-aware, like Bi-Real Net's W_b):
  g_W = alpha_c s'(W) g + sgn(W) / n * sum_c(g sign(W)) per channel (s' the STE's
  surrogate, sgn the derivative of |w|, 0 at 0); XNOR-Net's paper keeps only the
  diagonal term of the second part (g / n). An all-zero channel gets alpha = EPS.
- ``xnor``, role ``activation``: I ≈ A sign(I), A = mean over channels (axis 1) of |I|
  per sample and position; for (N, C) inputs, the mean over features per sample.
  XNOR-Net scales a convolution by K = A * k, A averaged over each w x h kernel
  window by the box filter k. A quantizer does not know which layer consumes its
  output (nor its kernel, stride or padding), so lowbit applies the scale per input
  position, i.e. with a 1 x 1 window: conv(A sign(I), W) equals
  conv(sign(I), W) K exactly where A is constant over each window and approximates
  it otherwise. Activations have no stored codes (``encode`` raises ConfigError).

Binary weights and activations never check for NaN in ``binary`` (sign keeps NaN
as NaN, so nothing is hidden); ``xnor`` weights raise CalibrationError, since one
NaN would poisons a whole channel's alpha. ``encode`` always checks.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from .base import EPS, Encoded, Quantizer, along, check_axis, check_finite, register
from .ste import check_ste, sign_ste

XNOR_ROLES = ("weight", "activation")


def binarize(x: torch.Tensor, ste: str = "clipped") -> torch.Tensor:
    """sign(x) in {-1, +1} with sign(0) = +1 and the named straight-through estimator."""
    return sign_ste(x, ste)


def binary_codes(x: torch.Tensor) -> torch.Tensor:
    """Bit 1 for +1 (x >= 0, -0.0 included), bit 0 for -1, as int64."""
    return (x >= 0).long()


def xnor_weight_scale(w: torch.Tensor) -> torch.Tensor:
    """alpha_c = ||W_c||_1 / n: mean of |W| over every axis but 0, floored at EPS; shape [C].

    Summed in float64 and rounded once, so a constant channel c gets alpha = |c| exactly
    (for |c| >= EPS).
    """
    return w.abs().reshape(w.shape[0], -1).double().mean(dim=1).to(w.dtype).clamp_min(EPS)


def xnor_weight(w: torch.Tensor, ste: str = "clipped") -> torch.Tensor:
    """BWN / XNOR-Net weights: sign(W) * alpha_c, gradient through sign (STE) and alpha."""
    return binarize(w, ste) * along(xnor_weight_scale(w), 0, w.dim())


def xnor_activation_scale(x: torch.Tensor) -> torch.Tensor:
    """A = mean over channels (axis 1) of |I|, kept as a broadcastable axis, floored at EPS."""
    return x.abs().mean(dim=1, keepdim=True).clamp_min(EPS)


def xnor_activation(x: torch.Tensor, ste: str = "clipped") -> torch.Tensor:
    """XNOR-Net inputs: sign(I) * A per sample and position (1 x 1 window)."""
    return binarize(x, ste) * xnor_activation_scale(x)


@register("binary")
class BinaryQuantizer(Quantizer):
    """y = sign(x) in {-1, +1} (sign(0) = +1); encodes as kind ``binary`` with scale 1."""

    bits = 1

    def __init__(self, ste: str = "clipped") -> None:
        super().__init__()
        self.ste = check_ste(ste)

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "ste": self.ste}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return binarize(x, self.ste)

    def encode(self, x: torch.Tensor) -> Encoded:
        check_finite(x, self.where())
        return Encoded("binary", binary_codes(x), 1, {"scale": torch.tensor(1.0)}, {"axis": None})


@register("xnor")
class XnorQuantizer(Quantizer):
    """XNOR-Net: weights alpha_c sign(W) per output channel, or activations A sign(I)."""

    bits = 1

    def __init__(self, ste: str = "clipped", role: str = "weight") -> None:
        super().__init__()
        self.ste = check_ste(ste)
        if role not in XNOR_ROLES:
            raise ConfigError(f"xnor role must be one of {', '.join(XNOR_ROLES)}, got {role!r}")
        self.role = role

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "ste": self.ste, "role": self.role}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.role == "activation":
            if x.dim() < 2:
                raise ConfigError(f"xnor activation scaling needs a (N, C, ...) input; {self.where()} "
                                  f"has shape {tuple(x.shape)}")
            return xnor_activation(x, self.ste)
        self._check_weight(x)
        return xnor_weight(x, self.ste)

    def encode(self, x: torch.Tensor) -> Encoded:
        if self.role == "activation":
            return super().encode(x)
        self._check_weight(x)
        return Encoded("binary", binary_codes(x), 1, {"scale": xnor_weight_scale(x).detach().float()}, {"axis": 0})

    def _check_weight(self, w: torch.Tensor) -> None:
        check_axis(w, 0, self.where())
        check_finite(w, self.where())
