"""Post-training methods that keep low-bit models near float without retraining, one file each.

A config's ``ptq`` list names them; they run in this order whatever the list's order:

1. ``"cle"``: cross-layer equalization with high-bias absorption (:mod:`.equalize`), data-free, run by
   :func:`lowbit.quantize` right after batch norm is folded;
2. activation ranges, observed by :func:`lowbit.calibrate`;
3. ``"adaround"`` (:mod:`.adaround`) or ``"gptq"`` (:mod:`.gptq`): the weights' rounding, layer by layer on
   the calibration batches; each rounded layer is frozen (:func:`lowbit.nn.freeze_weight`), so its codes are
   what save, the Engine and the ONNX export store;
4. ``"bias"``: empirical bias correction (:mod:`.bias_correction`), removing the mean output shift that
   quantization leaves.

``ptq_options`` maps a method to keyword options of its function (``{"adaround": {"steps": 500}}``).
Every method returns one :class:`~.result.LayerResult` per layer it changed.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .result import LayerResult

#: method name -> (module, function); the order is the order they run in
METHODS: dict[str, tuple[str, str]] = {
    "cle": ("equalize", "equalize"),
    "adaround": ("adaround", "adaround"),
    "gptq": ("gptq", "gptq"),
    "bias": ("bias_correction", "correct_bias"),
}
#: the methods that need calibration batches (run by lowbit.calibrate)
DATA_METHODS = ("adaround", "gptq", "bias")
#: model attribute holding the per-layer results of the data methods once they ran (a loaded model: empty)
PTQ_ATTR = "lowbit_ptq"
#: arguments every method takes from the pipeline, not from ptq_options
_PIPELINE_ARGS = ("model", "batches", "progress", "reference")


def method(name: str) -> Callable[..., list[LayerResult]]:
    """The function of method ``name``."""
    module, function = METHODS[name]
    return getattr(importlib.import_module(f".{module}", __name__), function)


def _options(name: str) -> tuple[str, ...]:
    """The keyword options method ``name`` accepts."""
    parameters = inspect.signature(method(name)).parameters
    return tuple(p for p in parameters if p not in _PIPELINE_ARGS)


def check_methods(methods: Any, options: Any) -> None:
    """Raise ConfigError unless ``methods`` is a list of distinct method names (at most one of adaround and
    gptq) and ``options`` maps listed methods to dicts of options their functions take."""
    if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
        raise ConfigError(f"config ptq must be a list of method names from {', '.join(METHODS)}, got {methods!r}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown ptq method(s) {', '.join(map(repr, unknown))}; valid: {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"config ptq names a method twice: {methods!r}")
    if {"adaround", "gptq"} <= set(methods):
        raise ConfigError("config ptq names both adaround and gptq; both choose the weights' rounding: pick one")
    if not isinstance(options, dict):
        raise ConfigError(f"config ptq_options must be a dict of method -> options, got {type(options).__name__}")
    for name, given in options.items():
        if name not in methods:
            raise ConfigError(f"ptq_options has options for {name!r}, which config ptq does not list ({methods})")
        if not isinstance(given, dict):
            raise ConfigError(f"ptq_options[{name!r}] must be a dict of options, got {type(given).__name__}")
        valid = _options(name)
        wrong = sorted(set(given) - set(valid))
        if wrong:
            raise ConfigError(f"ptq_options[{name!r}] has unknown option(s) {', '.join(map(repr, wrong))}; "
                              f"valid: {', '.join(valid)}")


def ordered(methods: Sequence[str], among: Sequence[str] = tuple(METHODS)) -> list[str]:
    """The listed methods that are in ``among``, in the order they run."""
    return [m for m in METHODS if m in methods and m in among]


def summarize(results: Sequence[LayerResult]) -> list[str]:
    """One line per method: layers changed, seconds, and the ratio of the layer-output error after the method to
    the error before it (round-to-nearest for rounding methods; geometric mean over layers) where measured."""
    lines = []
    changed = [r for r in results if "skipped" not in r.details]
    for name in dict.fromkeys(r.method for r in changed):
        rows = [r for r in changed if r.method == name]
        line = f"{name}: {len(rows)} layer(s), {sum(r.seconds for r in rows):.1f} s"
        ratios = [r.error_after / r.error_before for r in rows
                  if r.error_before and r.error_after is not None and r.error_before > 0]
        if ratios:
            mean = math.exp(sum(math.log(max(x, 1e-30)) for x in ratios) / len(ratios))
            line += f", layer output error after / before x{mean:.3f} (geometric mean over layers)"
        lines.append(line)
    return lines


def run(model: nn.Module, batches: Sequence[torch.Tensor], methods: Sequence[str],
        options: dict[str, dict[str, Any]] | None = None, progress: bool = False) -> list[LayerResult]:
    """Apply the data methods among ``methods`` (adaround / gptq, then bias) to the calibrated ``model`` on
    ``batches``; the results of all of them, in the order they ran."""
    check_methods(list(methods), dict(options or {}))
    results: list[LayerResult] = []
    steps = ordered(methods, DATA_METHODS)
    # bias correction after rounding compares with the float weights, which rounding overwrites: keep a copy
    reference = copy.deepcopy(model) if "bias" in steps and len(steps) > 1 else None
    for name in steps:
        extra = {"reference": reference} if name == "bias" and reference is not None else {}
        results += method(name)(model, list(batches), progress=progress, **extra, **(options or {}).get(name, {}))
    return results
