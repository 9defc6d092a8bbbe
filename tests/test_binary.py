"""binary (BNN sign) and xnor (XNOR-Net / BWN scaling): hand-worked values, gradients, codes."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lowbit.errors import CalibrationError, ConfigError
from lowbit.quantizers import decode, get
from lowbit.quantizers.base import EPS
from lowbit.quantizers.binary import BinaryQuantizer, XnorQuantizer, xnor_activation_scale, xnor_weight_scale
from lowbit.quantizers.ste import SIGN_STES

SUBNORMAL = float(np.finfo(np.float32).smallest_subnormal)
finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True)
special32 = st.sampled_from([0.0, -0.0, SUBNORMAL, -SUBNORMAL, 1.0, -1.0, 3.5])


def weights(min_dims: int = 1):
    """float32 arrays with 0, -0, subnormals, constants and ordinary values; axis 0 is the channel."""
    shapes = st.lists(st.integers(1, 4), min_size=min_dims, max_size=4).map(tuple)
    return st.one_of(arrays(np.float32, shapes, elements=st.one_of(finite32, special32)),
                     st.tuples(shapes, special32).map(lambda s: np.full(s[0], s[1], np.float32)))


def np_plus_sign(x):
    return np.where(x >= 0, 1.0, -1.0)


def np_window(x, ste):
    return {"identity": np.ones_like(x), "clipped": (np.abs(x) <= 1).astype(x.dtype),
            "approx_sign": np.where(np.abs(x) <= 1, 2 - 2 * np.abs(x), 0.0)}[ste]


# ---------------------------------------------------------------- binary

def test_binary_forward_by_hand():
    x = torch.tensor([-2.0, -0.0, 0.0, SUBNORMAL, -SUBNORMAL, 3.0])
    assert BinaryQuantizer()(x).tolist() == [-1.0, 1.0, 1.0, 1.0, -1.0, 1.0]


@pytest.mark.parametrize("ste", list(SIGN_STES))
def test_binary_gradient_matches_numpy_reference(ste):
    x = np.array([-1.5, -1.0, -0.6, -0.0, 0.0, 0.2, 0.999, 1.0, 4.0], np.float32)
    g = np.linspace(-2, 3, x.size).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_(True)
    BinaryQuantizer(ste)(xt).backward(torch.from_numpy(g))
    np.testing.assert_allclose(xt.grad.numpy(), g * np_window(x, ste), rtol=1e-6)


def test_binary_passes_nan_through_forward_but_encode_refuses_it():
    q = BinaryQuantizer()
    q.label = "fc1.weight"
    assert torch.isnan(q(torch.tensor([float("nan"), 1.0]))[0])
    with pytest.raises(CalibrationError, match="fc1.weight"):
        q.encode(torch.tensor([float("nan"), 1.0]))
    with pytest.raises(CalibrationError, match="fc1.weight"):
        q.encode(torch.tensor([float("inf")]))


@settings(max_examples=60, deadline=None)
@given(weights())
def test_binary_encode_decode_is_forward_bitwise(w):
    q = BinaryQuantizer().eval()
    x = torch.from_numpy(w)
    enc = q.encode(x)
    assert enc.kind == "binary" and enc.bits == 1 and enc.meta == {"axis": None}
    assert enc.codes.dtype == torch.int64 and set(enc.codes.unique().tolist()) <= {0, 1}
    assert torch.equal(enc.codes, torch.from_numpy((w >= 0).astype(np.int64)))
    assert enc.params["scale"].dtype == torch.float32 and enc.params["scale"].dim() == 0
    assert enc.params["scale"].item() == 1.0
    assert torch.equal(decode(enc), q(x))


@pytest.mark.parametrize("ste", list(SIGN_STES))
def test_binary_spec_round_trip(ste):
    q = BinaryQuantizer(ste)
    assert q.spec() == {"name": "binary", "ste": ste}
    assert get(json.loads(json.dumps(q.spec()))) == q
    assert q.bits == 1


@pytest.mark.parametrize("cls", [BinaryQuantizer, XnorQuantizer])
def test_bad_ste_lists_valid_names(cls):
    with pytest.raises(ConfigError) as err:
        cls(ste="tanh")
    assert all(name in str(err.value) for name in SIGN_STES)


# ---------------------------------------------------------------- xnor, weights

def test_xnor_alpha_of_2x3_weight_by_hand():
    w = torch.tensor([[1.0, -2.0, 3.0], [-0.5, 0.0, 0.25]])
    # alpha_0 = (1 + 2 + 3) / 3 = 2; alpha_1 = (0.5 + 0 + 0.25) / 3 = 0.25
    assert torch.equal(xnor_weight_scale(w), torch.tensor([2.0, 0.25]))
    y = XnorQuantizer()(w)
    assert torch.equal(y, torch.tensor([[2.0, -2.0, 2.0], [-0.25, 0.25, 0.25]]))  # sign(0) = +1


def test_xnor_conv_weight_alpha_is_mean_over_other_axes():
    w = torch.arange(-12.0, 12.0).reshape(2, 3, 2, 2)
    expected = torch.tensor([np.abs(np.arange(-12.0, 0.0)).mean(), np.abs(np.arange(0.0, 12.0)).mean()],
                            dtype=torch.float32)
    assert torch.equal(xnor_weight_scale(w), expected)


@settings(max_examples=60, deadline=None)
@given(weights())
def test_xnor_weight_values_are_plus_minus_alpha_per_channel(w):
    y = XnorQuantizer()(torch.from_numpy(w)).numpy()
    alpha = np.maximum(np.abs(w.astype(np.float64)).reshape(w.shape[0], -1).mean(axis=1), EPS)
    scale = xnor_weight_scale(torch.from_numpy(w)).numpy()
    np.testing.assert_allclose(scale, alpha, rtol=1e-6)
    for c in range(w.shape[0]):
        assert np.array_equal(y[c], np_plus_sign(w[c]).astype(np.float32) * scale[c])
        assert set(np.unique(y[c])) <= {-scale[c], scale[c]}


@settings(max_examples=60, deadline=None)
@given(weights())
def test_xnor_weight_encode_decode_is_forward_bitwise(w):
    q = XnorQuantizer().eval()
    x = torch.from_numpy(w)
    enc = q.encode(x)
    assert enc.kind == "binary" and enc.bits == 1 and enc.meta == {"axis": 0}
    assert enc.params["scale"].dtype == torch.float32 and enc.params["scale"].shape == (w.shape[0],)
    assert set(enc.codes.unique().tolist()) <= {0, 1}
    assert torch.equal(decode(enc), q(x))


def test_xnor_constant_channel_quantizes_to_itself_and_zero_channel_to_eps():
    w = torch.tensor([[0.1] * 7, [-3.0] * 7, [0.0] * 7])
    y = XnorQuantizer()(w)
    assert torch.equal(y[:2], w[:2])
    assert torch.equal(y[2], torch.full((7,), EPS))


@pytest.mark.parametrize("ste", list(SIGN_STES))
def test_xnor_weight_gradient_flows_through_alpha(ste):
    """g_W = alpha s'(W) g + sgn(W)/n * sum_row(g sign(W)), the exact derivative of alpha(W) sign_ste(W)."""
    w = np.array([[0.5, -0.25, 0.0, 2.0], [-1.5, 0.75, 0.1, -0.3]], np.float32)
    g = np.array([[1.0, -2.0, 0.5, 3.0], [0.25, 1.0, -1.0, 2.0]], np.float32)
    n = w.shape[1]
    alpha = np.abs(w).mean(axis=1, keepdims=True)
    expected = alpha * np_window(w, ste) * g + np.sign(w) / n * (g * np_plus_sign(w)).sum(axis=1, keepdims=True)
    wt = torch.from_numpy(w).requires_grad_(True)
    XnorQuantizer(ste)(wt).backward(torch.from_numpy(g))
    np.testing.assert_allclose(wt.grad.numpy(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_xnor_weight_nan_inf_is_calibration_error_naming_tensor(bad):
    q = XnorQuantizer()
    q.label = "features.0.weight"
    w = torch.ones(2, 3)
    w[1, 2] = bad
    with pytest.raises(CalibrationError, match="features.0.weight"):
        q(w)
    with pytest.raises(CalibrationError, match="features.0.weight"):
        q.encode(w)


def test_xnor_weight_needs_a_channel_axis():
    with pytest.raises(ConfigError):
        XnorQuantizer()(torch.tensor(2.0))


# ---------------------------------------------------------------- xnor, activations

def test_xnor_activation_4d_by_hand():
    # channel 0 = [1, -3], channel 1 = [-1, 1] at two positions: A = [(1 + 1)/2, (3 + 1)/2] = [1, 2]
    x = torch.tensor([[[[1.0, -3.0]], [[-1.0, 1.0]]]])
    assert torch.equal(xnor_activation_scale(x), torch.tensor([[[[1.0, 2.0]]]]))
    y = XnorQuantizer(role="activation")(x)
    assert torch.equal(y, torch.tensor([[[[1.0, -2.0]], [[-1.0, 2.0]]]]))


def test_xnor_activation_2d_uses_mean_over_features_per_sample():
    x = torch.tensor([[1.0, -2.0, 3.0], [0.0, 0.5, -1.0]])  # A = [2, 0.5]
    y = XnorQuantizer(role="activation")(x)
    assert torch.equal(y, torch.tensor([[2.0, -2.0, 2.0], [0.5, 0.5, -0.5]]))


@pytest.mark.parametrize("ste", list(SIGN_STES))
@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 2, 2)])
def test_xnor_activation_gradient_matches_numpy_reference(ste, shape):
    rng = np.random.default_rng(3)
    x = rng.uniform(-1.6, 1.6, shape).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    c = shape[1]
    a = np.abs(x).mean(axis=1, keepdims=True)
    expected = a * np_window(x, ste) * g + np.sign(x) / c * (g * np_plus_sign(x)).sum(axis=1, keepdims=True)
    xt = torch.from_numpy(x).requires_grad_(True)
    XnorQuantizer(ste, role="activation")(xt).backward(torch.from_numpy(g))
    np.testing.assert_allclose(xt.grad.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_xnor_activation_has_no_codes_and_needs_batch_and_channels():
    q = XnorQuantizer(role="activation")
    with pytest.raises(ConfigError):
        q.encode(torch.ones(2, 3))
    with pytest.raises(ConfigError, match="shape"):
        q(torch.ones(3))


def test_xnor_bad_role_lists_valid_roles():
    with pytest.raises(ConfigError) as err:
        XnorQuantizer(role="bias")
    assert "weight" in str(err.value) and "activation" in str(err.value)


@pytest.mark.parametrize("ste", list(SIGN_STES))
@pytest.mark.parametrize("role", ["weight", "activation"])
def test_xnor_spec_round_trip(ste, role):
    q = XnorQuantizer(ste, role)
    assert q.spec() == {"name": "xnor", "ste": ste, "role": role}
    assert get(json.loads(json.dumps(q.spec()))) == q


def test_defaults():
    assert get("xnor").spec() == {"name": "xnor", "ste": "clipped", "role": "weight"}
    assert get("binary").spec() == {"name": "binary", "ste": "clipped"}
