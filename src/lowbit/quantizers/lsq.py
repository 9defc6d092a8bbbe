"""Learned Step Size Quantization (Esser et al., ICLR 2020, arXiv:1902.08153).

    v_hat = round(clip(v / s, -Q_N, Q_P)) s

with Q_N = 2^(b-1), Q_P = 2^(b-1) - 1 (signed) or Q_N = 0, Q_P = 2^b - 1 (unsigned), and a learned
step s initialised to 2 mean(|v|) / sqrt(Q_P). Gradients (straight through the round):

    dv_hat/dv = 1 if -Q_N < v/s < Q_P else 0
    dv_hat/ds = -v/s + round(v/s) if -Q_N < v/s < Q_P;  -Q_N if v/s <= -Q_N;  Q_P if v/s >= Q_P

and the step gradient is multiplied by g = 1 / sqrt(N Q_P), N the number of values
that share the step: the weights of the layer (of the channel when per-channel), or the features per
sample for activations (numel / batch size, the batch being axis 0).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .base import EPS, Encoded, Quantizer, along, check_axis, check_bits, check_finite, register

ROLES = ("weight", "activation")
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def lsq_range(bits: int, signed: bool) -> tuple[int, int]:
    """(Q_N, Q_P): the codes run from -Q_N to Q_P."""
    return (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def lsq_init_step(v: torch.Tensor, q_p: int, per_channel: bool = False) -> torch.Tensor:
    """s = 2 mean(|v|) / sqrt(Q_P) in float32 (per output channel: mean over all axes but 0).

    The mean is taken in float64 and s kept within [EPS, float32 max].
    """
    dims = tuple(range(1, v.dim())) if per_channel else tuple(range(v.dim()))
    mean = v.detach().abs().double().mean(dim=dims) if dims else v.detach().abs().double()
    return (2 * mean / math.sqrt(q_p)).clamp(EPS, FLOAT32_MAX).float()


def lsq_codes(v: torch.Tensor, step: torch.Tensor, q_n: int, q_p: int) -> torch.Tensor:
    """round(clip(v / s, -Q_N, Q_P)) as floats, s = max(step, EPS) already shaped to broadcast."""
    return torch.round((v / step.clamp(min=EPS)).clamp(-q_n, q_p))


class LSQRound(torch.autograd.Function):
    """LSQ's v_hat = codes s forward and its paper gradients backward (see the module docstring).

    The floor of s at EPS is passed straight through, so the gradient can lift a step that fell below it.
    """

    @staticmethod
    def forward(ctx, v, step, q_n, q_p, grad_scale):
        ctx.save_for_backward(v, step)
        ctx.q_n, ctx.q_p, ctx.grad_scale = q_n, q_p, grad_scale
        return lsq_codes(v, step, q_n, q_p) * step.clamp(min=EPS)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        v, step = ctx.saved_tensors
        q_n, q_p = ctx.q_n, ctx.q_p
        ratio = v / step.clamp(min=EPS)
        below, above = ratio <= -q_n, ratio >= q_p
        inside = ~(below | above)
        d_step = torch.where(below, -float(q_n), torch.where(above, float(q_p), torch.round(ratio) - ratio))
        g_step = (g * d_step).sum_to_size(step.shape) * ctx.grad_scale
        return g * inside, g_step, None, None, None


def lsq_quantize(v: torch.Tensor, step: torch.Tensor, q_n: int, q_p: int, grad_scale: float = 1.0) -> torch.Tensor:
    """LSQ's v_hat = round(clip(v / s, -Q_N, Q_P)) s with the paper's gradients, the step's scaled by
    ``grad_scale``; ``step`` is a scalar or shaped to broadcast against v."""
    return LSQRound.apply(v, step, q_n, q_p, grad_scale)


@register("lsq")
class LSQQuantizer(Quantizer):
    """LSQ with a learned step: ``bits`` 2 to 8 when signed, 1 to 8 unsigned.

    ``step`` (nn.Parameter; scalar, or one per output channel along axis 0 with ``per_channel``) is
    initialised on the first forward to 2 mean(|v|) / sqrt(Q_P); the ``initialized`` buffer records it,
    so a loaded state_dict is not overwritten. ``role`` picks N of the gradient scale 1 / sqrt(N Q_P):
    "weight" uses the values per step (numel, or numel / channels), "activation" the features per sample
    (numel / batch size). encode: ``affine`` with scale s and zero point 0.
    """

    def __init__(self, bits: int = 4, signed: bool = True, per_channel: bool = False, role: str = "weight") -> None:
        super().__init__()
        if not isinstance(signed, bool) or not isinstance(per_channel, bool):
            raise ConfigError(f"lsq signed and per_channel must be True or False, got {signed!r}, {per_channel!r}")
        self.bits = check_bits(bits, 2 if signed else 1, 8)
        if role not in ROLES:
            raise ConfigError(f"unknown lsq role {role!r}; valid: {', '.join(ROLES)}")
        if per_channel and role == "activation":
            raise ConfigError("lsq per_channel steps are per output channel of a weight; use role='weight'")
        self.signed, self.per_channel, self.role = signed, per_channel, role
        self.q_n, self.q_p = lsq_range(bits, signed)
        self.step = nn.Parameter(torch.ones(0) if per_channel else torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(False))

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "bits": self.bits, "signed": self.signed, "per_channel": self.per_channel,
                "role": self.role}

    def grad_scale(self, v: torch.Tensor) -> float:
        """g = 1 / sqrt(N Q_P), N the values per step (weight) or the features per sample (activation)."""
        shares = v.shape[0] if v.dim() > 0 and (self.per_channel or self.role == "activation") else 1
        return 1.0 / math.sqrt(max(v.numel() // max(shares, 1), 1) * self.q_p)

    def _prepare(self, v: torch.Tensor) -> torch.Tensor:
        """Check v, initialise the step on first use; return the step shaped to broadcast against v."""
        check_finite(v, self.where())
        if self.per_channel:
            check_axis(v, 0, self.where())
        if not bool(self.initialized):
            with torch.no_grad():
                self.step.data = lsq_init_step(v, self.q_p, self.per_channel).to(self.step.device)
                self.initialized.fill_(True)
        if self.per_channel and self.step.numel() != v.shape[0]:
            raise ConfigError(
                f"lsq has {self.step.numel()} per-channel steps but {self.where()} has {v.shape[0]} channels "
                f"(shape {tuple(v.shape)})"
            )
        return along(self.step, 0 if self.per_channel else None, v.dim())

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        step = self._prepare(v)
        return lsq_quantize(v, step, self.q_n, self.q_p, self.grad_scale(v))

    @torch.no_grad()
    def encode(self, v: torch.Tensor) -> Encoded:
        step = self._prepare(v)
        codes = lsq_codes(v, step, self.q_n, self.q_p).long()
        scale = self.step.detach().clamp(min=EPS).float()
        meta = {"qmin": -self.q_n, "qmax": self.q_p}
        if self.per_channel:
            meta["axis"] = 0
        return Encoded("affine", codes, self.bits, {"scale": scale, "zero_point": torch.zeros_like(scale).long()}, meta)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # per-channel steps take the channel count of the first tensor seen, unknown until then
        step = state_dict.get(prefix + "step")
        if step is not None and step.shape != self.step.shape:
            self.step.data = self.step.data.new_empty(step.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
