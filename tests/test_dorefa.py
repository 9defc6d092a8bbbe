"""DoReFa-Net weights, activations and gradients (Zhou et al. 2016) against hand-worked values and numpy."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lowbit.errors import CalibrationError, ConfigError, TrainingError
from lowbit.quantizers import decode, get
from lowbit.quantizers.dorefa import (
    DorefaActQuantizer,
    DorefaGradQuantizer,
    DorefaWeightQuantizer,
    dorefa_act,
    dorefa_weight,
    quantize_gradient,
    quantize_k,
)

SPECIAL = [0.0, -0.0, 1e-45, -1e-45, 1.1754942e-38, -3e-39, 1.0, -1.0, 0.5, 3e38]
VALUES = st.one_of(st.sampled_from(SPECIAL), st.floats(width=32, allow_nan=False, allow_infinity=False))
ARRAYS = st.one_of(
    arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 6)), elements=VALUES),
    st.builds(lambda v, n: np.full((2, n), v, np.float32), VALUES, st.integers(1, 5)),
)
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])


def with_non_finite(a: np.ndarray, bad: float, where: int) -> torch.Tensor:
    a = a.copy()
    a.flat[where % a.size] = bad
    return torch.from_numpy(a)


# --- quantize_k and the weight / activation formulas, by hand ---------------------------------------------


def test_quantize_k_by_hand():
    # k = 2: 3 r = [0, 0.6, 1.5, 1.8, 3] rounds (half to even) to [0, 1, 2, 2, 3], divided by 3
    r = torch.tensor([0.0, 0.2, 0.5, 0.6, 1.0])
    expected = torch.tensor([0.0, 1 / 3, 2 / 3, 2 / 3, 1.0])
    torch.testing.assert_close(quantize_k(r, 2), expected, rtol=0, atol=1e-7)


def test_quantize_k_is_straight_through():
    r = torch.tensor([0.1, 0.4, 0.9], requires_grad=True)
    quantize_k(r, 3).sum().backward()
    torch.testing.assert_close(r.grad, torch.ones(3), rtol=0, atol=1e-6)


def test_two_bit_weights_by_hand():
    # tanh: -0.7616, -0.2913, 0, 0.4621, 0.9640; / (2 * 0.9640) + 1/2 = 0.1050, 0.3489, 0.5, 0.7397, 1
    # times 3: 0.315, 1.047, 1.5, 2.219, 3 -> round 0, 1, 2, 2, 3 -> 2 j / 3 - 1
    w = torch.tensor([-1.0, -0.3, 0.0, 0.5, 2.0])
    expected = torch.tensor([-1.0, -1 / 3, 1 / 3, 1 / 3, 1.0])
    torch.testing.assert_close(dorefa_weight(w, 2), expected, rtol=0, atol=1e-6)


def test_one_bit_weights_by_hand_with_identity_gradient():
    # E(|w|) = (2 + 0 + 1 + 3) / 4 = 1.5; sign(0) = +1
    w = torch.tensor([-2.0, 0.0, 1.0, 3.0], requires_grad=True)
    y = DorefaWeightQuantizer(1)(w)
    assert torch.equal(y, torch.tensor([-1.5, 1.5, 1.5, 1.5]))
    upstream = torch.tensor([0.3, -2.0, 5.0, 0.25])
    y.backward(upstream)
    assert torch.equal(w.grad, upstream)


def test_all_zero_weights_map_to_the_positive_level_next_to_zero():
    # tanh(0) / max floored at EPS = 0, + 1/2; (2^k - 1) / 2 rounds half to even to 2^(k-1): 2 2^(k-1)/(2^k-1) - 1
    for bits in range(2, 9):
        y = dorefa_weight(torch.zeros(3), bits)
        torch.testing.assert_close(y, torch.full((3,), 1 / (2**bits - 1)), rtol=0, atol=1e-6)


def numpy_weight_grad(w: np.ndarray, upstream: np.ndarray) -> np.ndarray:
    """d/dw of sum(upstream * (2 u - 1)), u = tanh(w) / (2 M) + 1/2, M = max|tanh(w)| (unique maximiser)."""
    t = np.tanh(w)
    m_index = np.argmax(np.abs(t))
    m = np.abs(t[m_index])
    dt = 1 - t**2
    grad = 2 * upstream * dt / (2 * m)  # through tanh(w_i) / (2M)
    dm = np.sign(t[m_index]) * dt[m_index]  # dM / dw at the maximiser
    grad[m_index] += np.sum(2 * upstream * (-t / (2 * m**2))) * dm
    return grad


@pytest.mark.parametrize("bits", [2, 4])
def test_weight_gradient_matches_numpy_reference(bits):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(5, 7, generator=gen, dtype=torch.float64).float().requires_grad_(True)
    upstream = torch.randn(5, 7, generator=gen)
    dorefa_weight(w, bits).backward(upstream)
    expected = numpy_weight_grad(w.detach().double().numpy().ravel(), upstream.double().numpy().ravel())
    np.testing.assert_allclose(w.grad.double().numpy().ravel(), expected, rtol=1e-5, atol=1e-6)


def test_activations_by_hand_with_gradient_on_closed_unit_interval():
    # clip -> [0, 0, 0.1, 0.5, 0.9, 1, 1]; times 3 -> [0, 0, 0.3, 1.5, 2.7, 3, 3]; round -> [0, 0, 0, 2, 3, 3, 3]
    x = torch.tensor([-0.5, 0.0, 0.1, 0.5, 0.9, 1.0, 2.0], requires_grad=True)
    y = dorefa_act(x, 2)
    torch.testing.assert_close(y, torch.tensor([0, 0, 0, 2 / 3, 1, 1, 1.0]), rtol=0, atol=1e-7)
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1, 1, 1, 1, 1, 0]))


def test_activation_forward_is_the_decode_arithmetic():
    # 5 bits: code 3 stands for 3 * float32(1/31), which is not float32(3/31)
    x = torch.tensor([3 / 31])
    q = DorefaActQuantizer(5)
    step = torch.tensor(1 / 31, dtype=torch.float32)
    assert torch.equal(q(x), torch.tensor([3.0]) * step)
    enc = q.encode(x)
    assert enc.kind == "affine" and enc.codes.tolist() == [3] and enc.meta == {"qmin": 0, "qmax": 31}
    assert int(enc.params["zero_point"]) == 0 and torch.equal(enc.params["scale"], step)


# --- encode / decode --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
def test_decode_of_encode_is_forward_bitwise(bits):
    w = torch.randn(6, 5, generator=torch.Generator().manual_seed(bits)) * 3
    w[0, :2] = 0.0
    for q in (DorefaWeightQuantizer(bits), DorefaActQuantizer(bits)):
        q.eval()
        enc = q.encode(w)
        assert enc.bits == bits and enc.codes.dtype == torch.int64 and enc.codes.shape == w.shape
        assert torch.equal(decode(enc), q(w))
    weight_enc = DorefaWeightQuantizer(bits).encode(w)
    if bits == 1:
        assert weight_enc.kind == "binary"
        torch.testing.assert_close(weight_enc.params["scale"], w.abs().mean())
    else:
        assert weight_enc.kind == "codebook" and weight_enc.params["codebook"].shape == (2**bits,)
        torch.testing.assert_close(weight_enc.params["codebook"], torch.linspace(-1, 1, 2**bits), rtol=0, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(ARRAYS, st.integers(1, 8))
def test_property_weights_on_grid_and_encodable(a, bits):
    w = torch.from_numpy(a)
    q = DorefaWeightQuantizer(bits)
    y = q(w)
    assert torch.isfinite(y).all()
    assert torch.equal(decode(q.encode(w)), y)
    if bits == 1:
        scale = w.double().abs().mean().clamp(min=torch.finfo(torch.float32).eps)
        assert torch.allclose(y.double().abs(), scale.expand(y.shape), rtol=1e-6, atol=0)
    else:
        levels = 2**bits - 1
        j = (y.double() + 1) / 2 * levels
        assert (y.abs() <= 1).all() and torch.allclose(j, j.round(), atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(ARRAYS, st.integers(1, 8))
def test_property_activations_on_grid_and_encodable(a, bits):
    x = torch.from_numpy(a)
    q = DorefaActQuantizer(bits)
    y = q(x)
    enc = q.encode(x)
    assert torch.equal(decode(enc), y)
    assert enc.codes.min() >= 0 and enc.codes.max() <= 2**bits - 1
    # quantize_k(clip(x, 0, 1)) is the nearest level: within half a step
    assert ((y.double() - x.double().clamp(0, 1)).abs() <= 0.5 / (2**bits - 1) + 1e-6).all()


@settings(max_examples=30, deadline=None)
@given(ARRAYS, NON_FINITE, st.integers(0, 100))
def test_property_non_finite_is_calibration_error_naming_tensor(a, bad, where):
    x = with_non_finite(a, bad, where)
    for q in (DorefaWeightQuantizer(2), DorefaWeightQuantizer(1), DorefaActQuantizer(2), DorefaGradQuantizer(4)):
        q.label = "conv1.weight"
        with pytest.raises(CalibrationError, match="conv1.weight"):
            q(x)
        if not isinstance(q, DorefaGradQuantizer):
            with pytest.raises(CalibrationError, match="conv1.weight"):
                q.encode(x)


# --- gradients ----------------------------------------------------------------------------------------------


def test_one_bit_gradient_by_hand_and_zero_sample_stays_zero():
    # k = 1: r = dr / (2 m) + 1/2 + sigma with sigma in [-1/2, 1/2): dr = +m gives r >= 1/2 -> 1, dr = -m gives
    # r < 1/2 -> 0; g_q = 2 m (q - 1/2) = +-m. The all-zero sample has m = 0 and stays 0.
    dr = torch.tensor([[3.0, -3.0], [0.0, 0.0]])
    for seed in range(5):
        g = quantize_gradient(dr, 1, torch.Generator().manual_seed(seed))
        assert torch.equal(g, dr)


def numpy_quantized_gradient(dr: np.ndarray, bits: int, sigma: np.ndarray) -> np.ndarray:
    n = 2**bits - 1
    m = np.abs(dr).reshape(dr.shape[0], -1).max(axis=1).reshape((-1,) + (1,) * (dr.ndim - 1))
    r = np.clip(dr / (2 * m) + 0.5 + sigma / n, 0, 1)
    return 2 * m * (np.round(n * r) / n - 0.5)


@pytest.mark.parametrize("bits", [2, 4, 6])
def test_gradient_matches_numpy_reference_with_the_same_noise(bits):
    dr = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(bits))
    sigma = torch.rand(dr.shape, generator=torch.Generator().manual_seed(11)) - 0.5
    got = quantize_gradient(dr, bits, torch.Generator().manual_seed(11))
    expected = numpy_quantized_gradient(dr.double().numpy(), bits, sigma.double().numpy())
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3])
def test_gradient_through_module_lies_on_per_sample_grid(bits):
    q = DorefaGradQuantizer(bits, seed=0)
    x = torch.zeros(4, 3, 8, requires_grad=True)
    upstream = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(1))
    upstream[2] = 0.0
    y = q(x)
    assert torch.equal(y, x)
    y.backward(upstream)
    levels = 2**bits - 1
    assert not torch.equal(x.grad, upstream)
    for sample, g in zip(upstream, x.grad):
        m = sample.abs().max().double()
        if m == 0:
            assert torch.equal(g, torch.zeros_like(g))
            continue
        grid = 2 * m * (torch.arange(levels + 1, dtype=torch.float64) / levels - 0.5)
        distance = (g.double().reshape(-1, 1) - grid.reshape(1, -1)).abs().min(dim=1).values
        assert (distance <= 1e-6 * m).all()
        assert g.unique().numel() <= 2**bits


def test_gradient_is_unbiased_on_average():
    # T independent draws of the same sample (each row is its own sample with the same max).
    # Per element the error is a stochastic rounding error on a grid of step d = 2 m / (2^k - 1):
    # variance f (1 - f) d^2 <= d^2 / 4, so the mean of T draws has standard deviation <= d / (2 sqrt(T)).
    bits, draws = 3, 4000
    sample = torch.randn(1, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = quantize_gradient(sample.expand(draws, 50).contiguous(), bits, torch.Generator().manual_seed(123))
    step = 2 * sample.abs().max() / (2**bits - 1)
    per_element_sd = step / (2 * math.sqrt(draws))
    mean_error = g.mean(dim=0) - sample[0]
    assert (mean_error.abs() <= 5 * per_element_sd).all()
    assert abs(float(mean_error.mean())) <= 5 * per_element_sd / math.sqrt(50)
    # and it really is noisy: the draws are not all the same
    assert (g.std(dim=0) > 0).sum() > 40


def test_seed_makes_gradients_reproducible():
    upstream = torch.randn(2, 30, generator=torch.Generator().manual_seed(5))

    def grad_of(q):
        x = torch.zeros(2, 30, requires_grad=True)
        q(x).backward(upstream)
        return x.grad

    a, b = DorefaGradQuantizer(4, seed=9), DorefaGradQuantizer(4, seed=9)
    first = grad_of(a)
    assert torch.equal(first, grad_of(b))
    assert not torch.equal(first, grad_of(a))  # the stream moves on
    assert grad_of(DorefaGradQuantizer(4)).shape == upstream.shape  # no seed: torch's global generator


def test_non_finite_gradient_is_training_error_naming_tensor():
    q = DorefaGradQuantizer(4)
    q.label = "fc2.output"
    x = torch.ones(2, 3, requires_grad=True)
    with pytest.raises(TrainingError, match="fc2.output"):
        q(x).backward(torch.tensor([[1.0, math.nan, 0.0], [1.0, 2.0, 3.0]]))


def test_gradient_quantizer_has_no_codes():
    q = DorefaGradQuantizer(6)
    assert q.bits is None and q.grad_bits == 6
    with pytest.raises(ConfigError):
        q.encode(torch.ones(2))


# --- configuration ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [{"name": "dorefa_weight", "bits": 1}, {"name": "dorefa_weight", "bits": 8}, {"name": "dorefa_act", "bits": 3},
     {"name": "dorefa_grad", "bits": 6, "seed": None}, {"name": "dorefa_grad", "bits": 16, "seed": 4}],
)
def test_spec_round_trip(spec):
    q = get(spec)
    assert q.spec() == spec and get(q.spec()) == q


@pytest.mark.parametrize(
    "spec",
    [{"name": "dorefa_weight", "bits": 0}, {"name": "dorefa_weight", "bits": 32}, {"name": "dorefa_act", "bits": 9},
     {"name": "dorefa_act", "bits": 2.0}, {"name": "dorefa_grad", "bits": 17}, {"name": "dorefa_grad", "seed": "x"},
     {"name": "dorefa_grad", "seed": True}],
)
def test_bad_config_is_config_error(spec):
    with pytest.raises(ConfigError):
        get(spec)
