"""Group-wise uniform weight quantization (weight-only, as GPTQ / AWQ store LLM weights: Frantar et al. 2022,
arXiv:2210.17323; Lin et al. 2023, arXiv:2306.00978).

The weight ``W`` of shape ``[O, ...]`` is read as ``O`` rows of ``K = prod(shape[1:])`` values in C order (a
linear layer's input features; a conv's ``(c_in, kernel position)`` pairs, kernel positions fastest), and
each row is cut into ``G = ceil(K / g)`` groups of ``g`` consecutive values. Group ``j`` of row ``o`` has its
own scale ``s[o, j]`` and zero point ``z[o, j]``, from its range ``[lo, hi]`` widened to include 0 (the rule
of :mod:`lowbit.quantizers.uniform`, so 0 is exact):

    affine:     qmin, qmax = 0, 2^b - 1                    s = max((hi - lo) / (2^b - 1), EPS)
                z = clamp(qmin - round(lo / s), qmin, qmax)
    symmetric:  qmin, qmax = -(2^(b-1) - 1), 2^(b-1) - 1   s = max(max(-lo, hi) / (2^(b-1) - 1), EPS), z = 0
    q = clamp(round(w * (1/s)) + z, qmin, qmax)            w_hat = (q - z) * s       (float32, 1/s a float32)

Symmetric uses the narrow grid, so the largest |w| of a group is a code (at 2 bits: {-1, 0, +1} s).
A group size ``g >= K`` gives one group per row (per-channel scales).

A ``g`` that does not divide ``K``: the row is padded to ``G g`` values with zeros and the last group of each
row is shorter (``K - (G - 1) g`` values). Since every range already includes 0, this is the same as quantizing
the short group on its own; the padding is never stored (codes keep the weight's shape).

Example (b = 4, affine, one group): [-1, 0.5, 2] -> s = 3/15 = 0.2, z = clamp(0 - round(-5)) = 5,
codes [0, 7, 15] (0.5 / 0.2 = 2.5 rounds half to even to 2), values [-1, 0.4, 2].

Gradient: straight-through within the grid, g_w = g_y where qmin <= round(w/s) + z <= qmax (as torch's
fake_quantize); scales and zero points carry no gradient. Stored as the ``group_affine`` codec: codes and (affine)
zero points bit-packed at b bits, scales float32 ``[O, G]``.

Binary and ternary groups, the same groups with one scale each (no zero point):

- ``group_binary`` (BWN, Rastegari et al. 2016, per group): alpha = mean |w| over the group, codes 1 where
  w >= 0 (sign(0) = +1), value (2 code - 1) alpha; an all-zero group gets alpha = EPS (as ``xnor``).
- ``group_ternary`` (TWN, Li & Liu 2016, per group): delta = threshold mean |w|, codes sign(w) where
  |w| > delta else 0, alpha = mean |w| over the kept values (EPS when none), value code alpha.

Means are over the group's own values (the short last group counts only its own), summed in float64 and rounded
once to float32, so a constant group c (|c| >= EPS) gives back c exactly. Their gradient is the identity
(straight-through, as TWN trains). Stored as the ``group_binary`` (1 bit) / ``group_ternary`` (code + 1 in 2 bits)
codecs with float32 scales ``[O, G]``: 1 + 32 / g and 2 + 32 / g bits per weight.

A codebook per group, ``group_kmeans`` (non-uniform levels, the idea of SqueezeLLM, Kim et al. 2023,
arXiv:2306.07629, which fits one per output channel: g >= K): the K = 2^b levels of each group are fitted by 1-D
k-means (Lloyd, ``iters`` rounds from centroids spaced evenly over the group's [min, max], an empty cluster keeping
its centroid; unweighted, where SqueezeLLM weighs by sensitivity), in float64 over all groups at once, then
rounded to float32; each value takes the index of its nearest float32 level (ties to the lower index). A group
of at most K distinct values whose levels land on them (a constant group always) is exact. Stored as the
``group_codebook`` codec: b-bit indices and float32 levels ``[O, G, K]``: b + 32 2^b / g bits per weight (3-bit:
5 at g = 128, 3.06 per channel of 4096 inputs), so the codebook pays off for large groups. Gradient: the identity.

Power-of-two levels per group, ``group_log2`` (Miyashita et al. 2016, arXiv:1603.01025, with one full-scale
value per group): s = max |w| of the group (float32, at least EPS), b bits hold the sign and E = 2^(b-1) - 1
levels s, s/2, ..., s 2^-(E-1) besides 0. |w| / s = m 2^e (float64, m in [1/2, 1)) rounds to 2^-k in the log
domain, k = -e if m >= sqrt(1/2) else 1 - e, exactly as a comparison (no log); k >= E (and w = 0) gives 0.
Codes are signed, code = sign(w) (E - k) in [-E, E], value sign(code) s 2^(|code| - E); a constant group is
exact. Stored as the ``group_log`` codec (``code + E`` in b bits, scales float32 [O, G]): b + 32 / g bits per
weight. Gradient: the identity.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import CalibrationError, ConfigError
from .base import EPS, Encoded, Quantizer, check_bits, check_finite, check_flag, register
from .ste import straight_through, straight_through_in_range
from .uniform import affine_qparams

#: largest group size (the element cap of a stored tensor)
MAX_GROUP_SIZE = 2**31


def check_group_size(group_size: int) -> int:
    """Return ``group_size`` if it is an int from 1 to MAX_GROUP_SIZE, else raise ConfigError."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or not 1 <= group_size <= MAX_GROUP_SIZE:
        raise ConfigError(f"group_size must be an integer from 1 to {MAX_GROUP_SIZE}, got {group_size!r}")
    return group_size


def check_group_weight(x: torch.Tensor, where: str) -> None:
    """ConfigError / CalibrationError naming ``where`` unless ``x`` can be grouped: at least 2 dimensions (output
    channels first), at least one element, finite."""
    if x.dim() < 2:
        raise ConfigError(f"{where} of shape {tuple(x.shape)}: group-wise quantization needs a weight of at least 2 "
                          "dimensions (output channels first); use it for linear / conv weights")
    if x.numel() == 0:
        raise CalibrationError(f"{where} is empty; there is nothing to quantize")
    check_finite(x, where)


def group_qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax): unsigned [0, 2^b - 1] when affine, narrow signed [-(2^(b-1) - 1), 2^(b-1) - 1] when symmetric."""
    return (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def group_count(k: int, group_size: int) -> int:
    """Groups per row: ceil(K / g)."""
    return -(-k // group_size)


def expand_groups(p: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """A per-group parameter ``[O, G]`` repeated over each group's columns: ``[O, K]``."""
    return p[:, torch.arange(k, device=p.device) // group_size]


def group_qparams(
    x: torch.Tensor, group_size: int, qmin: int, qmax: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale float32 [O, G], zero_point int64 [O, G]) of each group's range (widened to include 0)."""
    rows = x.reshape(x.shape[0], math.prod(x.shape[1:])).detach().float()
    k = rows.shape[1]
    groups = group_count(k, group_size)
    padded = F.pad(rows, (0, groups * group_size - k))  # zeros: inside every (0-including) range
    lo, hi = torch.aminmax(padded.view(rows.shape[0], groups, group_size), dim=-1)
    return affine_qparams(lo, hi, qmin, qmax, symmetric)


def group_codes(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int64 [x's shape], inside): q = clamp(round(w * (1/s)) + z, qmin, qmax) with each value's group's s, z."""
    rows = x.reshape(x.shape[0], math.prod(x.shape[1:])).float()
    k = rows.shape[1]
    inverse = expand_groups(torch.reciprocal(scale.float()), k, group_size)
    unclamped = torch.round(rows * inverse) + expand_groups(zero_point.long(), k, group_size)
    inside = (unclamped >= qmin) & (unclamped <= qmax)
    return unclamped.clamp(qmin, qmax).long().reshape(x.shape), inside.reshape(x.shape)


def group_values(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                 group_size: int) -> torch.Tensor:
    """(q - z) * s in float32, each value with its group's s and z (z = 0 when None): the codec's decode."""
    rows = codes.reshape(codes.shape[0], math.prod(codes.shape[1:])).long()
    k = rows.shape[1]
    if zero_point is not None:
        rows = rows - expand_groups(zero_point.long(), k, group_size)
    return (rows.float() * expand_groups(scale.float(), k, group_size)).reshape(codes.shape)


@register("group_uniform")
class GroupUniformQuantizer(Quantizer):
    """Uniform b-bit weights with a scale (and zero point, when affine) per group of ``group_size`` consecutive
    inputs of each output channel (see the module docstring). The range comes from each weight (dynamic); a
    weight needs at least 2 dimensions (output channels first), finite values and at least one element."""

    def __init__(self, bits: int = 4, group_size: int = 128, symmetric: bool = False) -> None:
        super().__init__()
        self.bits = check_bits(bits, 2, 8)
        self.group_size = check_group_size(group_size)
        self.symmetric = check_flag(symmetric, "symmetric")
        self.qmin, self.qmax = group_qrange(bits, symmetric)

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}

    def groups(self, shape: tuple[int, ...] | torch.Size) -> int:
        """Groups per output channel of a weight of ``shape``."""
        return group_count(math.prod(shape[1:]), self.group_size)

    def qparams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale [O, G], zero_point [O, G]) of weight ``x``; ConfigError / CalibrationError for a weight that
        cannot be grouped (fewer than 2 dims, empty, NaN/Inf)."""
        check_group_weight(x, self.where())
        with torch.no_grad():
            scale, zero_point = group_qparams(x, self.group_size, self.qmin, self.qmax, self.symmetric)
        if not bool(torch.isfinite(scale).all()):
            raise CalibrationError(f"{self.where()} spans a range too wide for float32 (hi - lo overflows)")
        return scale, zero_point

    def _quantize(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        codes, inside = group_codes(x, scale, zero_point, self.qmin, self.qmax, self.group_size)
        return group_values(codes, scale, None if self.symmetric else zero_point, self.group_size), inside

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero_point = self.qparams(x)
        if torch.is_grad_enabled() and x.requires_grad:
            return straight_through_in_range(x, lambda v: self._quantize(v, scale, zero_point))
        return self._quantize(x, scale, zero_point)[0].to(x.dtype)

    def encode(self, x: torch.Tensor) -> Encoded:
        scale, zero_point = self.qparams(x)
        codes, _ = group_codes(x, scale, zero_point, self.qmin, self.qmax, self.group_size)
        params = {"scale": scale.float()} if self.symmetric else {"scale": scale.float(), "zero_point": zero_point}
        meta = {"qmin": self.qmin, "qmax": self.qmax, "group_size": self.group_size, "symmetric": self.symmetric}
        return Encoded("group_affine", codes, self.bits, params, meta)


def group_abs(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(|w| as float64 [O, G, g], zero-padded; the number of real values in each group, [G])."""
    rows = x.detach().reshape(x.shape[0], math.prod(x.shape[1:])).double().abs()
    k = rows.shape[1]
    groups = group_count(k, group_size)
    padded = F.pad(rows, (0, groups * group_size - k)).view(rows.shape[0], groups, group_size)
    counts = torch.full((groups,), group_size, dtype=torch.float64, device=x.device)
    if groups:
        counts[-1] = k - (groups - 1) * group_size
    return padded, counts


def group_binary_codes_and_scale(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (int64, 1 where w >= 0) and alpha [O, G] = mean |w| per group (float32, at least EPS)."""
    magnitude, counts = group_abs(x, group_size)
    alpha = (magnitude.sum(dim=-1) / counts).float().clamp_min(EPS)
    return (x.detach() >= 0).long(), alpha


def group_ternary_codes_and_scale(x: torch.Tensor, group_size: int,
                                  threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """TWN per group: codes (int64 in {-1, 0, 1}) and alpha [O, G] (float32, at least EPS)."""
    magnitude, counts = group_abs(x, group_size)
    delta = threshold * magnitude.sum(dim=-1, keepdim=True) / counts[:, None]
    kept = magnitude > delta  # padding (0) is never kept: delta >= 0
    alpha = ((magnitude * kept).sum(dim=-1) / kept.sum(dim=-1).clamp_min(1)).float().clamp_min(EPS)
    k = math.prod(x.shape[1:])
    kept = kept.reshape(x.shape[0], -1)[:, :k].reshape(x.shape)
    return torch.sign(x.detach()).long() * kept, alpha


def group_scaled_values(codes: torch.Tensor, scale: torch.Tensor, group_size: int, binary: bool) -> torch.Tensor:
    """level * alpha[o, c // g] in float32, level 2 code - 1 (binary) or code (ternary): the codecs' decode."""
    rows = codes.reshape(codes.shape[0], math.prod(codes.shape[1:])).long()
    level = 2 * rows - 1 if binary else rows
    return (level.float() * expand_groups(scale.float(), rows.shape[1], group_size)).reshape(codes.shape)


class _GroupScaled(Quantizer):
    """A scale per group times a fixed level set (binary or ternary)."""

    kind = ""

    def __init__(self, group_size: int) -> None:
        super().__init__()
        self.group_size = check_group_size(group_size)

    def _check(self, x: torch.Tensor) -> None:
        check_group_weight(x, self.where())

    def _codes_and_scale(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enc = self.encode(x)
        value = group_scaled_values(enc.codes, enc.params["scale"], self.group_size, self.kind == "group_binary")
        return straight_through(x, value.to(x.dtype))

    def encode(self, x: torch.Tensor) -> Encoded:
        self._check(x)
        codes, scale = self._codes_and_scale(x)
        return Encoded(self.kind, codes, self.bits, {"scale": scale}, {"group_size": self.group_size})


@register("group_binary")
class GroupBinaryQuantizer(_GroupScaled):
    """Binary weights alpha * {-1, +1}, alpha = mean |w| per group of ``group_size`` inputs (module docstring)."""

    bits = 1
    kind = "group_binary"

    def __init__(self, group_size: int = 128) -> None:
        super().__init__(group_size)

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "group_size": self.group_size}

    def _codes_and_scale(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return group_binary_codes_and_scale(x, self.group_size)


@register("group_ternary")
class GroupTernaryQuantizer(_GroupScaled):
    """TWN ternary weights alpha * {-1, 0, +1} per group of ``group_size`` inputs (module docstring)."""

    bits = 2
    kind = "group_ternary"

    def __init__(self, group_size: int = 128, threshold: float = 0.7) -> None:
        super().__init__(group_size)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
                or not math.isfinite(threshold) or threshold < 0:
            raise ConfigError(f"group_ternary threshold must be a finite number >= 0 (TWN uses 0.7), "
                              f"got {threshold!r}")
        self.threshold = float(threshold)

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "group_size": self.group_size, "threshold": self.threshold}

    def _codes_and_scale(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return group_ternary_codes_and_scale(x, self.group_size, self.threshold)


#: distances computed at once by the k-means assignment (bounds its memory)
_CHUNK = 2**22


def nearest_level(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """For [N, g] values and [N, K] levels, the index of each value's nearest level (the lower one on ties)."""
    step = max(1, _CHUNK // max(1, values.shape[1] * levels.shape[1]))
    return torch.cat([(values[i:i + step, :, None] - levels[i:i + step, None, :]).abs().argmin(dim=2)
                      for i in range(0, values.shape[0], step)]) if values.shape[0] else \
        torch.zeros(values.shape, dtype=torch.int64, device=values.device)


def group_kmeans_codebook(x: torch.Tensor, group_size: int, levels: int, iters: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int64 [x's shape], codebook float32 [O, G, levels]): 1-D k-means in each group (module docstring)."""
    rows = x.detach().reshape(x.shape[0], math.prod(x.shape[1:])).double()
    o, k = rows.shape
    groups = group_count(k, group_size)
    padded = F.pad(rows, (0, groups * group_size - k)).view(o * groups, group_size)
    real = (torch.arange(groups * group_size, device=x.device) < k).view(groups, group_size)
    real = real.expand(o, groups, group_size).reshape(o * groups, group_size)
    inf = torch.tensor(math.inf, dtype=torch.float64, device=x.device)
    lo = torch.where(real, padded, inf).amin(dim=1, keepdim=True)
    hi = torch.where(real, padded, -inf).amax(dim=1, keepdim=True)
    # evenly spaced as numpy's linspace computes them (lo + i step, the last one hi), sorted
    centroids = lo + (hi - lo) / max(levels - 1, 1) * torch.arange(levels, dtype=torch.float64, device=x.device)
    if levels > 1:
        centroids[:, -1:] = hi
    weight = real.double()
    for _ in range(iters):
        labels = nearest_level(padded, centroids)
        sums = torch.zeros_like(centroids).scatter_add_(1, labels, padded * weight)
        counts = torch.zeros_like(centroids).scatter_add_(1, labels, weight)
        moved = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
        if torch.equal(moved, centroids):
            break
        centroids = moved
    book = centroids.float()
    values = F.pad(rows.float(), (0, groups * group_size - k)).view(o * groups, group_size)
    codes = nearest_level(values, book)
    codes = codes.view(o, groups * group_size)[:, :k].reshape(x.shape)
    return codes, book.view(o, groups, levels)


def group_codebook_values(codes: torch.Tensor, codebook: torch.Tensor, group_size: int) -> torch.Tensor:
    """codebook[o, c // g, code] in float32: the codec's decode."""
    rows = codes.reshape(codes.shape[0], math.prod(codes.shape[1:])).long()
    group = torch.arange(rows.shape[1], device=rows.device) // group_size
    row = torch.arange(rows.shape[0], device=rows.device)[:, None]
    return codebook.float()[row, group[None, :], rows].reshape(codes.shape)


@register("group_kmeans")
class GroupKMeansQuantizer(_GroupScaled):
    """Non-uniform weights: a k-means codebook of 2^bits levels per group of ``group_size`` inputs (module
    docstring); fitted afresh from each weight."""

    kind = "group_codebook"

    def __init__(self, bits: int = 3, group_size: int = 128, iters: int = 30) -> None:
        super().__init__(group_size)
        self.bits = check_bits(bits, 1, 8)
        if isinstance(iters, bool) or not isinstance(iters, int) or not 0 <= iters <= 10_000:
            raise ConfigError(f"group_kmeans iters must be an integer from 0 to 10000, got {iters!r}")
        self.iters = iters

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "bits": self.bits, "group_size": self.group_size, "iters": self.iters}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enc = self.encode(x)
        return straight_through(x, group_codebook_values(enc.codes, enc.params["codebook"], self.group_size
                                                         ).to(x.dtype))

    def encode(self, x: torch.Tensor) -> Encoded:
        self._check(x)
        codes, book = group_kmeans_codebook(x, self.group_size, 2**self.bits, self.iters)
        return Encoded(self.kind, codes, self.bits, {"codebook": book}, {"group_size": self.group_size})


#: the log-domain rounding boundary of a mantissa in [1/2, 1): 2^-1/2, correctly rounded
SQRT_HALF = math.sqrt(0.5)


def group_log_codes_and_scale(x: torch.Tensor, group_size: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed codes (int64 in [-E, E], E = 2^(bits-1) - 1) and s [O, G] = max |w| per group (float32, >= EPS)."""
    levels = 2 ** (bits - 1) - 1
    magnitude, _ = group_abs(x, group_size)
    scale = magnitude.amax(dim=-1).float().clamp_min(EPS)
    rows = x.detach().reshape(x.shape[0], math.prod(x.shape[1:]))
    ratio = rows.abs().double() / expand_groups(scale, rows.shape[1], group_size).double()
    mantissa, exponent = torch.frexp(ratio)
    k = torch.where(mantissa >= SQRT_HALF, -exponent, 1 - exponent).long()
    code = torch.where((ratio > 0) & (k < levels), levels - k, 0)
    return (code * torch.sign(rows).long()).reshape(x.shape), scale


def group_log_values(codes: torch.Tensor, scale: torch.Tensor, group_size: int, bits: int) -> torch.Tensor:
    """sign(code) s 2^(|code| - E) in float32: the codec's decode."""
    rows = codes.reshape(codes.shape[0], math.prod(codes.shape[1:])).long()
    full = expand_groups(scale.float(), rows.shape[1], group_size)
    return (torch.sign(rows).float() * torch.ldexp(full, rows.abs() - (2 ** (bits - 1) - 1))).reshape(codes.shape)


@register("group_log2")
class GroupLog2Quantizer(_GroupScaled):
    """Power-of-two weights s 2^-k per group of ``group_size`` inputs, s = max |w| of the group (module docstring)."""

    kind = "group_log"

    def __init__(self, bits: int = 4, group_size: int = 128) -> None:
        super().__init__(group_size)
        self.bits = check_bits(bits, 2, 6)

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "bits": self.bits, "group_size": self.group_size}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enc = self.encode(x)
        return straight_through(x, group_log_values(enc.codes, enc.params["scale"], self.group_size, self.bits
                                                    ).to(x.dtype))

    def encode(self, x: torch.Tensor) -> Encoded:
        self._check(x)
        codes, scale = group_log_codes_and_scale(x, self.group_size, self.bits)
        return Encoded(self.kind, codes, self.bits, {"scale": scale}, {"group_size": self.group_size})
