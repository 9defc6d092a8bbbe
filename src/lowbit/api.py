"""The top-level torch API: quantize a model, calibrate it, summarise it, save and load it.

- :func:`quantize` (:mod:`lowbit.convert`) swaps the ``nn.Linear`` / ``nn.Conv2d`` layers of any module
  tree for :class:`~lowbit.nn.QuantLinear` / :class:`~lowbit.nn.QuantConv2d`
  as a config says (see :mod:`lowbit.config`) and returns the model;
  :func:`quantize_report` does the same and also returns what it did.
- Layers it cannot convert (modules that own parameters and are neither
  Linear/Conv2d, nor a norm layer kept float on purpose, nor already
  quantized: ``nn.Conv1d``, ``nn.LSTM``, ``nn.Embedding``, ...) stay float and
  are never skipped silently: a warning lists them, ``QuantReport.unsupported``
  holds them, and ``strict=True`` raises UnsupportedLayerError instead.
- :func:`calibrate` runs data through the model so static quantizers observe
  their ranges.
- :func:`save`, :func:`load` and :func:`load_state_dict` write and read
  ``.lowbit`` files (defined in :mod:`lowbit.serialize`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .analysis.summary import Summary, summary
from .convert import QUANTIZED_WITH_ATTR, QuantReport, quantize, quantize_report
from .errors import CalibrationError, LowbitError, ShapeMismatchError
from .ptq import DATA_METHODS, PTQ_ATTR, check_methods, ordered
from .ptq import run as run_methods
from .ptq.capture import quantizers_off
from .quantizers import Quantizer
from .quantizers.base import check_finite
from .quantizers.observers import check_observer
from .serialize import load, load_state_dict, save

__all__ = [
    "QuantReport",
    "Summary",
    "calibrate",
    "load",
    "load_state_dict",
    "quantize",
    "quantize_report",
    "save",
    "summary",
]

def _batch_inputs(batch: Any, index: int, dtype: torch.dtype | None, tokens: bool = False) -> torch.Tensor:
    """A batch is a tensor, or a (inputs, targets, ...) tuple/list whose first item is fed to the model;
    its values must be of ``dtype`` (the model's parameters') when given, else floating point; int64 token
    indices where the model reads them (``tokens``: it has an embedding)."""
    inputs = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if not isinstance(inputs, torch.Tensor):
        raise CalibrationError(
            f"calibration batch {index} is a {type(batch).__name__}; expected a tensor or an (inputs, targets) pair"
        )
    if tokens and inputs.dtype == torch.int64:
        return inputs
    if not (inputs.dtype == dtype if dtype is not None else inputs.is_floating_point()):
        def name(dtype: torch.dtype) -> str:
            return str(dtype).removeprefix("torch.")

        wanted, convert = ("floating-point", ".float()") if dtype is None else (name(dtype), f".to({dtype})")
        if tokens:
            wanted, convert = f"int64 token indices or {wanted}", ".long() for tokens"
        raise CalibrationError(f"calibration batch {index} holds {name(inputs.dtype)} values; the model takes "
                               f"{wanted} inputs (convert them with {convert})")
    check_finite(inputs, f"calibration batch {index}")
    return inputs


def _failing_layer(model: nn.Module, inputs: torch.Tensor) -> nn.Module | None:
    """The innermost layer (not a quantizer) running when ``model(inputs)`` raises a RuntimeError, found by running
    the batch again, quantizers off (so no observer counts it twice), with a hook on every module; None if it
    runs through then."""
    running: list[nn.Module] = []

    def enter(module: nn.Module, args: Any) -> None:
        running.append(module)

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        running.pop()

    hooks = [handle for module in model.modules() if not isinstance(module, Quantizer)
             for handle in (module.register_forward_pre_hook(enter), module.register_forward_hook(leave))]
    try:
        with quantizers_off(model):
            model(inputs)
    except RuntimeError:
        return running[-1] if running else model
    finally:
        for handle in hooks:
            handle.remove()
    return None


def _run_batch(model: nn.Module, inputs: torch.Tensor, index: int) -> None:
    """``model(inputs)``; a torch error (wrong shape) becomes a ShapeMismatchError naming the innermost layer
    that was running (located only then, so that calibration runs without hooks)."""
    try:
        model(inputs)
    except RuntimeError as exc:
        if isinstance(exc, (LowbitError, torch.cuda.OutOfMemoryError)):
            raise
        layer = _failing_layer(model, inputs) or model
        names = {module: name for name, module in model.named_modules()}
        where = f"layer {names[layer]!r}" if names[layer] else "the model"
        takes = (f" of {layer.in_features} input features" if isinstance(layer, nn.Linear) else
                 f" of {layer.in_channels} input channel(s)" if isinstance(layer, nn.modules.conv._ConvNd) else "")
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ShapeMismatchError(f"calibration batch {index} of shape {list(inputs.shape)} does not fit {where} "
                                 f"({type(layer).__name__}{takes}): {reason}") from None


def _data_methods(model: nn.Module, methods: Sequence[str] | None) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """The post-training data methods to run after the ranges, and their options: ``methods`` if given, else the
    ones the model's config lists unless they already ran (on this model, or before it was saved)."""
    config = (getattr(model, QUANTIZED_WITH_ATTR, None) or {}).get("config", {})
    options = config.get("ptq_options", {})
    if methods is None:
        methods = [] if getattr(model, PTQ_ATTR, None) is not None else config.get("ptq", [])
    check_methods(list(methods), {name: o for name, o in options.items() if name in methods})
    return ordered(methods, DATA_METHODS), options


def calibrate(model: nn.Module, batches: Iterable[Any], observer: str | None = None, *,
              ptq: Sequence[str] | None = None, progress: bool = False) -> nn.Module:
    """Let every quantizer with a ``calibrating`` attribute observe ``batches``, then apply the post-training
    data methods; returns ``model``.

    Sets ``calibrating = True``, runs each batch in eval mode under
    ``torch.no_grad``, then sets ``calibrating = False``, calls each quantizer's
    ``finish_calibration()`` where it has one (histogram observers set their range
    there) and restores each module's train/eval mode. While calibrating, static
    quantizers with a histogram observer pass their input through unchanged (min/max
    ones quantize with the range seen so far). ``observer``
    ("minmax", "percentile", "mse", "entropy") replaces the observer of every
    static quantizer (``dynamic`` False).
    Raises CalibrationError for no batches, a batch that is not a tensor of
    the parameters' dtype or holds NaN/Inf (naming its index), or a static
    quantizer that observed nothing (naming its tensor); ShapeMismatchError
    for a batch the model cannot run, naming the layer it failed in;
    ConfigError for an unknown observer, or entropy on a per-channel quantizer.
    Records the input shape of one example as ``model.lowbit_input_shape``
    (batch 1), which :func:`save` uses to capture the graph.

    Then the post-training data methods (:mod:`lowbit.ptq`: adaround or gptq, then bias) named by ``ptq``, or
    by the config the model was quantized with (its ``ptq`` list, ``ptq_options``) when ``ptq`` is None and
    they have not run on it yet, run on the same batches; their per-layer results are kept in
    ``model.lowbit_ptq``. ``progress`` shows their progress bars.
    """
    methods, options = _data_methods(model, ptq)
    kept: list[torch.Tensor] = []
    calibrated = [q for q in model.modules() if isinstance(q, Quantizer) and hasattr(q, "calibrating")]
    static = [q for q in calibrated if hasattr(q, "observed") and not getattr(q, "dynamic", False)]
    if observer is not None:
        check_observer(observer)
        for q in static:
            if hasattr(q, "observer"):
                q.observer = observer
    modes = [(m, m.training) for m in model.modules()]
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    tokens = any(isinstance(m, nn.Embedding) for m in model.modules())
    count = 0
    try:
        model.eval()
        for q in calibrated:
            q.calibrating = True
        with torch.no_grad():
            for index, batch in enumerate(batches):
                inputs = _batch_inputs(batch, index, dtype, tokens)
                _run_batch(model, inputs, index)
                count += 1
                if methods:
                    kept.append(inputs)
    finally:
        for q in calibrated:
            q.calibrating = False
        for module, training in modes:
            module.training = training
        for q in calibrated:
            if hasattr(q, "finish_calibration"):
                q.finish_calibration()
    if count == 0:
        raise CalibrationError("calibration got no batches; pass a non-empty iterable of input tensors")
    model.lowbit_input_shape = (1, *inputs.shape[1:])
    missed = [q.where() for q in static if not q.observed]
    if missed:
        listed = ", ".join(missed)
        raise CalibrationError(f"calibration never reached {listed}; feed data that runs through these layers")
    if methods:
        setattr(model, PTQ_ATTR, run_methods(model, kept, methods, options, progress))
    return model
