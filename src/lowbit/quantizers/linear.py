"""Power-of-two-range linear quantization (Miyashita, Lee, Murmann 2016, arXiv:1603.01025).

    LinearQuant(x, bitwidth, FSR) = Clip(Round(x / step) * step, minV, maxV),  step = 2^(FSR - bitwidth)

The paper quantizes non-negative values into [0, 2^FSR) with 2^bitwidth levels. lowbit
implements, for ``bits`` = b stored bits:

- ``signed=False``: exactly the paper: step = 2^(fsr - b), codes [0, 2^b - 1], values
  [0, 2^fsr - step]; negative x clip to 0.
- ``signed=True``: the sign takes one of the b bits and the magnitude the paper's formula
  with bitwidth b - 1: step = 2^(fsr - b + 1), two's complement codes [-2^(b-1), 2^(b-1) - 1],
  values [-2^fsr, 2^fsr - step]. So 2^fsr is the full-scale range whatever the sign mode,
  and the rule "smallest fsr with 2^fsr >= max|x|" never clips the largest negative value.

Round is half to even. fsr=None: ``dynamic`` reads fsr off each input, else it comes from
the range observed while calibrating or training (kept in buffers ``stats.*``). fsr lies
in [m - 126, 127] (m = magnitude bits: b - 1 signed, b unsigned) so step is a normal
float32 and the range finite. Codes are ``kind="affine"`` with zero_point 0 and
scale = step, exact. Gradient: straight-through where round(x / step) lies in the code
range, 0 outside (as uniform).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import CalibrationError, ConfigError
from .base import Encoded, Quantizer, check_bits, check_finite, check_flag, register
from .observers import RangeObserver, minmax_range
from .uniform import affine_codes, affine_encoded, fake_quantize_affine


def linear_qrange(bits: int, signed: bool) -> tuple[int, int]:
    """(qmin, qmax): [-2^(b-1), 2^(b-1) - 1] signed, [0, 2^b - 1] unsigned."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def linear_fsr_bounds(bits: int, signed: bool) -> tuple[int, int]:
    """The valid fsr: step = 2^(fsr - magnitude bits) >= 2^-126 and 2^fsr <= 2^127."""
    return bits - int(signed) - 126, 127


def linear_step(bits: int, fsr: int, signed: bool = True) -> torch.Tensor:
    """step = 2^(fsr - b) unsigned, 2^(fsr - b + 1) signed, as a float32 scalar."""
    return torch.ldexp(torch.tensor(1.0), torch.tensor(fsr - bits + int(signed)))


def smallest_fsr(max_abs: torch.Tensor, low: int, high: int) -> int:
    """The smallest integer fsr with 2^fsr >= max_abs, clamped to [low, high] (max_abs = 0 gives low).

    Exact: with max_abs = m * 2^e (m in [0.5, 1)), ceil(log2 max_abs) is e - 1 when m = 0.5, else e.
    """
    if float(max_abs) == 0.0:
        return low
    mantissa, exponent = torch.frexp(max_abs.float())
    fsr = int(exponent) - int(float(mantissa) == 0.5)
    return min(max(fsr, low), high)


def check_fsr(fsr: int | None, low: int, high: int) -> int | None:
    """Return ``fsr`` if it is None or an int in [low, high], else raise ConfigError."""
    if fsr is not None and (isinstance(fsr, bool) or not isinstance(fsr, int) or not low <= fsr <= high):
        raise ConfigError(f"fsr must be None or an integer from {low} to {high} here, got {fsr!r}")
    return fsr


def linear_quant(x: torch.Tensor, bits: int, fsr: int, signed: bool = True) -> torch.Tensor:
    """LinearQuant(x, bits, fsr) = clamp(round(x / step), qmin, qmax) * step, straight-through gradient."""
    qmin, qmax = linear_qrange(bits, signed)
    step = linear_step(bits, fsr, signed)
    return fake_quantize_affine(x, step, torch.tensor(0), qmin, qmax)


class FullScaleRangeQuantizer(Quantizer):
    """Shared by linear and log2: b-bit codes under a power-of-two full-scale range 2^fsr.

    fsr is fixed (``fsr`` an int), read off each input (``fsr=None, dynamic=True``: smallest
    fsr with 2^fsr >= max|x|) or observed (``fsr=None, dynamic=False``: the same rule on
    max(-min, max) of the range kept in ``stats``: running extremes while ``calibrating``,
    else a moving average (momentum 0.01) while training; frozen otherwise). Subclasses
    set ``fsr_bounds``.
    """

    def __init__(self, bits: int, fsr: int | None, signed: bool, dynamic: bool, max_bits: int) -> None:
        super().__init__()
        self.code_bits = check_bits(bits, 2, max_bits)
        self.bits = self.code_bits
        self.signed = check_flag(signed, "signed")
        self.dynamic = check_flag(dynamic, "dynamic")
        self.fsr = check_fsr(fsr, *self.fsr_bounds())
        self.calibrating = False
        if fsr is None and not dynamic:
            self.stats = RangeObserver()

    def fsr_bounds(self) -> tuple[int, int]:
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "bits": self.code_bits, "fsr": self.fsr, "signed": self.signed,
                "dynamic": self.dynamic}

    @property
    def observed(self) -> bool:
        """True when the quantizer has the fsr it needs (always, unless static with fsr=None)."""
        return self.fsr is not None or self.dynamic or self.stats.observed

    def current_fsr(self, x: torch.Tensor, observe: bool = False) -> int:
        """The fsr for ``x``; with ``observe`` a static quantizer first updates its range when
        calibrating or training."""
        check_finite(x, self.where())
        if x.numel() == 0:
            raise CalibrationError(f"{self.where()} is empty; there is nothing to quantize")
        if self.fsr is not None:
            return self.fsr
        if self.dynamic:
            return smallest_fsr(x.detach().abs().amax(), *self.fsr_bounds())
        if observe and (self.calibrating or self.training):
            self.stats.update(*minmax_range(x), merge="extremes" if self.calibrating else "moving", where=self.where())
        lo, hi = self.stats.range(self.where())
        return smallest_fsr(torch.maximum(-lo, hi), *self.fsr_bounds())


@register("linear")
class LinearQuantizer(FullScaleRangeQuantizer):
    """Miyashita et al. 2016 LinearQuant: b-bit uniform codes with step 2^(fsr - b) (unsigned) or
    2^(fsr - b + 1) (signed, sign bit included in b); see the module docstring."""

    def __init__(self, bits: int = 4, fsr: int | None = None, signed: bool = True, dynamic: bool = True) -> None:
        super().__init__(bits, fsr, signed, dynamic, max_bits=16)
        self.qmin, self.qmax = linear_qrange(self.code_bits, self.signed)

    def fsr_bounds(self) -> tuple[int, int]:
        return linear_fsr_bounds(self.code_bits, self.signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_quant(x, self.code_bits, self.current_fsr(x, observe=True), self.signed)

    def encode(self, x: torch.Tensor) -> Encoded:
        step = linear_step(self.code_bits, self.current_fsr(x), self.signed)
        zero_point = torch.tensor(0)
        codes, _ = affine_codes(x, step, zero_point, self.qmin, self.qmax)
        return affine_encoded(codes, step, zero_point, self.qmin, self.qmax, None)
