"""Is one model's accuracy really higher than another's on the same test set? The exact McNemar test.

Two classifiers evaluated on the same n examples differ only on the
discordant examples: ``only_a`` that model A gets right and B wrong, ``only_b``
the reverse. Under the null hypothesis of equal accuracy each of the
d = only_a + only_b discordant examples favours either model with
probability 1/2, so only_a ~ Binomial(d, 1/2) (McNemar, Psychometrika 1947;
the exact form recommended for comparing classifiers by Dietterich, Neural
Computation 1998). The two-sided p-value is

    p = min(1, 2 * P[X <= min(only_a, only_b)]),   X ~ Binomial(d, 1/2),

and 1 when d = 0. The accuracy difference is (only_a - only_b) / n. With
10,000 test images a gap of a few images is never significant: 3 against 0
gives p = 0.25.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import binomtest

from ..errors import ConfigError

#: the significance level of :meth:`PairedComparison.verdict`
ALPHA = 0.05


@dataclass(frozen=True)
class PairedComparison:
    """The discordant counts of two models on the same examples and the exact McNemar p-value."""

    examples: int
    only_a: int
    only_b: int
    p_value: float

    @property
    def difference(self) -> float:
        """accuracy(A) - accuracy(B), a fraction."""
        return (self.only_a - self.only_b) / self.examples

    def verdict(self, alpha: float = ALPHA) -> str:
        """"win" / "loss" (A better / worse than B at level ``alpha``), else "tie" (equal accuracy) or
        "within noise" (unequal, not significant)."""
        if not 0 < alpha < 1:
            raise ConfigError(f"alpha must lie strictly between 0 and 1, got {alpha!r}")
        if self.only_a == self.only_b:
            return "tie"
        if self.p_value >= alpha:
            return "within noise"
        return "win" if self.only_a > self.only_b else "loss"

    def to_dict(self) -> dict:
        return {**asdict(self), "difference": self.difference}


def _as_flags(correct, name: str) -> np.ndarray:
    flags = np.asarray(correct)
    if flags.ndim != 1 or flags.dtype != np.bool_:
        raise ConfigError(f"{name} must be a 1-D boolean array (True where the model is right), got dtype "
                          f"{flags.dtype} and shape {flags.shape}")
    return flags


def paired_comparison(correct_a, correct_b) -> PairedComparison:
    """Compare two models from their per-example correctness on the same examples (1-D boolean arrays or
    tensors of equal length, e.g. the first output of ``lowbit.workflow.outcomes``)."""
    a, b = _as_flags(correct_a, "correct_a"), _as_flags(correct_b, "correct_b")
    if len(a) != len(b) or len(a) == 0:
        raise ConfigError(f"a paired comparison needs both models on the same, non-empty set of examples; got "
                          f"{len(a)} and {len(b)} results")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(b & ~a))
    discordant = only_a + only_b
    p_value = 1.0 if discordant == 0 else float(binomtest(only_a, discordant, 0.5).pvalue)
    return PairedComparison(examples=len(a), only_a=only_a, only_b=only_b, p_value=p_value)
