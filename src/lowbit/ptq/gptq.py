"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, ICLR 2023, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", arXiv:2210.17323): round a layer's weight a column at a time and let the
columns not yet rounded absorb each rounding error, as Optimal Brain Quantization does.

For a layer y = W x with inputs X (one column per sample; for a conv, the unfolded input patches, per group) the
output error of a rounded weight Q is ||W X - Q X||^2 = tr((W - Q) H (W - Q)^T) N / 2 with

    H = 2 X X^T / N  (+ damp * mean(diag H) on the diagonal).

Rounding column q of W to the grid and updating the columns after it by

    W[:, q+1:] -= (w_q - quant(w_q)) / [H^-1]_qq * [H^-1]_{q, q+1:}

minimises that error over the remaining columns. With U the upper Cholesky factor of H^-1, the rows of U hold
exactly these updates for every step (the paper's Algorithm 1); updates inside a block of ``block_size`` columns
are applied at once, the block's errors reach the later columns in one matrix product (lazy batch updates).
``act_order`` rounds the columns in decreasing diag(H) and undoes the permutation at the end; an input that is
always zero (H_qq = 0) gets H_qq = 1 and its weight column 0, as the paper's implementation does.

The grid (scale and zero point, per tensor, channel or group of columns, log2's fsr, the k-means codebook, or each
group's binary, ternary, power-of-two or k-means levels) is fixed once from the original weight by the layer's own
weight quantizer (:mod:`.grid`; the groups of the group-wise quantizers are static, their parameters those of the
original weight), so each column rounds to its nearest representable value in its own group, with act-order too.
All of GPTQ's arithmetic (H, its inverse Cholesky factor, the weight being updated) is float64; the rounding is the
grid's own (uniform: the quantizer's float32 ``w * (1/s)``) and the values are its exactly decoded float32 ones.
Each layer ends frozen on its codes (:func:`lowbit.nn.freeze_weight`).

Depthwise and other grouped convs get one Hessian per group (a depthwise conv: one [k, k] Hessian per channel),
rounded together as a batch. Transposed convs fall back to round-to-nearest on the same grid (the result says so).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from ..errors import CalibrationError, ConfigError
from ..nn import freeze_weight
from ..quantizers import decode
from ..quantizers.kmeans import KMeansQuantizer
from .capture import layer_output, select_layers, walk
from .grid import GRID_QUANTIZERS, FixedGrid, fixed_grid
from .result import LayerResult

#: at most this many input elements times kernel taps are unfolded at once (float64 patches of 128 MiB)
_UNFOLD_LIMIT = 2**24
#: a Hessian that is not positive definite is damped again with 10x more, up to this relative damping
_MAX_DAMP = 1.0


def _unsupported(layer: nn.Module) -> str | None:
    """Why GPTQ cannot round ``layer``'s weight, or None when it can."""
    if isinstance(layer, nn.Embedding):
        return "it is a lookup table: its inputs are token indices, with no products to reconstruct"
    quantizer = layer.weight_quantizer
    if quantizer is None:
        return "it has no weight quantizer"
    if quantizer.name not in GRID_QUANTIZERS:
        return f"its weight quantizer {quantizer.name!r} has no fixed grid"
    return None


def _select(model: nn.Module, layers: Sequence[str] | None) -> tuple[list[tuple[str, nn.Module]], dict[str, str]]:
    """The layers to round, in run order, and the skipped ones (default ``layers`` only) with the reason."""
    works = f"GPTQ rounds weights of quantizers {', '.join(GRID_QUANTIZERS)}"
    return select_layers(model, layers, "gptq", _unsupported, works)


def _check_options(block_size: int, damp: float, act_order: bool) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ConfigError(f"gptq block_size must be a positive integer, got {block_size!r}")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 <= damp <= _MAX_DAMP:
        raise ConfigError(f"gptq damp (a fraction of the mean Hessian diagonal) must be in [0, {_MAX_DAMP}], "
                          f"got {damp!r}")
    if not isinstance(act_order, bool):
        raise ConfigError(f"gptq act_order must be True or False, got {act_order!r}")


def _patches(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's inputs as columns, per group: [groups, in_features per group, samples] (a conv: the patches
    its kernel sees, padding included, in the order of the weight's flattened [C / groups, k...] axes)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1]).T.unsqueeze(0)
    pad = layer._reversed_padding_repeated_twice
    if any(pad):
        x = F.pad(x, pad, mode="constant" if layer.padding_mode == "zeros" else layer.padding_mode)
    kernel, stride, dilation = layer.kernel_size, layer.stride, layer.dilation
    if isinstance(layer, nn.Conv1d):
        x, kernel, stride, dilation = x.unsqueeze(2), (1, *kernel), (1, *stride), (1, *dilation)
    columns = F.unfold(x, kernel, dilation=dilation, stride=stride)
    n, _, positions = columns.shape
    return columns.reshape(n, layer.groups, -1, positions).permute(1, 2, 0, 3).reshape(layer.groups, -1, n * positions)


def layer_hessian(layer: nn.Module, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(H, N): H = 2 X X^T / N per group, float64 [groups, K, K], from the layer's (quantized) inputs."""
    hessian, samples = None, 0
    taps = math.prod(getattr(layer, "kernel_size", (1,)))
    for x in inputs:
        chunk = max(1, _UNFOLD_LIMIT * len(x) // max(1, x.numel() * taps))
        for part in x.split(chunk):
            columns = _patches(layer, part).double()
            product = columns @ columns.transpose(1, 2)
            hessian = product if hessian is None else hessian + product
            samples += columns.shape[-1]
    if not samples:
        raise CalibrationError(f"{layer.weight_quantizer.where() if layer.weight_quantizer else 'a layer'}: "
                               "its calibration inputs are empty")
    return hessian * (2 / samples), samples


def _inverse_cholesky(hessian: torch.Tensor, damp: float, name: str) -> tuple[torch.Tensor, float]:
    """(U, damp used): U upper triangular with U^T U = (H + damp mean(diag H) I)^-1 per group; a Hessian that
    is not positive definite is damped again with 10 times more, up to ``_MAX_DAMP``."""
    mean_diagonal = hessian.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None]
    eye = torch.eye(hessian.shape[-1], dtype=hessian.dtype, device=hessian.device)
    while True:
        lower, info = torch.linalg.cholesky_ex(hessian + damp * mean_diagonal * eye)
        if not info.any():
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if not info.any():
                return upper, damp
        if damp >= _MAX_DAMP:
            raise CalibrationError(f"gptq: the Hessian of layer {name!r} is not positive definite even with "
                                   f"damp {damp}; calibrate with more or more varied batches")
        damp = min(max(10 * damp, 1e-6), _MAX_DAMP)


def _round_columns(weight: torch.Tensor, upper: torch.Tensor, grid: FixedGrid, block_size: int,
                   order: torch.Tensor) -> torch.Tensor:
    """The paper's Algorithm 1 on ``weight`` [G, R, K] (float64, updated in place) with U [G, K, K], whose column
    j is the weight's column ``order[:, j]``: the grid index of every rounded entry."""
    groups, rows, columns = weight.shape
    index = torch.empty(weight.shape, dtype=torch.long, device=weight.device)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block, block_upper = weight[:, :, start:end], upper[:, start:end, start:end]
        errors = torch.empty_like(block)
        for j in range(end - start):
            column = block[:, :, j:j + 1]
            index[:, :, start + j:start + j + 1], rounded = grid.nearest(column, order[:, start + j:start + j + 1])
            error = (column - rounded) / block_upper[:, j, j].reshape(groups, 1, 1)
            block[:, :, j:] -= error * block_upper[:, j:j + 1, j:]
            errors[:, :, j:j + 1] = error
        weight[:, :, end:] -= errors @ upper[:, start:end, end:]
    return index


def gptq_rows(weight: torch.Tensor, hessian: torch.Tensor, grid: FixedGrid, *, block_size: int = 128,
              damp: float = 0.01, act_order: bool = False, name: str = "") -> tuple[torch.Tensor, dict]:
    """GPTQ of ``weight`` viewed as [groups, rows, columns] against H [groups, columns, columns]: the grid index
    of each entry (same layout) and details (damp used, dead columns)."""
    weight, hessian = weight.double().clone(), hessian.double().clone()
    diagonal = hessian.diagonal(dim1=-2, dim2=-1)
    dead = diagonal == 0
    diagonal[dead] = 1.0
    weight.masked_fill_(dead[:, None, :], 0.0)
    order = torch.arange(weight.shape[-1], device=weight.device).expand(weight.shape[0], -1)
    if act_order:
        order = torch.argsort(diagonal, dim=-1, descending=True, stable=True)
        weight = weight.gather(2, order[:, None, :].expand_as(weight))
        rows = order[:, :, None].expand_as(hessian)
        hessian = hessian.gather(1, rows).gather(2, rows.transpose(1, 2))
    upper, damp_used = _inverse_cholesky(hessian, damp, name)
    index = _round_columns(weight, upper, grid, block_size, order)
    if act_order:
        index = index.gather(2, torch.argsort(order, dim=-1)[:, None, :].expand_as(index))
    return index, {"damp": damp_used, "dead_columns": int(dead.sum())}


def _output_mse(layer: nn.Module, inputs: Sequence[torch.Tensor], reference: torch.Tensor,
                weights: Sequence[torch.Tensor]) -> list[float]:
    """Mean squared difference of the layer's output with each of ``weights`` against ``reference``'s."""
    sums, count = [0.0] * len(weights), 0
    for x in inputs:
        target = layer_output(layer, x, reference)
        for i, w in enumerate(weights):
            sums[i] += float((layer_output(layer, x, w) - target).double().square().sum())
        count += target.numel()
    return [s / count for s in sums]


def _round_layer(name: str, layer: nn.Module, inputs: list[torch.Tensor], block_size: int, damp: float,
                 act_order: bool, start: float) -> LayerResult:
    """GPTQ (or the fallback) of one layer on its quantized inputs, frozen on its codes; ``start``: when its
    inputs reached it."""
    weight = layer.weight.detach().clone()
    grid = fixed_grid(layer.weight_quantizer, weight)
    if isinstance(layer, nn.ConvTranspose2d):
        rtn = grid.nearest(weight)[0]
        enc = grid.encoded(rtn)
        details = {"fallback": "round to nearest: GPTQ's columns are not worked out for transposed convs"}
    else:
        groups = getattr(layer, "groups", 1)
        matrix = weight.reshape(groups, weight.shape[0] // groups, -1)
        hessian, samples = layer_hessian(layer, inputs)
        rows_grid = grid.by_rows(groups)
        rtn = rows_grid.nearest(matrix.double())[0].reshape(weight.shape)
        index, found = gptq_rows(matrix, hessian, rows_grid, block_size=block_size, damp=damp, act_order=act_order,
                                 name=name)
        enc = grid.encoded(index.reshape(weight.shape))
        details = {"columns": matrix.shape[-1], "groups": groups, "samples": samples, **found,
                   "act_order": act_order, "block_size": block_size, "fallback": None}
    freeze_weight(layer, enc)
    if isinstance(layer.weight_quantizer, KMeansQuantizer):  # its indices follow the codes (as a loaded layer's)
        layer.weight_quantizer.indices = enc.codes.clone()
    before, after = _output_mse(layer, inputs, weight, [decode(grid.encoded(rtn)).to(weight.dtype), layer.weight])
    return LayerResult("gptq", name, time.perf_counter() - start, before, after,
                       {"codec": enc.kind, "bits": enc.bits, **details})


def gptq(model: nn.Module, batches: Sequence[torch.Tensor], *, block_size: int = 128, damp: float = 0.01,
         act_order: bool = False, layers: Sequence[str] | None = None, progress: bool = False) -> list[LayerResult]:
    """Round the weights of ``model``'s quantized layers with GPTQ, layer by layer in run order, on ``batches``.

    Each layer's inputs come from the model as it is then (earlier layers already rounded and frozen), through
    the layer's input quantizer (activation ranges must be calibrated). ``layers`` restricts it to those paths
    (UnsupportedLayerError for one whose weight quantizer has no fixed grid, or none); by default every quantized
    layer, skipping the unsupported ones, each listed with a LayerResult whose ``details["skipped"]`` says why.
    ``damp`` is the fraction of the mean Hessian diagonal added to it (raised 10x at a time when H is still not
    positive definite; the result records the damp used). Returns one LayerResult per layer: seconds, the layer
    output MSE of round-to-nearest on the same grid (``error_before``) and of GPTQ (``error_after``) against the
    float weight on the same inputs, and details (columns per group, groups, samples, damp, dead columns, any
    fallback).
    """
    _check_options(block_size, damp, act_order)
    batches = list(batches)
    if not batches:
        raise CalibrationError("gptq needs at least one calibration batch")
    chosen, skipped = _select(model, layers)
    results = [LayerResult("gptq", name, 0.0, details={"skipped": reason}) for name, reason in skipped.items()]
    bar = tqdm(total=len(chosen), desc="gptq", unit="layer", disable=not progress)

    def visit(name: str, layer: nn.Module, captured: list[torch.Tensor], _) -> None:
        start = time.perf_counter()
        with torch.no_grad():
            quantizer = layer.input_quantizer
            inputs = [x if quantizer is None else quantizer(x) for x in captured]
            results.append(_round_layer(name, layer, inputs, block_size, damp, act_order, start))
        bar.update()

    with bar:
        walk(model, batches, chosen, visit, floats=False)
    return results
