"""The Quantizer contract, the name registry and the integer-code container.

A quantizer is a ``torch.nn.Module`` whose ``forward(x)`` returns the
fake-quantized tensor (float, same shape as ``x``) with its straight-through
gradient. ``spec()`` is a JSON-able dict that :func:`get` turns back into an
equal quantizer. Quantizers whose values map to integer codes implement
``encode(x) -> Encoded``; :func:`decode` inverts it bit for bit, so that
``decode(q.encode(x))`` equals ``q(x)`` exactly in eval mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..errors import CalibrationError, ConfigError

ENCODED_KINDS = ("affine", "log", "binary", "ternary", "codebook", "group_affine", "group_binary", "group_ternary",
                 "group_codebook", "group_log")


@dataclass
class Encoded:
    """Integer codes plus the parameters that turn them back into floats.

    ``kind`` selects the decoding rule (all arithmetic in float32):

    - ``affine``: ``(codes - zero_point) * scale``; ``params`` holds ``scale``
      (float32) and ``zero_point`` (int64), scalars or 1-D along ``meta["axis"]``;
      codes lie in ``[meta["qmin"], meta["qmax"]]``.
    - ``log``: ``sign * 2 ** (fsr - 2**bits + codes)`` where ``codes > 0`` and 0
      where ``codes == 0``; ``meta["fsr"]`` is an int, ``params["sign"]`` (int8,
      +-1) is present when ``meta["signed"]``.
    - ``binary``: ``(2 * codes - 1) * scale``, codes in {0, 1} (bit 1 is +1);
      ``params["scale"]`` float32, scalar or 1-D along ``meta["axis"]``.
    - ``ternary``: ``codes * scale``, codes in {-1, 0, +1}.
    - ``codebook``: ``params["codebook"][codes]``, codes in ``[0, len(codebook))``.
    - ``group_affine``: ``(codes - zero_point) * scale`` per group: the codes read as ``[O, K]`` rows (C order),
      column ``c`` in group ``c // meta["group_size"]``; ``scale`` float32 and ``zero_point`` int64 ``[O, G]``
      (no ``zero_point`` when ``meta["symmetric"]``: 0); codes in ``[meta["qmin"], meta["qmax"]]``.
    - ``group_binary`` / ``group_ternary``: ``(2 codes - 1) * scale`` / ``codes * scale`` per group (codes in
      {0, 1} / {-1, 0, 1}), the groups and ``scale`` [O, G] as ``group_affine``.
    - ``group_codebook``: ``codebook[o, c // g, codes]``, ``codebook`` float32 [O, G, K], codes in [0, K).
    - ``group_log``: ``sign(codes) * scale[o, c // g] * 2 ** (|codes| - E)``, E = 2^(bits-1) - 1, codes in
      [-E, E] (0 is 0); groups and ``scale`` as ``group_affine``.
    """

    kind: str
    codes: torch.Tensor
    bits: int
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def along(t: torch.Tensor, axis: int | None, ndim: int) -> torch.Tensor:
    """Reshape a per-channel parameter so it broadcasts along ``axis``."""
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def decode(enc: Encoded) -> torch.Tensor:
    """Turn :class:`Encoded` codes back into the float32 values they stand for."""
    codes, p, axis = enc.codes, enc.params, enc.meta.get("axis")
    if enc.kind == "affine":
        scale = along(p["scale"].float(), axis, codes.dim())
        zero = along(p["zero_point"].long(), axis, codes.dim())
        return (codes.long() - zero).float() * scale
    if enc.kind == "log":
        exponent = (enc.meta["fsr"] - 2**enc.bits) + codes.long()
        mag = torch.where(codes > 0, torch.ldexp(torch.ones_like(codes, dtype=torch.float32), exponent), 0.0)
        return mag * p["sign"].float() if enc.meta.get("signed") else mag
    if enc.kind == "binary":
        scale = along(p["scale"].float(), axis, codes.dim())
        return (2 * codes.long() - 1).float() * scale
    if enc.kind == "ternary":
        scale = along(p["scale"].float(), axis, codes.dim())
        return codes.float() * scale
    if enc.kind == "codebook":
        return p["codebook"].float()[codes.long()]
    if enc.kind == "group_affine":
        rows = codes.reshape(codes.shape[0], math.prod(codes.shape[1:])).long()
        group = torch.arange(rows.shape[1], device=rows.device) // enc.meta["group_size"]
        if "zero_point" in p:
            rows = rows - p["zero_point"].long()[:, group]
        return (rows.float() * p["scale"].float()[:, group]).reshape(codes.shape)
    if enc.kind in ("group_binary", "group_ternary"):
        rows = codes.reshape(codes.shape[0], math.prod(codes.shape[1:])).long()
        group = torch.arange(rows.shape[1], device=rows.device) // enc.meta["group_size"]
        level = 2 * rows - 1 if enc.kind == "group_binary" else rows
        return (level.float() * p["scale"].float()[:, group]).reshape(codes.shape)
    if enc.kind == "group_log":
        rows = codes.reshape(codes.shape[0], math.prod(codes.shape[1:])).long()
        full = p["scale"].float()[:, torch.arange(rows.shape[1], device=rows.device) // enc.meta["group_size"]]
        magnitude = torch.ldexp(full, rows.abs() - (2 ** (enc.bits - 1) - 1))
        return (torch.sign(rows).float() * magnitude).reshape(codes.shape)
    if enc.kind == "group_codebook":
        rows = codes.reshape(codes.shape[0], math.prod(codes.shape[1:])).long()
        group = torch.arange(rows.shape[1], device=rows.device) // enc.meta["group_size"]
        row = torch.arange(rows.shape[0], device=rows.device)[:, None]
        return p["codebook"].float()[row, group[None, :], rows].reshape(codes.shape)
    raise ConfigError(f"unknown encoded kind {enc.kind!r}; valid kinds: {', '.join(ENCODED_KINDS)}")


class Quantizer(nn.Module):
    """Base class: subclasses set ``name`` and implement ``forward`` and ``spec``.

    ``label`` is the dotted name of the layer tensor the quantizer serves (set
    by :func:`lowbit.quantize`), used in error messages.
    """

    name: ClassVar[str] = ""
    #: bits per stored value, or None for a float quantizer
    bits: int | None = None

    def __init__(self) -> None:
        super().__init__()
        self.label = ""

    def spec(self) -> dict[str, Any]:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> Encoded:
        raise ConfigError(f"quantizer {self.name!r} has no integer codes to encode ({self.where()})")

    def decode(self, enc: Encoded) -> torch.Tensor:
        return decode(enc)

    def where(self) -> str:
        return f"tensor {self.label!r}" if self.label else "unnamed tensor"

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.spec().items() if k != "name")

    def __eq__(self, other: object) -> bool:  # equal specs make equal quantizers
        return isinstance(other, Quantizer) and self.spec() == other.spec()

    __hash__ = nn.Module.__hash__


_REGISTRY: dict[str, type[Quantizer]] = {}


def register(name: str) -> Callable[[type[Quantizer]], type[Quantizer]]:
    """Class decorator: make a quantizer reachable by ``name`` through :func:`get`."""

    def deco(cls: type[Quantizer]) -> type[Quantizer]:
        if name in _REGISTRY:
            raise ConfigError(f"quantizer name {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def names() -> list[str]:
    """The registered quantizer names, sorted."""
    return sorted(_REGISTRY)


def get(spec: str | dict[str, Any] | Quantizer | None) -> Quantizer | None:
    """Build a quantizer from a name, a spec dict, a quantizer (returned as is) or None."""
    if spec is None or isinstance(spec, Quantizer):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or "name" not in spec:
        raise ConfigError(f"a quantizer spec is a name, a dict with a 'name' key, a Quantizer or None, not {spec!r}")
    params = dict(spec)
    name = params.pop("name")
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ConfigError(f"unknown quantizer {name!r}; known quantizers: {', '.join(names())}")
    try:
        return _REGISTRY[name](**params)
    except TypeError as exc:
        raise ConfigError(f"bad parameters for quantizer {name!r}: {exc}") from None


def check_bits(bits: int, low: int, high: int, what: str = "bits") -> int:
    """Return ``bits`` if it is an int in [low, high], else raise ConfigError."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= high:
        raise ConfigError(f"{what} must be an integer from {low} to {high}, got {bits!r}")
    return bits

def check_flag(value: bool, what: str) -> bool:
    """Return ``value`` if it is a bool, else raise ConfigError."""
    if not isinstance(value, bool):
        raise ConfigError(f"{what} must be True or False, got {value!r}")
    return value


def check_finite(x: torch.Tensor, where: str) -> None:
    """Raise CalibrationError if ``x`` holds NaN or Inf."""
    if x.is_floating_point() and x.numel() and not bool(torch.isfinite(x.abs().amax())):  # max propagates NaN
        bad = int((~torch.isfinite(x)).sum())
        raise CalibrationError(f"{where} holds {bad} NaN/Inf value(s); quantization needs finite values")


def check_axis(x: torch.Tensor, axis: int | None, where: str) -> None:
    """Raise ConfigError if a per-channel ``axis`` does not exist in ``x``."""
    if axis is not None and not (isinstance(axis, int) and 0 <= axis < x.dim()):
        raise ConfigError(f"per-channel axis {axis} does not fit {where} of shape {tuple(x.shape)}")


#: scale floor: a scale is never below this (so never 0 and never NaN), as in torch's observers
EPS = float(torch.finfo(torch.float32).eps)
