"""Per-layer sensitivity to quantization: one layer at a time, each candidate bit width.

After Zhou, Moosavi-Dezfooli, Cheung & Frossard, "Adaptive Quantization for
Deep Neural Network" (AAAI 2018): the effect of quantizing layer i to b bits
is measured with every other layer left float, on a calibration set run as
one batch. For each (layer, bits) the table holds

- ``accuracy_drop`` = float accuracy - accuracy (a fraction),
- ``loss_increase`` = cross-entropy - float cross-entropy (mean over examples),
- ``logit_mse`` = mean over examples and classes of (z_q - z)^2, the noise
  power on the logits (the paper's measure: noise from several layers adds),
- ``sqnr_db`` = 10 log10(sum z^2 / sum (z_q - z)^2) (None when the logits are
  unchanged),
- ``bytes``: the layer's storage under the summary byte rule
  (:mod:`lowbit.analysis.summary`), so allocations predict sizes exactly.

The allocator's cost of a (layer, bits) pair (:meth:`SensitivityTable.cost`)
is the chosen measure made non-increasing in bits and clipped at 0: on one
calibration batch the measured loss changes at 6-8 bits are of the order of
the sampling noise (often negative, sometimes higher than at fewer bits), and
a table where more bits look harmful or better than float misleads the
knapsack. For each layer the measures over the table's bit widths in
ascending order are replaced by their isotonic (least-squares non-increasing)
fit, computed by pooling adjacent violators (Barlow, Bartholomew, Bremner &
Brunk, "Statistical Inference under Order Restrictions", 1972): a run of
values that rises with the bits becomes its mean, repeated until none rises.
Unlike a cumulative minimum, pooling does not keep the luckiest noisy value.
Negative fitted values then become 0 (no layer is predicted to beat float).
The rows keep the raw measures.

Weight quantizers by bit width (:func:`weight_spec`): 1 bit is XNOR-Net
binary weights with a per-output-channel scale; 2-16 bits uniform symmetric
per-output-channel (``config.uniform_weight``); 32 leaves the weight float.
With ``act_bits`` each measured layer also gets an ``act_bits`` uniform input
quantizer (``config.uniform_act``), calibrated on the same images.

Per-layer activation bits (``role="input"``): the same measures with each
layer's *input* quantized alone (uniform affine, ``config.uniform_act``,
calibrated on the images; weights and every other input float), at 2-16 bits.
Their ``bytes`` are the layer's input at batch 1 at that width,
``ceil(numel * bits / 8)``: summed over layers, the activations the layers read
for one example, to which the cost report's activation energy is proportional.
The allocator then spends an input-bytes budget exactly as it spends a weight
budget, and :func:`layer_config` combines both choices in one config.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..api import calibrate, quantize
from ..config import QuantConfig, LayerRule, Spec, uniform_act, uniform_weight
from ..errors import ConfigError
from ..quantizers import Quantizer
from .summary import FLOAT_BITS, convertible_layers, measure_layers, summary

#: the candidate weight bit widths of the paper's search (and of ``lowbit allocate``)
DEFAULT_BITS = (1, 2, 3, 4, 6, 8)
#: the candidate input (activation) bit widths of ``role="input"`` tables
DEFAULT_INPUT_BITS = (2, 3, 4, 6, 8)
#: the measures a table holds per (layer, bits); allocation minimises the sum of one of them
OBJECTIVES = ("logit_mse", "loss", "accuracy")
#: what a table's bit widths quantize: each layer's weight, or its input
ROLES = ("weight", "input")


def weight_spec(bits: int) -> Spec:
    """The weight quantizer spec of a bit width: 1 -> XNOR binary, 2-16 -> uniform per-channel, 32 -> float."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not (1 <= bits <= 16 or bits == FLOAT_BITS):
        raise ConfigError(f"a candidate weight bit width must be 1, 2-16 or 32 (float), got {bits!r}")
    if bits == 1:
        return {"name": "xnor", "role": "weight"}
    return None if bits == FLOAT_BITS else uniform_weight(bits)


def act_spec(act_bits: int | None) -> Spec:
    """The input quantizer spec: None keeps inputs float, else ``act_bits`` uniform affine (calibrated)."""
    if act_bits is None:
        return None
    if isinstance(act_bits, bool) or not isinstance(act_bits, int) or not 2 <= act_bits <= 16:
        raise ConfigError(f"act_bits must be None (float inputs) or an integer from 2 to 16, got {act_bits!r}")
    return uniform_act(act_bits)


def layer_config(bits: dict[str, int], act_bits: int | None = None,
                 input_bits: dict[str, int] | None = None) -> QuantConfig:
    """A config giving each named layer its weight bits (one rule per layer name) and every layer the
    ``act_bits`` input quantizer, or its own ``input_bits``; a layer named only in ``input_bits`` keeps a
    float weight. First/last policy "same", so the rules alone decide. Layers named in neither are left
    float (a final skip rule)."""
    input_bits = input_bits or {}
    rules = []
    for name in dict.fromkeys([*bits, *input_bits]):
        specs = {"weight": weight_spec(bits[name]) if name in bits else None}
        if name in input_bits:
            specs["input"] = act_spec(input_bits[name])
        rules.append(LayerRule(pattern=name, **specs))
    rules.append(LayerRule(pattern="*", skip=True))
    return QuantConfig(input=act_spec(act_bits), first="same", last="same", rules=rules)


def nonincreasing_fit(values: list[float]) -> list[float]:
    """The least-squares non-increasing sequence closest to ``values`` (isotonic regression by pooling
    adjacent violators): argmin sum_k (f_k - v_k)^2 subject to f_1 >= f_2 >= ... Each pooled run is
    replaced by its mean, so values that already fall are returned unchanged."""
    blocks: list[tuple[float, int]] = []  # (sum, count) of each pooled run
    for value in values:
        total, count = value, 1
        while blocks and blocks[-1][0] / blocks[-1][1] < total / count:
            previous_total, previous_count = blocks.pop()
            total, count = total + previous_total, count + previous_count
        blocks.append((total, count))
    return [total / count for total, count in blocks for _ in range(count)]


@dataclass
class Sensitivity:
    """The measures of quantizing one layer to ``bits`` with every other layer float."""

    layer: str
    bits: int
    accuracy_drop: float
    loss_increase: float
    logit_mse: float
    sqnr_db: float | None
    bytes: int


@dataclass
class SensitivityTable:
    """Sensitivities of every (layer, bits) pair, with the float reference and the bytes outside the layers."""

    layers: list[str]
    bits: list[int]
    act_bits: int | None
    examples: int
    float_accuracy: float
    float_loss: float
    other_bytes: int
    rows: list[Sensitivity] = field(default_factory=list)
    role: str = "weight"

    def row(self, layer: str, bits: int) -> Sensitivity:
        found = next((r for r in self.rows if r.layer == layer and r.bits == bits), None)
        if found is None:
            raise ConfigError(f"the sensitivity table has no entry for layer {layer!r} at {bits} bits; "
                              f"layers: {self.layers}, bits: {self.bits}")
        return found

    def measure(self, layer: str, bits: int, objective: str = "loss") -> float:
        """The raw measure of ``objective`` for ``layer`` at ``bits`` (loss increase, logit MSE or accuracy drop)."""
        row = self.row(layer, bits)
        value = {"logit_mse": row.logit_mse, "loss": row.loss_increase, "accuracy": row.accuracy_drop}
        if objective not in value:
            raise ConfigError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
        if not math.isfinite(value[objective]):
            raise ConfigError(f"layer {layer!r} at {bits} bits has a non-finite {objective} ({value[objective]}) "
                              "in the sensitivity table")
        return value[objective]

    def costs(self, layer: str, objective: str = "loss") -> dict[int, float]:
        """The predicted loss of ``layer`` at each bit width of the table (ascending): the isotonic
        non-increasing fit of the raw measures over the bit widths, clipped at 0 (module docstring)."""
        order = sorted(self.bits)
        fitted = nonincreasing_fit([self.measure(layer, b, objective) for b in order])
        return {b: max(0.0, value) for b, value in zip(order, fitted)}

    def cost(self, layer: str, bits: int, objective: str = "loss") -> float:
        """The predicted loss of ``layer`` at ``bits`` (see :meth:`costs`)."""
        self.row(layer, bits)
        return self.costs(layer, objective)[bits]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SensitivityTable:
        data = dict(data)
        rows = [Sensitivity(**r) for r in data.pop("rows", [])]
        return cls(**data, rows=rows)

    def __str__(self) -> str:
        header = (f"{'layer':<16} {'bits':>4} {'acc drop':>9} {'loss +':>9} {'logit MSE':>10} {'SQNR dB':>8} "
                  f"{'bytes':>9}")
        lines = [header, "-" * len(header)]
        for r in self.rows:
            sqnr = "inf" if r.sqnr_db is None else f"{r.sqnr_db:.1f}"
            lines.append(f"{r.layer:<16} {r.bits:>4} {100 * r.accuracy_drop:>8.2f}% {r.loss_increase:>9.4f} "
                         f"{r.logit_mse:>10.4g} {sqnr:>8} {r.bytes:>9,}")
        lines.append(f"float: accuracy {100 * self.float_accuracy:.2f}%, loss {self.float_loss:.4f} "
                     f"on {self.examples} calibration examples")
        return "\n".join(lines)


def _check_inputs(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
    if any(isinstance(m, Quantizer) for m in model.modules()):
        raise ConfigError("sensitivity needs the float model; this one already holds quantizers "
                          "(measure the float checkpoint it came from)")
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise ConfigError("sensitivity needs calibration images and labels as tensors")
    if len(images) == 0 or len(images) != len(labels):
        raise ConfigError(f"sensitivity needs as many labels as images (at least one), got {len(images)} images "
                          f"and {len(labels)} labels")


def _measures(logits: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, float, float]:
    """(accuracy, cross-entropy, logit MSE, SQNR dB or NaN when noiseless) of ``logits`` against ``reference``."""
    noise = (logits.double() - reference.double()).pow(2)
    signal = float(reference.double().pow(2).sum())
    sqnr = 10 * math.log10(signal / float(noise.sum())) if float(noise.sum()) > 0 and signal > 0 else math.nan
    accuracy = float((logits.argmax(1) == labels).double().mean())
    return accuracy, float(F.cross_entropy(logits.double(), labels)), float(noise.mean()), sqnr


@torch.no_grad()
def _other_bytes(model: nn.Module) -> int:
    """Bytes of the parameters outside the layers once quantize has folded the batch norms (the model is in eval
    mode), as every quantized model of the table has them."""
    return summary(quantize(model, QuantConfig(first="same", last="same"))).other_bytes


@torch.no_grad()
def measure_sensitivity(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    bits: tuple[int, ...] | list[int] | None = None,
    act_bits: int | None = None,
    role: str = "weight",
) -> SensitivityTable:
    """Quantize the weight (``role="weight"``) or the input (``role="input"``) of each Linear/Conv2d
    layer of the float ``model`` alone at each of ``bits`` (default :data:`DEFAULT_BITS`, or
    :data:`DEFAULT_INPUT_BITS` for inputs) and measure accuracy, loss and logit noise on ``images``
    (one batch) against the float model.

    See the module docstring for the measures, the quantizers and the bytes. The
    model is not changed (each measurement quantizes a copy).
    """
    _check_inputs(model, images, labels)
    if role not in ROLES:
        raise ConfigError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if role == "input" and act_bits is not None:
        raise ConfigError("act_bits (one input width for every layer) does not apply to role='input', "
                          "which measures each layer's input widths itself")
    candidates = list(bits if bits is not None else DEFAULT_BITS if role == "weight" else DEFAULT_INPUT_BITS)
    check = weight_spec if role == "weight" else act_spec
    for b in candidates:
        check(b)
    act_spec(act_bits)
    if not candidates or len(set(candidates)) != len(candidates):
        raise ConfigError(f"candidate bit widths must be distinct and at least one, got {candidates}")
    layers = convertible_layers(model)
    if not layers:
        raise ConfigError("the model has no Linear/Conv2d layer to quantize")
    names = [name for name, _ in layers]
    was_training = model.training
    model.eval()
    reference = model(images)
    float_acc, float_loss, _, _ = _measures(reference, reference, labels)
    inputs = measure_layers(model, [m for _, m in layers], images[:1])
    input_numel = {name: inputs[id(m)].input_numel for name, m in layers}
    table = SensitivityTable(layers=names, bits=candidates, act_bits=act_bits, examples=len(labels),
                             float_accuracy=float_acc, float_loss=float_loss, role=role,
                             other_bytes=_other_bytes(model) if role == "weight" else 0)
    for name in names:
        for b in candidates:
            config = layer_config({name: b}, act_bits) if role == "weight" else layer_config({}, None, {name: b})
            quantized = quantize(model, config)
            if act_bits is not None or role == "input":
                calibrate(quantized, [images])
            logits = quantized.eval()(images)
            acc, loss, mse, sqnr = _measures(logits, reference, labels)
            size = (next(row.bytes for row in summary(quantized).layers if row.name == name) if role == "weight"
                    else math.ceil(input_numel[name] * b / 8))
            table.rows.append(Sensitivity(layer=name, bits=b, accuracy_drop=float_acc - acc,
                                          loss_increase=loss - float_loss, logit_mse=mse,
                                          sqnr_db=None if math.isnan(sqnr) else sqnr, bytes=size))
    model.train(was_training)
    return table
