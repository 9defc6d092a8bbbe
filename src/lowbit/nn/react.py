"""ReActNet's generalized activations (Liu, Shen, Savvides, Cheng, "ReActNet: Towards Precise Binary Neural Network
with Generalized Activation Functions", ECCV 2020, section 3.2), channel-wise learnable:

- RSign: ``x_b = +1 if x > alpha_c else -1``, a sign with a learned threshold per channel.
  :class:`RSignThreshold` holds alpha and computes ``x - alpha_c``; the sign itself is the ``binary`` input
  quantizer of the binary layer it feeds (a recipe's input spec), so that layer stays an XNOR-popcount layer that
  reads ``sign(x - alpha_c)``, the threshold travels with the float network from stage to stage, and its gradients
  are autograd's through the sign's estimator F (approx_sign in the paper, as Bi-Real Net's ApproxSign):
  ``g_x = g F'(x - alpha_c)``, ``g_alpha_c = -sum g F'(x - alpha_c)`` over the batch and positions (the paper's
  dh/dalpha_c = -1 chained after the estimator). Ties: lowbit's one sign rule, sign(0) = +1, gives +1 at
  ``x == alpha_c`` where the paper's text writes -1; the rule keeps RSign with alpha = 0 exactly lowbit's
  ``binary`` sign, which the Engine's packed bits (bit = value >= 0), its threshold folding and the ONNX export
  share.
- RPReLU: ``f(x) = x - gamma_c + zeta_c if x > gamma_c else beta_c (x - gamma_c) + zeta_c``, a PReLU whose kink
  moves to (gamma_c, zeta_c). Gradients (autograd of the same piecewise form): ``df/dx = 1`` above gamma_c, beta_c
  at or below; ``df/dgamma_c = -1`` / ``-beta_c``; ``df/dbeta_c = (x - gamma_c)`` at or below, else 0;
  ``df/dzeta_c = 1``.

Both act along axis 1 (the channels of NCHW maps, the features of [N, F] rows). Parameters are 1-D, one value per
channel; the graph IR stores them as constants of the ops ``rsign_threshold`` and ``rprelu``
(:mod:`lowbit.ops.react`). Initial values as the authors' code: alpha = gamma = zeta = 0, beta = 0.25 (PReLU's).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError, ShapeMismatchError
from ..ops.react import rprelu, rsign_threshold

# their per-channel broadcast reads the input's rank: a plain torch.fx trace records each as one call
torch.fx.wrap("rprelu")
torch.fx.wrap("rsign_threshold")

#: PReLU's initial negative slope (He et al. 2015), the authors' code's init of beta
BETA_INIT = 0.25


def _check_input(x: torch.Tensor, channels: int, where: str) -> None:
    """ShapeMismatchError unless ``x`` has ``channels`` channels on axis 1 (no check on an fx proxy while tracing)."""
    if isinstance(x, torch.Tensor) and (x.dim() < 2 or x.shape[1] != channels):
        raise ShapeMismatchError(f"{where} takes (N, {channels}, ...) inputs (channels on axis 1), got shape "
                                 f"{tuple(x.shape)}")


def _check_channels(channels: int, what: str) -> int:
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ConfigError(f"{what} channels must be an integer >= 1, got {channels!r}")
    return channels


class RSignThreshold(nn.Module):
    """RSign's learnable threshold: ``x - alpha_c`` (the binary layer after it takes the sign); see the module doc."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = _check_channels(channels, "RSignThreshold")
        self.alpha = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.channels, "RSignThreshold")
        return rsign_threshold(x, self.alpha)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


class RPReLU(nn.Module):
    """ReActNet's RPReLU with per-channel gamma (input shift), beta (negative slope), zeta (output shift)."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = _check_channels(channels, "RPReLU")
        self.gamma = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.full((channels,), BETA_INIT))
        self.zeta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.channels, "RPReLU")
        return rprelu(x, self.gamma, self.beta, self.zeta)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"
