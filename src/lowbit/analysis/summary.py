"""Per-layer summary of a (quantized) model: bits, parameters, storage bytes, MACs, compression.

One row per ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.ConvTranspose2d``
(quantized or not), in module registration order. Byte rule (storage as the quantizers encode it):

- weights: ``ceil(n * bits / 8)`` for the codes, where ``bits`` is the
  quantizer's ``bits`` (the ``Encoded.bits`` of ``encode(weight)`` when it has
  one), plus every tensor in the encoded ``params`` at its dtype size (scales
  float32, zero-points int64, codebooks float32), except a ``sign`` plane
  (signed log codes), counted at 1 bit per value, and group-wise zero points
  (``group_affine``), at the codes' bits as stored; a float weight (no
  quantizer, or ``bits`` None) is 4 bytes per value;
- biases: 4 bytes per value (they stay float32);
- input/output quantizers: their state_dict tensors (observed ranges, step
  sizes) at their dtype size;
- other parameters (norm layers and any module that is not a row, quantizers
  excluded): 4 bytes per value, shown as one ``(other)`` row.

Compression = float32 bytes of all parameters / total bytes. MACs come from
forward hooks during one eval-mode pass of ``example_input``:
``output.numel() * in_features`` for Linear,
``output.numel() * in_channels / groups * kernel taps`` for a conv and
``input.numel() * out_channels / groups * kernel taps`` for a transposed conv
(bias adds not counted); without an example input they are None. Bit operations
(``Summary.total_bops``) are MACs x weight bits x input bits. The hardware
cost report (MACs by precision, memory, energy) is
:func:`lowbit.analysis.cost.cost_report`, built on :func:`measure_layers`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..nn import named_modules_without_quantizers
from ..placement import input_quantizers
from ..quantizers import Encoded, Quantizer

FLOAT_BITS = 32
FLOAT_BYTES = 4


@dataclass
class LayerSummary:
    """One Linear/Conv2d layer: bits (32 = float), parameter count, storage bytes and MACs."""

    name: str
    type: str
    weight_bits: int
    input_bits: int
    params: int
    bytes: int
    macs: int | None


@dataclass
class Summary:
    """Rows per layer plus the parameters outside them; ``str()`` is an aligned table."""

    layers: list[LayerSummary]
    other_params: int
    other_bytes: int

    @property
    def total_params(self) -> int:
        return sum(row.params for row in self.layers) + self.other_params

    @property
    def total_bytes(self) -> int:
        return sum(row.bytes for row in self.layers) + self.other_bytes

    @property
    def float_bytes(self) -> int:
        return FLOAT_BYTES * self.total_params

    @property
    def compression(self) -> float:
        return self.float_bytes / self.total_bytes if self.total_bytes else 1.0

    @property
    def total_macs(self) -> int | None:
        macs = [row.macs for row in self.layers]
        return None if any(m is None for m in macs) else sum(macs)

    @property
    def quantized_mac_fraction(self) -> float | None:
        """The share of the MACs run by layers with quantized weights (None without MACs)."""
        total = self.total_macs
        if total is None:
            return None
        return sum(row.macs for row in self.layers if row.weight_bits < FLOAT_BITS) / total if total else 1.0

    @property
    def total_bops(self) -> int | None:
        """Bit operations, sum over rows of MACs x weight bits x input bits (float counts 32 bits)."""
        if self.total_macs is None:
            return None
        return sum(row.macs * row.weight_bits * row.input_bits for row in self.layers)

    def to_dict(self) -> dict:
        return {
            "layers": [asdict(row) for row in self.layers],
            "other": {"params": self.other_params, "bytes": self.other_bytes},
            "total": {
                "params": self.total_params,
                "bytes": self.total_bytes,
                "float_bytes": self.float_bytes,
                "compression": self.compression,
                "macs": self.total_macs,
                "quantized_mac_fraction": self.quantized_mac_fraction,
            },
        }

    def __str__(self) -> str:
        header = ("layer", "type", "w bits", "a bits", "params", "bytes", "MACs")
        rows = [
            (r.name or "(model)", r.type, str(r.weight_bits), str(r.input_bits), f"{r.params:,}", f"{r.bytes:,}",
             _count(r.macs))
            for r in self.layers
        ]
        if self.other_params:
            rows.append(("(other)", "-", "32", "-", f"{self.other_params:,}", f"{self.other_bytes:,}", "-"))
        rows.append(("total", "", "", "", f"{self.total_params:,}", f"{self.total_bytes:,}", _count(self.total_macs)))
        widths = [max(len(line[i]) for line in (header, *rows)) for i in range(len(header))]
        left = 2  # name and type columns are left-aligned, numbers right-aligned

        def fmt(line: Sequence[str]) -> str:
            cells = (c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
            return "  ".join(cells).rstrip()

        rule = "-" * len(fmt(["x" * w for w in widths]))
        lines = [fmt(header), rule, *map(fmt, rows[:-1]), rule, fmt(rows[-1])]
        lines.append(
            f"float32 {self.float_bytes:,} bytes -> {self.total_bytes:,} bytes, compression {self.compression:.2f}x"
        )
        if self.quantized_mac_fraction is not None:
            lines.append(f"{self.quantized_mac_fraction:.1%} of MACs in layers with quantized weights")
        return "\n".join(lines)


def _count(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _bits(quantizer: Quantizer | None) -> int:
    return FLOAT_BITS if quantizer is None or quantizer.bits is None else quantizer.bits


def _param_bytes(enc: Encoded, key: str, t: torch.Tensor) -> int:
    if key == "sign":
        return math.ceil(t.numel() / 8)
    if enc.kind == "group_affine" and key == "zero_point":  # bit-packed at the codes' width
        return math.ceil(t.numel() * enc.bits / 8)
    return t.numel() * t.element_size()


def _encoded_bytes(enc: Encoded) -> int:
    codes = math.ceil(enc.codes.numel() * enc.bits / 8)
    return codes + sum(_param_bytes(enc, key, t) for key, t in enc.params.items())


def _weight_bytes(weight: torch.Tensor, quantizer: Quantizer | None) -> int:
    if quantizer is None or quantizer.bits is None:
        return FLOAT_BYTES * weight.numel()
    if type(quantizer).encode is Quantizer.encode:  # no integer codes: count the bits alone
        return math.ceil(weight.numel() * quantizer.bits / 8)
    with torch.no_grad():
        return _encoded_bytes(quantizer.encode(weight.detach()))


def _state_bytes(quantizer: Quantizer | None) -> int:
    if quantizer is None:
        return 0
    return sum(t.numel() * t.element_size() for t in quantizer.state_dict().values())


def _layer_row(name: str, layer: nn.Linear | nn.Conv2d, macs: int | None, graph_input: Quantizer | None
               ) -> LayerSummary:
    weight_q = getattr(layer, "weight_quantizer", None)
    input_q = getattr(layer, "input_quantizer", None)
    bias = 0 if layer.bias is None else layer.bias.numel()
    size = (
        _weight_bytes(layer.weight, weight_q)
        + FLOAT_BYTES * bias
        + _state_bytes(input_q)
        + _state_bytes(getattr(layer, "output_quantizer", None))
    )
    return LayerSummary(
        name=name,
        type=type(layer).__name__,
        weight_bits=_bits(weight_q),
        input_bits=_bits(input_q or graph_input),  # quantized on the graph edge before it (a QuantAct)
        params=layer.weight.numel() + bias,
        bytes=size,
        macs=macs,
    )


def _layer_macs(layer: nn.Module, inputs: torch.Tensor, output: torch.Tensor) -> int:
    """Every output value of a linear / conv takes one weight row; every input value of a transposed conv does."""
    if isinstance(layer, nn.ConvTranspose2d):
        return inputs.numel() * (layer.out_channels // layer.groups) * math.prod(layer.kernel_size)
    if isinstance(layer, nn.modules.conv._ConvNd):
        return output.numel() * (layer.in_channels // layer.groups) * math.prod(layer.kernel_size)
    return output.numel() * layer.in_features


def example_tensor(model: nn.Module, example_input: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """``example_input`` itself, or zeros of that shape on the model's device (int64 token indices for a model
    holding an embedding; ConfigError otherwise)."""
    if isinstance(example_input, torch.Tensor):
        return example_input
    if isinstance(example_input, Sequence) and all(isinstance(d, int) and d > 0 for d in example_input):
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        dtype = torch.int64 if any(isinstance(m, nn.Embedding) for m in model.modules()) else torch.float32
        return torch.zeros(tuple(example_input), device=device, dtype=dtype)
    raise ConfigError(f"example_input must be a tensor or an input shape of positive ints, got {example_input!r}")


@dataclass(frozen=True)
class LayerShapes:
    """What one layer did in a forward pass: MACs, and the elements of its input and output (all calls summed)."""

    macs: int
    input_numel: int
    output_numel: int


def measure_layers(model: nn.Module, layers: list[nn.Module], example: torch.Tensor) -> dict[int, LayerShapes]:
    """MACs and input/output sizes per layer (by id) for one eval-mode forward pass of ``example``.

    Train/eval modes are restored and the hooks removed afterwards.
    """
    counts = {id(layer): [0, 0, 0] for layer in layers}

    def hook(layer: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        count = counts[id(layer)]
        count[0] += _layer_macs(layer, inputs[0], output)
        count[1] += inputs[0].numel()
        count[2] += output.numel()

    handles = [layer.register_forward_hook(hook) for layer in layers]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    return {key: LayerShapes(*count) for key, count in counts.items()}


#: the layers that are the summary's rows (quantized or not)
ROW_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)


def convertible_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every linear / conv layer (quantized or not) in registration order: the summary's rows."""
    return [(n, m) for n, m in named_modules_without_quantizers(model) if isinstance(m, ROW_LAYERS)]


def summary(model: nn.Module, example_input: torch.Tensor | Sequence[int] | None = None) -> Summary:
    """Summarise ``model`` per Linear/Conv2d layer; see the module docstring for the byte and MAC rules.

    ``example_input`` is a tensor or a shape (zeros of that shape are used);
    MACs are for one forward pass of it (batch included). A model with static
    activation quantizers must be calibrated before MACs can be measured.
    """
    named = named_modules_without_quantizers(model)
    rows = convertible_layers(model)
    shapes = None
    if example_input is not None:
        shapes = measure_layers(model, [m for _, m in rows], example_tensor(model, example_input))
    on_edges = input_quantizers(model)
    layers = [_layer_row(n, m, None if shapes is None else shapes[id(m)].macs, on_edges.get(id(m))) for n, m in rows]
    other = _other_params([m for _, m in named], {id(m) for _, m in rows})
    return Summary(layers=layers, other_params=other, other_bytes=FLOAT_BYTES * other)


def _other_params(modules: list[nn.Module], row_ids: set[int]) -> int:
    """Parameters owned by modules that are not rows (each tensor once, row tensors excluded)."""
    seen = {id(p) for m in modules if id(m) in row_ids for p in m.parameters(recurse=False)}
    total = 0
    for module in modules:
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total
