"""Exact McNemar test: hand-worked p-values, the binomial sum as an oracle, and bad input."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.analysis.significance import paired_comparison
from lowbit.errors import ConfigError


def flags(only_a: int, only_b: int, both: int = 0, neither: int = 0) -> tuple[np.ndarray, np.ndarray]:
    a = [True] * only_a + [False] * only_b + [True] * both + [False] * neither
    b = [False] * only_a + [True] * only_b + [True] * both + [False] * neither
    return np.array(a), np.array(b)


def binomial_p(k: int, n: int) -> float:
    """Two-sided exact p-value by the binomial sum: min(1, 2 P[X <= min(k, n - k)]), X ~ Bin(n, 1/2)."""
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def test_three_against_none_is_p_one_quarter():
    result = paired_comparison(*flags(3, 0, both=9_990, neither=7))
    assert (result.only_a, result.only_b, result.examples) == (3, 0, 10_000)
    assert result.p_value == pytest.approx(0.25)  # 2 * (1/2)^3
    assert result.difference == pytest.approx(3 / 10_000)
    assert result.verdict() == "within noise"


def test_seven_against_two_hand_worked():
    # P[X <= 2] for Bin(9, 1/2) = (1 + 9 + 36) / 512; two-sided doubles it
    result = paired_comparison(*flags(2, 7, both=5))
    assert result.p_value == pytest.approx(92 / 512)
    assert result.difference == pytest.approx(-5 / 14)


def test_significant_win_and_loss():
    win = paired_comparison(*flags(20, 2, both=100))
    assert win.p_value < 0.05 and win.verdict() == "win"
    loss = paired_comparison(*flags(2, 20, both=100))
    assert loss.p_value == pytest.approx(win.p_value) and loss.verdict() == "loss"
    assert win.verdict(alpha=1e-9) == "within noise"


def test_identical_predictions_tie_with_p_one():
    result = paired_comparison(*flags(0, 0, both=5, neither=5))
    assert result.p_value == 1.0 and result.verdict() == "tie" and result.difference == 0.0
    balanced = paired_comparison(*flags(4, 4))
    assert balanced.verdict() == "tie" and balanced.p_value == pytest.approx(1.0)


def test_accepts_torch_tensors():
    a, b = flags(5, 1, both=3)
    result = paired_comparison(torch.from_numpy(a), torch.from_numpy(b))
    assert (result.only_a, result.only_b) == (5, 1)
    assert result.to_dict()["difference"] == pytest.approx(4 / 9)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 60), st.integers(0, 60), st.integers(0, 30), st.integers(0, 30))
def test_matches_binomial_sum_and_is_symmetric(only_a, only_b, both, neither):
    if only_a + only_b + both + neither == 0:
        neither = 1
    a, b = flags(only_a, only_b, both, neither)
    result = paired_comparison(a, b)
    expected = 1.0 if only_a + only_b == 0 else binomial_p(only_a, only_a + only_b)
    assert result.p_value == pytest.approx(expected, rel=1e-9)
    assert 0 < result.p_value <= 1
    swapped = paired_comparison(b, a)
    assert swapped.p_value == pytest.approx(result.p_value) and swapped.difference == -result.difference
    assert result.difference == pytest.approx(a.mean() - b.mean())


@pytest.mark.parametrize("a, b, match", [
    (np.array([True, False]), np.array([True]), "same, non-empty"),
    (np.array([], dtype=bool), np.array([], dtype=bool), "same, non-empty"),
    (np.array([1, 0]), np.array([True, False]), "correct_a must be a 1-D boolean"),
    (np.array([True, False]), np.array([[True, False]]), "correct_b must be a 1-D boolean"),
])
def test_bad_input_is_named(a, b, match):
    with pytest.raises(ConfigError, match=match):
        paired_comparison(a, b)


def test_bad_alpha():
    with pytest.raises(ConfigError, match="alpha"):
        paired_comparison(*flags(1, 0)).verdict(alpha=0)
