"""ABC-Net: weights and activations as sums of binary bases (Lin, Zhao, Pan, NeurIPS 2017,
"Towards Accurate Binary Convolutional Neural Network").

Weights (``abc_weight``), per tensor as in the paper, M = ``bases`` in 1..8:

    B_i   = sign(W - mean(W) + u_i std(W)),  u_i = -1 + 2 (i - 1) / (M - 1)   (M = 1: u = 0)
    alpha = argmin ||W - sum_i alpha_i B_i||^2                                (least squares)
    W_q   = sum_i alpha_i B_i

std is the population standard deviation; sign(0) = +1. Since u_i increases with i,
the bases are nested (B_i = +1 implies B_j = +1 for j > i). Each weight's value
depends only on its M-bit pattern (bit i - 1 set where B_i = +1), so a weight is
stored as the pattern index and a codebook of 2^M float32 values,
codebook[k] = sum_i alpha_i (2 bit_i(k) - 1), evaluated in float64 and rounded once
to float32; the forward pass reads the same codebook, so decode(encode(W)) equals
the forward output bit for bit and a constant tensor quantizes to itself.
The least-squares problem goes through the normal equations G alpha = B^T W with
G = B^T B (exact integers) and the pseudo-inverse of G: for nested +-1 bases every
non-zero eigenvalue of G is >= 1, so eigenvalues below 1/2 are rounding noise of
zero (coinciding bases, e.g. for a constant W, or an all -1 beside an all +1
basis) and the minimum-norm alphas are taken. The gradient passes straight
through to W (identity: g_W = g_{W_q}, the alphas held constant).
Per-channel bases would need one codebook per channel, which the ``codebook``
encoding does not hold, so lowbit keeps the paper's per-tensor form.

Activations (``abc_act``), N = ``bases`` in 1..8, with learned shifts v_n and scales beta_n:

    A_n = H_{v_n}(R) = 2 * 1{clip(R + v_n, 0, 1) >= 0.5} - 1,   R_q = sum_n beta_n A_n

Backward is straight through the indicator and the clip:
g_R = sum_n beta_n g 1{0 <= R + v_n <= 1}, g_{v_n} = sum(beta_n g 1{0 <= R + v_n <= 1}),
g_{beta_n} = sum(g A_n). Initialisation (lowbit's choice): beta_n = 1/N and
v_n = 0.5 - t_n with thresholds t_n = -1 + (2n - 1)/N, so that R_q starts as the
uniform quantizer of [-1, 1] with N + 1 levels and thresholds at their midpoints
(N = 1: sign(R)). Activations have no stored codes and are not checked for NaN
(NaN propagates to the output).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import Encoded, Quantizer, check_bits, check_finite, register
from .ste import sign_ste, straight_through

MAX_BASES = 8


def abc_weight_shifts(bases: int) -> list[float]:
    """u_i = -1 + 2 (i - 1) / (M - 1) for i = 1..M, evenly over [-1, 1]; [0.0] for M = 1."""
    if bases == 1:
        return [0.0]
    return [-1.0 + 2.0 * i / (bases - 1) for i in range(bases)]


def abc_weight_bits(w: torch.Tensor, bases: int) -> list[torch.Tensor]:
    """The bases as booleans: bits[i - 1] is True where B_i = sign(W - mean + u_i std) = +1.

    Evaluated in float64, so that mean and std of any finite float32 tensor are finite.
    """
    w64 = w.detach().double()
    std, mean = torch.std_mean(w64, correction=0)
    centered = w64 - mean
    return [(centered + u * std) >= 0 for u in abc_weight_shifts(bases)]


def abc_weight_codes(bits: list[torch.Tensor]) -> torch.Tensor:
    """Pattern index sum_i bit_i 2^(i - 1), int64 in [0, 2^M)."""
    codes = torch.zeros_like(bits[0], dtype=torch.int64)
    for i, bit in enumerate(bits):
        codes |= bit.long() << i
    return codes


def abc_weight_alphas(w: torch.Tensor, bits: list[torch.Tensor]) -> torch.Tensor:
    """Least-squares alphas (float64 [M]) via G alpha = B^T W, minimum norm where G is singular."""
    w64 = w.detach().double()
    differ = torch.stack([(a ^ b).sum() for a in bits for b in bits]).reshape(len(bits), len(bits))
    gram = w64.numel() - 2 * differ.double()  # B_i . B_j = n - 2 * #{elements where they differ}
    proj = torch.stack([torch.where(bit, w64, -w64).sum() for bit in bits])
    return torch.linalg.pinv(gram, hermitian=True, atol=0.5) @ proj


def abc_weight_codebook(alphas: torch.Tensor) -> torch.Tensor:
    """codebook[k] = sum_i alpha_i (2 bit_i(k) - 1) for every M-bit pattern k, float32 [2^M]."""
    m = alphas.numel()
    patterns = torch.arange(2**m, device=alphas.device)[:, None] >> torch.arange(m, device=alphas.device) & 1
    return ((2 * patterns - 1).double() @ alphas.double()).float()


def abc_weight_encode(w: torch.Tensor, bases: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pattern codes int64, float32 codebook [2^M]) of W approximated by M binary bases."""
    bits = abc_weight_bits(w, bases)
    return abc_weight_codes(bits), abc_weight_codebook(abc_weight_alphas(w, bits))


def abc_act_init(bases: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial (shifts v_n, scales beta_n): v_n = 0.5 - t_n, t_n = -1 + (2n - 1)/N, beta_n = 1/N."""
    thresholds = torch.tensor([-1.0 + (2 * n + 1) / bases for n in range(bases)])
    return 0.5 - thresholds, torch.full((bases,), 1.0 / bases)


def abc_activation(x: torch.Tensor, shifts: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """sum_n beta_n H_{v_n}(x), H_v(x) = 2 * 1{clip(x + v, 0, 1) >= 0.5} - 1, STE through the clip."""
    out = torch.zeros((), dtype=scales.dtype, device=x.device)
    for v, beta in zip(shifts, scales):
        out = out + beta * sign_ste(torch.clamp(x + v, 0.0, 1.0) - 0.5, "identity")
    return out


@register("abc_weight")
class ABCWeightQuantizer(Quantizer):
    """ABC-Net weights: sum of M least-squares-scaled binary bases; encodes as a codebook of 2^M."""

    def __init__(self, bases: int = 3) -> None:
        super().__init__()
        self.bases = self.bits = check_bits(bases, 1, MAX_BASES, "abc_weight bases")

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "bases": self.bases}

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        enc = self.encode(w)
        return straight_through(w, enc.params["codebook"][enc.codes].to(w.dtype))

    def encode(self, w: torch.Tensor) -> Encoded:
        check_finite(w, self.where())
        codes, codebook = abc_weight_encode(w, self.bases)
        return Encoded("codebook", codes, self.bases, {"codebook": codebook}, {})


@register("abc_act")
class ABCActQuantizer(Quantizer):
    """ABC-Net activations: sum_n beta_n H_{v_n}(R) with learned shifts v_n and scales beta_n."""

    def __init__(self, bases: int = 3) -> None:
        super().__init__()
        self.bases = self.bits = check_bits(bases, 1, MAX_BASES, "abc_act bases")
        shifts, scales = abc_act_init(self.bases)
        self.shifts = nn.Parameter(shifts)
        self.scales = nn.Parameter(scales)

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "bases": self.bases}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return abc_activation(x, self.shifts, self.scales).to(x.dtype)
