"""DoReFa-Net: k-bit weights, activations and gradients (Zhou et al. 2016, arXiv:1606.06160).

All three build on the k-bit quantizer of a real number r in [0, 1] (section 2.2),

    quantize_k(r) = round((2^k - 1) r) / (2^k - 1),

with a straight-through gradient. lowbit computes it as ``round((2^k - 1) r) * step`` with
``step = float32(1 / (2^k - 1))``: the arithmetic of decoding the integer code, so that forward and
``decode(encode(x))`` agree bit for bit (the product can differ from the true quotient by one ulp).

- weights (section 2.3), k > 1: w_q = 2 quantize_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1, gradient by autograd
  through tanh and the max; k = 1: w_q = E(|w|) sign(w), sign(0) = +1, dw = dw_q.
- activations (section 2.4): x_q = quantize_k(clip(x, 0, 1)), gradient 1 on [0, 1] and 0 outside.
- gradients (section 2.5): forward identity; backward replaces the incoming gradient dr by
  g_q = 2 max0(|dr|) [quantize_k(dr / (2 max0(|dr|)) + 1/2 + N(k)) - 1/2], N(k) = sigma / (2^k - 1),
  sigma ~ U(-1/2, 1/2), max0 the maximum over every axis but the first (per sample).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError, TrainingError
from .base import EPS, Encoded, Quantizer, check_bits, check_finite, register
from .ste import round_ste, sign, straight_through

#: bit widths with stored codes (weights, activations) and of the gradient quantizer
MAX_BITS = 8
MAX_GRAD_BITS = 16


def unit_step(bits: int) -> torch.Tensor:
    """The float32 step 1 / (2^k - 1) of quantize_k."""
    return torch.tensor(1.0 / (2**bits - 1), dtype=torch.float32)


def quantize_k(r: torch.Tensor, bits: int) -> torch.Tensor:
    """DoReFa's quantize_k(r) = round((2^k - 1) r) / (2^k - 1) for r in [0, 1], straight-through gradient.

    Computed as ``round((2^k - 1) r) * float32(1 / (2^k - 1))`` (see the module docstring).
    """
    return round_ste(r * (2**bits - 1)) * unit_step(bits)


def weight_unit(w: torch.Tensor) -> torch.Tensor:
    """tanh(w) / (2 max|tanh(w)|) + 1/2, in [0, 1]; the max is floored at EPS so all-zero w gives 1/2."""
    t = torch.tanh(w)
    return t / (2 * t.abs().max().clamp(min=EPS)) + 0.5


def mean_abs(w: torch.Tensor) -> torch.Tensor:
    """E(|w|) accumulated in float64 (no overflow), floored at EPS, without gradient (as in DoReFa's code)."""
    return w.detach().abs().mean(dtype=torch.float64).clamp(min=EPS).to(w.dtype)


def dorefa_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """DoReFa k-bit weights: 2 quantize_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1, or E(|w|) sign(w) for k = 1.

    For k > 1 a zero weight maps to +1/(2^k - 1): (2^k - 1) / 2 rounds half to even upwards.
    """
    if bits == 1:
        return straight_through(w, sign(w) * mean_abs(w))
    return 2 * quantize_k(weight_unit(w), bits) - 1


def dorefa_act(x: torch.Tensor, bits: int) -> torch.Tensor:
    """DoReFa k-bit activations: quantize_k(clip(x, 0, 1)); gradient 1 on [0, 1], 0 outside."""
    return quantize_k(x.clamp(0, 1), bits)


def quantize_gradient(dr: torch.Tensor, bits: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """DoReFa's stochastic k-bit gradient (section 2.5), unbiased: E[g_q] = dr.

    g_q = 2 m [quantize_k(dr / (2 m) + 1/2 + N(k)) - 1/2] with m = max|dr| over every axis but the first
    and N(k) = sigma / (2^k - 1), sigma ~ U(-1/2, 1/2) drawn from ``generator``. The argument of
    quantize_k is clipped to [0, 1] (as in DoReFa's code) against float rounding at the ends. A sample
    whose gradient is all zero stays zero.
    """
    dims = tuple(range(1, dr.dim()))
    m = dr.abs().amax(dim=dims, keepdim=True) if dims else dr.abs()
    safe_m = torch.where(m > 0, m, torch.ones_like(m))
    sigma = torch.rand(dr.shape, generator=generator, dtype=dr.dtype, device=dr.device) - 0.5
    r = (dr / safe_m * 0.5 + 0.5 + sigma / (2**bits - 1)).clamp(0, 1)
    return (quantize_k(r, bits) - 0.5) * m * 2


class GradientQuantizer(torch.autograd.Function):
    """Identity forward; backward passes :func:`quantize_gradient` of the incoming gradient."""

    @staticmethod
    def forward(ctx, x, bits, generator, where):
        ctx.bits, ctx.generator, ctx.where = bits, generator, where
        return x.view_as(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        if not bool(torch.isfinite(g).all()):
            raise TrainingError(f"the gradient reaching {ctx.where} holds NaN/Inf; training diverged")
        return quantize_gradient(g, ctx.bits, ctx.generator), None, None, None


def dorefa_grad(
    x: torch.Tensor, bits: int, generator: torch.Generator | None = None, where: str = "unnamed tensor"
) -> torch.Tensor:
    """Identity on x whose backward quantizes the gradient to k bits (:func:`quantize_gradient`).

    A NaN/Inf gradient raises TrainingError naming ``where``.
    """
    return GradientQuantizer.apply(x, bits, generator, where)


@register("dorefa_weight")
class DorefaWeightQuantizer(Quantizer):
    """DoReFa k-bit weights, ``bits`` from 1 to 8 (for full precision use no quantizer).

    encode: k > 1 as ``codebook`` (code j stands for 2 (j step) - 1, the forward arithmetic);
    k = 1 as ``binary`` with the scalar scale E(|w|).
    """

    def __init__(self, bits: int = 2) -> None:
        super().__init__()
        self.bits = check_bits(bits, 1, MAX_BITS)

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "bits": self.bits}

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        check_finite(w, self.where())
        return dorefa_weight(w, self.bits)

    @torch.no_grad()
    def encode(self, w: torch.Tensor) -> Encoded:
        check_finite(w, self.where())
        if self.bits == 1:
            return Encoded("binary", (w >= 0).long(), 1, {"scale": mean_abs(w).float()})
        levels = 2**self.bits - 1
        codes = torch.round(weight_unit(w) * levels).long()
        codebook = 2 * (torch.arange(levels + 1, dtype=torch.float32, device=w.device) * unit_step(self.bits)) - 1
        return Encoded("codebook", codes, self.bits, {"codebook": codebook})


@register("dorefa_act")
class DorefaActQuantizer(Quantizer):
    """DoReFa k-bit activations quantize_k(clip(x, 0, 1)), ``bits`` from 1 to 8.

    encode: ``affine`` with scale float32(1 / (2^k - 1)), zero point 0, codes in [0, 2^k - 1].
    """

    def __init__(self, bits: int = 2) -> None:
        super().__init__()
        self.bits = check_bits(bits, 1, MAX_BITS)

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "bits": self.bits}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_finite(x, self.where())
        return dorefa_act(x, self.bits)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> Encoded:
        check_finite(x, self.where())
        levels = 2**self.bits - 1
        codes = torch.round(x.clamp(0, 1) * levels).long()
        params = {"scale": unit_step(self.bits), "zero_point": torch.tensor(0)}
        return Encoded("affine", codes, self.bits, params, {"qmin": 0, "qmax": levels})


@register("dorefa_grad")
class DorefaGradQuantizer(Quantizer):
    """DoReFa k-bit gradients: identity forward, stochastic k-bit gradient backward (section 2.5).

    ``bits`` (1 to 16) is the gradient's bit width; the forward values stay float, so the quantizer's
    ``bits`` attribute (bits per stored value) is None and the width lives in ``grad_bits``. ``seed``
    (an int) makes the noise reproducible through a torch.Generator per device; None uses torch's
    global generator. There is nothing to encode.
    """

    def __init__(self, bits: int = 6, seed: int | None = None) -> None:
        super().__init__()
        self.grad_bits = check_bits(bits, 1, MAX_GRAD_BITS)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigError(f"dorefa_grad seed must be an int or None, got {seed!r}")
        self.seed = seed
        self._generator: torch.Generator | None = None

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "bits": self.grad_bits, "seed": self.seed}

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The seeded generator for ``device`` (made on first use), or None without a seed."""
        if self.seed is None:
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_finite(x, self.where())
        return dorefa_grad(x, self.grad_bits, self.generator(x.device), self.where())
