"""LSQ (Esser et al. 2020): forward and step gradient by hand and against a numpy reference of eq. 3."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lowbit.errors import CalibrationError, ConfigError
from lowbit.quantizers import decode, get
from lowbit.quantizers.lsq import LSQQuantizer, lsq_quantize, lsq_range

# magnitudes up to 2^100: near float32 max, Q_P times the initial step 2 mean|v| / sqrt(Q_P) overflows
SPECIAL = [0.0, -0.0, 1e-45, -1e-45, 1.1754942e-38, 1.0, -1.0, 2.0**100]
VALUES = st.one_of(st.sampled_from(SPECIAL), st.floats(-2.0**100, 2.0**100, width=32))
ARRAYS = st.one_of(
    arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 6)), elements=VALUES),
    st.builds(lambda v, n: np.full((2, n), v, np.float32), VALUES, st.integers(1, 5)),
)


def with_step(q: LSQQuantizer, step) -> LSQQuantizer:
    with torch.no_grad():
        q.step.data = torch.as_tensor(step, dtype=torch.float32)
        q.initialized.fill_(True)
    return q


def numpy_lsq_grads(v, s, upstream, q_n, q_p, grad_scale):
    """Esser et al. eq. 3 elementwise in float64: (dL/dv, dL/ds per element before summing)."""
    ratio = v / s
    inside = (ratio > -q_n) & (ratio < q_p)
    d_step = np.where(ratio <= -q_n, -q_n, np.where(ratio >= q_p, q_p, np.round(ratio) - ratio))
    return upstream * inside, upstream * d_step * grad_scale


def test_ranges():
    assert lsq_range(4, True) == (8, 7)
    assert lsq_range(4, False) == (0, 15)
    assert lsq_range(2, True) == (2, 1)
    assert lsq_range(1, False) == (0, 1)


def test_forward_and_gradients_by_hand():
    # s = 0.5, 3 bits signed (Q_N = 4, Q_P = 3): v / s = -20, -2.6, -0.5, 0, 0.6, 1.48, 7.2, 20
    # clip -> -4, -2.6, -0.5, 0, 0.6, 1.48, 3, 3; round (half to even) -> -4, -3, 0, 0, 1, 1, 3, 3; times s
    v = torch.tensor([-10.0, -1.3, -0.25, 0.0, 0.3, 0.74, 3.6, 10.0], requires_grad=True)
    step = torch.full((8,), 0.5, requires_grad=True)  # one step per element: the step gradient stays elementwise
    y = lsq_quantize(v, step, 4, 3)
    assert torch.equal(y, torch.tensor([-2.0, -1.5, 0.0, 0.0, 0.5, 0.5, 1.5, 1.5]))
    y.sum().backward()
    assert torch.equal(v.grad, torch.tensor([0.0, 1, 1, 1, 1, 1, 0, 0]))
    # below: -Q_N; inside: round(v/s) - v/s = -3 + 2.6, 0 + 0.5, 0, 1 - 0.6, 1 - 1.48; above: Q_P
    expected = torch.tensor([-4.0, -0.4, 0.5, 0.0, 0.4, -0.48, 3.0, 3.0])
    torch.testing.assert_close(step.grad, expected, rtol=0, atol=1e-6)


def test_step_initialised_on_first_forward_by_hand():
    # mean|v| = (1 + 3 + 0 + 2) / 4 = 1.5; 4 bits signed: Q_P = 7; s = 2 * 1.5 / sqrt(7)
    q = LSQQuantizer(4)
    assert not q.initialized
    q(torch.tensor([1.0, -3.0, 0.0, 2.0]))
    assert q.initialized
    assert q.step.item() == pytest.approx(3 / math.sqrt(7), rel=1e-6)
    q(torch.tensor([100.0, 100.0]))  # initialised once only
    assert q.step.item() == pytest.approx(3 / math.sqrt(7), rel=1e-6)


def test_per_channel_steps_initialised_per_output_channel():
    v = torch.tensor([[1.0, -1.0], [4.0, 0.0], [0.0, 0.0]])
    q = LSQQuantizer(3, signed=False, per_channel=True)  # Q_P = 7
    q(v)
    expected = torch.tensor([2 * 1.0, 2 * 2.0, torch.finfo(torch.float32).eps * math.sqrt(7)]) / math.sqrt(7)
    torch.testing.assert_close(q.step.detach(), expected)


@pytest.mark.parametrize("signed,per_channel,role", [(True, False, "weight"), (False, False, "weight"),
                                                     (True, True, "weight"), (False, False, "activation")])
def test_gradients_match_numpy_reference(signed, per_channel, role):
    gen = torch.Generator().manual_seed(0)
    v = (torch.randn(4, 3, 5, generator=gen) * 2).requires_grad_(True)
    upstream = torch.randn(4, 3, 5, generator=gen)
    q = with_step(LSQQuantizer(3, signed, per_channel, role), [0.3, 0.7, 0.2, 1.1] if per_channel else 0.4)
    q(v).backward(upstream)

    q_n, q_p = lsq_range(3, signed)
    n = 15 if per_channel or role == "activation" else 60  # values per step, or features per sample
    s = np.array([0.3, 0.7, 0.2, 1.1]).reshape(4, 1, 1) if per_channel else 0.4
    s = np.float32(s).astype(np.float64)
    g_v, g_s = numpy_lsq_grads(v.detach().double().numpy(), s, upstream.double().numpy(), q_n, q_p,
                               1 / math.sqrt(n * q_p))
    np.testing.assert_array_equal(v.grad.numpy(), g_v)
    expected_step = g_s.sum(axis=(1, 2)) if per_channel else g_s.sum()
    np.testing.assert_allclose(q.step.grad.double().numpy(), expected_step, rtol=1e-5, atol=1e-6)


def test_outputs_are_multiples_of_the_step_within_range():
    v = torch.randn(50, generator=torch.Generator().manual_seed(1)) * 4
    for signed in (True, False):
        q = with_step(LSQQuantizer(3, signed), 0.25)
        q_n, q_p = lsq_range(3, signed)
        k = q(v) / 0.25
        assert torch.equal(k, k.round()) and k.min() >= -q_n and k.max() <= q_p
        assert k.min() == -q_n and k.max() == q_p  # the data reaches both ends


@pytest.mark.parametrize("signed,per_channel", [(True, False), (False, False), (True, True)])
def test_decode_of_encode_is_forward_bitwise(signed, per_channel):
    v = torch.randn(6, 7, generator=torch.Generator().manual_seed(2)) * 3
    q = LSQQuantizer(4, signed, per_channel)
    q(v)
    q.eval()
    enc = q.encode(v)
    assert enc.kind == "affine" and enc.meta["qmin"] == -lsq_range(4, signed)[0]
    assert enc.meta.get("axis") == (0 if per_channel else None)
    assert torch.equal(enc.params["scale"], q.step.detach()) and (enc.params["zero_point"] == 0).all()
    assert torch.equal(decode(enc), q(v))


def test_state_dict_round_trip_keeps_learned_step():
    v = torch.randn(5, 4, generator=torch.Generator().manual_seed(3))
    for per_channel in (False, True):
        q = LSQQuantizer(4, per_channel=per_channel)
        q(v)
        with torch.no_grad():
            q.step.mul_(1.5)  # "learned"
        loaded = get(q.spec())
        loaded.load_state_dict(q.state_dict())
        assert loaded.initialized and torch.equal(loaded.step, q.step)
        assert torch.equal(loaded(v * 10), q(v * 10))  # not initialised again


def test_channel_count_change_is_config_error_naming_tensor():
    q = LSQQuantizer(4, per_channel=True)
    q.label = "conv2.weight"
    q(torch.randn(3, 2))
    with pytest.raises(ConfigError, match=r"conv2\.weight"):
        q(torch.randn(4, 2))


@settings(max_examples=60, deadline=None)
@given(ARRAYS, st.integers(2, 8), st.booleans(), st.booleans())
def test_property_finite_encodable_and_in_range(a, bits, signed, per_channel):
    v = torch.from_numpy(a)
    q = LSQQuantizer(bits, signed, per_channel)
    y = q(v)
    enc = q.encode(v)
    assert torch.isfinite(y).all() and torch.equal(decode(enc), y)
    assert enc.codes.min() >= enc.meta["qmin"] and enc.codes.max() <= enc.meta["qmax"]
    assert (q.step >= torch.finfo(torch.float32).eps).all()


@settings(max_examples=30, deadline=None)
@given(ARRAYS, st.sampled_from([math.nan, math.inf, -math.inf]), st.integers(0, 100))
def test_property_non_finite_is_calibration_error_naming_tensor(a, bad, where):
    a = a.copy()
    a.flat[where % a.size] = bad
    q = LSQQuantizer(4)
    q.label = "fc3.weight"
    for call in (q, q.encode):
        with pytest.raises(CalibrationError, match=r"fc3\.weight"):
            call(torch.from_numpy(a))
    assert not q.initialized


def test_spec_round_trip():
    spec = {"name": "lsq", "bits": 3, "signed": False, "per_channel": False, "role": "activation"}
    q = get(spec)
    assert q.spec() == spec and get(q.spec()) == q


@pytest.mark.parametrize(
    "kwargs",
    [{"bits": 1}, {"bits": 9}, {"bits": 0, "signed": False}, {"role": "bias"}, {"signed": 1},
     {"per_channel": True, "role": "activation"}],
)
def test_bad_config_is_config_error(kwargs):
    with pytest.raises(ConfigError):
        LSQQuantizer(**kwargs)
