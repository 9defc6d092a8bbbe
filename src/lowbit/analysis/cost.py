"""Hardware cost of one inference at batch 1: MACs by precision, bit-operations, memory and energy.

Per Linear/Conv2d layer (the rows of :func:`lowbit.analysis.summary.summary`),
with w = weight bits and a = input bits (32 for a float tensor):

- MACs, counted as in the summary, and split by precision: ``binary`` when
  w = a = 1 (XNOR + popcount), ``float`` when either operand is float, else
  ``int`` (k-bit integer, 1-16 bits, 1-bit with k-bit included);
- BOPs = MACs x w x a;
- weight memory: the layer's bytes by the summary byte rule (codes, scales,
  biases, quantizer state); the model total adds the ``(other)`` parameters;
- activation memory: its input at ``a`` bits plus its output at the output
  quantizer's bits (32 when float), ``ceil(numel * bits / 8)`` bytes each;
  the model total is the peak over layers (a layer-by-layer execution holds
  one layer's input and output);
- energy, from a per-operation table (:class:`EnergyTable`, picojoules):

  ===========  ==========================================================
  float MAC    ``fp32_mult + fp32_add``; with 1-bit weights ``fp32_add``
               alone (a sign flip and an add)
  int MAC      ``int8_mult * w * a / 64 + int32_add``: an array multiplier's
               energy grows with the product of its operand widths (the
               rule gives 3.2 pJ for 32 x 32 bits, against Horowitz's
               3.1 pJ int32 multiply); products accumulate in 32 bits
  binary MAC   ``xnor_popcount``: by default ``int8_add / 4``, one bit of an
               8-bit adder for the XNOR and one full adder per input bit
               for the popcount tree
  weights      ``ceil(weight bytes / 4) * dram_read_32bit``: read once from
               DRAM per inference
  activations  ``ceil(activation bytes / 4) * sram_read_32bit``: input read
               and output written once through on-chip SRAM (a write costed
               as a read)
  ===========  ==========================================================

The default table is Horowitz, "Computing's energy problem (and what we can
do about it)", ISSCC 2014, 45 nm: fp32 multiply 3.7 pJ, fp32 add 0.9 pJ,
int8 multiply 0.2 pJ, int8 add 0.03 pJ, int32 add 0.1 pJ, 32-bit SRAM read
(8 KB) 5 pJ, 32-bit DRAM read 640 pJ. Users pass their own as a dict or JSON
(:meth:`EnergyTable.from_json`). The estimate ignores data reuse, control and
non-MAC operations (pooling, activations, batch norm).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..format.container import read_file
from ..serialize import load
from .summary import FLOAT_BITS, Summary, convertible_layers, example_tensor, measure_layers, summary

PRECISIONS = ("binary", "int", "float")
WORD_BYTES = 4  # the energy table prices 32-bit memory accesses
#: the largest energy per operation an :class:`EnergyTable` accepts, in pJ (a DRAM read is ~640 pJ)
MAX_PJ = 1e6


@dataclass(frozen=True)
class EnergyTable:
    """Energy per operation in picojoules (defaults: Horowitz ISSCC 2014, 45 nm); see the module docstring.

    ``xnor_popcount`` None means ``int8_add / 4``. Every entry is a finite number of pJ from 0 to
    :data:`MAX_PJ` (ConfigError naming the entry otherwise).
    """

    fp32_mult: float = 3.7
    fp32_add: float = 0.9
    int8_mult: float = 0.2
    int8_add: float = 0.03
    int32_add: float = 0.1
    sram_read_32bit: float = 5.0
    dram_read_32bit: float = 640.0
    xnor_popcount: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name == "xnor_popcount":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_PJ:
                raise ConfigError(f"energy table entry {f.name!r} must be a number of pJ from 0 to {MAX_PJ:g}, "
                                  f"got {value!r}")

    def mac_pj(self, weight_bits: int, input_bits: int) -> float:
        """Energy of one multiply-accumulate with ``weight_bits`` x ``input_bits`` operands (32 = float)."""
        precision = mac_precision(weight_bits, input_bits)
        if precision == "float":
            return self.fp32_add if weight_bits == 1 else self.fp32_mult + self.fp32_add
        if precision == "binary":
            return self.int8_add / 4 if self.xnor_popcount is None else self.xnor_popcount
        return self.int8_mult * weight_bits * input_bits / 64 + self.int32_add

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EnergyTable:
        """A table from a dict of pJ values; keys left out keep their defaults, unknown keys raise ConfigError."""
        if not isinstance(data, dict):
            raise ConfigError(f"an energy table is a JSON object of pJ values, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known), key=str)
        if unknown:
            raise ConfigError(f"energy table has unknown key(s) {unknown}; valid keys: {', '.join(known)}")
        return replace(cls(), **data)

    @classmethod
    def from_json(cls, text: str) -> EnergyTable:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"energy table is not valid JSON: {exc}") from None


def mac_precision(weight_bits: int, input_bits: int) -> str:
    """``binary`` (both 1 bit), ``float`` (either 32 bits, i.e. float) or ``int``."""
    if weight_bits == FLOAT_BITS or input_bits == FLOAT_BITS:
        return "float"
    return "binary" if weight_bits == 1 and input_bits == 1 else "int"


def _words(n_bytes: int) -> int:
    return -(-n_bytes // WORD_BYTES)


@dataclass
class LayerCost:
    """One layer's cost at batch 1 (energies in pJ); see the module docstring."""

    name: str
    weight_bits: int
    input_bits: int
    output_bits: int
    macs: int
    macs_binary: int
    macs_int: int
    macs_float: int
    bops: int
    weight_bytes: int
    activation_bytes: int
    compute_pj: float
    weight_pj: float
    activation_pj: float

    @property
    def energy_pj(self) -> float:
        return self.compute_pj + self.weight_pj + self.activation_pj


@dataclass
class CostReport:
    """Per-layer costs, the bytes outside the layers and the energy table used."""

    layers: list[LayerCost]
    other_bytes: int
    table: EnergyTable

    def total(self) -> dict[str, float | int]:
        """Sums over layers; weight bytes include the ``(other)`` parameters, activations are the peak."""
        other_pj = _words(self.other_bytes) * self.table.dram_read_32bit
        sums = {key: sum(getattr(r, key) for r in self.layers)
                for key in ("macs", "macs_binary", "macs_int", "macs_float", "bops", "compute_pj", "activation_pj")}
        weight_pj = sum(r.weight_pj for r in self.layers) + other_pj
        return {**sums, "weight_bytes": sum(r.weight_bytes for r in self.layers) + self.other_bytes,
                "activation_peak_bytes": max((r.activation_bytes for r in self.layers), default=0),
                "weight_pj": weight_pj, "energy_pj": sums["compute_pj"] + weight_pj + sums["activation_pj"]}

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [{**asdict(r), "energy_pj": r.energy_pj} for r in self.layers],
                "other_bytes": self.other_bytes, "total": self.total(), "energy_table_pj": self.table.to_dict()}

    def __str__(self) -> str:
        header = ("layer", "w/a bits", "MACs", "binary", "int", "float", "BOPs", "weight B", "act B", "energy nJ")
        rows = [(r.name or "(model)", f"{r.weight_bits}/{r.input_bits}", *(f"{v:,}" for v in (
            r.macs, r.macs_binary, r.macs_int, r.macs_float, r.bops, r.weight_bytes, r.activation_bytes)),
            f"{r.energy_pj / 1000:,.2f}") for r in self.layers]
        t = self.total()
        rows.append(("total", "", *(f"{t[k]:,}" for k in ("macs", "macs_binary", "macs_int", "macs_float", "bops",
                                                          "weight_bytes", "activation_peak_bytes")),
                     f"{t['energy_pj'] / 1000:,.2f}"))
        widths = [max(len(line[i]) for line in (header, *rows)) for i in range(len(header))]

        def fmt(line: Sequence[str]) -> str:
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))

        rule = "-" * len(fmt(header))
        return "\n".join([fmt(header), rule, *map(fmt, rows[:-1]), rule, fmt(rows[-1]),
                          f"energy: compute {t['compute_pj'] / 1000:,.2f} nJ, weights (DRAM) "
                          f"{t['weight_pj'] / 1000:,.2f} nJ, activations (SRAM) {t['activation_pj'] / 1000:,.2f} nJ;"
                          " total weight bytes include (other) parameters, act B total is the peak"])


def _bits_of(quantizer: nn.Module | None) -> int:
    bits = getattr(quantizer, "bits", None)
    return FLOAT_BITS if bits is None else int(bits)


def cost_report(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[int],
    table: EnergyTable | dict[str, Any] | None = None,
) -> CostReport:
    """The cost of one forward pass of ``example_input`` (batch 1: a tensor or shape whose first axis is 1).

    ``table`` is an :class:`EnergyTable`, a dict of pJ values (missing keys keep
    Horowitz's figures) or None for the defaults.
    """
    energy = table if isinstance(table, EnergyTable) else EnergyTable.from_dict(table or {})
    example = example_tensor(model, example_input)
    if example.dim() == 0 or example.shape[0] != 1:
        raise ConfigError(f"the cost report is for batch 1; example_input has shape {tuple(example.shape)}")
    rows = convertible_layers(model)
    shapes = measure_layers(model, [m for _, m in rows], example)
    sizes: Summary = summary(model)
    layers = []
    for (name, layer), size in zip(rows, sizes.layers):
        w, a = size.weight_bits, size.input_bits
        o = _bits_of(getattr(layer, "output_quantizer", None))
        shape = shapes[id(layer)]
        split = {p: shape.macs if mac_precision(w, a) == p else 0 for p in PRECISIONS}
        act_bytes = math.ceil(shape.input_numel * a / 8) + math.ceil(shape.output_numel * o / 8)
        layers.append(LayerCost(
            name=name, weight_bits=w, input_bits=a, output_bits=o, macs=shape.macs,
            macs_binary=split["binary"], macs_int=split["int"], macs_float=split["float"], bops=shape.macs * w * a,
            weight_bytes=size.bytes, activation_bytes=act_bytes, compute_pj=shape.macs * energy.mac_pj(w, a),
            weight_pj=_words(size.bytes) * energy.dram_read_32bit,
            activation_pj=_words(act_bytes) * energy.sram_read_32bit,
        ))
    return CostReport(layers=layers, other_bytes=sizes.other_bytes, table=energy)


def file_cost_report(path: str | os.PathLike[str], table: EnergyTable | dict[str, Any] | None = None) -> CostReport:
    """:func:`cost_report` of the model stored in a ``.lowbit`` file, at batch 1 of its stored input shape
    (the columns ``lowbit inspect`` shows). ConfigError when the file records no input shape."""
    shape = read_file(path).document["model"].get("input_shape")
    if not shape:
        raise ConfigError(f"{os.fspath(path)!r} records no input shape; save it with an example input to get costs")
    return cost_report(load(path), (1, *shape[1:]), table)
