"""An accuracy budget for post-training quantization: raise the most sensitive layers to 8 bits until the
quantized model is within ``max_drop`` points of float on a held-out slice.

The drop, in percentage points, is ``100 * (acc_float - acc_quantized)`` with labels, else
``100 * (1 - agreement)``, the share of examples whose top-1 class differs from the float model's.

1. The model quantized with the config as given is measured; within the budget, nothing changes.
2. Layers are ranked by their sensitivity table (:func:`~.sensitivity.measure_sensitivity`, Zhou et al.
   2018): the logit noise power when that layer alone is quantized at the config's weight bits (and input
   bits), every other layer float. The noisier a layer alone, the earlier it is raised.
3. Raising the k most sensitive layers to the "8bit" policy (8-bit per-channel weights, 8-bit inputs), the
   smallest k that meets the budget is found by bisection over k, each step a full quantize + calibrate
   (with the config's post-training methods), so the drop reported is measured, not predicted. Bisection
   assumes the drop does not grow with k; the k returned is always one that was measured within budget.

If even every ranked layer at 8 bits misses the budget, a CalibrationError says how close it came.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..api import QuantReport, calibrate, quantize_report
from ..config import EIGHT_BIT, LayerRule, QuantConfig, as_config
from ..errors import CalibrationError, ConfigError
from .sensitivity import measure_sensitivity


@dataclass
class BudgetResult:
    """The config that meets the budget, its quantized model and how it was found.

    ``raised``: (layer, logit noise when quantized alone) of the layers kept at 8 bits, most sensitive first;
    ``trials``: (k layers raised, measured drop) in the order measured; ``metric``: "accuracy" or
    "agreement" (no labels).
    """

    config: QuantConfig
    report: QuantReport
    metric: str
    float_score: float
    score: float
    max_drop: float
    raised: list[tuple[str, float]] = field(default_factory=list)
    trials: list[tuple[int, float]] = field(default_factory=list)

    @property
    def model(self) -> nn.Module:
        """The quantized, calibrated model that meets the budget."""
        return self.report.model

    @property
    def drop(self) -> float:
        """The measured drop of the returned model, in points."""
        return 100 * (self.float_score - self.score)

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "float": self.float_score, "quantized": self.score, "drop": self.drop,
                "max_drop": self.max_drop, "raised": [{"layer": n, "logit_mse": s} for n, s in self.raised],
                "trials": [{"raised": k, "drop": d} for k, d in self.trials]}

    def __str__(self) -> str:
        what = "accuracy" if self.metric == "accuracy" else "top-1 agreement with float"
        lines = [f"{what}: float {100 * self.float_score:.2f}%, quantized {100 * self.score:.2f}% "
                 f"(drop {self.drop:.2f} points, budget {self.max_drop:g}); "
                 f"{len(self.raised)} layer(s) raised to 8 bits after {len(self.trials)} measurement(s)"]
        lines += [f"  raised {name}: logit noise {noise:.4g} when quantized alone" for name, noise in self.raised]
        return "\n".join(lines)


def _uniform_bits(spec: Any, slot: str) -> int | None:
    """The bit width of a uniform spec (None for a float slot); ConfigError for other quantizers."""
    if spec is None:
        return None
    name, bits = (spec, 8) if isinstance(spec, str) else (spec.get("name"), spec.get("bits", 8))
    if name != "uniform":
        raise ConfigError(f"the accuracy budget ranks layers by uniform quantization sensitivity; the config's "
                          f"{slot} quantizer is {name!r}: use a uniform preset such as w4a8 or w4a8-ptq")
    return bits


def _exact(name: str) -> str:
    """An fnmatch pattern matching exactly ``name``."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def with_raised(config: QuantConfig, layers: Sequence[str]) -> QuantConfig:
    """``config`` with ``layers`` at the "8bit" policy, ahead of its own rules."""
    rules = [LayerRule(pattern=_exact(name), **EIGHT_BIT) for name in layers]
    return QuantConfig.from_dict({**config.to_dict(), "rules": [r.to_dict() for r in rules + config.rules]})


def fit_budget(model: nn.Module, config: Any, batches: Sequence[torch.Tensor], images: torch.Tensor,
               labels: torch.Tensor | None = None, max_drop: float = 0.5, progress: bool = False,
               example_input: torch.Tensor | None = None, observer: str | None = None) -> BudgetResult:
    """Quantize the float ``model`` with ``config`` (calibrated on ``batches``) keeping the most sensitive layers
    at 8 bits until the drop on ``images`` (``labels``, or agreement with float without them) is at most
    ``max_drop`` points; see the module docstring. ``example_input`` lets the report measure MACs; ``observer``
    replaces the static ranges' observer."""
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not 0 <= max_drop < 100:
        raise ConfigError(f"max_drop is a number of percentage points in [0, 100), got {max_drop!r}")
    config = as_config(config)
    weight_bits, input_bits = _uniform_bits(config.weight, "weight"), _uniform_bits(config.input, "input")
    model = model.eval()
    with torch.no_grad():
        reference = model(images).argmax(1)
    targets = reference if labels is None else labels
    float_score = float((reference == targets).double().mean())

    def score_of(quantized: nn.Module) -> float:
        with torch.no_grad():
            return float((quantized.eval()(images).argmax(1) == targets).double().mean())

    def measured(raised: Sequence[str]) -> tuple[QuantReport, float, QuantConfig]:
        trial = with_raised(config, raised)
        report = quantize_report(model, trial, example_input=example_input)
        calibrate(report.model, batches, observer, progress=progress)
        return report, score_of(report.model), trial

    def result(raised: Sequence[str], noise: dict[str, float], run: tuple[QuantReport, float, QuantConfig],
               trials: list[tuple[int, float]]) -> BudgetResult:
        return BudgetResult(config=run[2], report=run[0], metric="accuracy" if labels is not None else "agreement",
                            float_score=float_score, score=run[1], max_drop=float(max_drop),
                            raised=[(n, noise[n]) for n in raised], trials=trials)

    def within(score: float) -> bool:
        return 100 * (float_score - score) <= max_drop + 1e-9

    first = measured([])
    trials = [(0, 100 * (float_score - first[1]))]
    if within(first[1]):
        return result([], {}, first, trials)
    table = measure_sensitivity(model, images, targets, bits=[weight_bits or 32], act_bits=input_bits)
    noise = {row.layer: row.logit_mse for row in table.rows}
    ranked = sorted(noise, key=lambda n: -noise[n])
    runs = {0: first}
    low, high = 0, len(ranked)
    with tqdm(total=max(1, len(ranked)).bit_length(), desc="accuracy budget", disable=not progress) as bar:
        runs[high] = measured(ranked)
        trials.append((high, 100 * (float_score - runs[high][1])))
        if not within(runs[high][1]):
            raise CalibrationError(
                f"no allocation meets a drop of {max_drop:g} points: with all {high} ranked layers at 8 bits the "
                f"drop is {trials[-1][1]:.2f} points; allow a larger --max-drop, use more calibration data or a "
                "post-training preset (w4a8-ptq), or quantize at more bits")
        while high - low > 1:
            middle = (low + high) // 2
            runs[middle] = measured(ranked[:middle])
            trials.append((middle, 100 * (float_score - runs[middle][1])))
            low, high = (low, middle) if within(runs[middle][1]) else (middle, high)
            bar.update()
    return result(ranked[:high], noise, runs[high], trials)
