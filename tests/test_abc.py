"""ABC-Net (Lin, Zhao, Pan 2017): weight bases and least squares by hand, codebook codes, activations."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lowbit.errors import CalibrationError, ConfigError
from lowbit.quantizers import decode, get
from lowbit.quantizers.abc import (ABCActQuantizer, ABCWeightQuantizer, abc_act_init, abc_weight_alphas,
                                   abc_weight_bits, abc_weight_codes, abc_weight_shifts)

SUBNORMAL = float(np.finfo(np.float32).smallest_subnormal)
finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True)
special32 = st.sampled_from([0.0, -0.0, SUBNORMAL, -SUBNORMAL, 1.0, -0.25, 3.0])
shapes = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)
weights = st.one_of(arrays(np.float32, shapes, elements=st.one_of(finite32, special32)),
                    arrays(np.float32, shapes, elements=special32),
                    st.tuples(shapes, finite32).map(lambda s: np.full(s[0], s[1], np.float32)))


def np_abc_fit(w: np.ndarray, bases: int) -> np.ndarray:
    """The paper's construction in numpy float64: bases from mean/std shifts, alphas by lstsq."""
    w = w.astype(np.float64).reshape(-1)
    u = [0.0] if bases == 1 else [-1 + 2 * i / (bases - 1) for i in range(bases)]
    b = np.stack([np.where(w - w.mean() + ui * w.std() >= 0, 1.0, -1.0) for ui in u], axis=1)
    alpha = np.linalg.lstsq(b, w, rcond=None)[0]
    return b @ alpha


# ---------------------------------------------------------------- weights

def test_shifts_spread_evenly_over_minus_one_to_one():
    assert abc_weight_shifts(1) == [0.0]
    assert abc_weight_shifts(2) == [-1.0, 1.0]
    assert abc_weight_shifts(3) == [-1.0, 0.0, 1.0]
    assert abc_weight_shifts(5) == [-1.0, -0.5, 0.0, 0.5, 1.0]


def test_one_base_by_hand():
    # mean 3: B = sign(W - 3) = [-1, -1, +1, +1] (sign(0) = +1); alpha = B.W / n = (-1 - 2 + 3 + 6)/4 = 1.5
    w = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert torch.equal(ABCWeightQuantizer(1)(w), torch.tensor([-1.5, -1.5, 1.5, 1.5]))
    # zero mean: alpha = mean|W| (the BWN scale)
    assert torch.equal(ABCWeightQuantizer(1)(torch.tensor([-3.0, -1.0, 1.0, 3.0])), torch.tensor([-2.0, -2, 2, 2]))


def test_two_bases_least_squares_by_hand():
    w = torch.tensor([-3.0, -1.0, 0.0, 1.0, 5.0])
    # mean 0.4, std sqrt(7.04) = 2.653; B_1 = sign(W - 0.4 - std) = [-,-,-,-,+], B_2 = sign(W - 0.4 + std) = [-,+,+,+,+]
    bits = abc_weight_bits(w, 2)
    assert [b.tolist() for b in bits] == [[False] * 4 + [True], [False] + [True] * 4]
    assert abc_weight_codes(bits).tolist() == [0, 2, 2, 2, 3]
    # W_q = -(a1 + a2) on [-3], (a2 - a1) on [-1, 0, 1], (a1 + a2) on [5]: a2 - a1 = 0, a1 + a2 = 4
    assert abc_weight_alphas(w, bits).tolist() == pytest.approx([2.0, 2.0], abs=1e-12)
    q = ABCWeightQuantizer(2)
    assert torch.equal(q(w), torch.tensor([-4.0, 0.0, 0.0, 0.0, 4.0]))
    enc = q.encode(w)
    assert enc.params["codebook"].tolist() == pytest.approx([-4.0, 0.0, 0.0, 4.0], abs=1e-6)


def test_coinciding_bases_take_minimum_norm_alphas():
    w = torch.tensor([-2.0, 0.0, 0.0, 2.0])
    # mean 0, std sqrt(2): B_1 = [-,-,-,+], B_2 = B_3 = [-,+,+,+]; W = 1 B_1 + 1 (B_2 + B_3)/2 exactly
    bits = abc_weight_bits(w, 3)
    assert torch.equal(bits[1], bits[2])
    assert abc_weight_alphas(w, bits).tolist() == pytest.approx([1.0, 0.5, 0.5], abs=1e-12)
    assert ABCWeightQuantizer(3)(w).tolist() == pytest.approx(w.tolist(), abs=1e-12)


@pytest.mark.parametrize("bases", [1, 2, 3, 5, 8])
def test_constant_weight_quantizes_to_itself(bases):
    q = ABCWeightQuantizer(bases)
    for c in [0.1, -3.0, 0.0, SUBNORMAL]:
        w = torch.full((4, 3), c)
        assert torch.equal(q(w), w)


@pytest.mark.parametrize("bases", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_least_squares_matches_numpy_lstsq(bases, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((6, 5, 3)) * rng.uniform(0.01, 3) + rng.uniform(-1, 1)).astype(np.float32)
    y = ABCWeightQuantizer(bases)(torch.from_numpy(w)).numpy()
    np.testing.assert_allclose(y.reshape(-1), np_abc_fit(w, bases), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bases", [1, 2, 3, 4, 8])
@settings(max_examples=40, deadline=None)
@given(w=weights)
def test_codes_codebook_and_bitwise_decode(bases, w):
    q = ABCWeightQuantizer(bases).eval()
    x = torch.from_numpy(w)
    y = q(x)
    enc = q.encode(x)
    assert enc.kind == "codebook" and enc.bits == bases
    assert enc.codes.dtype == torch.int64 and enc.codes.shape == x.shape
    assert enc.codes.min() >= 0 and enc.codes.max() < 2**bases
    codebook = enc.params["codebook"]
    assert codebook.dtype == torch.float32 and codebook.shape == (2**bases,)
    assert torch.equal(decode(enc), y)
    # nested bases: a weight's pattern is 0...01...1 (B_i = +1 implies B_j = +1 for j > i)
    staircase = {2**bases - 2**k for k in range(bases + 1)}
    assert set(enc.codes.unique().tolist()) <= staircase
    assert torch.isfinite(y).all() and y.unique().numel() <= bases + 1


@pytest.mark.parametrize("bases", [1, 2, 3, 5])
@settings(max_examples=40, deadline=None)
@given(w=weights)
def test_residual_is_orthogonal_to_every_base(bases, w):
    """The least-squares optimality condition B^T (W - W_q) = 0 (normal equations)."""
    x = torch.from_numpy(w)
    y = ABCWeightQuantizer(bases)(x).double()
    residual = x.double() - y
    scale = float(np.abs(w.astype(np.float64)).max()) * w.size
    for bit in abc_weight_bits(x, bases):
        projection = torch.where(bit, residual, -residual).sum().item()
        assert abs(projection) <= 1e-6 * scale + w.size * SUBNORMAL  # float32 rounding of W_q


def test_weight_gradient_is_straight_through():
    w = torch.tensor([[0.3, -1.2, 2.0], [0.0, 0.7, -0.4]], requires_grad=True)
    g = torch.tensor([[1.0, -2.0, 0.5], [4.0, 0.25, -1.0]])
    ABCWeightQuantizer(3)(w).backward(g)
    assert torch.equal(w.grad, g)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_weight_nan_inf_is_calibration_error_naming_tensor(bad):
    q = ABCWeightQuantizer()
    q.label = "layer2.conv.weight"
    w = torch.ones(3, 2)
    w[2, 0] = bad
    with pytest.raises(CalibrationError, match="layer2.conv.weight"):
        q(w)
    with pytest.raises(CalibrationError, match="layer2.conv.weight"):
        q.encode(w)


@pytest.mark.parametrize("cls", [ABCWeightQuantizer, ABCActQuantizer])
@pytest.mark.parametrize("bad", [0, 9, 2.0, True, "3", None])
def test_bad_bases_is_config_error(cls, bad):
    with pytest.raises(ConfigError, match="bases"):
        cls(bad)


@pytest.mark.parametrize("cls", [ABCWeightQuantizer, ABCActQuantizer])
@pytest.mark.parametrize("bases", [1, 3, 8])
def test_spec_round_trip(cls, bases):
    q = cls(bases)
    assert q.spec() == {"name": cls.name, "bases": bases}
    assert get(json.loads(json.dumps(q.spec()))) == q
    assert q.bits == bases


# ---------------------------------------------------------------- activations

def np_abc_act(r, v, beta):
    """sum_n beta_n (2 * 1{clip(R + v_n, 0, 1) >= 0.5} - 1) and its straight-through gradients."""
    h = [np.clip(r + vn, 0, 1) for vn in v]
    a = [np.where(hn >= 0.5, 1.0, -1.0) for hn in h]
    window = [((r + vn >= 0) & (r + vn <= 1)).astype(np.float64) for vn in v]
    return sum(b * an for b, an in zip(beta, a)), a, window


def test_act_init_is_uniform_quantizer_of_minus_one_to_one():
    shifts, scales = abc_act_init(3)
    # thresholds -2/3, 0, 2/3 -> v = 0.5 - t; beta = 1/3: levels -1, -1/3, 1/3, 1
    assert shifts.tolist() == pytest.approx([0.5 + 2 / 3, 0.5, 0.5 - 2 / 3])
    assert scales.tolist() == pytest.approx([1 / 3] * 3)
    q = ABCActQuantizer(3)
    r = torch.tensor([-5.0, -0.7, -0.6, -0.1, 0.0, 0.6, 0.7, 9.0])
    third = np.float32(1 / 3)
    expected = [-3 * third, -3 * third, -third, -third, third, third, 3 * third, 3 * third]
    np.testing.assert_allclose(q(r).detach().numpy(), expected, rtol=1e-6)


def test_one_activation_base_starts_as_sign():
    r = torch.tensor([-2.0, -1e-6, -0.0, 0.0, SUBNORMAL, 0.3])
    assert ABCActQuantizer(1)(r).tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0, 1.0]
    # the indicator reads the float32 sum R + v: -SUBNORMAL + 0.5 rounds to 0.5, so +1
    assert ABCActQuantizer(1)(torch.tensor([-SUBNORMAL])).item() == 1.0


@pytest.mark.parametrize("bases", [1, 2, 3, 5])
def test_act_values_and_gradients_match_numpy_reference(bases):
    rng = np.random.default_rng(bases)
    q = ABCActQuantizer(bases)
    v = rng.uniform(-0.5, 1.5, bases).astype(np.float32)
    beta = rng.uniform(0.1, 2.0, bases).astype(np.float32)
    with torch.no_grad():
        q.shifts.copy_(torch.from_numpy(v))
        q.scales.copy_(torch.from_numpy(beta))
    r = rng.uniform(-2, 2, (3, 4, 5)).astype(np.float32)
    r.flat[:bases] = -v  # R + v_n = 0 exactly: on the edge of the window (inside)
    r.flat[bases:2 * bases] = 1 - v  # R + v_n = 1 (up to rounding)
    g = rng.standard_normal(r.shape).astype(np.float32)
    rt = torch.from_numpy(r).requires_grad_(True)
    y = q(rt)
    y.backward(torch.from_numpy(g))
    expected, a, window = np_abc_act(r, v, beta)  # float32 sums R + v_n, as in torch
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rt.grad.numpy(), sum(b * g * w for b, w in zip(beta, window)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(q.shifts.grad.numpy(), [b * (g * w).sum() for b, w in zip(beta, window)],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(q.scales.grad.numpy(), [(g * an).sum() for an in a], rtol=1e-5, atol=1e-5)


def test_act_nan_propagates_and_inf_saturates():
    y = ABCActQuantizer(2)(torch.tensor([float("nan"), float("inf"), -float("inf")]))
    assert torch.isnan(y[0]) and y[1].item() == pytest.approx(1.0) and y[2].item() == pytest.approx(-1.0)


def test_act_has_learnable_state_and_no_codes():
    q = ABCActQuantizer(4)
    assert set(dict(q.named_parameters())) == {"shifts", "scales"}
    assert set(q.state_dict()) == {"shifts", "scales"}
    with pytest.raises(ConfigError):
        q.encode(torch.ones(3))
    x = torch.ones(2, 3, dtype=torch.float64)
    assert q(x).dtype == torch.float64
