"""Range observers: how a quantizer reads the range [lo, hi] it quantizes off a tensor.

Four rules, per tensor (``axis=None``) or, except entropy, per channel (one range per index of ``axis``):

- ``minmax``: lo = min(x), hi = max(x).
- ``percentile``: lo = P_{100-p}(x), hi = P_p(x), percentiles with linear interpolation
  between order statistics (numpy's default), so the rarest outliers are clipped.
- ``mse``: the range t * [min(x), max(x)] for t in {1, (N-1)/N, ..., 1/N} (N = ``MSE_STEPS``)
  whose fake-quantized x has the smallest mean squared error; each channel picks its own t,
  ties go to the widest range. The quantizer supplies the fake-quantization it would apply.
- ``entropy`` (TensorRT's KL calibration; per tensor): a clipping threshold T on a
  ``HISTOGRAM_BINS``-bin histogram b_0..b_{B-1} over [0, A] whose clipped distribution
  loses least information when quantized to L levels (Migacz, "8-bit Inference with TensorRT",
  GTC 2017). For each i = L, ..., B: the reference P is b_0..b_{i-1} with the outliers
  sum_{j >= i} b_j added to b_{i-1}; the candidate Q is b_0..b_{i-1} merged into L levels (bin j
  joins level floor(j L / i)), each level's count spread evenly over its non-empty bins (empty bins
  stay empty); with both normalised, KL(P || Q) = sum_j P_j log(P_j / Q_j), +inf where
  Q_j = 0 < P_j. The smallest KL wins (ties: the largest i) and T = i A / B. A symmetric grid
  searches the histogram of |x| over [0, max |x|] with half its levels (2^(b-1) at b bits,
  TensorRT's 128 for int8) and gives [max(min x, -T), min(max x, T)]. An affine grid clips each
  side on its own: T+ from the histogram of the positive values over [0, max x], T- from that of
  -x for the negative ones over [0, -min x], the grid's levels shared between the sides in
  proportion to max x and -min x (all of them on data of one sign), giving [max(min x, -T-),
  min(max x, T+)]; folding both sides into |x| instead would clip the long side of a normalised
  input to the short side's extreme. Exact zeros stay out of b (every grid holds 0 exactly). All
  candidates are evaluated at once from prefix sums of b, b log b and the non-empty bins.

A per-tensor static quantizer calibrating with percentile, mse or entropy accumulates one
:class:`Histogram` over all calibration batches (as torch's HistogramObserver and TensorRT do) and
reads its range off it when calibration finishes: the percentile from the cumulative histogram,
mse by the expected error of each candidate range on the histogram, entropy by the KL search.
Per-channel static quantizers keep the per-batch rules.

:class:`RangeObserver` keeps the range of a static quantizer in buffers (so it lives in the
state_dict) and merges the range of each new batch into it.
"""

from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..errors import CalibrationError, ConfigError, ShapeMismatchError
from .base import check_finite

OBSERVERS = ("minmax", "percentile", "mse", "entropy")
#: the observers a per-tensor static quantizer reads off one histogram of all calibration batches
HISTOGRAM_OBSERVERS = ("percentile", "mse", "entropy")
#: number of clipping ranges the mse observer tries
MSE_STEPS = 100
#: bins of a calibration histogram (TensorRT's 2048)
HISTOGRAM_BINS = 2048
#: the fraction of calibration values past an entropy range above which calibration warns
ENTROPY_CLIP_WARNING = 0.01
#: points per histogram bin at which the mse observer measures the quantization error
MSE_SAMPLES = 4
#: weight of the newest batch in the moving average kept while training (torch's MovingAverageMinMaxObserver)
MOMENTUM = 0.01
#: torch.histc counts in float32 (exact to 2^24), so larger tensors are counted in chunks of this many values
_HISTC_CHUNK = 2**24
#: below this many values a tensor is counted in one piece, on one thread
_PARALLEL_MIN = 2**16
#: the mse search fake-quantizes at most this many values at once
_MSE_CHUNK = 2**24
_FLOAT32_MAX = float(np.finfo(np.float32).max)
#: KL divergences this close count as equal (the prefix-sum form rounds differently from a direct sum)
_KL_TIES = 1e-12

Range = tuple[torch.Tensor, torch.Tensor]
#: fake_quantize_rows(rows, lo, hi) -> [K, R, N]: what the quantizer outputs for each row r of ``rows`` [R, N]
#: under each of K candidate ranges [lo[k, r], hi[k, r]] (lo, hi of shape [K, R])
FakeQuantizeRows = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


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
    return torch.aminmax(rows) if axis is None else torch.aminmax(rows, dim=-1)  # a full reduction is faster


def _quantile(rows: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile (0 <= q <= 1) of each row, linear interpolation between order statistics
    (found by selection, not sorting)."""
    count = rows.shape[-1]
    position = q * (count - 1)
    below = math.floor(position)
    above = min(below + 1, count - 1)
    low = rows.kthvalue(below + 1, dim=-1).values
    high = low if above == below else rows.kthvalue(above + 1, dim=-1).values
    return low + (high - low) * (position - below)


def percentile_range(x: torch.Tensor, axis: int | None = None, percentile: float = 99.99) -> Range:
    """(P_{100-p}(x), P_p(x)) with linear interpolation, per tensor or per channel."""
    rows = _rows(x, axis)
    return _quantile(rows, 1 - percentile / 100), _quantile(rows, percentile / 100)


def _mse_fractions(steps: int) -> torch.Tensor:
    """The mse candidates t = 1, (steps-1)/steps, ..., 1/steps as float32, widest first."""
    return torch.tensor([k / steps for k in range(steps, 0, -1)], dtype=torch.float32)


def mse_range(x: torch.Tensor, axis: int | None, fake_quantize_rows: FakeQuantizeRows,
              steps: int = MSE_STEPS) -> Range:
    """The range t * [min, max] (t = 1, (steps-1)/steps, ..., 1/steps) with the least quantization MSE.

    Each channel picks its own t; among equal errors the largest t (widest range) wins. The
    candidates are evaluated together, one broadcast fake-quantization per chunk of candidates.
    """
    rows = _rows(x, axis)
    table = rows.reshape(-1, rows.shape[-1])  # [C, N]
    lo, hi = torch.aminmax(table, dim=-1)
    fractions = _mse_fractions(steps).to(table.device)
    per_chunk = max(1, _MSE_CHUNK // table.numel())
    errors = []
    for chunk in fractions.split(per_chunk):
        quantized = fake_quantize_rows(table, lo[None, :] * chunk[:, None], hi[None, :] * chunk[:, None])
        errors.append(quantized.sub_(table).square_().mean(dim=-1))
    best = fractions[torch.cat(errors).argmin(dim=0)]
    return (lo * best).reshape(rows.shape[:-1]), (hi * best).reshape(rows.shape[:-1])


def entropy_levels(levels: int, symmetric: bool, lo: float, hi: float) -> tuple[int, int]:
    """(L-, L+): the levels of a grid of ``levels`` codes on [lo, hi] (lo <= 0 <= hi) that the KL search gives the
    negative and the positive side: half each for a symmetric grid, else shares in proportion to -lo and hi
    (at least one level on a side that holds values)."""
    if symmetric:
        return (levels + 1) // 2, (levels + 1) // 2
    if hi - lo <= 0:
        return 0, levels
    positive = min(levels, max(1 if hi > 0 else 0, round(levels * hi / (hi - lo))))
    negative = levels - positive
    if lo < 0 and negative == 0:
        positive, negative = positive - 1, 1
    return negative, positive


def _in_parallel(function: Callable, items: list) -> list:
    """``[function(item) for item in items]`` on up to ``torch.get_num_threads()`` threads: for kernels that run on
    one core (torch.histc, numpy) and release the GIL while they run."""
    workers = min(torch.get_num_threads(), len(items))
    if workers <= 1:
        return [function(item) for item in items]
    return list(_thread_pool(workers).map(function, items))


@functools.lru_cache(maxsize=4)
def _thread_pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="lowbit-observer")


def _histogram(values: torch.Tensor, bins: int, lo: float, hi: float) -> np.ndarray:
    """float64 counts of ``values`` (1-D) over ``bins`` equal bins of [lo, hi] by torch.histc, in chunks of at most
    ``_HISTC_CHUNK`` values, on several threads for a large tensor on the CPU."""
    pieces = math.ceil(values.numel() / _HISTC_CHUNK)
    if values.device.type == "cpu" and values.numel() >= _PARALLEL_MIN:
        pieces = max(pieces, torch.get_num_threads())
    chunks = values.chunk(pieces)
    counts = _in_parallel(lambda chunk: torch.histc(chunk, bins, lo, hi).double().cpu().numpy(), list(chunks))
    return np.sum(counts, axis=0)


def _xlogx(v: np.ndarray) -> np.ndarray:
    """v log v with 0 log 0 = 0."""
    logs = np.zeros_like(v)
    np.log(v, out=logs, where=v > 0)
    return v * logs


@functools.lru_cache(maxsize=8)
def _level_edges(levels: int, bins: int) -> np.ndarray:
    """[candidates, L + 1]: the first bin of each level of candidate i = L, ..., B, ceil(k i / L) for k = 0..L
    (the same for every histogram, so kept)."""
    kept = np.arange(levels, bins + 1)
    edges = (np.arange(levels + 1)[None, :] * kept[:, None] + levels - 1) // levels
    edges.flags.writeable = False
    return edges


def entropy_divergences(counts: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """(i, KL_i) for each candidate i = L, ..., B of TensorRT's KL search on the |x| histogram ``counts``
    (see the module docstring); empty when there are no more than L bins or no counts.

    With N the total count, C_i = sum_{j<i} b_j, O_i = N - C_i, level k of candidate i spanning bins
    [ceil(k i / L), ceil((k+1) i / L)) with sum S_k over nz_k non-empty bins (Q_j = S_k / (nz_k C_i)
    there, sum_k S_k = C_i), and the last level (the one with bin i - 1) also taking O_i in P:
    KL_i = sum_{j<i} P_j log P_j - sum_k P(level k) log(S_k / (nz_k C_i))
         = sum_{j<i} P_j log P_j - (sum_k S_k log S_k - S_k log nz_k) / N + (C_i / N) log C_i
           - (O_i / N) log(S_last / (nz_last C_i)).
    """
    b = np.asarray(counts, dtype=np.float64)
    bins, total = len(b), float(b.sum())
    if bins <= levels or total <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    cumulative = np.concatenate([[0.0], np.cumsum(b)])
    nonempty = np.concatenate([[0.0], np.cumsum(b > 0, dtype=np.float64)])
    cumulative_xlogx = np.concatenate([[0.0], np.cumsum(_xlogx(b))])
    edges = _level_edges(levels, bins)

    def divergences(rows: slice) -> np.ndarray:
        kept = np.arange(levels, bins + 1)[rows]
        bounds, filled_bounds = cumulative[edges[rows]], nonempty[edges[rows]]
        sums, filled = bounds[:, 1:] - bounds[:, :-1], filled_bounds[:, 1:] - filled_bounds[:, :-1]
        ratio = np.ones_like(sums)
        np.divide(sums, filled, out=ratio, where=sums > 0)
        groups = (sums * np.log(ratio)).sum(axis=1)  # sum_k S_k log(S_k / nz_k), 0 where S_k = 0
        kept_mass, outliers, last = cumulative[kept], total - cumulative[kept], b[kept - 1]
        p_last = (last + outliers) / total
        reference = (cumulative_xlogx[kept - 1] - cumulative[kept - 1] * math.log(total)) / total + _xlogx(p_last)
        with np.errstate(divide="ignore", invalid="ignore"):
            last_level = np.where(outliers > 0, outliers * np.log(sums[:, -1] / (filled[:, -1] * kept_mass)), 0.0)
        divergence = reference - (groups - _xlogx(kept_mass) + last_level) / total
        divergence[(last == 0) & (outliers > 0)] = np.inf
        return divergence

    count = bins + 1 - levels
    step = math.ceil(count / torch.get_num_threads())
    parts = _in_parallel(divergences, [slice(start, start + step) for start in range(0, count, step)])
    return np.arange(levels, bins + 1), np.concatenate(parts)


def entropy_threshold(counts: np.ndarray, levels: int) -> int:
    """The number of leading bins of the |x| histogram ``counts`` that TensorRT's KL search keeps: the
    candidate of least divergence, the largest among those within ``_KL_TIES`` of it (float rounding);
    all bins when there are no more than ``levels`` of them or no counts."""
    kept, divergence = entropy_divergences(counts, levels)
    if len(kept) == 0:
        return len(counts)
    return int(kept[np.flatnonzero(divergence <= divergence.min() + _KL_TIES)[-1]])


class Histogram:
    """Counts of a tensor's values over ``bins`` equal bins spanning [lo, hi] = [min(0, min x), max(0, max x)],
    accumulated over batches; not a buffer (it lives while calibration runs, never in a state_dict).

    With ``exact_zeros`` (the entropy observer's), exact zeros (ReLU's, padding's) are counted apart, as a point
    mass at 0: every grid holds 0 exactly, so they carry no quantization error, and spread over a bin they would
    read as a dense bulk there (the KL search would then clip a ReLU output to keep that bulk's bins fine).
    Counting them costs a pass over the values (about as long as the histogram's own), which the percentile
    and mse observers, within a bin either way, do not pay. While every value seen is 0, lo = hi = 0 and they
    are the zeros. A batch outside [lo, hi] widens it to the batch's extremes; the old counts are re-binned by
    linear interpolation of the cumulative histogram (counts uniform within a bin).
    """

    def __init__(self, bins: int = HISTOGRAM_BINS, exact_zeros: bool = False) -> None:
        self.counts = np.zeros(bins)
        self.exact_zeros = exact_zeros
        self.zeros = 0
        self.lo = self.hi = 0.0
        self.min, self.max = math.inf, -math.inf
        self.batches = 0

    def add(self, x: torch.Tensor, where: str) -> None:
        """Count the values of ``x``; CalibrationError naming ``where`` if it is empty or not finite."""
        values = x.detach().reshape(-1).float()
        if values.numel() == 0:
            raise CalibrationError(f"{where} is empty; there is nothing to calibrate")
        low, high = torch.stack(torch.aminmax(values)).tolist()
        if not (math.isfinite(low) and math.isfinite(high)):
            check_finite(values, where)
        if max(high, 0.0) - min(low, 0.0) > _FLOAT32_MAX:
            raise CalibrationError(f"{where} spans a range too wide for float32 (hi - lo overflows)")
        self.min, self.max = min(self.min, low), max(self.max, high)
        self._widen(min(self.lo, low), max(self.hi, high))
        if self.hi == self.lo:
            zeros = values.numel()
        else:
            zeros = values.numel() - int(torch.count_nonzero(values)) if self.exact_zeros else 0
        self.zeros += zeros
        if self.hi > self.lo and zeros < values.numel():
            counts = _histogram(values, len(self.counts), self.lo, self.hi)
            if zeros:  # out of the bin torch.histc put them in (a copy without them would cost more)
                counts -= zeros * _histogram(torch.zeros(1, device=values.device), len(self.counts), self.lo, self.hi)
            self.counts += counts
        self.batches += 1

    @property
    def width(self) -> float:
        """The width of one bin."""
        return (self.hi - self.lo) / len(self.counts)

    @property
    def total(self) -> float:
        """How many values were counted."""
        return float(self.counts.sum()) + self.zeros

    def _nonzero_cdf(self, points: np.ndarray) -> np.ndarray:
        """How many non-zero counted values lie at or below each point (uniform within their bin)."""
        if self.hi == self.lo:
            return np.zeros(len(points))
        cumulative = np.concatenate([[0.0], np.cumsum(self.counts)])
        return np.interp(points, np.linspace(self.lo, self.hi, len(self.counts) + 1), cumulative)

    def cdf(self, points: np.ndarray) -> np.ndarray:
        """How many counted values lie at or below each point."""
        return self._nonzero_cdf(points) + np.where(points >= 0, float(self.zeros), 0.0)

    def outside(self, lo: float, hi: float) -> float:
        """The fraction of the counted values below ``lo`` or above ``hi``."""
        below = self.cdf(np.array([lo]))[0] if lo > self.min else 0.0
        above = self.total - self.cdf(np.array([hi]))[0] if hi < self.max else 0.0
        return (below + above) / self.total if self.total > 0 else 0.0

    def _widen(self, lo: float, hi: float) -> None:
        """Span [lo, hi] (which holds the old span), re-binning the non-zero counts."""
        if (lo, hi) == (self.lo, self.hi):
            return
        below = self._nonzero_cdf(np.linspace(lo, hi, len(self.counts) + 1))
        self.counts = np.diff(below)
        self.counts[0] += below[0]
        self.lo, self.hi = lo, hi

    def _value_of_rank(self, rank: float, cumulative: np.ndarray, zeros_from: float) -> float:
        """Where the cumulative histogram reaches ``rank`` + 1/2: the value of order statistic ``rank`` (from 0),
        within the bin that holds it, or 0 among the zeros (ranks ``zeros_from`` on); the first and the last
        are min x and max x."""
        if rank <= 0 or rank >= self.total - 1:
            return self.min if rank <= 0 else self.max
        target = rank + 0.5
        if target >= zeros_from + self.zeros:
            target -= self.zeros
        elif target >= zeros_from:
            return 0.0
        j = int(np.clip(np.searchsorted(cumulative, target, side="left"), 1, len(self.counts)))
        return self.lo + (j - 1 + (target - cumulative[j - 1]) / self.counts[j - 1]) * self.width

    def quantile(self, q: float) -> float:
        """numpy's q-quantile (linear interpolation between the order statistics around rank q (n - 1)), each
        order statistic read off the cumulative histogram, so within a bin of numpy's value on the same data."""
        if self.hi == self.lo:
            return self.lo
        cumulative = np.concatenate([[0.0], np.cumsum(self.counts)])
        zeros_from = float(self._nonzero_cdf(np.array([0.0]))[0])
        position = q * (self.total - 1)
        below = math.floor(position)
        low = self._value_of_rank(below, cumulative, zeros_from)
        high = self._value_of_rank(min(below + 1, self.total - 1), cumulative, zeros_from)
        return float(np.clip(low + (high - low) * (position - below), self.min, self.max))

    def percentile_range(self, percentile: float) -> Range:
        """(P_{100-p}, P_p) read off the cumulative histogram."""
        return _pair(self.quantile(1 - percentile / 100), self.quantile(percentile / 100))

    def mse_range(self, fake_quantize_rows: FakeQuantizeRows, steps: int = MSE_STEPS) -> Range:
        """The range t * [min x, max x] (the candidates of :func:`mse_range`) with the least expected squared
        error, each bin's count spread over ``MSE_SAMPLES`` evenly spaced points of the bin."""
        occupied = np.flatnonzero(self.counts)
        offsets = (np.arange(MSE_SAMPLES) + 0.5) / MSE_SAMPLES
        points = torch.tensor(self.lo + (occupied[:, None] + offsets[None, :]).reshape(-1) * self.width,
                              dtype=torch.float32)
        weights = torch.tensor(np.repeat(self.counts[occupied] / MSE_SAMPLES, MSE_SAMPLES), dtype=torch.float32)
        fractions = _mse_fractions(steps)
        low, high = _pair(self.min, self.max)
        quantized = fake_quantize_rows(points[None, :], (low * fractions)[:, None], (high * fractions)[:, None])
        errors = quantized[:, 0].sub_(points).square_() @ weights
        best = fractions[errors.argmin()]
        return low * best, high * best

    def entropy_range(self, levels: int, symmetric: bool) -> Range:
        """TensorRT's KL thresholds for a grid of ``levels`` codes: one T on the histogram of |x| for a symmetric
        grid, T- and T+ on each side's histogram for an affine one, as [max(min x, -T-), min(max x, T+)]."""
        if self.hi == self.lo:
            return _pair(self.lo, self.hi)
        negative, positive = entropy_levels(levels, symmetric, self.lo, self.hi)
        if symmetric:
            threshold = self._threshold(max(-self.lo, self.hi), positive, both_sides=True)
            return _pair(max(self.min, -threshold), min(self.max, threshold))
        low = self._threshold(-self.lo, negative, sign=-1.0) if self.lo < 0 else 0.0
        high = self._threshold(self.hi, positive, sign=1.0) if self.hi > 0 else 0.0
        return _pair(max(self.min, -low), min(self.max, high))

    def _threshold(self, reach: float, levels: int, sign: float = 1.0, both_sides: bool = False) -> float:
        """The KL threshold over [0, ``reach``] on the histogram of the non-zero |x| (``both_sides``: over as
        many bins as this histogram has) or ``sign`` x (over this histogram's own bins, ending at ``reach``)."""
        cdf = self._nonzero_cdf
        if both_sides:
            edges = np.linspace(0.0, reach, len(self.counts) + 1)
            below = cdf(edges) - cdf(-edges)
        else:
            bins = max(1, math.ceil(reach / self.width - 1e-9))
            edges = np.concatenate([[0.0], reach - self.width * np.arange(bins - 1, -1, -1)])
            below = sign * cdf(sign * edges)
        return float(edges[entropy_threshold(np.diff(below), levels)])

    def range(self, observer: str, percentile: float, fake_quantize_rows: FakeQuantizeRows, levels: int,
              symmetric: bool) -> Range:
        """The range by the named histogram observer (see HISTOGRAM_OBSERVERS)."""
        if observer == "percentile":
            return self.percentile_range(percentile)
        if observer == "mse":
            return self.mse_range(fake_quantize_rows)
        if observer == "entropy":
            return self.entropy_range(levels, symmetric)
        raise ConfigError(f"observer {observer!r} reads no histogram; valid: {', '.join(HISTOGRAM_OBSERVERS)}")


def _pair(lo: float, hi: float) -> Range:
    """(lo, hi) as float32 scalars."""
    return torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32)


def batch_range(
    x: torch.Tensor, observer: str, axis: int | None, percentile: float, fake_quantize_rows: FakeQuantizeRows,
    levels: int = 256, symmetric: bool = False,
) -> Range:
    """The range of one tensor by the named rule (``fake_quantize_rows`` is used by ``mse`` only; ``levels``,
    the number of codes of the grid, and ``symmetric`` by ``entropy`` only, which is per tensor)."""
    if check_observer(observer) == "minmax":
        return minmax_range(x, axis)
    if observer == "percentile":
        return percentile_range(x, axis, percentile)
    if observer == "mse":
        return mse_range(x, axis, fake_quantize_rows)
    if axis is not None:
        raise ConfigError("the entropy observer reads one range per tensor; use per_channel=False, or observer "
                          "'minmax', 'percentile' or 'mse' per channel")
    histogram = Histogram(exact_zeros=True)
    histogram.add(x, "tensor")
    return histogram.entropy_range(levels, symmetric)


class RangeObserver(nn.Module):
    """The observed range of a static quantizer, kept in buffers ``min_val``, ``max_val``, ``batches``.

    :meth:`update` merges a batch range in one of three ways:

    - ``"extremes"``: running min of lo and max of hi (torch's MinMaxObserver; min/max calibration);
    - ``"mean"``: running mean of the batch ranges (per-channel percentile and mse calibration);
    - ``"moving"``: lo <- lo + MOMENTUM * (lo_batch - lo), same for hi (training; torch's
      MovingAverageMinMaxObserver with averaging_constant 0.01).

    The first batch sets the range whatever the way; :meth:`replace` sets a range read off a
    calibration histogram. ``min_val``/``max_val`` are empty until then, 0-d per tensor, [C] per
    channel; loading a state_dict takes the stored shapes.
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
            torch.minimum(self.min_val, lo, out=self.min_val)
            torch.maximum(self.max_val, hi, out=self.max_val)
        elif merge == "mean":
            count = torch.full_like(lo, float(self.batches + 1))  # a tensor divides the same on every device
            self.min_val = self.min_val + (lo - self.min_val) / count
            self.max_val = self.max_val + (hi - self.max_val) / count
        else:
            self.min_val = self.min_val + MOMENTUM * (lo - self.min_val)
            self.max_val = self.max_val + MOMENTUM * (hi - self.max_val)
        self.batches += 1

    @torch.no_grad()
    def replace(self, lo: torch.Tensor, hi: torch.Tensor, batches: int) -> None:
        """Keep [lo, hi], observed over ``batches`` batches, in place of any earlier range."""
        device = self.batches.device
        self.min_val, self.max_val = lo.float().to(device), hi.float().to(device)
        self.batches.fill_(batches)

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
