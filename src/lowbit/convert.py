"""Conversion: :func:`quantize` swaps a model's ``nn.Linear`` / ``nn.Conv2d`` layers for quantized ones.

:func:`quantize` swaps the ``nn.Linear`` / ``nn.Conv2d`` layers of any module tree for
:class:`~lowbit.nn.QuantLinear` / :class:`~lowbit.nn.QuantConv2d` as a config says (see
:mod:`lowbit.config`) and returns the model; :func:`quantize_report` does the same and also returns
what it did. Layers it cannot convert (modules that own parameters and are neither Linear/Conv2d, nor a
norm layer kept float on purpose, nor already quantized) stay float and are never skipped silently: a
warning lists them, ``QuantReport.unsupported`` holds them, and ``strict=True`` raises
UnsupportedLayerError instead. Re-exported by :mod:`lowbit.api`; :mod:`lowbit.serialize` uses it to
rebuild a stored model from its float architecture.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .config import QuantConfig, as_config
from .errors import UnsupportedLayerError
from .nn import QuantAct, QuantConv2d, QuantLinear, label_quantizers, named_modules_without_quantizers

__all__ = ["CONVERTIBLE", "KEPT_FLOAT", "QuantReport", "quantize", "quantize_report"]


#: the float layers quantize converts, and the class each becomes (exact types: subclasses are not converted)
CONVERTIBLE: dict[type[nn.Module], type[nn.Module]] = {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d}
#: layers with parameters that stay float on purpose (normalisation is folded or kept float at inference)
KEPT_FLOAT = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LayerNorm, nn.GroupNorm)


@dataclass
class QuantReport:
    """What :func:`quantize_report` did: the model, the layers converted, those left float by the
    config (first/last policy "float" or a skip rule), the unsupported layers as (name, type), and the
    config rules (pattern or layer type) that match no layer, which a warning names."""

    model: nn.Module
    converted: list[str] = field(default_factory=list)
    kept_float: list[str] = field(default_factory=list)
    unsupported: list[tuple[str, str]] = field(default_factory=list)
    unmatched_rules: list[str] = field(default_factory=list)


def _unsupported(modules: list[tuple[str, nn.Module]]) -> list[tuple[str, str]]:
    handled = (*KEPT_FLOAT, QuantLinear, QuantConv2d, QuantAct)
    def owns_parameters(m: nn.Module) -> bool:
        return next(m.parameters(recurse=False), None) is not None

    return [
        (name, type(m).__name__)
        for name, m in modules
        if type(m) not in CONVERTIBLE and not isinstance(m, handled) and owns_parameters(m)
    ]


def _replace(model: nn.Module, replacements: dict[int, nn.Module]) -> nn.Module:
    """Put each replacement wherever its original is registered (shared modules included)."""
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                setattr(parent, child_name, replacements[id(child)])
    return replacements.get(id(model), model)


def _convert(model: nn.Module, config: str | dict[str, Any] | QuantConfig, inplace: bool, strict: bool) -> QuantReport:
    cfg = as_config(config)
    modules = named_modules_without_quantizers(model)
    report = QuantReport(model=model, unsupported=_unsupported(modules))
    if report.unsupported and strict:
        raise UnsupportedLayerError(f"cannot quantize {_listing(report)}; lowbit converts nn.Linear and nn.Conv2d")
    if not inplace:
        model = copy.deepcopy(model)
        modules = named_modules_without_quantizers(model)
    layers = [(name, m) for name, m in modules if type(m) in CONVERTIBLE]
    replacements: dict[int, nn.Module] = {}
    for index, (name, layer) in enumerate(layers):
        specs = cfg.layer_specs(name, layer, first=index == 0, last=index == len(layers) - 1)
        if specs is None:
            report.kept_float.append(name)
            continue
        quantizers = {f"{slot}_quantizer": spec for slot, spec in specs.items()}
        replacements[id(layer)] = CONVERTIBLE[type(layer)].from_float(layer, **quantizers)
        report.converted.append(name)
    if not any(isinstance(m, (QuantLinear, QuantConv2d)) for _, m in modules):  # re-quantizing: rules name those
        report.unmatched_rules = [r.pattern or r.layer_type for r in cfg.rules
                                  if not any(r.matches(name, layer) for name, layer in layers)]
    report.model = _replace(model, replacements)
    label_quantizers(report.model)
    return report


def _listing(report: QuantReport) -> str:
    return ", ".join(f"{name or '(model)'} ({kind})" for name, kind in report.unsupported)


def _warn_unsupported(report: QuantReport) -> None:
    if report.unsupported:
        count = len(report.unsupported)
        message = f"lowbit.quantize left {count} layer(s) float that it cannot convert: {_listing(report)}"
        warnings.warn(message, UserWarning, stacklevel=3)  # points at the caller of quantize / quantize_report
    if report.unmatched_rules:
        layers = ", ".join([*report.converted, *report.kept_float]) or "none"
        message = (f"lowbit.quantize: config rule(s) {report.unmatched_rules} match no Linear/Conv2d layer of the "
                   f"model (a typo?); its layers: {layers}")
        warnings.warn(message, UserWarning, stacklevel=3)


def quantize_report(
    model: nn.Module, config: str | dict[str, Any] | QuantConfig, inplace: bool = False, strict: bool = False
) -> QuantReport:
    """Convert ``model``'s Linear/Conv2d layers as ``config`` (preset name, dict or QuantConfig) says.

    The first and last layers are the first and last exact ``nn.Linear`` /
    ``nn.Conv2d`` in ``model.named_modules()`` order (registration order).
    Layers that are already QuantLinear/QuantConv2d are left as they are.
    With ``inplace=False`` the model is deep-copied first. Quantizer labels
    are set to the tensor names (``features.0.weight``, ``features.0.input``).
    Unsupported layers raise UnsupportedLayerError when ``strict`` (before
    anything is changed), else a warning lists them.
    """
    report = _convert(model, config, inplace, strict)
    _warn_unsupported(report)
    return report


def quantize(
    model: nn.Module, config: str | dict[str, Any] | QuantConfig, inplace: bool = False, strict: bool = False
) -> nn.Module:
    """:func:`quantize_report` returning the converted model alone."""
    report = _convert(model, config, inplace, strict)
    _warn_unsupported(report)
    return report.model
