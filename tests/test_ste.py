"""Straight-through estimators: forward values and gradients against numpy references."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lowbit.errors import ConfigError
from lowbit.quantizers.ste import SIGN_STES, check_ste, round_ste, sign, sign_ste, straight_through

SUBNORMAL = float(np.finfo(np.float32).smallest_subnormal)
SPECIAL = [0.0, -0.0, SUBNORMAL, -SUBNORMAL, 1.0, -1.0, 0.5, -0.5, 1.5, -1.5, 1e-30, float("nan"),
           float("inf"), -float("inf")]


def np_sign(x: np.ndarray) -> np.ndarray:
    """sign with sign(+-0) = +1, NaN kept."""
    return np.where(np.isnan(x), np.nan, np.where(x >= 0, 1.0, -1.0)).astype(x.dtype)


def np_ste_grad(x: np.ndarray, g: np.ndarray, ste: str) -> np.ndarray:
    """Surrogate gradients written from the papers (Hubara et al. 2016; Liu et al. 2018)."""
    if ste == "identity":
        return g
    if ste == "clipped":
        return g * ((x >= -1) & (x <= 1))
    # Bi-Real ApproxSign: dF/dx = 2 + 2x on [-1, 0), 2 - 2x on [0, 1), 0 elsewhere (and 0 at 1)
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.select([(x >= -1) & (x < 0), (x >= 0) & (x < 1)], [2 + 2 * x, 2 - 2 * x], 0.0)
    return g * d.astype(np.float32)


floats32 = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)
vectors = st.one_of(arrays(np.float32, st.integers(1, 12), elements=floats32),
                    st.sampled_from(SPECIAL).map(lambda v: np.full(3, v, np.float32)))


def test_sign_of_zero_and_negative_zero_is_plus_one():
    y = sign(torch.tensor([0.0, -0.0, SUBNORMAL, -SUBNORMAL, -2.0, 3.0]))
    assert y.tolist() == [1.0, 1.0, 1.0, -1.0, -1.0, 1.0]


def test_sign_keeps_nan_and_saturates_inf():
    y = sign(torch.tensor([float("nan"), float("inf"), -float("inf")]))
    assert math.isnan(y[0]) and y[1:].tolist() == [1.0, -1.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_sign_keeps_dtype(dtype):
    y = sign(torch.tensor([-0.0, -3.0], dtype=dtype))
    assert y.dtype == dtype and y.tolist() == [1.0, -1.0]


@settings(max_examples=60, deadline=None)
@given(vectors)
def test_sign_matches_numpy_reference(x):
    assert np.array_equal(sign(torch.from_numpy(x)).numpy(), np_sign(x), equal_nan=True)


@pytest.mark.parametrize("ste", list(SIGN_STES))
def test_sign_ste_gradient_by_hand_points(ste):
    x = torch.tensor([-2.0, -1.0, -0.75, -0.25, -0.0, 0.0, 0.25, 0.75, 1.0, 2.0], requires_grad=True)
    g = torch.arange(1.0, 11.0)
    y = sign_ste(x, ste)
    y.backward(g)
    expected = {
        "identity": g,
        "clipped": g * torch.tensor([0, 1, 1, 1, 1, 1, 1, 1, 1, 0.0]),
        # 2 + 2x on [-1, 0): x = -1 -> 0, -0.75 -> 0.5, -0.25 -> 1.5; 2 - 2x on [0, 1): 0 -> 2, 0.25 -> 1.5, ...
        "approx_sign": g * torch.tensor([0, 0, 0.5, 1.5, 2, 2, 1.5, 0.5, 0, 0]),
    }[ste]
    assert torch.equal(y.detach(), torch.tensor([-1.0, -1, -1, -1, 1, 1, 1, 1, 1, 1]))
    assert torch.equal(x.grad, expected)


@pytest.mark.parametrize("ste", list(SIGN_STES))
@settings(max_examples=40, deadline=None)
@given(x=vectors, seed=st.integers(0, 2**16))
def test_sign_ste_gradient_matches_numpy_reference(ste, x, seed):
    g = np.random.default_rng(seed).standard_normal(x.shape).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_(True)
    y = sign_ste(xt, ste)
    y.backward(torch.from_numpy(g))
    assert np.array_equal(y.detach().numpy(), np_sign(x), equal_nan=True)
    np.testing.assert_allclose(xt.grad.numpy(), np_ste_grad(x, g, ste), rtol=1e-6, atol=0)
    assert np.isfinite(xt.grad.numpy()).all()  # NaN/Inf inputs never make a NaN gradient


def test_approx_sign_gradient_is_derivative_of_bireal_polynomial():
    """Finite differences of F(x) = 2x + x^2 on [-1, 0), 2x - x^2 on [0, 1) (Liu et al. 2018)."""
    pts = np.array([-0.9, -0.6, -0.3, -0.1, 0.1, 0.3, 0.6, 0.9])

    def F(v):
        return np.where(v < 0, 2 * v + v * v, 2 * v - v * v)

    h = 1e-6
    numeric = (F(pts + h) - F(pts - h)) / (2 * h)
    x = torch.tensor(pts, dtype=torch.float64, requires_grad=True)
    sign_ste(x, "approx_sign").sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), numeric, rtol=1e-6)


def test_sign_ste_default_is_clipped():
    x = torch.tensor([0.5, 1.5], requires_grad=True)
    sign_ste(x).sum().backward()
    assert x.grad.tolist() == [1.0, 0.0]


@settings(max_examples=60, deadline=None)
@given(vectors)
def test_round_ste_is_half_to_even_with_identity_gradient(x):
    xt = torch.from_numpy(x).requires_grad_(True)
    y = round_ste(xt)
    assert np.array_equal(y.detach().numpy(), np.round(x), equal_nan=True)
    g = torch.linspace(-1, 1, x.size)
    y.backward(g)
    assert torch.equal(xt.grad, g)


def test_round_ste_halves_by_hand():
    assert round_ste(torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5])).tolist() == [0.0, 2.0, 2.0, -0.0, -2.0]


def test_straight_through_keeps_value_bits_and_passes_gradient():
    x = torch.tensor([0.3, -2.0, 5.0], requires_grad=True)
    value = torch.tensor([-0.0, float("nan"), 7.0])
    y = straight_through(x, value)
    assert torch.equal(torch.signbit(y), torch.signbit(value))  # -0.0 stays -0.0
    assert math.isnan(y[1].item()) and y[2].item() == 7.0
    g = torch.tensor([1.0, -2.0, 3.0])
    y.backward(g)
    assert torch.equal(x.grad, g)


def test_straight_through_sends_no_gradient_to_value():
    x = torch.ones(2, requires_grad=True)
    v = torch.full((2,), 3.0, requires_grad=True)
    straight_through(x, v * 2).sum().backward()
    assert v.grad is None and torch.equal(x.grad, torch.ones(2))


@pytest.mark.parametrize("bad", ["hardtanh", "", "CLIPPED", None, ["clipped"], 1])
def test_unknown_estimator_is_config_error_listing_valid_names(bad):
    with pytest.raises(ConfigError) as err:
        check_ste(bad)
    for name in SIGN_STES:
        assert name in str(err.value)
    with pytest.raises(ConfigError):
        sign_ste(torch.zeros(1), bad)
