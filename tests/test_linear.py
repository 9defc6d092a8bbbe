"""Miyashita LinearQuant: hand-worked examples, numpy and torch oracles, properties, errors."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import CalibrationError, ConfigError
from lowbit.quantizers import decode, get
from lowbit.quantizers.linear import LinearQuantizer, linear_fsr_bounds, linear_quant, linear_step, smallest_fsr

finite32 = st.floats(min_value=-(2.0**100), max_value=2.0**100, allow_nan=False, allow_infinity=False, width=32)
special = st.sampled_from([0.0, -0.0, 1e-45, -1e-45, 1e-40, -3e-39, 1.0, -1.0, 0.5])
values = st.lists(st.one_of(finite32, special), min_size=1, max_size=24)


def paper_linear_quant(x: np.ndarray, bits: int, fsr: int, signed: bool) -> np.ndarray:
    """Clip(Round(x / step) * step, minV, maxV) in float64 with the documented step and range."""
    step = 2.0 ** (fsr - bits + (1 if signed else 0))
    low = -(2.0**fsr) if signed else 0.0
    return np.clip(np.round(x.astype(np.float64) / step) * step, low, 2.0**fsr - step)


def test_signed_4_bits_fsr_0_by_hand():
    # b = 4 with sign: step = 2^(0 - 4 + 1) = 1/8, codes [-8, 7], values [-1, 7/8]
    x = torch.tensor([0.3, -1.0, 0.9, 0.0625, 0.1875, -2.0, 5.0])
    # x / step = 2.4, -8, 7.2, 0.5 (half to even -> 0), 1.5 (-> 2), -16 (-> -8), 40 (-> 7)
    q = LinearQuantizer(bits=4, fsr=0)
    assert torch.equal(q(x), torch.tensor([0.25, -1.0, 0.875, 0.0, 0.25, -1.0, 0.875]))
    enc = q.encode(x)
    assert enc.codes.tolist() == [2, -8, 7, 0, 2, -8, 7]
    assert enc.kind == "affine" and enc.params["scale"].item() == 0.125 and enc.params["zero_point"].item() == 0
    assert enc.meta == {"qmin": -8, "qmax": 7, "axis": None}


def test_unsigned_3_bits_fsr_1_by_hand():
    # the paper's case: step = 2^(1 - 3) = 1/4, codes [0, 7], values [0, 2 - 1/4]
    x = torch.tensor([-0.5, 0.3, 1.9, 0.125, 1.0])
    q = LinearQuantizer(bits=3, fsr=1, signed=False)
    assert torch.equal(q(x), torch.tensor([0.0, 0.25, 1.75, 0.0, 1.0]))
    assert q.encode(x).codes.tolist() == [0, 1, 7, 0, 4]


@pytest.mark.parametrize(
    ("max_abs", "fsr"), [(0.9, 0), (1.0, 0), (1.01, 1), (0.5, -1), (0.26, -1), (3.0, 2), (2.0**-130, -130)]
)
def test_smallest_fsr_by_hand(max_abs, fsr):
    assert smallest_fsr(torch.tensor(max_abs), -200, 200) == fsr


def test_smallest_fsr_is_clamped_and_zero_gives_the_floor():
    assert smallest_fsr(torch.tensor(0.0), -7, 9) == -7
    assert smallest_fsr(torch.tensor(2.0**-130), -122, 127) == -122
    assert smallest_fsr(torch.tensor(3e38), -122, 127) == 127


def test_dynamic_fsr_from_max_abs():
    # max|x| = 0.9 -> fsr 0 -> step 1/8 (4 bits signed): -0.9 -> -7.2 -> -7 -> -0.875
    q = LinearQuantizer(bits=4)
    x = torch.tensor([0.2, -0.9])
    assert torch.equal(q(x), torch.tensor([0.25, -0.875]))
    assert q.encode(x).params["scale"].item() == 0.125


@pytest.mark.parametrize("bits", range(2, 17))
@pytest.mark.parametrize("signed", [True, False])
def test_matches_the_paper_formula_and_torch(bits, signed):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(300, generator=g) * 2
    fsr = 1
    ours_x = x.clone().requires_grad_(True)
    ours = linear_quant(ours_x, bits, fsr, signed)
    assert np.array_equal(ours.detach().numpy().astype(np.float64), paper_linear_quant(x.numpy(), bits, fsr, signed))
    step = linear_step(bits, fsr, signed)
    assert step.item() == 2.0 ** (fsr - bits + int(signed))
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    ref_x = x.clone().requires_grad_(True)
    ref = torch.fake_quantize_per_tensor_affine(ref_x, step.item(), 0, qmin, qmax)
    assert torch.equal(ours, ref)
    ours.sum().backward()
    ref.sum().backward()
    assert torch.equal(ours_x.grad, ref_x.grad)


def test_gradient_is_zero_where_clipped():
    x = torch.tensor([-3.0, -0.5, 0.2, 0.99, 5.0], requires_grad=True)
    LinearQuantizer(bits=4, fsr=0)(x).sum().backward()  # range [-1, 7/8]; 0.99 / (1/8) = 7.92 -> 8 outside
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]


@settings(max_examples=80, deadline=None)
@given(xs=values, bits=st.integers(2, 16), signed=st.booleans(), fsr=st.one_of(st.none(), st.integers(-20, 20)))
def test_codes_in_range_and_decode_equals_forward(xs, bits, signed, fsr):
    q = LinearQuantizer(bits=bits, fsr=fsr, signed=signed)
    x = torch.tensor(xs, dtype=torch.float32)
    enc = q.encode(x)
    assert int(enc.codes.min()) >= q.qmin and int(enc.codes.max()) <= q.qmax
    y = q(x)
    assert torch.equal(decode(enc), y) and torch.isfinite(y).all()
    step = enc.params["scale"].item()
    assert math.frexp(step)[0] == 0.5 and step >= 2.0**-126  # a normal power of two
    if fsr is None:
        assert float(x.abs().max()) <= 2.0 ** (math.log2(step) + bits - int(signed))  # 2^fsr >= max|x|


@settings(max_examples=60, deadline=None)
@given(xs=values, bits=st.integers(2, 16), signed=st.booleans(), fsr=st.integers(-20, 20))
def test_idempotent_with_a_fixed_fsr(xs, bits, signed, fsr):
    """With fsr fixed, q(x) lies on the grid inside the range, so q(q(x)) == q(x). (With fsr
    read per input it can change: max|x| = 2^(f-1) + tiny takes fsr f but q(x) may round to 2^(f-1),
    which takes fsr f - 1, where +2^(f-1) is no longer representable.)"""
    q = LinearQuantizer(bits=bits, fsr=fsr, signed=signed)
    once = q(torch.tensor(xs, dtype=torch.float32))
    assert torch.equal(q(once), once)


@settings(max_examples=20, deadline=None)
@given(xs=values, bad=st.sampled_from([math.nan, math.inf, -math.inf]))
def test_nan_or_inf_is_a_calibration_error_naming_the_tensor(xs, bad):
    q = LinearQuantizer()
    q.label = "fc2.weight"
    with pytest.raises(CalibrationError, match="fc2.weight"):
        q(torch.tensor([*xs, bad]))


def test_static_fsr_is_observed_and_kept_in_the_state_dict():
    q = LinearQuantizer(bits=4, dynamic=False).eval()
    q.label = "fc.input"
    assert not q.observed
    with pytest.raises(CalibrationError, match="fc.input"):
        q(torch.ones(2))
    q.calibrating = True
    q(torch.tensor([0.1, -0.3]))
    q(torch.tensor([1.5, 0.2]))  # running extremes: max|x| = 1.5 -> fsr 1, step 1/4
    q.calibrating = False
    assert q.observed and q.current_fsr(torch.ones(1)) == 1
    x = torch.tensor([0.3, 3.0])
    assert torch.equal(q(x), torch.tensor([0.25, 1.75]))
    fresh = LinearQuantizer(bits=4, dynamic=False).eval()
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x), q(x)) and torch.equal(decode(fresh.encode(x)), q(x))


def test_explicit_fsr_needs_no_observation():
    q = LinearQuantizer(fsr=2, dynamic=False).eval()
    assert q.observed and "stats.min_val" not in q.state_dict()


@pytest.mark.parametrize("kwargs", [{}, {"bits": 8, "fsr": -3, "signed": False, "dynamic": False}])
def test_spec_round_trip(kwargs):
    q = LinearQuantizer(**kwargs)
    assert set(q.spec()) == {"name", "bits", "fsr", "signed", "dynamic"}
    assert get(q.spec()) == q and q.spec()["name"] == "linear"


@pytest.mark.parametrize(
    "kwargs",
    [{"bits": 1}, {"bits": 17}, {"bits": 4.0}, {"fsr": 1.5}, {"fsr": True}, {"fsr": 128},
     {"bits": 4, "fsr": 4 - 1 - 127}, {"signed": 1}, {"dynamic": "no"}],
)
def test_bad_options_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        LinearQuantizer(**kwargs)


def test_fsr_bounds_keep_the_step_normal():
    low, high = linear_fsr_bounds(4, True)
    assert (low, high) == (4 - 1 - 126, 127)
    assert linear_step(4, low, True).item() == 2.0**-126
    LinearQuantizer(bits=4, fsr=low)  # the floor itself is valid
