"""Logarithmic (power-of-two) quantization (Miyashita, Lee, Murmann 2016, arXiv:1603.01025).

    LogQuant(x, bitwidth, FSR) = 0 if x = 0, else sign(x) * 2^Clip(Round(log2|x|), FSR - 2^bitwidth, FSR)

with the paper's Clip(e, min, max) = 0 (underflow to zero) for e <= min, max - 1 for
e >= max, e otherwise. The exponents FSR - 2^b + 1 .. FSR - 1 (2^b - 1 of them) plus zero
make the 2^b codes: code 0 is zero, code c in 1..2^b - 1 is exponent FSR - 2^b + c. The sign
is a separate bit when ``signed`` (stored bits b + 1); with ``signed=False`` negative x
become 0. sign(0) = +1 and a value that becomes zero keeps sign +1.

Rounding is the paper's, in the log domain: round(log2|x|), so the threshold between 2^e and
2^(e+1) is 2^(e + 1/2) = sqrt(2) * 2^e (not the midpoint 1.5 * 2^e of nearest-power-of-two in
the linear domain); 0.72 -> 1 (log2 0.72 = -0.47), 0.70 -> 0.5. It is computed exactly,
without a float log: |x| = m * 2^e with m in [0.5, 1) gives round(log2|x|) = e when m^2 >= 1/2,
else e - 1 (m^2 exact in float64; m^2 = 1/2 never happens, so there are no ties). x = 0 is
handled on its own (no log of 0).

Gradient: straight-through (identity) where x is representable without saturating
(round(log2|x|) <= FSR - 1, zero and underflow to zero included), 0 where the exponent is
clipped to FSR - 1 from above and, unsigned, for negative x.

fsr=None follows the linear rule (smallest fsr with 2^fsr >= max|x|, per input when
``dynamic``, else from the observed range); fsr lies in [-125, 128] so the top value
2^(fsr - 1) is a normal float32.
"""

from __future__ import annotations

import torch

from .base import Encoded, decode, register
from .linear import FullScaleRangeQuantizer
from .ste import straight_through_in_range


def log2_round(magnitude: torch.Tensor) -> torch.Tensor:
    """round(log2 m) as int64 for m > 0, exactly: m = f * 2^e, f in [0.5, 1) -> e if f^2 >= 1/2 else e - 1."""
    fraction, exponent = torch.frexp(magnitude.float())
    return exponent.long() - (fraction.double().square() < 0.5).long()


def log_codes(
    x: torch.Tensor, bits: int, fsr: int, signed: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes int64 in [0, 2^b - 1], sign int8 +-1, inside) of LogQuant(x, bits, fsr)."""
    nonzero = x != 0 if signed else x > 0
    exponent = log2_round(x.abs())
    codes = torch.where(nonzero, (exponent - (fsr - 2**bits)).clamp(0, 2**bits - 1), 0)
    sign = torch.where((x < 0) & (codes > 0), -1, 1).to(torch.int8)
    inside = torch.where(nonzero, exponent <= fsr - 1, x >= 0)
    return codes, sign, inside


def log_encoded(codes: torch.Tensor, sign: torch.Tensor, bits: int, fsr: int, signed: bool) -> Encoded:
    """Package log codes (the sign only when ``signed``)."""
    return Encoded("log", codes, bits, {"sign": sign} if signed else {}, {"fsr": fsr, "signed": signed})


def log_quant(x: torch.Tensor, bits: int, fsr: int, signed: bool = True) -> torch.Tensor:
    """LogQuant(x, bits, fsr) = sign * 2^(fsr - 2^b + code) (0 for code 0), straight-through gradient."""

    def quantize(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes, sign, inside = log_codes(v, bits, fsr, signed)
        return decode(log_encoded(codes, sign, bits, fsr, signed)), inside

    return straight_through_in_range(x, quantize)


@register("log2")
class Log2Quantizer(FullScaleRangeQuantizer):
    """Miyashita et al. 2016 LogQuant with b-bit exponent codes (see the module docstring).

    ``bits`` (the spec's) counts the code bits b; the ``bits`` attribute is the stored width,
    b + 1 when ``signed`` (the sign bit).
    """

    def __init__(self, bits: int = 4, fsr: int | None = None, signed: bool = True, dynamic: bool = True) -> None:
        super().__init__(bits, fsr, signed, dynamic, max_bits=8)
        self.bits = self.code_bits + int(self.signed)

    def fsr_bounds(self) -> tuple[int, int]:
        return -125, 128

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return log_quant(x, self.code_bits, self.current_fsr(x, observe=True), self.signed)

    def encode(self, x: torch.Tensor) -> Encoded:
        fsr = self.current_fsr(x)
        codes, sign, _ = log_codes(x, self.code_bits, fsr, self.signed)
        return log_encoded(codes, sign, self.code_bits, fsr, self.signed)
