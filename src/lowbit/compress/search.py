"""Deep Compression settings found from an error budget: per-layer sparsity and k-means bits around the default rule.

Han, Mao & Dally (ICLR 2016, Fig. 6, after Han et al. NIPS 2015, Fig. 5) choose each layer's pruning
threshold from a sensitivity analysis: the big fully connected layers are pruned hardest, the first conv
and the last layers less. The default rule (:mod:`lowbit.compress.rule`) states those findings for any
model; :func:`search` adapts its overall strength to a model and an error budget:

1. **One dial** (:func:`ladder`): for a factor f in :data:`FACTORS` (from the most cautious), each layer
   keeps ``min(1, f * rule_kept)`` of its weights with ``rule_bits + round(log2 f)`` k-means bits (from 2
   to 8, at most one centroid per 4 kept weights); f = 1 is the default recipe. Pruning without
   retraining says little of what retraining recovers (ip1 of LeNet-300-100 alone loses points at 85-90%
   sparsity, yet ends at 94.5% 0.08 points above the float model after retraining), so every candidate
   is judged by a full recipe run.
2. **Reference**: the float model has usually been trained on the whole training split, the slice
   included, so its error there is a training error, lower than any model retrained without the
   slice can reach. The baseline is therefore a reference probe: the recipe run with nothing pruned
   and 8-bit codebooks, retrained as long as the default candidate, without the slice.
3. **Probes**: the full recipe (prune in rounds and retrain, share, fine-tune) on the training images
   minus the validation slice; the first probe is the default (f = 1), then a bisection towards the
   aggressive end while probes meet the budget, towards the cautious end when they miss it. The
   smallest probe whose validation error exceeds the reference's by at most the budget is chosen.
   Each probe's epochs (its rounds x retraining epochs + fine-tuning epochs), the reference's included,
   are counted against ``max_epochs``.

Small budgets meet sampling noise: two error rates counted on n images differ by chance by up to
``1.96 sqrt(2 p (1 - p) / n)`` (95%; :func:`noise_points`), +-0.46 points on 5,000 MNIST images at 1.4%
error, so the search logs that width and says when the budget lies inside it.

The relative-index width is chosen per layer (``index_bits="auto"``, the width with the fewest coded
bytes). The result's :class:`Settings` are plain JSON (``to_dict`` / ``from_dict``) and reusable:
``DeepCompressionConfig(**settings.config())``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..data.loaders import split_validation
from ..errors import ConfigError
from .pipeline import DEFAULT_FINETUNE_EPOCHS, DEFAULT_RETRAIN_EPOCHS, DeepCompressionConfig, accuracy, deep_compress
from .prune import check_number
from .rule import rule_bits, rule_rounds, rule_sparsity
from .share import MAX_BITS

#: the dial's factors on the rule's kept fractions, from the most cautious; 1 is the default recipe
FACTORS = (3.0, 2.0, 1.5, 1.25, 1.0, 0.85, 0.7, 0.6, 0.5)
SETTINGS_VERSION = 1


@dataclass
class Settings:
    """Per-layer final sparsity and k-means bits (relative-index widths chosen per layer, ``"auto"``)."""

    sparsity: dict[str, float]
    bits: dict[str, int]
    index_bits: str = "auto"

    def config(self) -> dict[str, Any]:
        """The :class:`~lowbit.compress.pipeline.DeepCompressionConfig` options these settings fix."""
        return {"sparsity": dict(self.sparsity), "bits": dict(self.bits), "index_bits": self.index_bits}

    def to_dict(self) -> dict[str, Any]:
        return {"version": SETTINGS_VERSION, **self.config()}

    @classmethod
    def from_dict(cls, data: Any, layers: Iterable[str] | None = None) -> Settings:
        """Read settings; with ``layers``, they must name exactly those layers. ConfigError otherwise."""
        if not isinstance(data, dict) or set(data) != {"version", "sparsity", "bits", "index_bits"}:
            raise ConfigError("compression settings are an object with keys version, sparsity, bits, index_bits; "
                              f"got {str(data)[:120]}")
        if data["version"] != SETTINGS_VERSION:
            raise ConfigError(f"compression settings version {data['version']!r} is not supported "
                              f"(supported: {SETTINGS_VERSION})")
        sparsity, bits = data["sparsity"], data["bits"]
        if not isinstance(sparsity, dict) or not isinstance(bits, dict) or set(sparsity) != set(bits):
            raise ConfigError("compression settings: sparsity and bits must map the same layers to numbers")
        if layers is not None and set(sparsity) != set(layers):
            raise ConfigError(f"compression settings name layers {sorted(sparsity)}, the model has {sorted(layers)}")
        for name in sparsity:
            check_number(sparsity[name], f"sparsity of layer {name!r}", 0, 1)
            if isinstance(bits[name], bool) or not isinstance(bits[name], int) or not 1 <= bits[name] <= MAX_BITS:
                raise ConfigError(f"bits of layer {name!r} must be an int from 1 to {MAX_BITS}, got {bits[name]!r}")
        if data["index_bits"] != "auto":
            raise ConfigError(f"compression settings index_bits is 'auto', got {data['index_bits']!r}")
        return cls({k: float(v) for k, v in sparsity.items()}, dict(bits))


def error_points(model: nn.Module, loader: Iterable[Any]) -> float:
    """Top-1 error in points (100 - accuracy in %)."""
    return 100.0 * (1 - accuracy(model, loader))


def scaled(model: nn.Module, factor: float) -> Settings:
    """The rule's settings at strength ``factor``: kept ``min(1, factor * rule_kept)``, bits shifted by
    ``round(log2 factor)`` (:func:`~lowbit.compress.rule.rule_bits`)."""
    check_number(factor, "factor", 1e-6)
    return Settings(rule_sparsity(model, factor), rule_bits(model, factor))


def ladder(model: nn.Module, factors: Iterable[float] = FACTORS) -> list[tuple[float, Settings]]:
    """(factor, settings) for each distinct setting of the dial, from the most cautious (factors descending)."""
    found: list[tuple[float, Settings]] = []
    for factor in sorted(set(factors), reverse=True):
        settings = scaled(model, factor)
        if not found or settings != found[-1][1]:
            found.append((factor, settings))
    return found


@dataclass
class Probe:
    factor: float  # the dial's factor on the rule's kept fractions (0 for the reference)
    settings: Settings
    error: float  # validation error of the compressed model (points)
    layer_bytes: int  # Huffman-coded bytes of the compressed layers
    epochs: int
    result: Any = field(repr=False, default=None)

    def to_dict(self) -> dict[str, Any]:
        return {"factor": self.factor, "settings": self.settings.to_dict(), "error": self.error,
                "layer_bytes": self.layer_bytes, "epochs": self.epochs}


@dataclass
class SearchResult:
    """The chosen probe (None when every probe missed the budget), every probe, the reference probe the
    budget is measured from, the float model's validation error, the training epochs spent (the
    reference's included) and the slice's noise (:func:`noise_points` at the reference's error)."""

    best: Probe | None
    probes: list[Probe]
    reference: Probe
    float_error: float
    epochs: int
    noise: float

    def to_dict(self) -> dict[str, Any]:
        return {"best": None if self.best is None else self.best.to_dict(),
                "probes": [p.to_dict() for p in self.probes], "reference": self.reference.to_dict(),
                "float_error": self.float_error, "epochs": self.epochs, "noise": self.noise}


def noise_points(error: float, images: int) -> float:
    """Half-width in points of the 95% interval of the difference of two independent error rates near ``error``
    points, each counted on ``images`` images: ``1.96 sqrt(2 p (1 - p) / n)``. Budgets below it are decided by
    which images the slice holds more than by the settings (5,000 images at 1.4% error: +-0.46 points)."""
    if images < 1:
        return math.inf  # no images resolve no difference
    p = min(max(error / 100, 0.0), 1.0)
    return 100 * 1.96 * math.sqrt(2 * p * (1 - p) / images)


def probe_epochs(options: Mapping[str, Any], sparsity: Mapping[str, float]) -> int:
    """Training epochs one run of the recipe spends on ``sparsity``: rounds (given, or
    :func:`~lowbit.compress.rule.rule_rounds`) x retraining epochs + fine-tuning epochs."""
    rounds = options.get("rounds") or rule_rounds(dict(sparsity))
    return (rounds * options.get("retrain_epochs", DEFAULT_RETRAIN_EPOCHS)
            + options.get("finetune_epochs", DEFAULT_FINETUNE_EPOCHS))


def search(model: nn.Module, train_loader: Iterable[Any], val_loader: Iterable[Any], budget: float,
           options: Mapping[str, Any] | None = None, max_epochs: int = 60,
           log: Callable[[str], None] | None = None, factors: Iterable[float] = FACTORS) -> SearchResult:
    """Bisect the dial of :func:`ladder` from the default (f = 1) with full recipe runs (``options``: the other
    :class:`~lowbit.compress.pipeline.DeepCompressionConfig` fields) for the smallest compressed model whose
    validation error exceeds the reference probe's by at most ``budget`` points, within ``max_epochs``."""
    check_number(budget, "max error increase (points)", 0)
    options = {k: v for k, v in (options or {}).items() if v is not None}
    for fixed in ("sparsity", "quality", "bits", "index_bits"):
        if fixed in options:
            raise ConfigError(f"the search chooses {fixed}; do not pass it with a budget")
    log = log or (lambda message: None)
    found = ladder(model, factors)
    start = min(range(len(found)), key=lambda i: abs(math.log(found[i][0])))  # the default, or the nearest
    default = found[start][1]
    # the reference retrains as long as the default candidate: its rounds, nothing pruned, 8-bit codebooks
    reference_options = {**options, "rounds": options.get("rounds") or rule_rounds(default.sparsity)}
    names = list(default.sparsity)
    nothing = Settings({n: 0.0 for n in names}, {n: MAX_BITS for n in names})
    needed = probe_epochs(reference_options, nothing.sparsity) + probe_epochs(options, default.sparsity)
    if isinstance(max_epochs, bool) or not isinstance(max_epochs, int) or max_epochs < needed:
        raise ConfigError(f"the search needs at least {needed} epochs (the reference and the default candidate), "
                          f"got max_epochs={max_epochs!r}")
    float_error = error_points(model, val_loader)
    log(f"float validation error {float_error:.2f}%; {len(found)} candidate settings (factors "
        f"{', '.join(f'{f:g}' for f, _ in found)} on the default rule's kept fractions), budget +{budget:g} points, "
        f"at most {max_epochs} epochs")
    probes: list[Probe] = []

    def run(factor: float, settings: Settings, run_options: Mapping[str, Any]) -> Probe:
        config = DeepCompressionConfig(**{**run_options, **settings.config()})
        result = deep_compress(copy.deepcopy(model), train_loader, val_loader, config)
        error = 100.0 * (1 - result.accuracy["finetune" if "finetune" in result.accuracy else "share"])
        return Probe(factor, settings, error, sum(s.bytes_huffman for s in result.layers),
                     probe_epochs(run_options, settings.sparsity), result)

    reference = run(0.0, nothing, reference_options)
    noise = noise_points(reference.error, sum(len(labels) for _, labels in val_loader))
    log(f"reference (nothing pruned, {MAX_BITS}-bit codebooks, retrained without the slice): validation error "
        f"{reference.error:.2f}%; the slice resolves differences of about +-{noise:.2f} points (95%)"
        + (": the budget is within that noise" if budget < noise else ""))

    def spent() -> int:
        return reference.epochs + sum(p.epochs for p in probes)

    def probe_at(index: int) -> Probe | None:
        factor, settings = found[index]
        if spent() + probe_epochs(options, settings.sparsity) > max_epochs:
            return None
        probe = run(factor, settings, options)
        probes.append(probe)
        log(f"probe {len(probes)}: factor {factor:g} -> validation error {probe.error:.2f}% "
            f"({probe.error - reference.error:+.2f}), {probe.layer_bytes} B")
        return probe

    def within(probe: Probe) -> bool:
        return probe.error - reference.error <= budget

    low, high, best = 0, len(found) - 1, None  # bisect for the last candidate within budget, from the default
    middle = start
    while low <= high:
        probe = probe_at(middle)
        if probe is None:
            break
        if within(probe):
            best, low = probe, middle + 1
        else:
            high = middle - 1
        middle = (low + high + 1) // 2
    if best is None:
        cautious = min(probes, key=lambda p: -p.factor) if probes else reference
        log(f"no candidate met the budget within {spent()} epochs (the most cautious one probed, factor "
            f"{cautious.factor:g}: {cautious.error - reference.error:+.2f} points)")
    else:
        log(f"chosen: factor {best.factor:g}, validation error {best.error:.2f}% "
            f"({best.error - reference.error:+.2f}), {best.layer_bytes} B; {spent()} epochs in {len(probes) + 1} runs")
    return SearchResult(best, probes, reference, float_error, spent(), noise)


__all__ = ["FACTORS", "Probe", "SearchResult", "Settings", "error_points", "ladder", "noise_points", "probe_epochs",
           "scaled", "search", "split_validation"]
