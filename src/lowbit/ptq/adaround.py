"""AdaRound (Nagel, Amjad, van Baalen, Louizos, Blankevoort, ICML 2020, "Up or Down? Adaptive Rounding for
Post-Training Quantization", arXiv:2004.10568): learn, layer by layer, whether each weight rounds down or up.

On the layer's uniform grid (scale s, zero point z, codes [qmin, qmax], per tensor or per output channel), fixed
once from the original weight W by the layer's own weight quantizer, a weight rounds down or up by h(V):

    W~ = s * (clip(floor(W / s) + h(V) + z, qmin, qmax) - z)
    h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1),   zeta = 1.1, gamma = -0.1

V starts where h(V) is the fractional part W / s - floor(W / s) (W~ = W inside the grid) and Adam minimises

    mean((X W~^T - Y)^2) + lambda * sum(1 - |2 h(V) - 1|^beta)

with X the layer's inputs in the model whose earlier layers are already rounded (through the layer's input
quantizer) and Y the float layer's output on the float model's inputs, without the bias (which cancels). The
regulariser is off for the first ``warmup`` fraction of the steps (the paper's 20%); after it beta anneals from
20 to 2 by AIMET's cosine, beta(t) = end + (start - end) / 2 * (1 + cos(pi (t - t0) / (T - t0))), t0 = warmup T.
At the end h(V) rounds to {0, 1}: the codes are floor(W / s) + z or one more (clipped), frozen into the layer
(:func:`lowbit.nn.freeze_weight`) with the quantizer's own ``Encoded`` parameters, so save, the Engine and the
ONNX export store them. Where AdaRound's output error on the calibration inputs ends above round-to-nearest's,
the layer keeps round-to-nearest (its result says so).

Each step is one matrix product (batched over the groups of a grouped or depthwise conv) on ``sample`` output
positions drawn afresh, without replacement, from a pool: a linear layer's input rows, or a conv's input patches
(padding included, per group), with the target outputs at the same positions. The pool is a random subset of all
calibration positions, drawn once per layer, of at most ``POOL_FLOATS`` input and target values (128 MiB of
float32), so an early high-resolution layer keeps a sample of its positions, not all of them; it never holds fewer
than ``sample`` positions, which a very wide layer pays above the cap (EfficientNet-Lite1's 1152-channel 5x5
depthwise conv: 2048 x 29,952 values, 245 MB). Besides the pool, the live activations of the quantized and the
float model (:func:`~.capture.walk`, one forward of each for all layers) stay in memory while a layer is rounded.

Defaults: lambda 0.01, beta 20 -> 2, warm-up 20% and Adam are the paper's and AIMET's. They run 10,000 steps at
Adam's default rate 1e-3; here 1,000 steps (ten times fewer, for CPU) at 1e-2: on three convs of EfficientNet-Lite1
(w4a8, 32 photo crops) 1e-2 left x0.66, x0.24, x0.64 of nearest's output error where 1e-3 left x0.77, x0.40, x0.77.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from ..errors import CalibrationError, ConfigError
from ..nn import freeze_weight
from ..quantizers import Encoded, decode
from ..quantizers.base import along
from ..quantizers.uniform import UniformQuantizer
from .capture import layer_output, select_layers, walk
from .result import LayerResult

ZETA, GAMMA = 1.1, -0.1
#: at most this many float32 values (inputs and targets) in a layer's pool of positions: 128 MiB
POOL_FLOATS = 2**25
_WORKS = "AdaRound rounds linear, conv1d and conv2d layers whose weight quantizer is 'uniform'"


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1): 0 or 1 well inside finite V, 0.5 at V = 0."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def initial_v(fraction: torch.Tensor) -> torch.Tensor:
    """V with h(V) = ``fraction`` (in [0, 1)): sigmoid(V) = (fraction - gamma) / (zeta - gamma)."""
    return torch.logit((fraction - GAMMA) / (ZETA - GAMMA))


def rounding_regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
    """sum(1 - |2h - 1|^beta): 1 per weight at h = 0.5, 0 at h in {0, 1}; larger beta flattens it near 0.5."""
    return (1 - (2 * h - 1).abs().pow(beta)).sum()


def annealed_beta(step: int, steps: int, warmup: float, beta: tuple[float, float] = (20.0, 2.0)) -> float | None:
    """beta at ``step`` of ``steps``: None during the warm-up (steps below ``warmup * steps``: no regulariser),
    then end + (start - end) / 2 * (1 + cos(pi * (step - warmup * steps) / (steps - warmup * steps)))."""
    begin = warmup * steps
    if step < begin:
        return None
    start, end = beta
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * (step - begin) / (steps - begin)))


@dataclass(frozen=True)
class _Settings:
    steps: int
    sample: int
    lambda_: float
    beta: tuple[float, float]
    warmup: float
    lr: float
    progress: bool


def _check_options(steps, sample, lambda_, beta, warmup, lr, seed, progress) -> _Settings:
    """The options as settings, or ConfigError naming the first bad one."""
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    def integer(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not integer(steps) or steps < 1:
        raise ConfigError(f"adaround steps must be a positive integer, got {steps!r}")
    if not integer(sample) or sample < 1:
        raise ConfigError(f"adaround sample (output positions per step) must be a positive integer, got {sample!r}")
    if not number(lambda_) or lambda_ < 0:
        raise ConfigError(f"adaround lambda_ (the regulariser's weight) must be a finite number >= 0, got {lambda_!r}")
    if not (isinstance(beta, (tuple, list)) and len(beta) == 2 and all(number(b) and b > 0 for b in beta)):
        raise ConfigError(f"adaround beta must be (start, end), two positive numbers such as (20, 2), got {beta!r}")
    if not number(warmup) or not 0 <= warmup <= 1:
        raise ConfigError(f"adaround warmup (fraction of steps without the regulariser) must be in [0, 1], "
                          f"got {warmup!r}")
    if not number(lr) or lr <= 0:
        raise ConfigError(f"adaround lr must be a positive number, got {lr!r}")
    if not integer(seed):
        raise ConfigError(f"adaround seed must be an integer, got {seed!r}")
    if not isinstance(progress, bool):
        raise ConfigError(f"adaround progress must be True or False, got {progress!r}")
    return _Settings(steps, sample, float(lambda_), (float(beta[0]), float(beta[1])), float(warmup), float(lr),
                     progress)


def _unsupported(layer: nn.Module) -> str | None:
    """Why AdaRound cannot round ``layer``, or None when it can."""
    if isinstance(layer, nn.ConvTranspose2d):
        return "it is a transposed conv (its outputs overlap, so positions cannot be drawn one by one)"
    quantizer = layer.weight_quantizer
    if quantizer is None:
        return "it has no weight quantizer"
    if not isinstance(quantizer, UniformQuantizer):
        return f"its weight quantizer is {quantizer.name!r}, not 'uniform'"
    return None


def _select(model: nn.Module, layers: Sequence[str] | None) -> tuple[list[tuple[str, nn.Module]], dict[str, str]]:
    """The layers to round, in run order, and the skipped ones (default ``layers`` only) with the reason."""
    return select_layers(model, layers, "adaround", _unsupported, _WORKS)


# --- output positions: a linear layer's rows, a conv's input patches ------------------------------------------


def _conv_geometry(layer: nn.Module, x: torch.Tensor):
    """(padded input [N, C, H, W], kernel, stride, dilation, output height, output width) of a conv1d/2d; a
    conv1d is a conv2d of height 1."""
    pad = layer._reversed_padding_repeated_twice
    if any(pad):
        x = F.pad(x, pad, mode="constant" if layer.padding_mode == "zeros" else layer.padding_mode)
    kernel, stride, dilation = layer.kernel_size, layer.stride, layer.dilation
    if isinstance(layer, nn.Conv1d):
        x, kernel, stride, dilation = x.unsqueeze(2), (1, *kernel), (1, *stride), (1, *dilation)
    height, width = ((size - d * (k - 1) - 1) // s + 1
                     for size, k, s, d in zip(x.shape[2:], kernel, stride, dilation))
    return x, kernel, stride, dilation, height, width


def _positions(layer: nn.Module, x: torch.Tensor) -> int:
    """Output positions of ``layer`` on input ``x`` (all samples)."""
    if isinstance(layer, nn.Linear):
        return x.numel() // x.shape[-1]
    _, _, _, _, height, width = _conv_geometry(layer, x)
    return x.shape[0] * height * width


def _input_rows(layer: nn.Module, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """What the layer multiplies at output positions ``index`` of input ``x``: [len(index), in features] (a conv:
    the patch under its kernel, padding included, flattened as the weight's [C, k...] axes)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])[index]
    x, kernel, stride, dilation, height, width = _conv_geometry(layer, x)
    sample, rest = index // (height * width), index % (height * width)
    rows = (rest // width)[:, None] * stride[0] + torch.arange(kernel[0], device=x.device) * dilation[0]
    columns = (rest % width)[:, None] * stride[1] + torch.arange(kernel[1], device=x.device) * dilation[1]
    patches = x[sample[:, None, None], :, rows[:, :, None], columns[:, None, :]]  # [P, kh, kw, C]
    return patches.permute(0, 3, 1, 2).reshape(len(index), -1)


def _output_rows(y: torch.Tensor, linear: bool, index: torch.Tensor) -> torch.Tensor:
    """The outputs ``y`` at positions ``index``: [len(index), out channels]."""
    if linear:
        return y.reshape(-1, y.shape[-1])[index]
    return y.reshape(y.shape[0], y.shape[1], -1)[index // y[0, 0].numel(), :, index % y[0, 0].numel()]


@dataclass
class _Pool:
    """Inputs [G, P, K] and float targets without bias [G, P, O / G] at P positions, per group (group-major,
    so that a step's product is one batched matmul over the groups without a copy)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    #: all calibration positions the pool was drawn from
    positions: int

    def draw(self, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` positions drawn without replacement; the whole pool when it holds no more (a mean over
        positions does not depend on their order)."""
        if count >= self.inputs.shape[1]:
            return self.inputs, self.targets
        pick = torch.randperm(self.inputs.shape[1], generator=generator)[:count].to(self.inputs.device)
        return self.inputs.index_select(1, pick), self.targets.index_select(1, pick)


def _pool(layer: nn.Module, quantized: list[torch.Tensor], floats: list[torch.Tensor], weight: torch.Tensor,
          sample: int, generator: torch.Generator) -> _Pool:
    """A random subset of all calibration positions (at most POOL_FLOATS values, at least ``sample``
    positions): the layer's quantized inputs and the float layer's outputs on the float inputs there."""
    groups, linear = getattr(layer, "groups", 1), isinstance(layer, nn.Linear)
    width = weight[0].numel() * groups + weight.shape[0]
    counts = [_positions(layer, x) for x in quantized]
    size = min(sum(counts), max(sample, POOL_FLOATS // width))
    chosen = torch.randperm(sum(counts), generator=generator)[:size].sort().values
    inputs, targets, offset = [], [], 0
    for xq, xf, count in zip(quantized, floats, counts):
        index = (chosen[(chosen >= offset) & (chosen < offset + count)] - offset).to(xq.device)
        offset += count
        if len(index):
            inputs.append(_input_rows(layer, xq, index))
            targets.append(_output_rows(layer_output(layer, xf, weight, bias=None), linear, index))
    x, y = torch.cat(inputs).float(), torch.cat(targets).float()
    return _Pool(x.reshape(size, groups, -1).transpose(0, 1).contiguous(),
                 y.reshape(size, groups, -1).transpose(0, 1).contiguous(), sum(counts))


# --- the rounding ------------------------------------------------------------------------------------------------


@dataclass
class _Rounding:
    """Soft and hard rounding of one weight on its fixed grid (the quantizer's round-to-nearest ``nearest``)."""

    nearest: Encoded
    floor: torch.Tensor  # floor(W * (1/s)), unclipped, float
    scale: torch.Tensor  # along the weight's axes
    zero_point: torch.Tensor

    @classmethod
    def of(cls, quantizer: UniformQuantizer, weight: torch.Tensor) -> _Rounding:
        with torch.no_grad():
            nearest = quantizer.encode(weight)
        axis, dim = nearest.meta["axis"], weight.dim()
        scale = along(nearest.params["scale"].float(), axis, dim)
        zero_point = along(nearest.params["zero_point"], axis, dim).float()
        floor = torch.floor(weight.float() * along(torch.reciprocal(nearest.params["scale"].float()), axis, dim))
        return cls(nearest, floor, scale, zero_point)

    def fraction(self, weight: torch.Tensor) -> torch.Tensor:
        """W * (1/s) - floor(W * (1/s)), in [0, 1)."""
        return weight.float() * torch.reciprocal(self.scale) - self.floor

    def soft(self, h: torch.Tensor) -> torch.Tensor:
        """W~ = s * (clip(floor + h + z, qmin, qmax) - z)."""
        meta = self.nearest.meta
        return self.scale * (torch.clamp(self.floor + h + self.zero_point, meta["qmin"], meta["qmax"])
                             - self.zero_point)

    def hard(self, up: torch.Tensor) -> Encoded:
        """The quantizer's Encoded with codes clip(floor + z + up, qmin, qmax)."""
        meta = self.nearest.meta
        codes = torch.clamp(self.floor + self.zero_point + up.float(), meta["qmin"], meta["qmax"]).long()
        return replace(self.nearest, codes=codes)


def _group_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [G, S, K] times each group's weight rows: [G, S, O / G]."""
    groups = x.shape[0]
    return torch.bmm(x, weight.reshape(groups, weight.shape[0] // groups, -1).transpose(1, 2))


def _optimize(name: str, rounding: _Rounding, weight: torch.Tensor, pool: _Pool, settings: _Settings,
              generator: torch.Generator) -> torch.Tensor:
    """Learn V on the pool; whether each weight rounds up (h(V) >= 0.5) at the end."""
    v = initial_v(rounding.fraction(weight)).requires_grad_()
    optimizer = torch.optim.Adam([v], lr=settings.lr)
    count = min(settings.sample, pool.inputs.shape[1])
    for step in tqdm(range(settings.steps), desc=f"adaround {name}", unit="step", leave=False,
                     disable=not settings.progress):
        x, y = pool.draw(count, generator)
        h = rectified_sigmoid(v)
        loss = (_group_product(x, rounding.soft(h)) - y).square().mean()
        beta = annealed_beta(step, settings.steps, settings.warmup, settings.beta)
        if beta is not None:
            loss = loss + settings.lambda_ * rounding_regularizer(h, beta)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return rectified_sigmoid(v) >= 0.5


def _output_mse(layer: nn.Module, quantized: list[torch.Tensor], floats: list[torch.Tensor], weight: torch.Tensor,
                candidates: Sequence[torch.Tensor]) -> list[float]:
    """Mean squared error of the layer's output on the quantized inputs with each candidate weight against the
    float layer's output on the float inputs."""
    sums, count = [0.0] * len(candidates), 0
    with torch.no_grad():
        for xq, xf in zip(quantized, floats):
            target = layer_output(layer, xf, weight)
            for i, candidate in enumerate(candidates):
                sums[i] += float((layer_output(layer, xq, candidate) - target).double().square().sum())
            count += target.numel()
    return [s / count for s in sums]


def _round_layer(name: str, layer: nn.Module, inputs: list[torch.Tensor], floats: list[torch.Tensor],
                 settings: _Settings, generator: torch.Generator) -> LayerResult:
    """AdaRound of one layer, frozen on its codes (or on round-to-nearest's where those reconstruct better)."""
    start = time.perf_counter()
    weight = layer.weight.detach().clone()
    rounding = _Rounding.of(layer.weight_quantizer, weight)
    with torch.no_grad():
        quantizer = layer.input_quantizer
        quantized = [x if quantizer is None else quantizer(x) for x in inputs]
    pool = _pool(layer, quantized, floats, weight, settings.sample, generator)
    up = _optimize(name, rounding, weight, pool, settings, generator)
    positions, pooled = pool.positions, pool.inputs.shape[1]
    del pool
    adaround = rounding.hard(up)
    nearest, learned = (decode(enc).to(weight.dtype) for enc in (rounding.nearest, adaround))
    before, after = _output_mse(layer, quantized, floats, weight, [nearest, learned])
    kept = "adaround" if after <= before else "nearest"
    freeze_weight(layer, adaround if kept == "adaround" else rounding.nearest)
    details = {"steps": settings.steps, "bits": adaround.bits, "positions": positions, "pool": pooled,
               "rounded_up": float(up.float().mean()),
               "differs_from_nearest": float((adaround.codes != rounding.nearest.codes).float().mean()),
               "kept": kept, "adaround_error": after}
    return LayerResult("adaround", name, time.perf_counter() - start, before, min(before, after), details)


#: the fewest output positions a layer must see; a step draws min(sample, positions seen)
MIN_POSITIONS = 32


def _check_positions(model: nn.Module, chosen: list[tuple[str, nn.Module]], batches: list[torch.Tensor],
                     sample: int) -> None:
    """CalibrationError unless every chosen layer sees at least ``sample`` output positions in ``batches``
    (found from one forward of one image, before any layer changes)."""
    per_image: dict[str, int] = {}

    def count(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            per_image.setdefault(name, _positions(module, args[0][:1]))
        return hook

    hooks = [layer.register_forward_pre_hook(count(name)) for name, layer in chosen]
    try:
        with torch.no_grad():
            model(batches[0][:1])
    finally:
        for hook in hooks:
            hook.remove()
    images = sum(len(batch) for batch in batches)
    for name, _ in chosen:
        if name not in per_image:
            raise CalibrationError(f"adaround: layer {name!r} received no input from the calibration batches")
        if per_image[name] * images < sample:
            raise CalibrationError(
                f"adaround: layer {name!r} has {per_image[name]} output position(s) per image, so {images} "
                f"calibration image(s) give {per_image[name] * images}, fewer than the {sample} each step draws; "
                f"it needs at least {math.ceil(sample / per_image[name])} images (or a smaller sample)")


def adaround(model: nn.Module, batches: Sequence[torch.Tensor], *, steps: int = 1000, sample: int = 2048,
             lambda_: float = 0.01, beta: tuple[float, float] = (20.0, 2.0), warmup: float = 0.2, lr: float = 1e-2,
             seed: int = 0, layers: Sequence[str] | None = None, progress: bool = False) -> list[LayerResult]:
    """Round the weights of ``model``'s quantized layers with AdaRound, layer by layer in run order (module
    docstring), on the calibration ``batches`` (input tensors; activation ranges already calibrated).

    Each layer learns its rounding for ``steps`` Adam steps (rate ``lr``) on ``sample`` output positions per step,
    with the regulariser's weight ``lambda_``, its exponent annealed over ``beta`` = (start, end) after a warm-up of
    ``warmup`` of the steps, and is frozen on its codes; ``seed`` fixes every draw. ``layers`` restricts it to those
    paths (UnsupportedLayerError for one whose weight quantizer is not uniform, none, or a transposed conv); by
    default every quantized layer, skipping those, each listed by a LayerResult whose ``details["skipped"]`` says
    why. A layer with fewer than ``sample`` output positions in ``batches`` is a CalibrationError naming how many
    images it needs (checked for every layer before any is changed). Returns one LayerResult per layer: seconds,
    the layer output MSE on the calibration inputs of round-to-nearest (``error_before``) and of the frozen weight
    (``error_after``), and details: steps, bits, positions and pool size, the fraction of weights rounded up and
    of codes that differ from round-to-nearest, and which rounding was ``kept`` (``"nearest"`` where AdaRound's
    error, ``adaround_error``, came out higher).
    """
    settings = _check_options(steps, sample, lambda_, beta, warmup, lr, seed, progress)
    batches = list(batches)
    if not batches:
        raise CalibrationError("adaround needs at least one calibration batch")
    chosen, skipped = _select(model, layers)
    results = [LayerResult("adaround", name, 0.0, details={"skipped": reason}) for name, reason in skipped.items()]
    training = model.training
    model.eval()
    try:
        _check_positions(model, chosen, batches, min(sample, MIN_POSITIONS))
        bar = tqdm(total=len(chosen), desc="adaround", unit="layer", disable=not progress)
        order = {name: index for index, (name, _) in enumerate(chosen)}

        def visit(name: str, layer: nn.Module, inputs: list[torch.Tensor], floats: list[torch.Tensor]) -> None:
            generator = torch.Generator().manual_seed(seed + order[name])
            results.append(_round_layer(name, layer, inputs, floats, settings, generator))
            bar.update()

        with bar:
            walk(model, batches, chosen, visit)
    finally:
        model.train(training)
    return results
