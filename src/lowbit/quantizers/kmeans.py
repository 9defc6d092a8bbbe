"""k-means weight sharing (Han, Mao, Dally, ICLR 2016, "Deep Compression", arXiv:1510.00149).

The n weights W of a layer are clustered into k = 2^bits centroids C by 1-D k-means (Lloyd's
algorithm), minimising sum_j sum_{w in c_j} |w - c_j|^2; each weight then stores only the index of its
centroid. Fine-tuning updates the shared values: the gradient of centroid k is the sum of the
gradients of the weights that share it, dL/dC_k = sum_i dL/dW_i 1(I_i = k).

Initialisation: "linear" spaces the centroids evenly over [min, max] (the paper's best),
"density" places them at the quantiles (i + 1/2) / k of the weights (evenly spaced on the CDF),
"random" draws k of the weights with the seed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from .base import Encoded, Quantizer, check_bits, check_finite, register

INITS = ("linear", "density", "random")
MAX_ITERS = 10_000


def init_centroids(values: np.ndarray, k: int, init: str, seed: int) -> np.ndarray:
    """k sorted float64 starting centroids for the 1-D ``values`` (see the module docstring)."""
    if init == "linear":
        return np.linspace(values.min(), values.max(), k)
    if init == "density":
        return np.quantile(values, (np.arange(k) + 0.5) / k)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(values, size=k, replace=values.size < k))


def assign(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest of the sorted ``centroids`` for each value (ties go to the lower one).

    In 1-D the nearest centroid is found exactly by a binary search among the midpoints.
    """
    return np.searchsorted((centroids[:-1] + centroids[1:]) / 2, values, side="left")


def kmeans_1d(values: np.ndarray, k: int, init: str = "linear", iters: int = 30, seed: int = 0):
    """Lloyd's k-means on 1-D float64 ``values``: returns (sorted centroids [k], labels).

    Stops early when the centroids no longer move. An empty cluster keeps its previous centroid, so
    fewer distinct values than centroids leave duplicate (unused) centroids and a constant tensor
    gets its own value back.
    """
    centroids = np.sort(init_centroids(values, k, init, seed))
    for _ in range(iters):
        labels = assign(values, centroids)
        counts = np.bincount(labels, minlength=k)
        sums = np.bincount(labels, weights=values, minlength=k)
        moved = np.sort(np.where(counts > 0, sums / np.maximum(counts, 1), centroids))
        if np.array_equal(moved, centroids):
            break
        centroids = moved
    return centroids, assign(values, centroids)


class ShareWeights(torch.autograd.Function):
    """codebook[indices] forward; backward: g_codebook[j] = sum of g over the weights with index j
    (Deep Compression) and a zero gradient for the latent weight (its values no longer matter)."""

    @staticmethod
    def forward(ctx, w, codebook, indices):
        ctx.save_for_backward(indices)
        ctx.size = codebook.numel()
        return codebook[indices]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (indices,) = ctx.saved_tensors
        g_codebook = g.new_zeros(ctx.size).index_add_(0, indices.flatten(), g.flatten())
        return torch.zeros_like(g), g_codebook, None


def share_weights(w: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The shared weights codebook[indices] with the gradients of :class:`ShareWeights`."""
    return ShareWeights.apply(w, codebook, indices)


@register("kmeans")
class KMeansQuantizer(Quantizer):
    """Deep Compression weight sharing with 2^bits centroids (``bits`` 1 to 8).

    Fitted on the first forward (or by :meth:`fit`); then ``codebook`` (an nn.Parameter, float32
    [2^bits]) and ``indices`` (a buffer, int64, the weight's shape) define the output
    ``codebook[indices]``; ``fitted`` (a bool buffer) records the fit, so all three travel in the
    state_dict. Training updates the centroids only: the indices stay fixed and the latent weight
    gets a zero gradient. ``fit(w)`` clusters again, e.g. after pruning.

    ``keep_zero=True`` honours pruning as Deep Compression does: exact zeros take the reserved code 0,
    whose value is always 0 and never trained, and the other 2^bits - 1 centroids are fitted to the
    non-zero weights only.
    """

    def __init__(
        self, bits: int = 4, init: str = "linear", iters: int = 30, seed: int = 0, keep_zero: bool = False
    ) -> None:
        super().__init__()
        self.bits = check_bits(bits, 1, 8)
        if init not in INITS:
            raise ConfigError(f"unknown k-means init {init!r}; valid: {', '.join(INITS)}")
        self.init = init
        self.iters = check_bits(iters, 0, MAX_ITERS, "k-means iters")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"k-means seed must be an int, got {seed!r}")
        self.seed = seed
        if not isinstance(keep_zero, bool):
            raise ConfigError(f"k-means keep_zero must be True or False, got {keep_zero!r}")
        self.keep_zero = keep_zero
        self.codebook = nn.Parameter(torch.zeros(2**bits))
        self.register_buffer("indices", torch.zeros(0, dtype=torch.long))
        self.register_buffer("fitted", torch.tensor(False))

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "bits": self.bits, "init": self.init, "iters": self.iters,
                "seed": self.seed, "keep_zero": self.keep_zero}

    @torch.no_grad()
    def fit(self, w: torch.Tensor) -> None:
        """Cluster ``w`` and store its codebook and indices."""
        check_finite(w, self.where())
        values = w.detach().cpu().double().numpy().ravel()
        reserved = int(self.keep_zero)
        clustered = values != 0 if self.keep_zero else np.ones(values.size, dtype=bool)
        centroids = np.zeros(2**self.bits)
        labels = np.zeros(values.size, dtype=np.int64)
        if clustered.any():
            k = 2**self.bits - reserved
            centroids[reserved:], labels[clustered] = kmeans_1d(values[clustered], k, self.init, self.iters, self.seed)
            labels[clustered] += reserved
        self.codebook.copy_(torch.from_numpy(centroids))
        self.indices = torch.from_numpy(labels).reshape(w.shape).to(self.codebook.device)
        self.fitted.fill_(True)

    def shared_values(self) -> torch.Tensor:
        """The codebook as used: with ``keep_zero``, entry 0 is exactly 0 and receives no gradient."""
        if self.keep_zero:
            return torch.cat([self.codebook.new_zeros(1), self.codebook[1:]])
        return self.codebook

    def _prepare(self, w: torch.Tensor) -> None:
        if bool(self.fitted):
            check_finite(w, self.where())
        else:
            self.fit(w)
        if w.shape != self.indices.shape:
            raise ConfigError(
                f"k-means codebook of {self.where()} was fitted to shape {tuple(self.indices.shape)}, "
                f"got shape {tuple(w.shape)}; call fit() with the new tensor to cluster it again"
            )

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        self._prepare(w)
        return share_weights(w, self.shared_values(), self.indices).to(w.dtype)

    @torch.no_grad()
    def encode(self, w: torch.Tensor) -> Encoded:
        self._prepare(w)
        return Encoded("codebook", self.indices.clone(), self.bits, {"codebook": self.shared_values().clone()})

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the indices take the fitted weight's shape, unknown until then
        indices = state_dict.get(prefix + "indices")
        if indices is not None:
            self.indices = self.indices.new_empty(indices.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
