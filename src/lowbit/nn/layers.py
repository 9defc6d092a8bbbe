"""Quantized drop-in layers: QuantLinear, QuantConv1d, QuantConv2d, QuantConvTranspose2d, QuantEmbedding and
QuantAct.

``QuantLinear``, ``QuantConv1d``, ``QuantConv2d`` and ``QuantConvTranspose2d``
subclass the torch layers and keep their constructor signatures; the quantizers come as keyword-only arguments (each a
spec accepted by :func:`lowbit.quantizers.get`, a Quantizer or None)::

    y = Q_out( layer(Q_in(x), Q_w(W), b) )

A quantizer that is None is the identity, so with all three None a layer
computes exactly what its torch layer computes (same operation, bit for bit)
and has the same parameters and state_dict keys. Quantizer state (observed
ranges, step sizes, codebooks) appears under ``weight_quantizer.*``,
``input_quantizer.*`` and ``output_quantizer.*``. Biases stay float.

Per-channel weight scales follow the output channel: axis 0 of a linear or
conv weight ``[O, C / groups, k...]``, axis 1 of a transposed conv weight
``[C, O / groups, kh, kw]`` (see :class:`QuantConvTranspose2d`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError
from ..quantizers import Encoded, Quantizer, decode, get
from ..quantizers.uniform import UniformQuantizer

QuantizerSpec = str | dict[str, Any] | Quantizer | None

#: the quantizer slots of a quantized layer, and the suffix of each one's label
QUANTIZER_SLOTS = {"weight_quantizer": "weight", "input_quantizer": "input", "output_quantizer": "output"}


def _quantize(quantizer: Quantizer | None, x: torch.Tensor) -> torch.Tensor:
    return x if quantizer is None else quantizer(x)


def _attach(layer: nn.Module, *specs: QuantizerSpec) -> None:
    """Build the weight, input and output specs and register each as a (possibly None) child of
    ``layer``, on the layer's device."""
    device = layer.weight.device
    for slot, spec in zip(QUANTIZER_SLOTS, specs):
        quantizer = get(spec)
        layer.register_module(slot, None)
        if quantizer is not None:
            setattr(layer, slot, quantizer.to(device))  # through the layer's __setattr__, which may check it


class QuantLinear(nn.Linear):
    """``nn.Linear`` with optional weight, input and output quantizers.

    ``y = Q_out(Q_in(x) Q_w(W)^T + b)``.
    """

    weight_quantizer: Quantizer | None
    input_quantizer: Quantizer | None
    output_quantizer: Quantizer | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        weight_quantizer: QuantizerSpec = None,
        input_quantizer: QuantizerSpec = None,
        output_quantizer: QuantizerSpec = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        _attach(self, weight_quantizer, input_quantizer, output_quantizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = _quantize(self.weight_quantizer, self.weight)
        y = F.linear(_quantize(self.input_quantizer, x), weight, self.bias)
        return _quantize(self.output_quantizer, y)

    @classmethod
    def from_float(
        cls,
        layer: nn.Linear,
        *,
        weight_quantizer: QuantizerSpec = None,
        input_quantizer: QuantizerSpec = None,
        output_quantizer: QuantizerSpec = None,
    ) -> QuantLinear:
        """A QuantLinear with a copy of ``layer``'s weight and bias, its device, dtype and train/eval mode."""
        new = nn.utils.skip_init(
            cls, layer.in_features, layer.out_features, layer.bias is not None,
            device=layer.weight.device, dtype=layer.weight.dtype,
        )
        return _finish_from_float(new, layer, weight_quantizer, input_quantizer, output_quantizer)


class _QuantConv:
    """Forward and ``from_float`` of a (non-transposed) quantized conv, before its torch conv class in the bases."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = _quantize(self.weight_quantizer, self.weight)
        y = self._conv_forward(_quantize(self.input_quantizer, x), weight, self.bias)
        return _quantize(self.output_quantizer, y)

    @classmethod
    def from_float(cls, layer: nn.modules.conv._ConvNd, *, weight_quantizer: QuantizerSpec = None,
                   input_quantizer: QuantizerSpec = None, output_quantizer: QuantizerSpec = None):
        """A quantized conv with a copy of ``layer``'s weight and bias, its geometry, device, dtype and mode."""
        new = nn.utils.skip_init(
            cls, layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
            layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode,
            device=layer.weight.device, dtype=layer.weight.dtype,
        )
        return _finish_from_float(new, layer, weight_quantizer, input_quantizer, output_quantizer)


class QuantConv2d(_QuantConv, nn.Conv2d):
    """``nn.Conv2d`` with optional weight, input and output quantizers.

    ``y = Q_out(conv2d(Q_in(x), Q_w(W)) + b)``; padding (any ``padding_mode``)
    is applied to the quantized input, as torch pads the float input.
    """

    weight_quantizer: Quantizer | None
    input_quantizer: Quantizer | None
    output_quantizer: Quantizer | None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        weight_quantizer: QuantizerSpec = None,
        input_quantizer: QuantizerSpec = None,
        output_quantizer: QuantizerSpec = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype
        )
        _attach(self, weight_quantizer, input_quantizer, output_quantizer)


class QuantConv1d(_QuantConv, nn.Conv1d):
    """``nn.Conv1d`` with optional weight, input and output quantizers.

    ``y = Q_out(conv1d(Q_in(x), Q_w(W)) + b)`` on NCL input, weight ``[O, C / groups, k]``; padding (any
    ``padding_mode``) is applied to the quantized input, as torch pads the float input. Per-channel weight
    scales lie along axis 0, the output channel.
    """

    weight_quantizer: Quantizer | None
    input_quantizer: Quantizer | None
    output_quantizer: Quantizer | None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int],
        stride: int | tuple[int] = 1,
        padding: str | int | tuple[int] = 0,
        dilation: int | tuple[int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        weight_quantizer: QuantizerSpec = None,
        input_quantizer: QuantizerSpec = None,
        output_quantizer: QuantizerSpec = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype
        )
        _attach(self, weight_quantizer, input_quantizer, output_quantizer)


def _along_output_channels(quantizer: Quantizer) -> None:
    """Make a transposed conv's per-channel weight quantizer keep one scale per output channel (weight axis 1):
    uniform's scales move to axis 1; quantizers whose per-channel scales are fixed on axis 0 (lsq and ternary
    with ``per_channel``, xnor weights) would keep them per input channel and raise ConfigError."""
    spec = quantizer.spec()
    if spec["name"] in ("lsq", "ternary") and spec.get("per_channel") or \
            spec["name"] == "xnor" and spec.get("role") == "weight":
        raise ConfigError(f"QuantConvTranspose2d: weight quantizer {spec['name']!r} keeps one scale per index of "
                          "the weight's axis 0, which is a transposed conv's input channel; use a per-tensor "
                          "quantizer, or uniform (its per-channel scales follow the output channel, axis 1)")
    if isinstance(quantizer, UniformQuantizer) and quantizer.per_channel:
        quantizer.axis = 1


class QuantConvTranspose2d(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` with optional weight, input and output quantizers.

    ``y = Q_out(conv_transpose2d(Q_in(x), Q_w(W)) + b)``, weight ``[C_in, C_out / groups, kh, kw]``; like torch's,
    ``forward(x, output_size)`` may pick the output padding from a size.

    Per-channel weight scales follow the output channel, axis 1 of the weight: a per-channel ``uniform`` weight
    quantizer given to this layer (at construction or assigned later) is set to quantize along axis 1, so its
    codes are stored, loaded, run by the Engine and exported to ONNX (DequantizeLinear ``axis=1``) with
    ``C_out / groups`` scales; with ``groups > 1`` scale j serves the output channels j, j + C_out / groups, ...
    (the same weight slice of every group). Quantizers whose per-channel scales are fixed on axis 0 (``lsq`` and
    ``ternary`` with ``per_channel=True``, ``xnor`` weights), which would give one scale per input channel, are
    refused with a ConfigError; per-tensor quantizers work as on any layer.
    """

    weight_quantizer: Quantizer | None
    input_quantizer: Quantizer | None
    output_quantizer: Quantizer | None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        output_padding: int | tuple[int, int] = 0,
        groups: int = 1,
        bias: bool = True,
        dilation: int | tuple[int, int] = 1,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        weight_quantizer: QuantizerSpec = None,
        input_quantizer: QuantizerSpec = None,
        output_quantizer: QuantizerSpec = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias, dilation,
            padding_mode, device, dtype,
        )
        _attach(self, weight_quantizer, input_quantizer, output_quantizer)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "weight_quantizer" and isinstance(value, Quantizer):
            _along_output_channels(value)
        super().__setattr__(name, value)

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if self.padding_mode != "zeros":
            raise ValueError("Only `zeros` padding mode is supported for ConvTranspose2d")
        output_padding = self._output_padding(
            x, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation  # type: ignore[arg-type]
        )
        weight = _quantize(self.weight_quantizer, self.weight)
        y = F.conv_transpose2d(_quantize(self.input_quantizer, x), weight, self.bias, self.stride, self.padding,
                               output_padding, self.groups, self.dilation)
        return _quantize(self.output_quantizer, y)

    @classmethod
    def from_float(
        cls,
        layer: nn.ConvTranspose2d,
        *,
        weight_quantizer: QuantizerSpec = None,
        input_quantizer: QuantizerSpec = None,
        output_quantizer: QuantizerSpec = None,
    ) -> QuantConvTranspose2d:
        """A QuantConvTranspose2d with a copy of ``layer``'s weight and bias, its geometry, device, dtype and
        mode."""
        new = nn.utils.skip_init(
            cls, layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
            layer.output_padding, layer.groups, layer.bias is not None, layer.dilation, layer.padding_mode,
            device=layer.weight.device, dtype=layer.weight.dtype,
        )
        return _finish_from_float(new, layer, weight_quantizer, input_quantizer, output_quantizer)


class QuantEmbedding(nn.Embedding):
    """``nn.Embedding`` with optional weight and output quantizers: ``y = Q_out(Q_w(W)[x])``.

    The input is integer token indices, so ``input_quantizer`` is always None (a slot kept so that every quantized
    layer has the same three). Per-channel weight scales are per row (axis 0, one embedding vector). ``max_norm``
    (which renormalizes the weight in place on every call) is refused with a ConfigError.
    """

    weight_quantizer: Quantizer | None
    input_quantizer: None
    output_quantizer: Quantizer | None

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 max_norm: float | None = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                 sparse: bool = False, _weight: torch.Tensor | None = None, _freeze: bool = False, device=None,
                 dtype=None, *, weight_quantizer: QuantizerSpec = None, input_quantizer: QuantizerSpec = None,
                 output_quantizer: QuantizerSpec = None) -> None:
        if max_norm is not None:
            raise ConfigError("QuantEmbedding: max_norm renormalizes the weight in place on every call, which a "
                              "quantized weight cannot follow; leave it None")
        if input_quantizer is not None:
            raise ConfigError("QuantEmbedding: the input is integer token indices, which take no input quantizer")
        super().__init__(num_embeddings, embedding_dim, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse,
                         _weight, _freeze, device, dtype)
        _attach(self, weight_quantizer, None, output_quantizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = _quantize(self.weight_quantizer, self.weight)
        y = F.embedding(x, weight, self.padding_idx, None, self.norm_type, self.scale_grad_by_freq, self.sparse)
        return _quantize(self.output_quantizer, y)

    @classmethod
    def from_float(cls, layer: nn.Embedding, *, weight_quantizer: QuantizerSpec = None,
                   input_quantizer: QuantizerSpec = None, output_quantizer: QuantizerSpec = None) -> QuantEmbedding:
        """A QuantEmbedding with a copy of ``layer``'s weight, its padding index, device, dtype and mode."""
        new = nn.utils.skip_init(cls, layer.num_embeddings, layer.embedding_dim, layer.padding_idx,
                                 layer.max_norm, layer.norm_type, layer.scale_grad_by_freq, layer.sparse,
                                 device=layer.weight.device, dtype=layer.weight.dtype)
        return _finish_from_float(new, layer, weight_quantizer, input_quantizer, output_quantizer)


#: the quantized layers (a weight, an input and an output quantizer slot)
QUANT_LAYERS = (QuantLinear, QuantConv1d, QuantConv2d, QuantConvTranspose2d, QuantEmbedding)


#: weight-quantizer attribute holding the stored Encoded of a frozen weight (loaded, or rounded by a PTQ method)
STORED_ATTR = "lowbit_stored"


def _pass_stored_weight(quantizer: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
    """Forward hook of a frozen weight quantizer: return the stored (already quantized) weight in eval mode;
    the first training-mode call unfreezes it for good."""
    if quantizer.training:
        setattr(quantizer, STORED_ATTR, None)
        return None
    return args[0] if getattr(quantizer, STORED_ATTR, None) is not None else None


def freeze_weight(layer: nn.Module, enc: Encoded) -> None:
    """Make ``layer`` hold the weight ``decode(enc)`` and its quantizer the codes ``enc``.

    In eval mode the weight quantizer then passes the weight through unchanged (it is already on the grid),
    and save, the Engine and ONNX export store ``enc`` as it is, so codes chosen by a rounding method
    (AdaRound, GPTQ) or read from a file survive bit for bit. Training unfreezes the layer for good.
    """
    quantizer = layer.weight_quantizer
    with torch.no_grad():
        layer.weight.copy_(decode(enc).to(layer.weight.dtype).reshape(layer.weight.shape))
    if not getattr(quantizer, "lowbit_freeze_hook", False):
        quantizer.register_forward_hook(_pass_stored_weight)
        quantizer.lowbit_freeze_hook = True
    setattr(quantizer, STORED_ATTR, enc)


def _finish_from_float(new, layer: nn.Module, *specs: QuantizerSpec):
    """Copy weight and bias (values and requires_grad) into ``new``, attach the quantizers, copy the mode."""
    with torch.no_grad():
        for name in ("weight", "bias"):
            source = getattr(layer, name, None)
            if source is not None:
                target = getattr(new, name)
                target.copy_(source)
                target.requires_grad_(source.requires_grad)
    _attach(new, *specs)
    return new.train(layer.training)


class QuantAct(nn.Module):
    """Quantizes a tensor on its own (an activation between layers): ``y = Q(x)``; the identity if None."""

    quantizer: Quantizer | None

    def __init__(self, quantizer: QuantizerSpec = None) -> None:
        super().__init__()
        self.register_module("quantizer", get(quantizer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _quantize(self.quantizer, x)


def label_quantizers(model: nn.Module) -> None:
    """Set every quantizer's ``label`` to the tensor it serves: ``<layer>.weight``, ``<layer>.input``,
    ``<layer>.output`` for the layers of :data:`QUANT_LAYERS`, and the module's own name for QuantAct."""
    for name, module in model.named_modules():
        if isinstance(module, QUANT_LAYERS):
            for slot, suffix in QUANTIZER_SLOTS.items():
                quantizer = getattr(module, slot)
                if quantizer is not None:
                    quantizer.label = f"{name}.{suffix}" if name else suffix
        elif isinstance(module, QuantAct) and module.quantizer is not None:
            module.quantizer.label = name or "input"


def named_modules_without_quantizers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model.named_modules()`` (registration order) without the quantizers and the modules inside them."""
    inside = {id(m) for q in model.modules() if isinstance(q, Quantizer) for m in q.modules()}
    return [(name, m) for name, m in model.named_modules() if id(m) not in inside]
