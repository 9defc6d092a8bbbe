"""Quantized recurrent layers: QuantLSTM and QuantGRU, ``nn.LSTM`` / ``nn.GRU`` whose weight matrices are quantized.

Every weight matrix (``weight_ih_l{k}`` ``[G H, I]``, ``weight_hh_l{k}`` ``[G H, H]``) gets its own weight quantizer
(built from one spec; per-channel scales are per gate row, axis 0), held in ``weight_quantizers[<name>]``; biases
stay float. The recurrence itself (gates, cell and hidden state) runs in float, the weights being the quantized ones
(weight-only quantization)::

    (output, state) = torch_rnn(x, {Q_w(W) for each weight matrix}, biases)

Activations stay float on purpose: the hidden state is produced and read at every step inside the fused
recurrence, where a per-step (dynamic) quantizer could not be written to ONNX's LSTM / GRU ops, so float
activations keep torch, the numpy recurrence (:mod:`lowbit.ops.rnn`) and ONNX computing the same function.
Bidirectional layers, ``proj_size`` and dropout between layers in train mode are refused
(:func:`lowbit.ops.rnn.check_module`, UnsupportedLayerError naming the layer).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import ConfigError
from ..ops.rnn import check_module
from ..quantizers import Encoded, Quantizer, decode, get
from .layers import STORED_ATTR, QuantizerSpec, _pass_stored_weight


class _QuantRNN:
    """The weight quantization shared by QuantLSTM and QuantGRU (a mixin before the torch class)."""

    weight_quantizers: nn.ModuleDict

    def _attach(self, weight_quantizer: QuantizerSpec, input_quantizer: QuantizerSpec,
                output_quantizer: QuantizerSpec) -> None:
        if input_quantizer is not None or output_quantizer is not None:
            raise ConfigError(f"{type(self).__name__}: the recurrence keeps its activations float (weights only "
                              "are quantized); pass input_quantizer=None and output_quantizer=None")
        check_module(self, type(self).__name__)
        device = self.weight_ih_l0.device
        quantizers = {}
        for name in self._flat_weights_names:
            if name.startswith("weight_"):
                q = get(weight_quantizer)
                if q is not None:  # one quantizer per matrix: a Quantizer given is copied, never shared
                    quantizers[name] = copy.deepcopy(q).to(device)
        self.weight_quantizers = nn.ModuleDict(quantizers)

    @property
    def weight_quantizer(self) -> Quantizer | None:
        """The quantizer of ``weight_ih_l0`` (one spec builds them all), None for a float layer."""
        return self.weight_quantizers["weight_ih_l0"] if "weight_ih_l0" in self.weight_quantizers else None

    def quantized_weights(self) -> dict:
        """Parameter name -> the weight the recurrence uses (quantized where it has a quantizer)."""
        return {name: self.weight_quantizers[name](getattr(self, name)) if name in self.weight_quantizers
                else getattr(self, name) for name in self._flat_weights_names}

    def encodings(self) -> dict[str, Encoded]:
        """Parameter name -> the codes of each quantized weight matrix (the stored ones where frozen)."""
        out = {}
        for name, q in self.weight_quantizers.items():
            stored = getattr(q, STORED_ATTR, None)
            if stored is None:
                with torch.no_grad():
                    stored = q.encode(getattr(self, name).detach())
            out[name] = stored
        return out

    def freeze(self, name: str, enc: Encoded) -> None:
        """Hold ``decode(enc)`` in weight ``name`` and pass it through its quantizer unchanged in eval mode (as
        :func:`lowbit.nn.freeze_weight` does for one-weight layers): a loaded layer computes what was saved."""
        q, weight = self.weight_quantizers[name], getattr(self, name)
        with torch.no_grad():
            weight.copy_(decode(enc).to(weight.dtype).reshape(weight.shape))
        if not getattr(q, "lowbit_freeze_hook", False):
            q.register_forward_hook(_pass_stored_weight)
            q.lowbit_freeze_hook = True
        setattr(q, STORED_ATTR, enc)

    def forward(self, input, hx=None):
        check_module(self, type(self).__name__)
        flat = self._flat_weights
        weights = self.quantized_weights()
        self._flat_weights = [weights[name] for name in self._flat_weights_names]
        try:
            return super().forward(input, hx)
        finally:
            self._flat_weights = flat

    @classmethod
    def from_float(cls, layer: nn.Module, *, weight_quantizer: QuantizerSpec = None,
                   input_quantizer: QuantizerSpec = None, output_quantizer: QuantizerSpec = None):
        """A copy of ``layer`` (its parameters, geometry, device, dtype and mode) with quantized weights."""
        check_module(layer, type(layer).__name__)
        new = cls(layer.input_size, layer.hidden_size, layer.num_layers, bias=layer.bias,
                                 batch_first=layer.batch_first, dropout=layer.dropout,
                                 device=layer.weight_ih_l0.device, dtype=layer.weight_ih_l0.dtype,
                                 weight_quantizer=weight_quantizer, input_quantizer=input_quantizer,
                                 output_quantizer=output_quantizer)
        new.load_state_dict(layer.state_dict(), strict=False)
        for name in layer._flat_weights_names:
            getattr(new, name).requires_grad_(getattr(layer, name).requires_grad)
        return new.train(layer.training)


class QuantLSTM(_QuantRNN, nn.LSTM):
    """``nn.LSTM`` (unidirectional, no projection) with per-gate-row quantized weights; activations float."""

    def __init__(self, *args, weight_quantizer: QuantizerSpec = None, input_quantizer: QuantizerSpec = None,
                 output_quantizer: QuantizerSpec = None, **kwargs) -> None:
        nn.LSTM.__init__(self, *args, **kwargs)
        self._attach(weight_quantizer, input_quantizer, output_quantizer)


class QuantGRU(_QuantRNN, nn.GRU):
    """``nn.GRU`` (unidirectional) with per-gate-row quantized weights; activations float."""

    def __init__(self, *args, weight_quantizer: QuantizerSpec = None, input_quantizer: QuantizerSpec = None,
                 output_quantizer: QuantizerSpec = None, **kwargs) -> None:
        nn.GRU.__init__(self, *args, **kwargs)
        self._attach(weight_quantizer, input_quantizer, output_quantizer)


#: the quantized recurrent layers
QUANT_RNNS = (QuantLSTM, QuantGRU)
