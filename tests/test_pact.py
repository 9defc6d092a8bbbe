"""PACT (Choi et al. 2018): clipped k-bit activations with a learned clipping level, by hand and against numpy."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lowbit.errors import CalibrationError, ConfigError
from lowbit.quantizers import decode, get
from lowbit.quantizers.pact import PACTQuantizer, pact_quantize

SPECIAL = [0.0, -0.0, 1e-45, -1e-45, 1.1754942e-38, 1.0, -1.0, 10.0, 3e38, -3e38]
VALUES = st.one_of(st.sampled_from(SPECIAL), st.floats(width=32, allow_nan=False, allow_infinity=False))
ARRAYS = st.one_of(
    arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 6)), elements=VALUES),
    st.builds(lambda v, n: np.full((2, n), v, np.float32), VALUES, st.integers(1, 5)),
)


def test_forward_and_gradients_by_hand():
    # alpha = 2, k = 2: scale 2/3; clip -> 0, 0, 0.3, 0.5, 1, 1.9, 2, 2; / scale -> 0, 0, 0.45, 0.75, 1.5, 2.85, 3, 3
    # round (half to even) -> 0, 0, 0, 1, 2, 3, 3, 3; times 2/3
    x = torch.tensor([-1.0, 0.0, 0.3, 0.5, 1.0, 1.9, 2.0, 5.0], requires_grad=True)
    alpha = torch.tensor(2.0, requires_grad=True)
    y = pact_quantize(x, alpha, 2)
    torch.testing.assert_close(y, torch.tensor([0, 0, 0, 2 / 3, 4 / 3, 2, 2, 2.0]), rtol=0, atol=1e-6)
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1, 1, 1, 1, 1, 0, 0]))  # 1 on [0, alpha)
    assert alpha.grad.item() == 2.0  # x >= alpha: 2.0 and 5.0


def test_gradients_match_numpy_reference():
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 30, generator=gen) * 3).requires_grad_(True)
    upstream = torch.randn(4, 30, generator=gen)
    q = PACTQuantizer(3, alpha=2.5)
    q(x).backward(upstream)
    xs, g = x.detach().double().numpy(), upstream.double().numpy()
    np.testing.assert_array_equal(x.grad.double().numpy(), g * ((xs >= 0) & (xs < 2.5)))
    assert q.alpha.grad.item() == pytest.approx(np.sum(g * (xs >= 2.5)), rel=1e-5)


def test_regularization_is_half_lambda_alpha_squared():
    q = PACTQuantizer(4, alpha=10.0)
    penalty = q.regularization(0.01)
    assert penalty.item() == pytest.approx(0.5 * 0.01 * 100)
    penalty.backward()
    assert q.alpha.grad.item() == pytest.approx(0.01 * 10.0)  # weight decay lambda on alpha


def test_alpha_is_learned():
    # every x above alpha and a loss that rewards larger outputs: alpha grows by lr * (number of such x)
    q = PACTQuantizer(4, alpha=1.0)
    opt = torch.optim.SGD(q.parameters(), lr=0.1)
    (-q(torch.full((5,), 3.0)).sum()).backward()
    opt.step()
    assert q.alpha.item() == pytest.approx(1.0 + 0.1 * 5)


def test_forward_is_the_decode_arithmetic_and_encodes():
    q = PACTQuantizer(3, alpha=1.3).eval()
    x = torch.linspace(-1, 2, 41)
    enc = q.encode(x)
    scale = torch.tensor(1.3, dtype=torch.float32) / 7
    assert enc.kind == "affine" and enc.meta == {"qmin": 0, "qmax": 7}
    assert torch.equal(enc.params["scale"], scale) and int(enc.params["zero_point"]) == 0
    assert torch.equal(q(x), enc.codes.float() * scale)
    assert torch.equal(decode(enc), q(x))


def test_alpha_floored_at_eps():
    q = PACTQuantizer(2, alpha=1.0)
    with torch.no_grad():
        q.alpha.fill_(-1.0)  # trained below zero
    x = torch.tensor([-1.0, 0.0, 5.0])
    y = q(x)
    eps = torch.finfo(torch.float32).eps
    assert torch.isfinite(y).all() and y.max() <= eps and torch.equal(decode(q.encode(x)), y)


def test_state_dict_keeps_learned_alpha_and_spec_the_start():
    q = PACTQuantizer(4, alpha=6.0)
    with torch.no_grad():
        q.alpha.fill_(3.5)
    assert q.spec() == {"name": "pact", "bits": 4, "alpha": 6.0}
    loaded = get(q.spec())
    loaded.load_state_dict(q.state_dict())
    assert loaded.alpha.item() == 3.5 and loaded == q


@settings(max_examples=60, deadline=None)
@given(ARRAYS, st.integers(1, 8), st.floats(1e-3, 1e3))
def test_property_within_half_step_of_clip_and_encodable(a, bits, alpha):
    x = torch.from_numpy(a)
    q = PACTQuantizer(bits, alpha=alpha)
    y = q(x)
    enc = q.encode(x)
    assert torch.equal(decode(enc), y)
    assert enc.codes.min() >= 0 and enc.codes.max() <= 2**bits - 1
    level = q.alpha.item()
    clipped = x.double().clamp(0, level)
    assert ((y.double() - clipped).abs() <= 0.5 * level / (2**bits - 1) * (1 + 1e-5)).all()


@settings(max_examples=30, deadline=None)
@given(ARRAYS, st.sampled_from([math.nan, math.inf, -math.inf]), st.integers(0, 100))
def test_property_non_finite_is_calibration_error_naming_tensor(a, bad, where):
    a = a.copy()
    a.flat[where % a.size] = bad
    q = PACTQuantizer()
    q.label = "relu1.output"
    for call in (q, q.encode):
        with pytest.raises(CalibrationError, match=r"relu1\.output"):
            call(torch.from_numpy(a))


def test_spec_round_trip():
    spec = {"name": "pact", "bits": 2, "alpha": 4.0}
    q = get(spec)
    assert q.spec() == spec and get(q.spec()) == q
    assert get({"name": "pact", "alpha": 3}).spec()["alpha"] == 3.0


@pytest.mark.parametrize(
    "kwargs",
    [{"bits": 0}, {"bits": 9}, {"alpha": 0.0}, {"alpha": -1.0}, {"alpha": math.inf}, {"alpha": math.nan},
     {"alpha": "1"}, {"alpha": True}],
)
def test_bad_config_is_config_error(kwargs):
    with pytest.raises(ConfigError):
        PACTQuantizer(**kwargs)
