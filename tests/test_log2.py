"""Miyashita LogQuant: hand-worked examples, a numpy reference of the paper's formula, properties."""

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import CalibrationError, ConfigError
from lowbit.quantizers import decode, get
from lowbit.quantizers.log2 import Log2Quantizer, log2_round, log_codes, log_quant

finite32 = st.floats(min_value=-(2.0**100), max_value=2.0**100, allow_nan=False, allow_infinity=False, width=32)
special = st.sampled_from([0.0, -0.0, 1e-45, -1e-45, 1e-40, -3e-39, 1.0, -1.0, 0.5, 0.70710677, 0.7071068])
values = st.lists(st.one_of(finite32, special), min_size=1, max_size=24)


def paper_log_quant(x: np.ndarray, bits: int, fsr: int, signed: bool) -> np.ndarray:
    """LogQuant in float64: 0 for x = 0, else sign * 2^Clip(round(log2|x|), fsr - 2^b, fsr) with
    Clip(e) = 0 (zero) for e <= fsr - 2^b and fsr - 1 for e >= fsr; unsigned: x < 0 -> 0."""
    x = x.astype(np.float64)
    with np.errstate(divide="ignore"):
        e = np.round(np.log2(np.abs(x)))
    e = np.minimum(e, fsr - 1)
    out = np.where(e <= fsr - 2**bits, 0.0, np.sign(x) * 2.0**e)
    out = np.where(x == 0, 0.0, out)
    return out if signed else np.where(x < 0, 0.0, out)


@pytest.mark.parametrize(
    ("x", "rounded"),
    [(1.0, 0), (0.72, 0), (0.70, -1), (1.4, 0), (1.45, 1), (3.0, 2), (2.0**-149, -149), (1e-40, -133), (0.1767, -3),
     (0.1768, -2)],
)
def test_log2_round_by_hand(x, rounded):
    # log2 0.72 = -0.474, log2 0.70 = -0.515, log2 1.45 = 0.536, log2 3 = 1.585, log2 1e-40 = -132.88,
    # threshold between 2^-3 and 2^-2 at 2^-2.5 = 0.17678
    assert log2_round(torch.tensor([x])).item() == rounded


def test_log_quant_2_bits_fsr_1_by_hand():
    # b = 2, fsr = 1: code c in 1..3 is exponent 1 - 4 + c: 1/4, 1/2, 1; zero below 2^-2.5
    x = torch.tensor([0.72, 0.70, -0.5, 3.0, 0.18, 0.17, 0.0, -0.3])
    # round(log2|x|) = 0, -1, -1, 2 (clipped to fsr - 1 = 0), -2, -3 (<= fsr - 4 = -3: zero), -, -2
    expected = torch.tensor([1.0, 0.5, -0.5, 1.0, 0.25, 0.0, 0.0, -0.25])
    q = Log2Quantizer(bits=2, fsr=1)
    assert torch.equal(q(x), expected)
    enc = q.encode(x)
    assert enc.kind == "log" and enc.bits == 2 and enc.meta == {"fsr": 1, "signed": True}
    assert enc.codes.tolist() == [3, 2, 2, 3, 1, 0, 0, 1]
    assert enc.params["sign"].tolist() == [1, 1, -1, 1, 1, 1, 1, -1]
    assert enc.params["sign"].dtype == torch.int8


def test_rounding_is_in_the_log_domain_not_to_the_nearest_power():
    # 0.72 is nearer 0.5 than 1 in the linear domain, but round(log2 0.72) = 0 gives 1
    assert log_quant(torch.tensor([0.72]), 4, 2).item() == 1.0


def test_unsigned_makes_negatives_zero_and_has_no_sign():
    q = Log2Quantizer(bits=3, fsr=0, signed=False)
    x = torch.tensor([-0.5, 0.5, 0.3, -4.0], requires_grad=True)
    y = q(x)
    assert torch.equal(y, torch.tensor([0.0, 0.5, 0.25, 0.0]))
    enc = q.encode(x.detach())
    assert "sign" not in enc.params and enc.meta["signed"] is False
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]
    assert q.bits == 3 and Log2Quantizer(bits=3).bits == 4  # the sign bit counts when signed


def test_zero_needs_no_log_and_gives_no_warning():
    x = torch.tensor([0.0, -0.0, 0.0], requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = Log2Quantizer(bits=4, fsr=0)(x)
    assert torch.equal(y, torch.zeros(3)) and not torch.signbit(y).any()
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0]


def test_gradient_passes_inside_and_stops_where_saturated():
    # b = 2, fsr = 1: top value 1 (exponent 0); |x| >= 2^0.5 rounds to exponent >= 1 and is clipped
    x = torch.tensor([0.3, -0.9, 1.4, 1.45, -8.0, 0.01], requires_grad=True)
    log_quant(x, 2, 1).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]


def test_dynamic_fsr_is_the_linear_rule():
    # max|x| = 0.9 -> fsr 0, top value 2^-1; 0.9 has round(log2) = 0 -> clipped to 0.5
    q = Log2Quantizer(bits=3)
    x = torch.tensor([0.9, -0.26, 0.0])
    enc = q.encode(x)
    assert enc.meta["fsr"] == 0
    assert torch.equal(q(x), torch.tensor([0.5, -0.25, 0.0]))


@settings(max_examples=100, deadline=None)
@given(xs=values, bits=st.integers(2, 8), fsr=st.integers(-125, 128), signed=st.booleans())
def test_matches_the_paper_formula(xs, bits, fsr, signed):
    x = torch.tensor(xs, dtype=torch.float32)
    ours = log_quant(x, bits, fsr, signed).numpy().astype(np.float64)
    assert np.array_equal(ours, paper_log_quant(x.numpy(), bits, fsr, signed))


@settings(max_examples=80, deadline=None)
@given(xs=values, bits=st.integers(2, 8), fsr=st.one_of(st.none(), st.integers(-125, 128)), signed=st.booleans())
def test_codes_in_range_and_decode_equals_forward(xs, bits, fsr, signed):
    q = Log2Quantizer(bits=bits, fsr=fsr, signed=signed)
    x = torch.tensor(xs, dtype=torch.float32)
    enc = q.encode(x)
    assert enc.codes.dtype == torch.int64
    assert int(enc.codes.min()) >= 0 and int(enc.codes.max()) <= 2**bits - 1
    y = q(x)
    assert torch.equal(decode(enc), y) and torch.isfinite(y).all()
    codes, _, _ = log_codes(x, bits, enc.meta["fsr"], signed)
    assert torch.equal(codes, enc.codes)


@settings(max_examples=60, deadline=None)
@given(xs=values, bits=st.integers(2, 8), fsr=st.integers(-125, 128), signed=st.booleans())
def test_idempotent_with_a_fixed_fsr(xs, bits, fsr, signed):
    """With fsr fixed, q(x) holds representable powers of two, so q(q(x)) == q(x). (With fsr read per
    input it is not: max|q(x)| <= 2^(fsr-1), so the next fsr is fsr - 1.)"""
    q = Log2Quantizer(bits=bits, fsr=fsr, signed=signed)
    once = q(torch.tensor(xs, dtype=torch.float32))
    assert torch.equal(q(once), once)


@settings(max_examples=20, deadline=None)
@given(xs=values, bad=st.sampled_from([math.nan, math.inf, -math.inf]))
def test_nan_or_inf_is_a_calibration_error_naming_the_tensor(xs, bad):
    q = Log2Quantizer()
    q.label = "conv2.weight"
    with pytest.raises(CalibrationError, match="conv2.weight"):
        q(torch.tensor([*xs, bad]))


def test_static_fsr_is_observed():
    q = Log2Quantizer(bits=3, dynamic=False).eval()
    q.label = "act"
    with pytest.raises(CalibrationError, match="act"):
        q(torch.ones(2))
    q.train()
    q(torch.tensor([3.0, -1.0]))  # first training batch sets the range: max|x| = 3 -> fsr 2
    q.eval()
    assert q.observed and q.encode(torch.ones(1)).meta["fsr"] == 2
    fresh = Log2Quantizer(bits=3, dynamic=False).eval()
    fresh.load_state_dict(q.state_dict())
    x = torch.tensor([5.0, 0.3, -1.5])
    assert torch.equal(fresh(x), torch.tensor([2.0, 0.25, -2.0]))  # log2 1.5 = 0.585 -> 1


@pytest.mark.parametrize("kwargs", [{}, {"bits": 8, "fsr": -3, "signed": False, "dynamic": False}])
def test_spec_round_trip(kwargs):
    q = Log2Quantizer(**kwargs)
    assert set(q.spec()) == {"name", "bits", "fsr", "signed", "dynamic"}
    assert get(q.spec()) == q and q.spec()["name"] == "log2"


@pytest.mark.parametrize(
    "kwargs", [{"bits": 1}, {"bits": 9}, {"bits": "4"}, {"fsr": 129}, {"fsr": -126}, {"fsr": 0.5}, {"signed": None}]
)
def test_bad_options_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        Log2Quantizer(**kwargs)
