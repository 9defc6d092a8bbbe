"""Export a lowbit model to ONNX: standard QDQ graphs that onnxruntime runs on its int8 kernels.

``export_onnx(model, path, example_input)`` captures the model's graph IR
(:func:`lowbit.export.graph.capture`) and writes one ONNX node group per IR node:

- Affine weights (uniform, LSQ, linear; any bit width that fits) are stored as
  their integer codes (int8 / uint8 initializers, int4 / uint4 with ``int4=True``
  at opset >= 21) followed by ``DequantizeLinear`` with the quantizer's scale and
  zero point (per channel: ``axis=0``, ``axis=1`` for a transposed conv's
  ``[C_in, C_out / groups, kh, kw]`` weight; opset >= 13). Conv1d is ``Conv`` with 1-D attributes, a transposed
  conv ``ConvTranspose`` (strides, pads, output_padding, dilations, group).
- Dynamic uniform activations (per tensor, or per token) are their float32 arithmetic (ReduceMin / ReduceMax,
  Round, Clip; no standard op quantizes per token), bit for bit as torch.
- Static affine activations (calibrated uniform, LSQ, PACT, DoReFa) become a
  ``QuantizeLinear -> DequantizeLinear`` pair with a per-tensor scale; a code range
  narrower than the container (for example 4 bits in uint8) adds a ``Clip`` to
  ``[(qmin - z) s, (qmax - z) s]`` before the pair, which gives the same codes.
- When a layer's input and weight are both QDQ, its bias is stored as int32 codes
  with scale ``s_x s_w`` (per channel), the form onnxruntime's QDQ fusion needs to
  turn ``DQ -> Conv/Gemm -> Q`` into QLinearConv / QGemm / QLinearMatMul.
- A batch norm right after a conv (not transposed) / linear whose weight is float or affine is
  folded into it: with a = gamma / sqrt(var + eps) the weight scale becomes
  ``s |a|`` (codes negated where a < 0) and the bias ``a (b - mean) + beta``, so the
  codes are unchanged.
- Binary, ternary, log, codebook (k-means, DoReFa, ABC) and XNOR weights are
  stored as their dequantized float values (always runnable); with
  ``binary_ops="custom"`` binary and XNOR weights instead become the sign-bit
  ops of domain ``ai.lowbit`` (:mod:`lowbit.export.binary_ops`). Binary and XNOR
  activations become ``Where(x < 0, -1, 1)`` (times ``max(mean_c |x|, EPS)`` for
  XNOR), sign(0) = +1 as in :mod:`lowbit.quantizers.binary`.
- A conv (at most 3x3 taps, one group) with an 8-bit QDQ input and symmetric int8
  weights (zero point 0), which onnxruntime fuses into ``QLinearConv``, but whose
  input channels are not a multiple of ``channel_multiple`` (4: onnxruntime's x86
  int8 convolution for symmetric weights needs it, else it falls back to a slower
  im2col GEMM; a 1-channel image input took 2-3x as long as float), gets zero input
  channels: ``Pad`` on the float input before its ``QuantizeLinear`` and zero weight
  codes for them, so every output is the same sum. Larger kernels gained nothing
  measurable.
- 8-bit weight codes of a layer with an 8-bit QDQ input run on onnxruntime's
  u8 x s8 kernels, which on x86 CPUs without VNNI add pairs of products in int16
  (``VPMADDUBSW``) and saturate where ``|a1 w1 + a2 w2| > 32767``.
  ``weight_type="safe"`` (default) keeps int8 codes only where that cannot happen
  (every ``|code| <= 64``: ``2 * 255 * 64 = 32640``) and elsewhere stores them as
  uint8 with 128 added to codes and zero point (the same values; onnxruntime's
  u8 x u8 kernels widen to int16 before multiplying, exact on every CPU).
  ``"int8"`` always keeps int8 (exact and fastest on x86 with VNNI), ``"uint8"``
  always shifts. See docs/onnx.md, "Saturation on x86 without VNNI".

Rounding: ONNX ``QuantizeLinear`` computes ``saturate(round(x / s) + z)`` (half to
even); lowbit multiplies by the float32 reciprocal ``x * (1/s)``. The two differ
only where ``x / s`` lies within a float32 rounding of a tie, by one code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from ..errors import ConfigError, UnsupportedLayerError
from ..format.atomic import write_atomic
from ..quantizers import Encoded, Quantizer, decode
from ..quantizers.base import EPS
from ..quantizers.uniform import affine_qrange
from ..ops import LAYER_OPS, Graph, GraphNode
from ..ops.rnn import onnx_rnn
from .binary_ops import DOMAIN, VERSION, pack_signs
from .transformer import decompose

__all__ = ["BINARY_OPS", "DEFAULT_CHANNEL_MULTIPLE", "DEFAULT_OPSET", "MAX_OPSET", "MIN_OPSET", "UINT8_WEIGHTS_PROP",
           "WEIGHT_TYPES", "export_onnx", "to_onnx", "uint8_weight_layers", "write_onnx"]

#: opset written by default: the first with int4 / int16 QuantizeLinear types
DEFAULT_OPSET = 21
#: Clip with min / max inputs (opset 11) is the oldest form written
MIN_OPSET = 11
#: the newest opset written (the newest onnxruntime's QDQ fusion is checked against)
MAX_OPSET = 21
#: DequantizeLinear's per-channel ``axis`` attribute
PER_CHANNEL_OPSET = 13
#: int4 / uint4 / int16 / uint16 quantized types
WIDE_TYPES_OPSET = 21
#: input channels of an int8 conv are padded to a multiple of this (onnxruntime's x86 int8 conv kernel needs 4)
DEFAULT_CHANNEL_MULTIPLE = 4
#: only kernels of at most this many taps are padded (3x3: 1.3-1.45x faster; 5x5 / 7x7 with 1-3 channels: +-5%)
MAX_PADDED_TAPS = 9
#: how binary / XNOR weights are written: dequantized float (standard ops) or sign bits in ai.lowbit ops
BINARY_OPS = ("float", "custom")
#: how int8 weight codes before an 8-bit QDQ input are stored: int8 where they cannot saturate, always, never
WEIGHT_TYPES = ("safe", "int8", "uint8")
#: the largest |int8 code| whose products with uint8 inputs never saturate an int16 pair sum: 2 * 255 * 64 < 2^15
SATURATION_FREE_CODE = 64
#: added to int8 codes and zero points to store them as uint8
_UINT8_SHIFT = 128
#: model metadata key listing the layers whose int8 weight codes were stored as uint8
UINT8_WEIGHTS_PROP = "lowbit.uint8_weight_layers"

#: quantizers whose forward is the identity (they act on gradients only)
_IDENTITY = {"dorefa_grad"}
#: quantizers whose scale and zero point never depend on the input
_STATIC_AFFINE = {"lsq", "pact", "dorefa_act"}
#: affine quantizers whose range is observed (static with ``dynamic=False``)
_RANGE_AFFINE = {"uniform", "linear"}
#: activation quantizers exported as a sign (``Where``), not as QDQ
_SIGN = {"binary", "xnor"}
#: the element types onnxruntime's int8 kernels (QLinearConv, QGemm) take
_EIGHT_BIT = {TensorProto.INT8, TensorProto.UINT8}
#: layer ops whose weight's axis 0 is the output channel, so a following batch norm folds into it
_FOLDS_BATCHNORM = ("linear", "conv1d", "conv2d")


@dataclass(frozen=True)
class _Container:
    """An ONNX quantized element type with its code range and the first opset that has it."""

    onnx_type: int
    numpy_type: Any
    low: int
    high: int
    opset: int
    int4: bool = False


_CONTAINERS = (
    _Container(TensorProto.INT4, np.int8, -8, 7, WIDE_TYPES_OPSET, int4=True),
    _Container(TensorProto.UINT4, np.uint8, 0, 15, WIDE_TYPES_OPSET, int4=True),
    _Container(TensorProto.INT8, np.int8, -128, 127, 10),
    _Container(TensorProto.UINT8, np.uint8, 0, 255, 10),
    _Container(TensorProto.INT16, np.int16, -(2**15), 2**15 - 1, WIDE_TYPES_OPSET),
    _Container(TensorProto.UINT16, np.uint16, 0, 2**16 - 1, WIDE_TYPES_OPSET),
)
_INT32 = (-(2**31), 2**31 - 1)


def _container(qmin: int, qmax: int, zero_point: np.ndarray, opset: int, int4: bool, where: str) -> _Container:
    """The narrowest container holding codes and zero points in [qmin, qmax] (int4 only when asked)."""
    low, high = min(qmin, int(zero_point.min())), max(qmax, int(zero_point.max()))
    fitting = [c for c in _CONTAINERS if c.low <= low and high <= c.high and (int4 or not c.int4)]
    if not fitting:
        raise UnsupportedLayerError(f"{where}: codes in [{qmin}, {qmax}] fit no ONNX quantized type (at most 16 bits)")
    for container in fitting:
        if container.opset <= opset:
            return container
    raise ConfigError(f"{where}: codes in [{qmin}, {qmax}] need {TensorProto.DataType.Name(fitting[0].onnx_type)}, "
                      f"which needs opset >= {fitting[0].opset}; got opset {opset}")


@dataclass
class _Affine:
    """Codes (weights only), float32 scale, integer zero point (scalars or 1-D along ``axis``)."""

    scale: np.ndarray
    zero_point: np.ndarray
    qmin: int
    qmax: int
    per_channel: bool
    codes: np.ndarray | None = None
    axis: int = 0


@dataclass
class _Value:
    """An ONNX value and, when it is the output of an 8-bit DequantizeLinear, its per-tensor scale and the
    quantization it went through."""

    name: str
    scale: float | None = None
    affine: _Affine | None = None


class _Builder:
    def __init__(self, opset: int, int4: bool) -> None:
        self.opset, self.int4 = opset, int4
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.names: set[str] = set()
        #: the example shape (batch axis not counted; a constant's own shape) of each value made for a graph node
        self.shapes: dict[str, tuple[int, ...]] = {}

    def fresh(self, base: str) -> str:
        name, count = base, 1
        while name in self.names:
            name, count = f"{base}_{count}", count + 1
        self.names.add(name)
        return name

    def const(self, base: str, array: np.ndarray, container: _Container | None = None) -> str:
        name = self.fresh(base)
        if container is not None and container.int4:
            values = array.astype(np.int64).ravel().tolist()
            self.initializers.append(helper.make_tensor(name, container.onnx_type, array.shape, values))
        else:
            target = container.numpy_type if container is not None else array.dtype
            self.initializers.append(numpy_helper.from_array(np.array(array, dtype=target, order="C"), name))
        return name

    def node(self, op: str, inputs: list[str], base: str, **attrs: Any) -> str:
        out = self.fresh(base)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    # ------------------------------------------------------------ quantization

    def container(self, affine: _Affine, where: str) -> _Container:
        return _container(affine.qmin, affine.qmax, affine.zero_point, self.opset, self.int4, where)

    def eight_bit(self, q: Quantizer | None, base: str) -> bool:
        """Whether activation quantizer ``q`` becomes an int8 / uint8 QuantizeLinear -> DequantizeLinear pair."""
        if q is None or q.name in _IDENTITY or q.name in _SIGN or _dynamic_uniform(q):
            return False
        affine = _static_affine(q, f"activation quantizer {q.name!r} of {base!r}")
        return self.container(affine, base).onnx_type in _EIGHT_BIT

    def full_range(self, affine: _Affine) -> bool:
        """Whether codes use the whole range of their 8-bit container (integer kernels, no Clip before them)."""
        container = self.container(affine, "activation")
        return container.onnx_type in _EIGHT_BIT and (affine.qmin, affine.qmax) == (container.low, container.high)

    def pad_channels(self, x: str, count: int, base: str) -> str:
        """``count`` zero channels appended to NCHW tensor ``x`` (Pad, constant 0)."""
        pads = np.array([0, 0, 0, 0, 0, count, 0, 0], np.int64)  # begins of N, C, H, W, then their ends
        return self.node("Pad", [x, self.const(f"{base}.pads", pads)], f"{base}.padded")

    def dequantize(self, base: str, affine: _Affine, container: _Container) -> str:
        """DequantizeLinear of an integer initializer (``affine.codes``)."""
        axis = {"axis": affine.axis} if affine.per_channel else {}
        inputs = [self.const(f"{base}.codes", affine.codes, container),
                  self.const(f"{base}.scale", affine.scale.astype(np.float32)),
                  self.const(f"{base}.zero_point", affine.zero_point, container)]
        return self.node("DequantizeLinear", inputs, f"{base}.dequantized", **axis)

    def qdq(self, x: str, affine: _Affine, base: str) -> _Value:
        """Clip (where the code range is narrower than the container), QuantizeLinear, DequantizeLinear."""
        container = self.container(affine, base)
        scale, zero = np.float32(affine.scale), int(affine.zero_point)
        if (affine.qmin, affine.qmax) != (container.low, container.high):
            bounds = [np.float32((q - zero) * scale) for q in (affine.qmin, affine.qmax)]
            x = self.node("Clip", [x, self.const(f"{base}.min", np.array(bounds[0])),
                                   self.const(f"{base}.max", np.array(bounds[1]))], f"{base}.clipped")
        scale_name = self.const(f"{base}.scale", np.array(scale))
        zero_name = self.const(f"{base}.zero_point", np.array(zero), container)
        q = self.node("QuantizeLinear", [x, scale_name, zero_name], f"{base}.quantized")
        out = self.node("DequantizeLinear", [q, scale_name, zero_name], f"{base}.dequantized")
        if container.onnx_type not in _EIGHT_BIT:
            return _Value(out)
        return _Value(out, float(scale), affine)

    def reduce(self, op: str, x: str, axes: list[int] | None, base: str) -> str:
        """ReduceMin / ReduceMax / ReduceMean over ``axes`` (None: all), dimensions kept."""
        if axes is None:
            return self.node(op, [x], base, keepdims=1)
        if self.opset >= 18:
            return self.node(op, [x, self.const(f"{base}.axes", np.array(axes, np.int64))], base, keepdims=1)
        return self.node(op, [x], base, axes=axes, keepdims=1)

    def dynamic_affine(self, x: str, spec: dict[str, Any], base: str) -> _Value:
        """A dynamic uniform quantizer (per tensor, or per token: along ``token_axis``) in float32 arithmetic, step for
        step as torch's: lo = min(min x, 0), hi = max(max x, 0), s = max((hi - lo) / (qmax - qmin), EPS) (symmetric:
        max(-lo, hi) / ((qmax - qmin) / 2)), z = clip(qmin - round(lo / s)), then
        (clip(round(x * (1 / s)) + z, qmin, qmax) - z) * s. No standard op quantizes per token (DynamicQuantizeLinear
        is per tensor and uint8 only), so the codes stay float values here."""
        qmin, qmax = affine_qrange(spec["bits"], spec["symmetric"], spec["narrow"])
        f32 = np.float32
        whole = spec.get("per_token", False) and spec["token_axis"] == 0
        if whole:  # each sample whole: quantize its rows after Flatten, then take the input's shape back
            shape, x = self.node("Shape", [x], f"{base}.shape"), self.node("Flatten", [x], f"{base}.rows", axis=1)
        axes = [-1 if whole else spec["token_axis"]] if spec.get("per_token") else None
        zero_value = self.const(f"{base}.zero", f32(0))
        lo = self.node("Min", [self.reduce("ReduceMin", x, axes, f"{base}.min"), zero_value], f"{base}.lo")
        hi = self.node("Max", [self.reduce("ReduceMax", x, axes, f"{base}.max"), zero_value], f"{base}.hi")
        if spec["symmetric"]:
            span = self.node("Max", [self.node("Neg", [lo], f"{base}.neg_lo"), hi], f"{base}.span")
            levels = f32((qmax - qmin) / 2)
        else:
            span, levels = self.node("Sub", [hi, lo], f"{base}.span"), f32(qmax - qmin)
        scale = self.node("Max", [self.node("Div", [span, self.const(f"{base}.levels", levels)], f"{base}.step"),
                                  self.const(f"{base}.eps", f32(EPS))], f"{base}.scale")
        low, high = self.const(f"{base}.qmin", f32(qmin)), self.const(f"{base}.qmax", f32(qmax))
        if spec["symmetric"]:
            zero = zero_value
        else:
            shift = self.node("Round", [self.node("Div", [lo, scale], f"{base}.lo_steps")], f"{base}.lo_codes")
            zero = self.node("Clip", [self.node("Sub", [low, shift], f"{base}.z"), low, high], f"{base}.zero_point")
        inverse = self.node("Reciprocal", [scale], f"{base}.inverse")
        rounded = self.node("Round", [self.node("Mul", [x, inverse], f"{base}.steps")], f"{base}.rounded")
        codes = self.node("Clip", [self.node("Add", [rounded, zero], f"{base}.shifted"), low, high], f"{base}.codes")
        y = self.node("Mul", [self.node("Sub", [codes, zero], f"{base}.centered"), scale], f"{base}.dequantized")
        return _Value(self.node("Reshape", [y, shape], f"{base}.reshaped") if whole else y)

    def sign(self, x: str, base: str) -> str:
        """sign(x) with sign(0) = +1: Where(x < 0, -1, 1)."""
        negative = self.node("Less", [x, self.const(f"{base}.zero", np.array(0.0, np.float32))], f"{base}.negative")
        return self.node("Where", [negative, self.const(f"{base}.minus_one", np.array(-1.0, np.float32)),
                                   self.const(f"{base}.one", np.array(1.0, np.float32))], f"{base}.sign")

    def activation(self, x: _Value, q: Quantizer | None, base: str) -> _Value:
        """The ONNX form of activation quantizer ``q`` applied to ``x``."""
        if q is None or q.name in _IDENTITY:
            return x
        where = f"activation quantizer {q.name!r} of {base!r}"
        if q.name == "binary":
            return _Value(self.sign(x.name, base))
        if _dynamic_uniform(q):
            return self.dynamic_affine(x.name, q.spec(), base)
        if x.affine is not None and q.name not in _SIGN and _same_grid(x.affine, _static_affine(q, where)):
            return x  # quantized with exactly these parameters already
        if q.name == "xnor" and q.spec()["role"] == "activation":
            magnitude = self.node("Abs", [x.name], f"{base}.abs")
            mean = self.reduce("ReduceMean", magnitude, [1], f"{base}.mean")
            floor = self.node("Max", [mean, self.const(f"{base}.eps", np.array(EPS, np.float32))], f"{base}.a")
            return _Value(self.node("Mul", [self.sign(x.name, base), floor], f"{base}.xnor"))
        return self.qdq(x.name, _static_affine(q, where), base)


def _dynamic_uniform(q: Quantizer) -> bool:
    """Whether ``q`` is a uniform quantizer reading its range off each input (per tensor or per token)."""
    return q.name == "uniform" and q.spec()["dynamic"] and not q.spec()["per_channel"]


def _moves(node: GraphNode) -> bool:
    """Whether the node only moves values, so an activation quantization commutes with it (a pad: with 0)."""
    return node.schema.placement == "moves" and not node.attrs.get("value")


def _same_grid(a: _Affine, b: _Affine) -> bool:
    return (np.array_equal(a.scale, b.scale) and np.array_equal(a.zero_point, b.zero_point)
            and (a.qmin, a.qmax) == (b.qmin, b.qmax))


def _affine_of(enc: Encoded, where: str, channel_axis: int = 0) -> _Affine:
    """The affine codes of ``enc``; per-channel scales must lie along ``channel_axis`` (the output channel)."""
    scale = enc.params["scale"].detach().float().cpu().numpy()
    zero = enc.params["zero_point"].detach().long().cpu().numpy()
    axis = enc.meta.get("axis")
    if axis not in (None, channel_axis) and scale.size > 1:
        raise UnsupportedLayerError(f"{where}: per-channel axis {axis} cannot be exported; this layer's ONNX "
                                    f"weight takes scales along its output channel, axis {channel_axis}")
    per_channel = axis == channel_axis and scale.ndim == 1
    if per_channel:  # a zero point shared by every channel may be stored once
        zero = np.broadcast_to(zero, scale.shape).copy()
    return _Affine(scale, zero, int(enc.meta["qmin"]), int(enc.meta["qmax"]), per_channel,
                   enc.codes.detach().long().cpu().numpy(), channel_axis)


def _static_affine(q: Quantizer, where: str) -> _Affine:
    """Per-tensor scale and zero point of a static affine activation quantizer."""
    spec = q.spec()
    if not (q.name in _STATIC_AFFINE or q.name in _RANGE_AFFINE and spec.get("dynamic") is False):
        raise UnsupportedLayerError(
            f"{where} has no ONNX form: activations export as static affine QDQ (calibrated uniform / linear, "
            f"lsq, pact, dorefa_act), dynamic uniform (float arithmetic), binary or xnor; dynamic linear ranges "
            f"and log / codebook activations cannot be exported")
    if spec.get("per_channel"):
        raise UnsupportedLayerError(f"{where}: per-channel activation scales cannot be exported; use per-tensor")
    training = q.training
    q.eval()
    try:
        with torch.no_grad():
            enc = q.encode(torch.zeros(1))
    finally:
        q.train(training)
    if enc.kind != "affine":
        raise UnsupportedLayerError(f"{where} encodes as {enc.kind!r}, not affine; it has no QDQ form")
    affine = _affine_of(enc, where)
    if affine.scale.size != 1:
        raise UnsupportedLayerError(f"{where}: per-channel activation scales cannot be exported; use per-tensor")
    affine.scale, affine.zero_point = affine.scale.reshape(()), affine.zero_point.reshape(())
    return affine


def _weight(layer: nn.Module, where: str, channel_axis: int = 0) -> tuple[_Affine | None, np.ndarray]:
    """(affine codes of the weight or None, the weight's float value as the torch model uses it); per-channel
    scales along ``channel_axis``, the weight's output channel."""
    from ..serialize import weight_encoding

    weight = layer.weight.detach().float().cpu()
    q = getattr(layer, "weight_quantizer", None)
    if q is None:
        return None, weight.numpy()
    training = q.training
    q.eval()
    try:
        with torch.no_grad():
            enc = weight_encoding(layer) if type(q).encode is not Quantizer.encode else None
            value = decode(enc) if enc is not None else q(weight)
    finally:
        q.train(training)
    affine = _affine_of(enc, where, channel_axis) if enc is not None and enc.kind == "affine" else None
    return affine, value.detach().float().cpu().numpy()


def _fold_batchnorm(affine: _Affine | None, weight: np.ndarray, bias: np.ndarray, bn: nn.Module,
                    ) -> tuple[_Affine | None, np.ndarray, np.ndarray] | None:
    """(affine, float weight, bias) with batch norm ``bn`` folded in, or None where the codes cannot absorb it."""
    invstd = 1.0 / np.sqrt(bn.running_var.detach().double().numpy() + bn.eps)
    a = bn.weight.detach().double().numpy() * invstd if bn.affine else invstd
    beta = bn.bias.detach().double().numpy() if bn.affine else 0.0
    new_bias = ((bias - bn.running_mean.detach().double().numpy()) * a + beta).astype(np.float32)
    shape = (-1,) + (1,) * (weight.ndim - 1)
    if affine is None:
        return None, (weight * a.reshape(shape)).astype(np.float32), new_bias
    codes = affine.codes
    scale = (np.broadcast_to(affine.scale, a.shape) * a).astype(np.float32)
    zero = np.broadcast_to(affine.zero_point, a.shape).copy()
    qmin, qmax = affine.qmin, affine.qmax
    folded = _Affine(scale, zero, qmin, qmax, True, codes)
    value = ((codes - zero.reshape(shape)) * scale.reshape(shape)).astype(np.float32)
    return folded, value, new_bias


def _pad_input_channels(affine: _Affine, weight: np.ndarray, count: int) -> tuple[_Affine, np.ndarray]:
    """Symmetric weight codes and values with ``count`` zero input channels (axis 1) appended."""
    shape = (weight.shape[0], count, *weight.shape[2:])
    codes = np.concatenate([affine.codes, np.zeros(shape, affine.codes.dtype)], axis=1)
    return replace(affine, codes=codes), np.concatenate([weight, np.zeros(shape, weight.dtype)], axis=1)


def _shift_to_uint8(affine: _Affine) -> _Affine:
    """The same values with int8 codes and zero points stored as uint8: (q + 128 - (z + 128)) s = (q - z) s."""
    return replace(affine, codes=affine.codes + _UINT8_SHIFT, zero_point=affine.zero_point + _UINT8_SHIFT,
                   qmin=affine.qmin + _UINT8_SHIFT, qmax=affine.qmax + _UINT8_SHIFT)


class _Exporter:
    def __init__(self, model: nn.Module, ir: Graph, opset: int, int4: bool, channel_multiple: int,
                 binary_ops: str = "float", weight_type: str = "safe") -> None:
        self.model, self.ir, self.channel_multiple, self.binary_ops = model, ir, channel_multiple, binary_ops
        self.weight_type = weight_type
        self.custom_nodes = 0
        #: layers whose int8 weight codes were stored as uint8 (weight_type)
        self.uint8_weight_layers: list[str] = []
        self.modules = dict(model.named_modules())
        self.b = _Builder(opset, int4)
        self.values: dict[str, _Value] = {}
        #: value name -> the nodes reading it (None for a graph output)
        self.readers: dict[str, list[GraphNode | None]] = {}
        for node in ir.nodes:
            for name in node.inputs:
                self.readers.setdefault(name, []).append(node)
        for name in ir.outputs:
            self.readers.setdefault(name, []).append(None)
        consumers = {name: len(readers) for name, readers in self.readers.items()}
        # batch norm node -> the conv / linear node it follows (the folding candidates)
        by_name = {n.name: n for n in ir.nodes}
        self.fold: dict[str, GraphNode] = {}
        for node in ir.nodes:
            if node.op == "batchnorm":
                source = by_name.get(node.inputs[0])
                if source is not None and source.op in _FOLDS_BATCHNORM and consumers[source.name] == 1 \
                        and "output" not in source.quant:
                    self.fold[source.name] = node
        self.folded: set[str] = set()
        # conv node -> the zero pad of its spatial axes that only it reads (a TF "same" padding): one Conv's pads
        self.padded: dict[str, GraphNode] = {}
        for node in ir.nodes:
            source = by_name.get(node.inputs[0]) if node.inputs else None
            if node.op == "conv2d" and source is not None and source.op == "pad" and consumers[source.name] == 1 \
                    and len(source.attrs["pads"]) == 4 and not source.attrs["value"]:
                self.padded[node.name] = source
                self.folded.add(source.name)

    def run(self) -> onnx.GraphProto:
        inputs = []
        for name, shape in self.ir.inputs.items():
            dtype = TensorProto.INT64 if self.ir.dtypes.get(name) == "int64" else TensorProto.FLOAT
            inputs.append(helper.make_tensor_value_info(name, dtype, ["batch", *shape]))
            self.values[name] = _Value(self.b.fresh(name))
            self.b.shapes[self.values[name].name] = shape
        for node in self.ir.nodes:
            if node.name in self.folded:
                self.values[node.name] = self.values[node.inputs[0]]
                continue
            self.values[node.name] = self.emit(node)
            self.b.shapes.setdefault(self.values[node.name].name, node.shape)
        shapes = {**self.ir.inputs, **{n.name: n.shape for n in self.ir.nodes}}
        outputs = [helper.make_tensor_value_info(self.values[name].name, TensorProto.FLOAT,
                                                 ["batch", *shapes[name]]) for name in self.ir.outputs]
        return helper.make_graph(self.b.nodes, "lowbit", inputs, outputs, self.b.initializers)

    def emit(self, node: GraphNode) -> _Value:
        op, name, attrs = node.op, node.name, node.attrs
        args = [self.values[a] for a in node.inputs]
        b = self.b
        if op == "embedding":
            return self.embedding(node, args[0])
        if op in ("lstm", "gru"):  # ONNX's LSTM / GRU on the dequantized weights (its ops take float weights)
            module = self.modules[node.module]
            with torch.no_grad():
                weights = module.quantized_weights() if hasattr(module, "quantized_weights") else \
                    {n: getattr(module, n) for n in module._flat_weights_names}
            layers = [tuple(None if weights.get(f"{n}_l{k}") is None else
                            weights[f"{n}_l{k}"].detach().float().cpu().numpy()
                            for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
                      for k in range(attrs["num_layers"])]
            return _Value(onnx_rnn(b, name, args[0].name, op, layers, batch_first=True))
        if op in LAYER_OPS:
            return self.layer(node, args[0])
        if op == "quant_act":
            return b.activation(args[0], self.modules[node.module].quantizer, node.module)
        if op == "batchnorm":
            bn = self.modules[node.module]
            params = [bn.weight if bn.affine else torch.ones_like(bn.running_var),
                      bn.bias if bn.affine else torch.zeros_like(bn.running_mean), bn.running_mean, bn.running_var]
            names = [b.const(f"{name}.{k}", p.detach().float().cpu().numpy())
                     for k, p in zip(("scale", "bias", "mean", "var"), params)]
            x = args[0].name
            if len(node.shape) == 1:  # BatchNorm1d on (N, C): the ONNX op wants (N, C, ...)
                x = b.node("Unsqueeze", [x, b.const(f"{name}.axes", np.array([2]))], f"{name}.nc1")
            y = b.node("BatchNormalization", [x, *names], name, epsilon=float(attrs["eps"]))
            if len(node.shape) == 1:
                y = b.node("Squeeze", [y, b.const(f"{name}.axes", np.array([2]))], f"{name}.nc")
            return _Value(y)
        # a non-module op that reads stored tensors (a constant) gets them as initializers after its inputs
        stored = [b.const(node.params[t], _state_tensor(self.model, node.params[t]))
                  for t in (*node.schema.tensors, *node.schema.optional) if t in node.params]
        if _moves(node) and args and args[0].affine is None:
            args[0] = b.activation(args[0], self.reader_quantizer(node), f"{name}.input")
        y = node.schema.onnx(b, name, [a.name for a in args] + stored, attrs)
        if _moves(node) and args[0].affine is not None and b.full_range(args[0].affine):
            # the same quantization again: it commutes with the op, and integer kernels see QDQ on both sides
            return b.qdq(y, args[0].affine, f"{name}.requantized")
        return _Value(y)

    def reader_quantizer(self, node: GraphNode) -> Quantizer | None:
        """The 8-bit input quantizer of the layer that alone reads ``node``'s output, directly or through ops that
        only move values: quantized before ``node`` as well, the ops between run on integers."""
        while True:
            readers = self.readers.get(node.name, [])
            if len(readers) != 1 or readers[0] is None or readers[0].inputs[0] != node.name:
                return None
            node = readers[0]
            if node.op in LAYER_OPS:
                q = getattr(self.modules[node.module], "input_quantizer", None)
                base = f"{node.module}.input"
                full = self.b.eight_bit(q, base) and self.b.full_range(_static_affine(q, base))
                return q if full else None
            if not _moves(node):
                return None

    def layer(self, node: GraphNode, x: _Value) -> _Value:
        name, module = node.name, self.modules[node.module]
        b, where = self.b, f"layer {node.module!r}"
        input_quantizer = getattr(module, "input_quantizer", None)
        affine, weight = _weight(module, f"{where} weight", 1 if node.op == "conv_transpose2d" else 0)
        bias = (module.bias.detach().float().cpu().numpy() if module.bias is not None
                else np.zeros(weight.shape[0], np.float32))
        has_bias = module.bias is not None
        bn_node = self.fold.get(name)
        # dequantized binary / codebook weights keep their exact values: batch norm then stays a separate op
        if bn_node is not None and (affine is not None or getattr(module, "weight_quantizer", None) is None):
            folded = _fold_batchnorm(affine, weight, bias, self.modules[bn_node.module])
            if folded is not None and (folded[0] is None or not folded[0].per_channel
                                       or b.opset >= PER_CHANNEL_OPSET):
                affine, weight, bias = folded
                has_bias = True
                self.folded.add(bn_node.name)
        eight_bit_input = b.eight_bit(input_quantizer, f"{node.module}.input")
        unsigned = eight_bit_input and self.unsigned_weights(affine, where)
        padding = 0 if unsigned or not eight_bit_input else self.input_padding(node, affine, where)
        if padding:
            affine, weight = _pad_input_channels(affine, weight, padding)
            x = _Value(b.pad_channels(x.name, padding, f"{node.module}.input"))
        x = b.activation(x, input_quantizer, f"{node.module}.input")
        output_quantizer = getattr(module, "output_quantizer", None)
        if self.binary_ops == "custom" and _sign_weights(module) and (
                node.op == "conv2d" or node.op == "linear" and len(node.shape) == 1):
            y = self.binary_layer(node, x.name, weight, bias if has_bias else None, where)
            return b.activation(_Value(y), output_quantizer, f"{node.module}.output")
        if affine is not None:
            if affine.per_channel and b.opset < PER_CHANNEL_OPSET:
                raise ConfigError(f"{where}: per-channel weight scales need opset >= {PER_CHANNEL_OPSET} "
                                  f"(DequantizeLinear axis); got opset {b.opset}")
            stored = _shift_to_uint8(affine) if unsigned else affine
            if unsigned:
                self.uint8_weight_layers.append(node.module)
            w = b.dequantize(f"{node.module}.weight", stored, b.container(stored, f"{where} weight"))
        else:
            w = b.const(f"{node.module}.weight", weight.astype(np.float32))
        inputs = [x.name, w]
        if has_bias:
            inputs.append(self.bias(node.module, bias, x, affine))
        attrs = node.attrs
        if node.op in ("conv1d", "conv2d"):
            y = b.node("Conv", inputs, name, kernel_shape=list(weight.shape[2:]), strides=attrs["stride"],
                       pads=self.conv_pads(node), dilations=attrs["dilation"], group=attrs["groups"])
        elif node.op == "conv_transpose2d":
            y = b.node("ConvTranspose", inputs, name, kernel_shape=list(weight.shape[2:]), strides=attrs["stride"],
                       pads=attrs["padding"] * 2, output_padding=attrs["output_padding"],
                       dilations=attrs["dilation"], group=attrs["groups"])
        elif len(node.shape) == 1:
            y = b.node("Gemm", inputs, name, transB=1)
        else:
            t = b.node("Transpose", [w], f"{name}.weight_t", perm=[1, 0])
            y = b.node("MatMul", [x.name, t], f"{name}.matmul")
            if has_bias:
                y = b.node("Add", [y, inputs[2]], name)
        return b.activation(_Value(y), output_quantizer, f"{node.module}.output")

    def embedding(self, node: GraphNode, x: _Value) -> _Value:
        """``Gather`` of the indices from the table: a per-row ``DequantizeLinear`` of the codes where they are
        affine (onnxruntime folds it into an int8 gather), else the float (decoded) table."""
        module, b, where = self.modules[node.module], self.b, f"layer {node.module!r}"
        affine, weight = _weight(module, f"{where} weight", 0)
        if affine is not None:
            if affine.per_channel and b.opset < PER_CHANNEL_OPSET:
                raise ConfigError(f"{where}: per-row embedding scales need opset >= {PER_CHANNEL_OPSET} "
                                  f"(DequantizeLinear axis); got opset {b.opset}")
            table = b.dequantize(f"{node.module}.weight", affine, b.container(affine, f"{where} weight"))
        else:
            table = b.const(f"{node.module}.weight", weight.astype(np.float32))
        y = b.node("Gather", [table, x.name], node.name, axis=0)
        return b.activation(_Value(y), getattr(module, "output_quantizer", None), f"{node.module}.output")

    def binary_layer(self, node: GraphNode, x: str, weight: np.ndarray, bias: np.ndarray | None,
                     where: str) -> str:
        """``BinaryConv`` / ``BinaryGemm`` of domain ai.lowbit: the weight as sign bits and a scale per channel."""
        b, base = self.b, node.module
        flat = weight.reshape(weight.shape[0], -1)
        scale = np.abs(flat).max(axis=1).astype(np.float32)
        positive = flat >= 0
        if not np.array_equal(np.where(positive, scale[:, None], -scale[:, None]), flat):
            raise ConfigError(f"{where}: the weight is not one scale times a sign per output channel, "
                              "so it cannot be written as sign bits; export with binary_ops='float'")
        inputs = [x, b.const(f"{base}.weight.signs", pack_signs(positive)),
                  b.const(f"{base}.weight.scale", scale)]
        if bias is not None:
            inputs.append(b.const(f"{base}.bias", bias.astype(np.float32)))
        self.custom_nodes += 1
        if node.op == "linear":
            return b.node("BinaryGemm", inputs, node.name, domain=DOMAIN, k=flat.shape[1])
        attrs = node.attrs
        return b.node("BinaryConv", inputs, node.name, domain=DOMAIN, k=flat.shape[1],
                      kernel_shape=list(weight.shape[2:]), strides=attrs["stride"],
                      pads=self.conv_pads(node), dilations=attrs["dilation"], group=attrs["groups"])

    def conv_pads(self, node: GraphNode) -> list[int]:
        """ONNX pads (begins of the spatial axes, then their ends) of a conv, with the zero pad before a conv2d
        merged in."""
        if node.name not in self.padded:
            return node.attrs["padding"] * 2
        ph, pw = node.attrs["padding"]
        left, right, top, bottom = self.padded[node.name].attrs["pads"]
        return [ph + top, pw + left, ph + bottom, pw + right]

    def unsigned_weights(self, affine: _Affine | None, where: str) -> bool:
        """Whether the int8 weight codes of a layer with 8-bit QDQ input are stored as uint8 (``weight_type``)."""
        if affine is None or self.b.container(affine, f"{where} weight").onnx_type != TensorProto.INT8:
            return False
        if self.weight_type == "safe":
            return int(np.abs(affine.codes).max(initial=0)) > SATURATION_FREE_CODE
        return self.weight_type == "uint8"

    def input_padding(self, node: GraphNode, affine: _Affine | None, where: str) -> int:
        """Zero input channels a conv with 8-bit QDQ input needs so its channel count is a multiple of
        ``channel_multiple``; 0 where the conv is grouped, its kernel has more than MAX_PADDED_TAPS taps, or it
        will not run on onnxruntime's symmetric int8 conv kernel (weights not int8 with zero point 0)."""
        if node.op != "conv2d" or node.attrs["groups"] != 1 or affine is None or affine.zero_point.any() \
                or int(np.prod(affine.codes.shape[2:])) > MAX_PADDED_TAPS:
            return 0
        missing = -affine.codes.shape[1] % self.channel_multiple
        if not missing or self.b.container(affine, f"{where} weight").onnx_type != TensorProto.INT8:
            return 0
        return missing

    def bias(self, module: str, bias: np.ndarray, x: _Value, affine: _Affine | None) -> str:
        """int32 codes with scale s_x s_w where input and weight are 8-bit QDQ (and the codes fit), else float."""
        if x.scale is None or affine is None or affine.zero_point.any():
            return self.b.const(f"{module}.bias", bias.astype(np.float32))
        scale = (np.float32(x.scale) * affine.scale).astype(np.float32)
        if scale.size not in (1, bias.size):  # a grouped transposed conv: scale j serves channel j of each group
            scale = np.tile(scale, bias.size // scale.size)
        codes = np.round(bias.astype(np.float64) / scale.astype(np.float64))
        if codes.min() < _INT32[0] or codes.max() > _INT32[1]:
            return self.b.const(f"{module}.bias", bias.astype(np.float32))
        int32 = _Container(TensorProto.INT32, np.int32, *_INT32, 10)
        coded = _Affine(scale, np.zeros(scale.shape, np.int64), *_INT32, affine.per_channel, codes.astype(np.int64))
        return self.b.dequantize(f"{module}.bias", coded, int32)


def _state_tensor(model: nn.Module, key: str) -> np.ndarray:
    """The float32 value of the model's parameter or buffer at state_dict key ``key``."""
    owner, _, local = key.rpartition(".")
    tensor = getattr(model.get_submodule(owner) if owner else model, local)
    return tensor.detach().float().cpu().numpy()


def _sign_weights(module: nn.Module) -> bool:
    """Whether the layer's weight quantizer gives one scale times a sign per channel (binary, xnor)."""
    q = getattr(module, "weight_quantizer", None)
    return q is not None and q.name in _SIGN


def _check_opset(opset: int) -> int:
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ConfigError(f"opset must be an integer from {MIN_OPSET} to {MAX_OPSET}, got {opset!r}")
    return opset


def _check_channel_multiple(channel_multiple: int) -> int:
    if isinstance(channel_multiple, bool) or not isinstance(channel_multiple, int) or channel_multiple < 1:
        raise ConfigError(f"channel_multiple must be a positive integer (1: no channel padding), "
                          f"got {channel_multiple!r}")
    return channel_multiple


def to_onnx(model: nn.Module, example_input: torch.Tensor, *, opset: int = DEFAULT_OPSET,
            int4: bool = False, channel_multiple: int = DEFAULT_CHANNEL_MULTIPLE,
            binary_ops: str = "float", weight_type: str = "safe") -> onnx.ModelProto:
    """The ONNX model of ``model`` (see the module docstring), its graph traced on ``example_input``.

    ``int4=True`` stores codes of at most 4 bits as int4 / uint4 (opset >= 21); by default they
    travel in int8 / uint8, which onnxruntime's int8 kernels run. A conv with 8-bit input and int8
    symmetric weights gets zero input channels up to a multiple of ``channel_multiple`` (1: none).
    ``binary_ops="custom"`` writes binary / XNOR weight layers as the sign-bit ops of
    :mod:`lowbit.export.binary_ops` (not runnable by onnxruntime); ``"float"`` (default) as dequantized
    float weights. ``weight_type`` says how int8 weight codes of layers with an 8-bit input are stored:
    ``"safe"`` (default) as int8 where no int16 pair sum of onnxruntime's x86 kernels can saturate and
    as uint8 (codes + 128) elsewhere, ``"int8"`` always (exact and fastest on x86 CPUs with VNNI),
    ``"uint8"`` always. The model is checked with ``onnx.checker.check_model(full_check=True)``.
    """
    _check_opset(opset)
    _check_channel_multiple(channel_multiple)
    if binary_ops not in BINARY_OPS:
        raise ConfigError(f"binary_ops must be one of {', '.join(BINARY_OPS)}, got {binary_ops!r}")
    if weight_type not in WEIGHT_TYPES:
        raise ConfigError(f"weight_type must be one of {', '.join(WEIGHT_TYPES)}, got {weight_type!r}")
    if int4 and opset < WIDE_TYPES_OPSET:
        raise ConfigError(f"int4=True needs opset >= {WIDE_TYPES_OPSET} (int4 QuantizeLinear); got opset {opset}")
    from ..serialize import GraphModel, captured_graph

    # a model loaded from a .lowbit file runs its stored graph IR, which is the graph to export
    if not isinstance(model, GraphModel):
        model = decompose(model)  # a float model's multi-head attention: the linears its graph reads
    ir = model.graph if isinstance(model, GraphModel) else captured_graph(model, example_input)[1]
    exporter = _Exporter(model, ir, opset, int4, channel_multiple, binary_ops, weight_type)
    graph = exporter.run()
    imports = [helper.make_opsetid("", opset)]
    if exporter.custom_nodes:
        imports.append(helper.make_opsetid(DOMAIN, VERSION))
    proto = helper.make_model(graph, opset_imports=imports, producer_name="lowbit")
    if exporter.uint8_weight_layers:
        helper.set_model_props(proto, {UINT8_WEIGHTS_PROP: ",".join(exporter.uint8_weight_layers)})
    proto.ir_version = helper.find_min_ir_version_for(proto.opset_import, ignore_unknown=True)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export_onnx(model: nn.Module, path: str | os.PathLike, example_input: torch.Tensor, *,
                opset: int = DEFAULT_OPSET, int4: bool = False, channel_multiple: int = DEFAULT_CHANNEL_MULTIPLE,
                binary_ops: str = "float", weight_type: str = "safe") -> Path:
    """Write :func:`to_onnx` of ``model`` to ``path`` (:func:`write_onnx`)."""
    return write_onnx(to_onnx(model, example_input, opset=opset, int4=int4, channel_multiple=channel_multiple,
                              binary_ops=binary_ops, weight_type=weight_type), path)


def write_onnx(proto: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write ``proto`` to ``path`` through a temporary file renamed into place (parent directories created)."""
    write_atomic(path, proto.SerializeToString())
    return Path(path)


def uint8_weight_layers(proto: onnx.ModelProto) -> list[str]:
    """The layers of an exported model whose int8 weight codes are stored as uint8 (see ``weight_type``)."""
    props = {p.key: p.value for p in proto.metadata_props}
    return [name for name in props.get(UINT8_WEIGHTS_PROP, "").split(",") if name]


#: the x86 CPU flags of int8 dot products that accumulate in int32 (exact for int8 weights in onnxruntime)
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def local_vnni(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> list[str] | None:
    """The :data:`VNNI_FLAGS` this machine's CPU reports (empty: none), or None where ``cpuinfo`` cannot be
    read (not Linux): whether int8 weights are exact in onnxruntime *here*, not on the deployment target."""
    try:
        flags = set(Path(cpuinfo).read_text().split())
    except OSError:
        return None
    return sorted(flags & set(VNNI_FLAGS))
