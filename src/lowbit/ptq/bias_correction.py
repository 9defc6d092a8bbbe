"""Bias correction (Nagel et al., ICCV 2019, "Data-Free Quantization Through Weight Equalization and Bias
Correction", Section 4.3): remove the mean shift that quantization adds to each layer's output.

A quantized layer computes ``y~ = W~ x~ + b`` where the float model computes ``y = W x + b``; its error has a mean
``E[y - y~]`` per output channel that the next layers see as a bias shift (large for depthwise convs and low bit
widths). Adding it to ``b`` removes it.

- :func:`correct_bias` (empirical): ``E[y - y~]`` over calibration batches, ``y`` from the float model
  (:func:`~.capture.quantizers_off`, original biases) on its own inputs, ``y~`` from the quantized model on its
  inputs, through the layer's input quantizer and with its quantized weight, both before any output quantizer.
  Layer by layer in run order, so each layer's ``y~`` sees the corrections of the layers before it: the two
  models run side by side through the graph, node by node, and each layer is corrected when both reach it (one
  forward of each, not one per layer). Covers every error source (weight, input and upstream quantization).
- :func:`correct_bias_analytic` (data-free, the paper's variant): ``E[y - y~] = -(W~ - W) E[x]`` for the weight
  error alone, with ``E[x]`` from the batch norm folded into the layer before, whose output per channel is taken
  as ``N(mu, sigma^2)`` (``mu = beta``, ``sigma = |gamma|``, recorded by the fold: :data:`.equalize.FOLDED_BATCHNORM`)
  and then clipped: ``E[relu(N(mu, sigma^2))] = mu Phi(mu / sigma) + sigma phi(mu / sigma)``,
  ``E[clip(N, 0, t)] = g(mu) - g(mu - t)`` with ``g`` that ReLU mean, ``E[N] = mu`` through no activation
  (through a clip that equalization kept exact, ``clip(s x, 0, t) / s``, in the clip's own units). Averaging and
  flattening keep the mean; zero padding is ignored, as in the paper.

A layer without a bias gets one (zeros, then the correction): ``lowbit.save`` stores it like any bias. Once a
rounding method has frozen a layer (:func:`lowbit.nn.freeze_weight`) its float weight is gone: pass the float
model as ``reference`` (a deep copy taken before rounding).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
from torch import fx, nn
from tqdm import tqdm

from ..errors import CalibrationError, ConfigError
from ..nn import STORED_ATTR
from .capture import layer_output, quantized_layers, walk
from .equalize import FOLDED_BATCHNORM, Link, input_shift, input_view, links
from .result import LayerResult

__all__ = ["clipped_normal_mean", "correct_bias", "correct_bias_analytic", "relu_normal_mean"]


def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _channel_axis(layer: nn.Module) -> int:
    return -1 if isinstance(layer, nn.Linear) else 1


def _frozen(layer: nn.Module) -> bool:
    return getattr(layer.weight_quantizer, STORED_ATTR, None) is not None


def _ensure_bias(layer: nn.Module) -> None:
    """Give a layer without a bias a zero one (a parameter, so save, load and the exports carry it)."""
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(_out_channels(layer), dtype=layer.weight.dtype,
                                              device=layer.weight.device))


def _quantized_weight(layer: nn.Module) -> torch.Tensor:
    return layer.weight_quantizer(layer.weight)


def _per_channel(y: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(sum, sum of squares) per channel along ``axis`` in float64, and the values per channel."""
    y = y.double().movedim(axis, -1).reshape(-1, y.shape[axis])
    return y.sum(0), y.square().sum(0), y.shape[0]


def correct_bias(model: fx.GraphModule, batches: Sequence[torch.Tensor], *, reference: fx.GraphModule | None = None,
                 progress: bool = False) -> list[LayerResult]:
    """Empirical bias correction of every quantized layer of ``model`` in run order, in place (module docstring).

    ``batches``: calibration inputs (activation ranges already calibrated). ``reference``: the float model, a copy
    of ``model`` taken before its weights were rounded (default: ``model`` itself with its quantizers off and its
    original biases), needed once layers are frozen on rounded codes. The float and the quantized model run side
    by side through the graph (:func:`~.capture.walk`), so each layer is corrected before the quantized values go
    past it and the cost is about one forward of each. Returns one result per layer: ``error_before`` /
    ``error_after``, the mean squared error of the layer output against the float one on the batches before and
    after the correction, and details ``mean_shift`` / ``max_shift`` (mean and largest |correction|),
    ``bias_added`` (the layer had none). CalibrationError for no batches, a frozen layer without ``reference``, or
    a reference without one of the layers.
    """
    if not isinstance(model, fx.GraphModule) or reference is not None and not isinstance(reference, fx.GraphModule):
        raise ConfigError("correct_bias works on the fx.GraphModule lowbit.quantize returns (and a copy of it as "
                          f"reference), got {type(model).__name__}")
    batches = list(batches)
    if not batches:
        raise CalibrationError("correct_bias needs at least one calibration batch")
    layers = quantized_layers(model)
    for name, layer in layers:
        if reference is None and _frozen(layer):
            raise CalibrationError(f"correct_bias: layer {name!r} is frozen on rounded codes, so its float weight is "
                                   "gone; pass reference=<a copy of the model taken before rounding>")
        if reference is not None and not isinstance(_submodule(reference, name), type(layer)):
            raise CalibrationError(f"correct_bias: the reference model has no layer {name!r}")
    float_layers = {name: _submodule(model if reference is None else reference, name) for name, _ in layers}
    results = []
    bar = tqdm(total=len(layers), desc="bias correction", unit="layer", disable=not progress)

    def visit(name: str, layer: nn.Module, inputs: list[torch.Tensor], float_inputs: list[torch.Tensor]) -> None:
        with torch.no_grad():
            results.append(_correct(name, layer, float_layers[name], float_inputs, inputs))
        bar.update()

    with bar:
        walk(model, batches, layers, visit, reference=reference)
    return results


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _correct(name: str, layer: nn.Module, float_layer: nn.Module, float_inputs: list[torch.Tensor],
             quantized_inputs: list[torch.Tensor]) -> LayerResult:
    """Add ``E[y - y~]`` over the batches to the layer's bias; its result."""
    start = time.perf_counter()
    axis = _channel_axis(layer)
    weight = _quantized_weight(layer)
    total = squares = None
    count = 0
    for x_float, x in zip(float_inputs, quantized_inputs):
        x = x if layer.input_quantizer is None else layer.input_quantizer(x)
        error = layer_output(float_layer, x_float, bias=False) - layer_output(layer, x, weight, bias=False)
        s, q, n = _per_channel(error, axis)
        total, squares = (s, q) if total is None else (total + s, squares + q)
        count += n
    shift = total / count
    before = float(squares.sum()) / (count * total.numel())
    added = layer.bias is None
    _ensure_bias(layer)
    layer.bias += shift.to(layer.bias.dtype)
    # E[(d - m)^2] = E[d^2] - m^2 per channel, every channel holding as many values
    after = max(before - float(shift.square().mean()), 0.0)
    return LayerResult("bias", name, time.perf_counter() - start, before, after,
                       {"mean_shift": float(shift.abs().mean()), "max_shift": float(shift.abs().max()),
                        "bias_added": added})


# ---------------------------------------------------------------------------------------- the analytic variant


def relu_normal_mean(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``E[relu(X)]`` for ``X ~ N(mean, std^2)``: ``mean Phi(mean / std) + std phi(mean / std)`` (``relu(mean)``
    where std is 0)."""
    std = std.abs()
    z = mean / torch.where(std > 0, std, 1)
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return torch.where(std > 0, mean * cdf + std * pdf, mean.clamp(min=0))


def clipped_normal_mean(mean: torch.Tensor, std: torch.Tensor, top: float) -> torch.Tensor:
    """``E[clip(X, 0, top)]`` for ``X ~ N(mean, std^2)``: ``E[relu(X)] - E[relu(X - top)]``."""
    return relu_normal_mean(mean, std) - relu_normal_mean(mean - top, std)


#: ops between two layers that keep the per-channel mean of what passes through them (zero padding aside)
_MEAN_KEEPING = ("quant_act", "identity", "flatten", "mean", "avgpool2d", "adaptive_avgpool2d", "upsample", "pad")


def _expected_input(link: Link, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor | None:
    """``E[x]`` per channel at layer 2's input given layer 1's output ``N(mean, std^2)``: through at most one
    ReLU or clip(0, t) and ops that keep means; None otherwise."""
    activations = [k for k in link.kinds if k not in _MEAN_KEEPING and k != "clip_scale"]
    if len(activations) > 1 or activations and not (activations[0] == "relu" or link.clips):
        return None
    if not activations:
        return mean
    if link.clips:  # clip(s x, 0, t) / s where an equalization kept the clip exact
        scale = torch.ones_like(mean) if link.clip_scale is None else link.clip_scale.to(mean.dtype)
        if scale.shape != mean.shape:
            return None
        return clipped_normal_mean(mean * scale, std * scale, link.top) / scale
    return relu_normal_mean(mean, std)


def correct_bias_analytic(model: fx.GraphModule, *, progress: bool = False) -> list[LayerResult]:
    """Data-free bias correction of the weight error (module docstring), in place: ``b -= (W~ - W) E[x]`` for each
    quantized layer whose input comes from a layer with a folded batch norm through ReLU, ReLU6, averaging or
    nothing. Returns one result per corrected layer (details ``mean_shift``, ``max_shift``, ``source``: the layer
    whose statistics gave ``E[x]``); layers without such a source are left alone. CalibrationError for a frozen
    layer (its float weight is gone: correct before rounding)."""
    if not isinstance(model, fx.GraphModule):
        raise ConfigError(f"correct_bias_analytic works on the fx.GraphModule lowbit.quantize returns, got "
                          f"{type(model).__name__}")
    statistics = model.meta.get(FOLDED_BATCHNORM, {})
    sites = [node.target for node in model.graph.nodes if node.op == "call_module"]
    feeding = {link.second: link for link in links(model, exclusive=False) if sites.count(link.second) == 1}
    results = []
    training = model.training
    try:
        model.eval()
        for name, layer in tqdm(quantized_layers(model), desc="bias correction", unit="layer", disable=not progress):
            if _frozen(layer):
                raise CalibrationError(f"correct_bias_analytic: layer {name!r} is frozen on rounded codes, so its "
                                       "float weight is gone; correct the bias before rounding")
            start = time.perf_counter()
            link = feeding.get(name)
            if link is None or link.first not in statistics or isinstance(layer, nn.ConvTranspose2d):
                continue
            expected = _expected_input(link, *statistics[link.first])
            if expected is None:
                continue
            with torch.no_grad():
                error = (_quantized_weight(layer) - layer.weight).double()
                shift = -_input_shift(error, layer, link.block, expected)
                _ensure_bias(layer)
                layer.bias += shift.to(layer.bias.dtype)
            results.append(LayerResult("bias-analytic", name, time.perf_counter() - start, details={
                "mean_shift": float(shift.abs().mean()), "max_shift": float(shift.abs().max()), "source": link.first}))
    finally:
        model.train(training)
    return results


def _input_shift(weight_error: torch.Tensor, layer: nn.Module, block: int, expected: torch.Tensor) -> torch.Tensor:
    view = input_view(weight_error.contiguous(), getattr(layer, "groups", 1), block)
    return input_shift(view, expected.double())
