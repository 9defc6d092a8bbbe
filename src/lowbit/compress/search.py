"""Deep Compression settings found from an error budget: per-layer sparsity and k-means bits.

Han, Mao & Dally (ICLR 2016, Fig. 6, after Han et al. NIPS 2015, Fig. 5) choose each layer's pruning
threshold from a sensitivity analysis: prune one layer at a time, watch the accuracy, and prune the
sensitive layers (the first conv, the last layers) less. :func:`search` automates the choice:

1. **Sensitivity** (:func:`sensitivity`, forward passes only): on a validation slice, for every
   layer alone, the error increase e_l(s) after pruning a fraction s of its smallest weights (no
   retraining) and e_l(b) after sharing its weights through a b-bit k-means codebook.
2. **One dial** (:func:`settings_at`): for a tolerance t, each layer takes the highest sparsity and
   the fewest bits whose own increase is at most t (a higher t never gives a larger file); each
   distinct setting of the dial is one candidate, ordered from the most cautious.
3. **Reference**: the float model has usually been trained on the whole training split, the slice
   included, so its error there is a training error, lower than any model retrained without the
   slice can reach. The baseline is therefore a reference probe: the recipe run with nothing pruned
   and 8-bit codebooks, retrained as every probe is, without the slice.
4. **Probes**: retraining recovers most of what pruning alone loses, so the increases of step 1
   only order the candidates; :func:`search` bisects them with the full recipe (prune in rounds and
   retrain, share, fine-tune) on the training images minus the validation slice, measuring the
   validation error of each probe, and keeps the smallest (highest t) whose error exceeds the
   reference's by at most the budget. Each probe's epochs, the reference's included, are counted
   against ``max_epochs``.

The relative-index width is chosen per layer afterwards (``index_bits="auto"``, the width with the
fewest coded bytes). The result's :class:`Settings` are plain JSON (``to_dict`` / ``from_dict``) and
reusable: ``DeepCompressionConfig(**settings.config())``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..quantizers.kmeans import assign, kmeans_1d
from .pipeline import DeepCompressionConfig, accuracy, deep_compress
from .prune import check_number, prunable_layers, sparsity_threshold
from .share import MAX_BITS

#: the sparsities and k-means bit widths the sensitivity analysis tries per layer
SPARSITIES = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98)
BITS = tuple(range(2, MAX_BITS + 1))
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


@dataclass
class Curves:
    """Validation error increases (points) of each layer alone: by sparsity and by k-means bits."""

    error: float  # the float model's validation error (points)
    sparsity: dict[str, dict[float, float]]
    bits: dict[str, dict[int, float]]


def error_points(model: nn.Module, loader: Iterable[Any]) -> float:
    """Top-1 error in points (100 - accuracy in %)."""
    return 100.0 * (1 - accuracy(model, loader))


def _shared(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """``weight`` with its values replaced by their nearest of 2^bits k-means centroids (linear init)."""
    values = weight.detach().double().cpu().numpy().ravel()
    centroids, _ = kmeans_1d(values, 2**bits)
    return torch.from_numpy(centroids[assign(values, centroids)]).to(weight.dtype).reshape(weight.shape)


@torch.no_grad()
def sensitivity(model: nn.Module, loader: Iterable[Any], sparsities: Iterable[float] = SPARSITIES,
                bits: Iterable[int] = BITS, progress: Callable[[str], None] | None = None) -> Curves:
    """The error increase of pruning, or of sharing, each prunable layer alone (no retraining)."""
    base = error_points(model, loader)
    layers = prunable_layers(model)
    curves = Curves(base, {}, {})
    for name, layer in layers.items():
        original = layer.weight.detach().clone()
        try:
            curves.sparsity[name] = {}
            for s in sparsities:
                layer.weight.masked_fill_(original.abs() <= sparsity_threshold(original, s), 0.0)
                curves.sparsity[name][s] = error_points(model, loader) - base
                layer.weight.copy_(original)
            curves.bits[name] = {}
            for b in bits:
                layer.weight.copy_(_shared(original, b))
                curves.bits[name][b] = error_points(model, loader) - base
                layer.weight.copy_(original)
        finally:
            layer.weight.copy_(original)
        if progress:
            progress(f"sensitivity of {name}: " + ", ".join(f"{100 * s:g}% {e:+.2f}" for s, e in
                                                             curves.sparsity[name].items()))
    return curves


def settings_at(curves: Curves, tolerance: float) -> Settings:
    """Each layer's highest sparsity and fewest bits whose own error increase is at most ``tolerance``
    (none: sparsity 0, or the widest bits)."""
    sparsity = {name: max((s for s, e in by.items() if e <= tolerance), default=0.0)
                for name, by in curves.sparsity.items()}
    bits = {name: min((b for b, e in by.items() if e <= tolerance), default=max(by))
            for name, by in curves.bits.items()}
    return Settings(sparsity, bits)


def candidates(curves: Curves) -> list[tuple[float, Settings]]:
    """(tolerance, settings) for every distinct setting of the dial, from the most cautious."""
    tolerances = sorted({0.0, *(max(e, 0.0) for by in (*curves.sparsity.values(), *curves.bits.values())
                                for e in by.values())})
    found: list[tuple[float, Settings]] = []
    for t in tolerances:
        settings = settings_at(curves, t)
        if not found or settings != found[-1][1]:
            found.append((t, settings))
    return found


@dataclass
class Probe:
    tolerance: float
    settings: Settings
    error: float  # validation error of the compressed model (points)
    layer_bytes: int  # Huffman-coded bytes of the compressed layers
    epochs: int
    result: Any = field(repr=False, default=None)

    def to_dict(self) -> dict[str, Any]:
        return {"tolerance": self.tolerance, "settings": self.settings.to_dict(), "error": self.error,
                "layer_bytes": self.layer_bytes, "epochs": self.epochs}


@dataclass
class SearchResult:
    """The chosen probe (None when even the most cautious candidate missed the budget), every probe, the
    reference probe the budget is measured from, the curves (with the float model's validation error) and the
    training epochs spent (the reference's included)."""

    best: Probe | None
    probes: list[Probe]
    reference: Probe
    curves: Curves
    epochs: int

    def to_dict(self) -> dict[str, Any]:
        return {"best": None if self.best is None else self.best.to_dict(),
                "probes": [p.to_dict() for p in self.probes], "reference": self.reference.to_dict(),
                "float_error": self.curves.error, "epochs": self.epochs}


def probe_epochs(options: Mapping[str, Any]) -> int:
    """Training epochs one run of the recipe spends: rounds x retraining epochs + fine-tuning epochs."""
    return options.get("rounds", 3) * options.get("retrain_epochs", 1) + options.get("finetune_epochs", 1)


def search(model: nn.Module, train_loader: Iterable[Any], val_loader: Iterable[Any], budget: float,
           options: Mapping[str, Any] | None = None, max_epochs: int = 40,
           log: Callable[[str], None] | None = None) -> SearchResult:
    """Bisect the candidates of :func:`candidates` with full recipe runs (``options``: the other
    :class:`~lowbit.compress.pipeline.DeepCompressionConfig` fields) for the smallest compressed model whose
    validation error exceeds the reference probe's by at most ``budget`` points, within ``max_epochs``."""
    check_number(budget, "max error increase (points)", 0)
    options = dict(options or {})
    for fixed in ("sparsity", "quality", "bits", "index_bits"):
        if fixed in options:
            raise ConfigError(f"the search chooses {fixed}; do not pass it with a budget")
    cost = probe_epochs(options)
    if isinstance(max_epochs, bool) or not isinstance(max_epochs, int) or max_epochs < 2 * cost:
        raise ConfigError(f"the search needs at least {2 * cost} epochs (the reference and one probe), got "
                          f"max_epochs={max_epochs!r}")
    log = log or (lambda message: None)
    curves = sensitivity(model, val_loader, progress=log)
    found = candidates(curves)
    log(f"float validation error {curves.error:.2f}%; {len(found)} candidate settings, budget +{budget:g} points, "
        f"{cost} epochs per probe, at most {max_epochs // cost - 1} probes after the reference")
    probes: list[Probe] = []

    def run(tolerance: float, settings: Settings) -> Probe:
        config = DeepCompressionConfig(**{**options, **settings.config()})
        result = deep_compress(copy.deepcopy(model), train_loader, val_loader, config)
        error = 100.0 * (1 - result.accuracy["finetune" if "finetune" in result.accuracy else "share"])
        return Probe(tolerance, settings, error, sum(s.bytes_huffman for s in result.layers), cost, result)

    names = list(curves.sparsity)
    reference = run(-1.0, Settings({n: 0.0 for n in names}, {n: MAX_BITS for n in names}))
    log(f"reference (nothing pruned, {MAX_BITS}-bit codebooks, retrained without the slice): validation error "
        f"{reference.error:.2f}%")

    def probe_at(index: int) -> Probe:
        probe = run(*found[index])
        probes.append(probe)
        log(f"probe {len(probes)}: tolerance {probe.tolerance:.2f} -> validation error {probe.error:.2f}% "
            f"({probe.error - reference.error:+.2f}), {probe.layer_bytes} B")
        return probe

    def affordable() -> bool:
        return (len(probes) + 2) * cost <= max_epochs

    def within(probe: Probe) -> bool:
        return probe.error - reference.error <= budget

    low, high, best = 0, len(found) - 1, None  # bisect for the last candidate within budget
    while low < high and affordable():
        middle = (low + high + 1) // 2
        probe = probe_at(middle)
        if within(probe):
            best, low = probe, middle
        else:
            high = middle - 1
    if best is None and affordable():  # every probe so far missed: the most cautious candidate left
        probe = probe_at(low)
        best = probe if within(probe) else None
    epochs = cost + sum(p.epochs for p in probes)
    if best is None:
        cautious = min(probes, key=lambda p: p.tolerance) if probes else reference
        log(f"no candidate met the budget within {epochs} epochs (the most cautious one probed, tolerance "
            f"{cautious.tolerance:.2f}: {cautious.error - reference.error:+.2f} points)")
    else:
        log(f"chosen: tolerance {best.tolerance:.2f}, validation error {best.error:.2f}% "
            f"({best.error - reference.error:+.2f}), {best.layer_bytes} B; {epochs} epochs in {len(probes) + 1} runs")
    return SearchResult(best, probes, reference, curves, epochs)


def split_validation(images: torch.Tensor, labels: torch.Tensor, size: int) -> tuple[tuple, tuple]:
    """((train images, labels), (validation images, labels)): the last ``size`` examples held out."""
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size < len(images):
        raise ConfigError(f"the validation slice must hold from 1 to {len(images) - 1} training examples, "
                          f"got {size!r}")
    return (images[:-size], labels[:-size]), (images[-size:], labels[-size:])


__all__ = ["BITS", "SPARSITIES", "Curves", "Probe", "SearchResult", "Settings", "candidates", "error_points",
           "probe_epochs", "search", "sensitivity", "settings_at", "split_validation"]
