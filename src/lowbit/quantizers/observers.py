"""Range observers: how a quantizer reads the range [lo, hi] it quantizes off a tensor.

Three rules, per tensor (``axis=None``) or per channel (one range per index of ``axis``):

- ``minmax``: lo = min(x), hi = max(x).
- ``percentile``: lo = P_{100-p}(x), hi = P_p(x), percentiles with linear interpolation
  between order statistics (numpy's default), so the rarest outliers are clipped.
- ``mse``: the range t * [min(x), max(x)] for t in {1, (N-1)/N, ..., 1/N} (N = ``MSE_STEPS``)
  whose fake-quantized x has the smallest mean squared error; each channel picks its own t,
  ties go to the widest range. The quantizer supplies the fake-quantization it would apply.

:class:`RangeObserver` keeps the range of a static quantizer in buffers (so it lives in the
state_dict) and merges the range of each new batch into it.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ..errors import CalibrationError, ConfigError, ShapeMismatchError

OBSERVERS = ("minmax", "percentile", "mse")
#: number of clipping ranges the mse observer tries
MSE_STEPS = 100
#: weight of the newest batch in the moving average kept while training (torch's MovingAverageMinMaxObserver)
MOMENTUM = 0.01

Range = tuple[torch.Tensor, torch.Tensor]
#: fake_quantize(x, lo, hi) -> x_hat: what the quantizer outputs for x when its range is [lo, hi]
FakeQuantize = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def check_observer(observer: str) -> str:
    """Return ``observer`` if it names a rule in OBSERVERS, else raise ConfigError."""
    if observer not in OBSERVERS:
        raise ConfigError(f"unknown observer {observer!r}; valid: {', '.join(OBSERVERS)}")
    return observer


def check_percentile(percentile: float) -> float:
    """Return ``percentile`` as a float if it lies in [50, 100], else raise ConfigError."""
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 50 <= percentile <= 100:
        raise ConfigError(f"percentile must be a number from 50 to 100, got {percentile!r}")
    return float(percentile)


def _rows(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """x as float32 [N] (per tensor) or [C, N] (one row per index of ``axis``)."""
    x = x.detach().float()
    return x.reshape(-1) if axis is None else x.movedim(axis, 0).reshape(x.shape[axis], -1)


def minmax_range(x: torch.Tensor, axis: int | None = None) -> Range:
    """(min(x), max(x)), per tensor or per channel along ``axis``."""
    rows = _rows(x, axis)
    return rows.amin(dim=-1), rows.amax(dim=-1)


def _quantile_of_sorted(ordered: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile (0 <= q <= 1) of each row of sorted values, linear interpolation."""
    position = q * (ordered.shape[-1] - 1)
    below = math.floor(position)
    above = min(below + 1, ordered.shape[-1] - 1)
    low, high = ordered[..., below], ordered[..., above]
    return low + (high - low) * (position - below)


def percentile_range(x: torch.Tensor, axis: int | None = None, percentile: float = 99.99) -> Range:
    """(P_{100-p}(x), P_p(x)) with linear interpolation, per tensor or per channel."""
    ordered = _rows(x, axis).sort(dim=-1).values
    return _quantile_of_sorted(ordered, 1 - percentile / 100), _quantile_of_sorted(ordered, percentile / 100)


def mse_range(x: torch.Tensor, axis: int | None, fake_quantize: FakeQuantize, steps: int = MSE_STEPS) -> Range:
    """The range t * [min, max] (t = 1, (steps-1)/steps, ..., 1/steps) with the least quantization MSE.

    Each channel picks its own t; among equal errors the largest t (widest range) wins.
    """
    lo, hi = minmax_range(x, axis)
    rows = _rows(x, axis)
    fractions = [k / steps for k in range(steps, 0, -1)]
    errors = torch.stack(
        [(_rows(fake_quantize(x, lo * t, hi * t), axis) - rows).square().mean(dim=-1) for t in fractions]
    )
    best = torch.tensor(fractions, dtype=torch.float32, device=errors.device)[errors.argmin(dim=0)]
    return lo * best, hi * best


def batch_range(
    x: torch.Tensor, observer: str, axis: int | None, percentile: float, fake_quantize: FakeQuantize
) -> Range:
    """The range of one tensor by the named rule (``fake_quantize`` is used by ``mse`` only)."""
    if check_observer(observer) == "minmax":
        return minmax_range(x, axis)
    if observer == "percentile":
        return percentile_range(x, axis, percentile)
    return mse_range(x, axis, fake_quantize)


class RangeObserver(nn.Module):
    """The observed range of a static quantizer, kept in buffers ``min_val``, ``max_val``, ``batches``.

    :meth:`update` merges a batch range in one of three ways:

    - ``"extremes"``: running min of lo and max of hi (torch's MinMaxObserver; min/max calibration);
    - ``"mean"``: running mean of the batch ranges (percentile and mse calibration);
    - ``"moving"``: lo <- lo + MOMENTUM * (lo_batch - lo), same for hi (training; torch's
      MovingAverageMinMaxObserver with averaging_constant 0.01).

    The first batch sets the range whatever the way. ``min_val``/``max_val`` are empty until then,
    0-d per tensor, [C] per channel; loading a state_dict takes the stored shapes.
    """

    MERGES = ("extremes", "mean", "moving")

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("min_val", torch.empty(0))
        self.register_buffer("max_val", torch.empty(0))
        self.register_buffer("batches", torch.zeros((), dtype=torch.int64))

    @property
    def observed(self) -> bool:
        """True once a batch has been observed."""
        return bool(self.batches > 0)

    @torch.no_grad()
    def update(self, lo: torch.Tensor, hi: torch.Tensor, merge: str, where: str) -> None:
        """Merge the batch range [lo, hi] into the kept range by ``merge`` (one of MERGES)."""
        if merge not in self.MERGES:
            raise ConfigError(f"unknown range merge {merge!r} for {where}; valid: {', '.join(self.MERGES)}")
        lo, hi = lo.float(), hi.float()
        if self.observed and lo.shape != self.min_val.shape:
            raise ShapeMismatchError(
                f"{where} has range shape {tuple(lo.shape)} but observed {tuple(self.min_val.shape)} before"
            )
        if not self.observed:
            self.min_val, self.max_val = lo.clone(), hi.clone()
        elif merge == "extremes":
            self.min_val, self.max_val = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)
        elif merge == "mean":
            count = torch.full_like(lo, float(self.batches + 1))  # a tensor divides the same on every device
            self.min_val = self.min_val + (lo - self.min_val) / count
            self.max_val = self.max_val + (hi - self.max_val) / count
        else:
            self.min_val = self.min_val + MOMENTUM * (lo - self.min_val)
            self.max_val = self.max_val + MOMENTUM * (hi - self.max_val)
        self.batches += 1

    def range(self, where: str) -> Range:
        """The kept (min_val, max_val); CalibrationError naming ``where`` if nothing was observed."""
        if not self.observed:
            raise CalibrationError(
                f"{where} has no observed range: it is static (dynamic=False), so run lowbit.calibrate "
                "or train before evaluating it"
            )
        return self.min_val, self.max_val

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("min_val", "max_val"):
            stored = state_dict.get(prefix + name)
            if isinstance(stored, torch.Tensor):
                setattr(self, name, torch.empty_like(stored, dtype=torch.float32, device=self.batches.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
