"""Float32 numpy versions of the activation quantizers' eval-mode forward, op for op as in torch.

Each function repeats the float32 arithmetic of its torch quantizer (same
operations in the same order, rounding half to even), so that on the same
input it gives the same bits:

- ``binary``: sign(x), sign(0) = +1;  ``xnor`` (activation): sign(x) * A,
  A = max(mean over channels of |x|, EPS) (Rastegari et al. 2016);
- ``uniform`` (per tensor; static: range from ``stats.min_val`` /
  ``stats.max_val``, dynamic: min/max of the input; ``per_token``: of each vector along ``token_axis``):
  ``s = max((hi - lo) / (qmax - qmin), EPS)``, ``z = clamp(qmin - round(lo / s), qmin, qmax)``
  with lo <- min(lo, 0), hi <- max(hi, 0); symmetric ``s = max(max(-lo, hi) / ((qmax - qmin) / 2), EPS)``,
  ``z = 0``; then ``(clamp(round(x * (1 / s)) + z, qmin, qmax) - z) * s`` (torch's fake_quantize);
- ``linear`` / ``log2`` (Miyashita et al. 2016): fsr fixed, or the smallest fsr with
  2^fsr >= max|x| (dynamic) or >= max(-min_val, max_val) (static), clamped to the valid fsr;
  LinearQuant ``clamp(round(x / step), qmin, qmax) * step`` with step = 2^(fsr - b + signed);
  LogQuant ``sign(x) 2^(fsr - 2^b + c)``, c = clamp(round(log2|x|) - (fsr - 2^b), 0, 2^b - 1), 0 for c = 0;
- ``dorefa_act`` (Zhou et al. 2016): ``round(clip(x, 0, 1) (2^k - 1)) * float32(1 / (2^k - 1))``;
- ``pact`` (Choi et al. 2018): ``round(min(max(x, 0), a) / s) * s``, a = max(alpha, EPS), s = a / (2^k - 1);
- ``lsq`` (Esser et al. 2020): ``round(clip(x / s, -Q_N, Q_P)) * s``, s = max(step, EPS);
- ``dorefa_grad``: the identity (it quantizes gradients only).

A quantizer's learned or observed state comes as ``state``: its local state
names (``stats.min_val``, ``alpha``, ``step``, ``initialized``) -> arrays.
As in torch, all but ``binary`` and ``xnor`` reject NaN / Inf input with
:class:`~lowbit.errors.CalibrationError`.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..errors import CalibrationError, FormatError, UnsupportedLayerError

#: an activation quantizer: float32 array -> float32 array of the same shape
Activation = Callable[[np.ndarray], np.ndarray]
#: a quantizer's state: local state name -> array
State = dict[str, np.ndarray]

#: scale floor: lowbit.quantizers.base.EPS, float32's machine epsilon
EPS = np.finfo(np.float32).eps

SUPPORTED = ("binary", "dorefa_act", "dorefa_grad", "linear", "log2", "lsq", "pact",
             "uniform (per tensor or per token, minmax when dynamic)", "xnor (activation)")


def sign(x: np.ndarray) -> np.ndarray:
    """+1 where ``x >= 0``, else -1 (float32; sign(0) = +1)."""
    return np.where(x >= 0, np.float32(1), np.float32(-1))


def xnor_activation(x: np.ndarray) -> np.ndarray:
    """XNOR-Net input ``sign(I) * A``, A the mean of |I| over channels (axis 1), floored at EPS."""
    return sign(x) * np.maximum(np.abs(x).mean(axis=1, keepdims=True, dtype=np.float32), EPS)


# ---------------------------------------------------------------- uniform (affine) grids


def affine_qrange(bits: int, symmetric: bool, narrow: bool) -> tuple[int, int]:
    """(qmin, qmax): affine [narrow, 2^b - 1], symmetric [-2^(b-1) + narrow, 2^(b-1) - 1]."""
    if symmetric:
        return -(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1
    return int(narrow), 2**bits - 1


def affine_qparams(lo: np.ndarray, hi: np.ndarray, qmin: int, qmax: int, symmetric: bool,
                   where: str = "activation") -> tuple[np.ndarray, np.ndarray | int]:
    """(scale float32, zero point) of the range [lo, hi] widened to include 0 (torch's observer rule), scalars or
    arrays of ranges alike; CalibrationError naming ``where`` when hi - lo overflows float32."""
    lo = np.minimum(np.float32(lo), np.float32(0))
    hi = np.maximum(np.float32(hi), np.float32(0))
    with np.errstate(over="ignore"):
        if symmetric:
            scale = np.maximum(np.maximum(-lo, hi) / np.float32((qmax - qmin) / 2), EPS)
            return scale, np.zeros(scale.shape, np.float32) if scale.ndim else 0
        scale = np.maximum((hi - lo) / np.float32(qmax - qmin), EPS)
    if not np.isfinite(scale).all():
        raise CalibrationError(f"{where}: a range is too wide for float32 (hi - lo overflows)")
    zero_point = np.clip(np.float32(qmin) - np.rint(lo / scale), qmin, qmax)
    return scale, zero_point if zero_point.ndim else int(zero_point)


def fake_quantize_affine(x: np.ndarray, scale: np.float32, zero_point: int, qmin: int, qmax: int) -> np.ndarray:
    """``(clamp(round(x * (1 / s)) + z, qmin, qmax) - z) * s`` in float32 (torch.fake_quantize_per_tensor_affine)."""
    inverse = np.float32(1) / np.float32(scale)
    with np.errstate(over="ignore", invalid="ignore"):
        codes = np.clip(np.rint(x * inverse) + np.float32(zero_point), np.float32(qmin), np.float32(qmax))
        return (codes - np.float32(zero_point)) * np.float32(scale)


def uniform(spec: dict[str, Any], state: State, where: str) -> Activation:
    """The uniform quantizer: static (range from ``stats``) or dynamic minmax, per tensor."""
    if spec.get("per_channel"):
        raise _unsupported(spec, where, "per-channel activation ranges")
    qmin, qmax = affine_qrange(spec["bits"], spec["symmetric"], spec["narrow"])
    symmetric = spec["symmetric"]
    if spec.get("per_token"):
        axis = spec["token_axis"]
        return lambda x: fake_quantize_affine(x, *_token_qparams(x, axis, qmin, qmax, symmetric, where), qmin, qmax)
    if spec["dynamic"]:
        if spec["observer"] != "minmax":
            raise _unsupported(spec, where, f"a dynamic {spec['observer']!r} observer")
        return lambda x: fake_quantize_affine(x, *affine_qparams(x.min(), x.max(), qmin, qmax, symmetric, where),
                                              qmin, qmax)
    scale, zero_point = affine_qparams(*_observed(state, where), qmin, qmax, symmetric, where)
    return lambda x: fake_quantize_affine(x, scale, zero_point, qmin, qmax)


def _token_qparams(x: np.ndarray, axis: int, qmin: int, qmax: int, symmetric: bool,
                   where: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-token (scale, zero point), kept dimensions: the range of each vector along ``axis``."""
    if axis == 0:  # each sample whole
        rows = x.reshape(len(x), -1)
        shape = (len(x),) + (1,) * (x.ndim - 1)
        lo, hi = rows.min(axis=1).reshape(shape), rows.max(axis=1).reshape(shape)
    else:
        lo, hi = x.min(axis=axis, keepdims=True), x.max(axis=axis, keepdims=True)
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise CalibrationError(f"{where} holds NaN/Inf value(s); quantization needs finite values")
    return affine_qparams(lo, hi, qmin, qmax, symmetric, where)


def _observed(state: State, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The per-tensor (min_val, max_val) a static quantizer observed; CalibrationError if it observed nothing."""
    lo, hi = state.get("stats.min_val"), state.get("stats.max_val")
    if lo is None or hi is None or lo.size == 0 or hi.size == 0:
        raise CalibrationError(f"{where} has no observed range: calibrate the model (lowbit.calibrate) before saving")
    if lo.shape != () or hi.shape != ():
        raise UnsupportedLayerError(f"{where}: the runtime runs per-tensor activation ranges, got shape "
                                    f"{list(lo.shape)}")
    return lo.astype(np.float32), hi.astype(np.float32)


# ---------------------------------------------------------------- power-of-two full-scale range


def smallest_fsr(max_abs: np.ndarray, low: int, high: int) -> int:
    """The smallest integer fsr with 2^fsr >= max_abs, clamped to [low, high] (0 gives low); exact by frexp."""
    if float(max_abs) == 0.0:
        return low
    mantissa, exponent = np.frexp(np.float32(max_abs))
    return min(max(int(exponent) - int(mantissa == 0.5), low), high)


def linear_quant(x: np.ndarray, bits: int, fsr: int, signed: bool) -> np.ndarray:
    """LinearQuant: ``clamp(round(x / step), qmin, qmax) * step``, step = 2^(fsr - b + signed)."""
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return fake_quantize_affine(x, np.ldexp(np.float32(1), fsr - bits + int(signed)), 0, qmin, qmax)


def log_quant(x: np.ndarray, bits: int, fsr: int, signed: bool) -> np.ndarray:
    """LogQuant: ``sign(x) 2^(fsr - 2^b + c)`` for code c > 0, 0 for c = 0 (negative x are 0 when unsigned).

    round(log2|x|) is exact: |x| = f 2^e, f in [0.5, 1), gives e when f^2 >= 1/2, else e - 1.
    """
    nonzero = x != 0 if signed else x > 0
    fraction, exponent = np.frexp(np.abs(x))
    rounded = exponent.astype(np.int64) - (np.square(fraction.astype(np.float64)) < 0.5)
    offset = fsr - 2**bits
    codes = np.where(nonzero, np.clip(rounded - offset, 0, 2**bits - 1), 0)
    with np.errstate(over="ignore", under="ignore"):
        magnitude = np.where(codes > 0, np.ldexp(np.float32(1), offset + codes).astype(np.float32), np.float32(0))
    if not signed:
        return magnitude
    return magnitude * np.where((x < 0) & (codes > 0), np.float32(-1), np.float32(1))


def full_scale_range(spec: dict[str, Any], state: State, where: str) -> Activation:
    """``linear`` or ``log2``: fsr fixed, read off each input (dynamic) or off the observed range (static)."""
    bits, signed, name = spec["bits"], spec["signed"], spec["name"]
    low, high = (bits - int(signed) - 126, 127) if name == "linear" else (-125, 128)
    quantize = linear_quant if name == "linear" else log_quant
    fsr = spec.get("fsr")
    if fsr is None and spec["dynamic"]:
        return lambda x: quantize(x, bits, smallest_fsr(np.abs(x).max(), low, high), signed)
    if fsr is None:
        lo, hi = _observed(state, where)
        fsr = smallest_fsr(np.maximum(-lo, hi), low, high)
    return lambda x: quantize(x, bits, fsr, signed)


# ---------------------------------------------------------------- learned / fixed clipping


def dorefa_act(x: np.ndarray, bits: int) -> np.ndarray:
    """DoReFa quantize_k(clip(x, 0, 1)) = ``round(clip(x, 0, 1) (2^k - 1)) * float32(1 / (2^k - 1))``."""
    levels = 2**bits - 1
    return np.rint(np.clip(x, np.float32(0), np.float32(1)) * np.float32(levels)) * np.float32(1 / levels)


def pact(x: np.ndarray, alpha: np.float32, bits: int) -> np.ndarray:
    """PACT ``round(min(max(x, 0), a) / s) * s`` with a = max(alpha, EPS), s = a / (2^k - 1)."""
    level = np.maximum(np.float32(alpha), EPS)
    scale = level / np.float32(2**bits - 1)
    with np.errstate(over="ignore"):
        return np.rint(np.minimum(np.maximum(x, np.float32(0)), level) / scale) * scale


def lsq(x: np.ndarray, step: np.float32, bits: int, signed: bool) -> np.ndarray:
    """LSQ ``round(clip(x / s, -Q_N, Q_P)) * s``, s = max(step, EPS); Q_N, Q_P = 2^(b-1), 2^(b-1) - 1 signed,
    0, 2^b - 1 unsigned."""
    q_n, q_p = (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    step = np.maximum(np.float32(step), EPS)
    with np.errstate(over="ignore"):
        return np.rint(np.clip(x / step, np.float32(-q_n), np.float32(q_p))) * step


def _scalar(state: State, name: str, spec: dict[str, Any], where: str) -> np.float32:
    value = state.get(name)
    if value is None or value.shape != ():
        raise UnsupportedLayerError(f"{where}: quantizer {spec!r} needs a scalar {name!r} in the file, got "
                                    f"{None if value is None else list(value.shape)}")
    return np.float32(value)


def _lsq(spec: dict[str, Any], state: State, where: str) -> Activation:
    if spec.get("per_channel"):
        raise _unsupported(spec, where, "per-channel steps")
    if not bool(state.get("initialized", np.bool_(False))):
        raise CalibrationError(f"{where}: the lsq step was never initialised; calibrate or train before saving")
    step, bits, signed = _scalar(state, "step", spec, where), spec["bits"], spec["signed"]
    return lambda x: lsq(x, step, bits, signed)


def _pact(spec: dict[str, Any], state: State, where: str) -> Activation:
    alpha, bits = _scalar(state, "alpha", spec, where), spec["bits"]
    return lambda x: pact(x, alpha, bits)


def _unsupported(spec: dict[str, Any], where: str, what: str | None = None) -> UnsupportedLayerError:
    reason = f" ({what})" if what else ""
    return UnsupportedLayerError(f"{where}: the runtime has no numpy version of quantizer {spec!r}{reason}; "
                                 f"supported: {', '.join(SUPPORTED)}")


_FACTORIES: dict[str, Callable[[dict[str, Any], State, str], Activation]] = {
    "dorefa_act": lambda spec, state, where: lambda x: dorefa_act(x, spec["bits"]),
    "dorefa_grad": lambda spec, state, where: lambda x: x,
    "linear": full_scale_range,
    "log2": full_scale_range,
    "lsq": _lsq,
    "pact": _pact,
    "uniform": uniform,
}


def activation_quantizer(spec: dict[str, Any] | None, state: State, where: str) -> Activation:
    """The numpy eval-mode forward of an activation quantizer ``spec`` with its ``state`` (None: the identity).

    ``where`` names the layer and slot in errors: UnsupportedLayerError for quantizers the runtime cannot run,
    CalibrationError for a static quantizer that observed nothing.
    """
    if spec is None:
        return lambda x: x
    name = spec.get("name") if isinstance(spec, dict) else None
    if name == "xnor":
        if spec.get("role") != "activation":
            raise _unsupported(spec, where, "an xnor weight quantizer on an activation")
        return xnor_activation
    if name == "binary":
        return sign
    if name not in _FACTORIES:
        raise _unsupported(spec, where)
    try:
        quantize = _FACTORIES[name](spec, state, where)
    except KeyError as exc:
        raise FormatError("bad-graph", f"{where}: quantizer spec {spec!r} lacks {exc}") from None
    return _checked(quantize, where)


def _checked(quantize: Activation, where: str) -> Activation:
    """``quantize`` behind torch's input check: NaN or Inf in x raises CalibrationError naming ``where``."""
    def run(x: np.ndarray) -> np.ndarray:
        if not np.isfinite(x).all():
            bad = int(np.count_nonzero(~np.isfinite(x)))
            raise CalibrationError(f"{where} holds {bad} NaN/Inf value(s); quantization needs finite values")
        return quantize(x)
    return run
