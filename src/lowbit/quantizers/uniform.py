"""Uniform (affine and symmetric) k-bit quantization, as in torch's observers and fake_quantize.

Affine, range [lo, hi] widened to include 0 (lo <- min(lo, 0), hi <- max(hi, 0), so 0 is
exactly representable), codes in [qmin, qmax]:

    s = max((hi - lo) / (qmax - qmin), EPS)     z = clamp(qmin - round(lo / s), qmin, qmax)
    q = clamp(round(x * (1/s)) + z, qmin, qmax)   x_hat = (q - z) * s

Symmetric: s = max(max(-lo, hi) / ((qmax - qmin) / 2), EPS), z = 0, signed codes.
Rounding is half to even and ``1/s`` is a float32 reciprocal, the arithmetic of
``torch.fake_quantize_per_tensor_affine``, so both give the same bits. Code ranges
(b bits): affine [0, 2^b - 1] (narrow: [1, 2^b - 1]); symmetric [-2^(b-1), 2^(b-1) - 1]
(narrow: [-(2^(b-1) - 1), 2^(b-1) - 1]). Example: [-3, 6] at 8 bits gives s = 9/255,
z = 85; -3 -> 0, 6 -> 255, code 128 -> 43 s ~ 1.518.

Applying the dynamic quantizer twice is not idempotent in general: rounding the zero point
moves the grid by up to s/2, so an end of the range can clamp and q(x) spans a different range
than x; narrow symmetric is idempotent up to float32 rounding of the recomputed scale.

Gradient (straight-through, Bengio et al. 2013, as torch's fake_quantize): g_x = g_y where
qmin <= round(x/s) + z <= qmax, else 0. The scale and zero point carry no gradient.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import CalibrationError, ShapeMismatchError
from .base import EPS, Encoded, Quantizer, along, check_axis, check_bits, check_finite, check_flag, decode, register
from .ste import straight_through_in_range
from .observers import RangeObserver, batch_range, check_observer, check_percentile

#: quantize(x) -> (x_hat, inside): the quantized values and where the gradient passes


def affine_qrange(bits: int, symmetric: bool, narrow: bool) -> tuple[int, int]:
    """(qmin, qmax) for ``bits``: unsigned codes when affine, signed when symmetric."""
    if symmetric:
        return -(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1
    return int(narrow), 2**bits - 1


def affine_qparams(
    lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale float32, zero_point int64) for the range [lo, hi] widened to include 0 (torch's rule)."""
    lo = torch.clamp(lo.float(), max=0.0)
    hi = torch.clamp(hi.float(), min=0.0)
    # divide by a tensor, not a Python number: CUDA multiplies by the reciprocal of a Python number,
    # which can differ from the division (CPU, torch's observers there) in the last bit
    if symmetric:
        scale = torch.clamp(torch.maximum(-lo, hi) / torch.full_like(lo, (qmax - qmin) / 2), min=EPS)
        return scale, torch.zeros_like(scale, dtype=torch.int64)
    scale = torch.clamp((hi - lo) / torch.full_like(lo, qmax - qmin), min=EPS)
    zero_point = torch.clamp(qmin - torch.round(lo / scale).long(), qmin, qmax)
    return scale, zero_point


def affine_codes(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, axis: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, inside): q = clamp(round(x * (1/s)) + z, qmin, qmax) as int64, inside = unclamped q in range."""
    inverse = along(torch.reciprocal(scale.float()), axis, x.dim())
    unclamped = torch.round(x.float() * inverse) + along(zero_point.long(), axis, x.dim())
    inside = (unclamped >= qmin) & (unclamped <= qmax)
    return unclamped.clamp(qmin, qmax).long(), inside


def affine_encoded(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, axis: int | None
) -> Encoded:
    """Package affine codes; ``bits`` is the width of [qmin, qmax]."""
    return Encoded(
        kind="affine",
        codes=codes,
        bits=(qmax - qmin).bit_length(),
        params={"scale": scale.float(), "zero_point": zero_point.long()},
        meta={"qmin": qmin, "qmax": qmax, "axis": axis},
    )


def fake_quantize_affine(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, axis: int | None = None
) -> torch.Tensor:
    """x_hat = (clamp(round(x * (1/s)) + z, qmin, qmax) - z) * s with the straight-through gradient.

    Bit for bit ``torch.fake_quantize_per_tensor_affine`` (``axis=None``) or
    ``torch.fake_quantize_per_channel_affine`` (scale, zero_point 1-D along ``axis``).
    """

    def quantize(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes, inside = affine_codes(v, scale, zero_point, qmin, qmax, axis)
        return decode(affine_encoded(codes, scale, zero_point, qmin, qmax, axis)), inside

    return straight_through_in_range(x, quantize)


@register("uniform")
class UniformQuantizer(Quantizer):
    """Uniform k-bit quantizer (affine or symmetric, per tensor or per output channel).

    ``dynamic=True`` (weights) reads the range off each input; ``dynamic=False``
    (activations) keeps it in buffers (``stats.min_val``, ``stats.max_val``,
    ``stats.batches``): updated while ``calibrating`` (min/max: running extremes;
    percentile and mse: running mean of batch ranges) or, failing that, while
    training (moving average, momentum 0.01), frozen otherwise. ``observer`` picks
    how a tensor's range is read (see :mod:`lowbit.quantizers.observers`).
    A constant c gets the range [min(c, 0), max(c, 0)], so c takes an end code of
    the grid; it decodes to c exactly when ``(qmax - qmin) * fl(c / (qmax - qmin))``
    rounds back to c in float32, else within one float32 rounding of c. Full-range
    symmetric does not keep constants (torch's rule): c / s = +-(qmax + 1/2) rounds half
    to even, so c > 0 becomes qmax s and c < 0 becomes qmin s (for b >= 2).
    """

    def __init__(
        self,
        bits: int = 8,
        symmetric: bool = False,
        per_channel: bool = False,
        narrow: bool = False,
        dynamic: bool = True,
        observer: str = "minmax",
        percentile: float = 99.99,
    ) -> None:
        super().__init__()
        self.bits = check_bits(bits, 2, 16)
        self.symmetric = check_flag(symmetric, "symmetric")
        self.per_channel = check_flag(per_channel, "per_channel")
        self.narrow = check_flag(narrow, "narrow")
        self.dynamic = check_flag(dynamic, "dynamic")
        self.observer = check_observer(observer)
        self.percentile = check_percentile(percentile)
        self.qmin, self.qmax = affine_qrange(bits, symmetric, narrow)
        self.axis = 0 if per_channel else None
        self.calibrating = False
        if not dynamic:
            self.stats = RangeObserver()

    def spec(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "bits": self.bits,
            "symmetric": self.symmetric,
            "per_channel": self.per_channel,
            "narrow": self.narrow,
            "dynamic": self.dynamic,
            "observer": self.observer,
            "percentile": self.percentile,
        }

    @property
    def observed(self) -> bool:
        """True when the quantizer has the range it needs (always, when dynamic)."""
        return self.dynamic or self.stats.observed

    def _merge(self) -> str:
        """How a batch range joins the kept one (see RangeObserver.update)."""
        if not self.calibrating:
            return "moving"
        return "extremes" if self.observer == "minmax" else "mean"

    def _fake_quantize_range(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        scale, zero_point = affine_qparams(lo, hi, self.qmin, self.qmax, self.symmetric)
        return fake_quantize_affine(x, scale, zero_point, self.qmin, self.qmax, self.axis)

    def qparams(self, x: torch.Tensor, observe: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) for ``x``; with ``observe`` a static quantizer first updates its range
        when calibrating or training."""
        check_finite(x, self.where())
        if x.numel() == 0:
            raise CalibrationError(f"{self.where()} is empty; there is nothing to quantize")
        check_axis(x, self.axis, self.where())
        with torch.no_grad():
            if self.dynamic:
                lo, hi = batch_range(x, self.observer, self.axis, self.percentile, self._fake_quantize_range)
            else:
                if observe and (self.calibrating or self.training):
                    batch = batch_range(x, self.observer, self.axis, self.percentile, self._fake_quantize_range)
                    self.stats.update(*batch, merge=self._merge(), where=self.where())
                lo, hi = self.stats.range(self.where())
                if self.axis is not None and lo.numel() != x.shape[self.axis]:
                    raise ShapeMismatchError(
                        f"{self.where()} has {x.shape[self.axis]} channels but its range was observed "
                        f"for {lo.numel()}"
                    )
            scale, zero_point = affine_qparams(lo, hi, self.qmin, self.qmax, self.symmetric)
        if not bool(torch.isfinite(scale).all()):
            raise CalibrationError(f"{self.where()} spans a range too wide for float32 (hi - lo overflows)")
        return scale, zero_point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero_point = self.qparams(x, observe=True)
        return fake_quantize_affine(x, scale, zero_point, self.qmin, self.qmax, self.axis)

    def encode(self, x: torch.Tensor) -> Encoded:
        scale, zero_point = self.qparams(x)
        codes, _ = affine_codes(x, scale, zero_point, self.qmin, self.qmax, self.axis)
        return affine_encoded(codes, scale, zero_point, self.qmin, self.qmax, self.axis)
