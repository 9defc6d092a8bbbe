"""ternary (TWN, Li & Liu 2016): delta and alpha by hand, value sets, codes, STE, errors."""

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
from lowbit.quantizers.ternary import TernaryQuantizer, twn_codes_and_scale

SUBNORMAL = float(np.finfo(np.float32).smallest_subnormal)
finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True)
special32 = st.sampled_from([0.0, -0.0, SUBNORMAL, -SUBNORMAL, 1.0, -0.7, 2.5])
shapes = st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple)
weights = st.one_of(arrays(np.float32, shapes, elements=st.one_of(finite32, special32)),
                    st.tuples(shapes, special32).map(lambda s: np.full(s[0], s[1], np.float32)))


def test_twn_per_tensor_by_hand():
    w = torch.tensor([0.1, -0.5, 1.0, -2.0, 0.0, 0.4])
    # mean|W| = 4/6, delta = 0.7 * 4/6 = 0.4667: kept -0.5, 1.0, -2.0; alpha = 3.5 / 3
    codes, alpha = twn_codes_and_scale(w)
    assert codes.tolist() == [0, -1, 1, -1, 0, 0]
    assert alpha.dim() == 0 and alpha.item() == pytest.approx(3.5 / 3, rel=1e-7)
    y = TernaryQuantizer()(w)
    a = np.float32(3.5 / 3)
    assert y.tolist() == [0.0, -a, a, -a, 0.0, 0.0]


def test_twn_per_channel_by_hand():
    w = torch.tensor([[1.0, -0.1, 0.2], [-4.0, 4.0, 0.5]])
    # row 0: delta = 0.7 * 1.3/3 = 0.303 -> keeps 1.0, alpha 1; row 1: delta = 0.7 * 8.5/3 = 1.98 -> alpha 4
    codes, alpha = twn_codes_and_scale(w, per_channel=True)
    assert codes.tolist() == [[1, 0, 0], [-1, 1, 0]]
    assert alpha.tolist() == [1.0, 4.0]
    assert torch.equal(TernaryQuantizer(per_channel=True)(w), torch.tensor([[1.0, 0, 0], [-4.0, 4.0, 0]]))
    # per tensor: delta = 0.7 * 9.8/6 = 1.143 -> keeps -4, 4; alpha 4
    assert torch.equal(TernaryQuantizer()(w), torch.tensor([[0.0, 0, 0], [-4.0, 4.0, 0]]))


def test_threshold_is_a_parameter():
    w = torch.tensor([1.0, 2.0, 3.0, -6.0])  # mean|W| = 3
    assert TernaryQuantizer(threshold=0.0)(w).tolist() == [3.0, 3.0, 3.0, -3.0]  # every non-zero weight
    assert TernaryQuantizer(threshold=1.0)(w).tolist() == [0.0, 0.0, 0.0, -6.0]  # only |w| > 3


@pytest.mark.parametrize("per_channel", [False, True])
@settings(max_examples=60, deadline=None)
@given(w=weights, threshold=st.sampled_from([0.0, 0.5, 0.7, 1.0, 1.5]))
def test_twn_matches_numpy_reference(per_channel, w, threshold):
    codes, alpha = twn_codes_and_scale(torch.from_numpy(w), threshold, per_channel)
    rows = np.abs(w.astype(np.float64)).reshape(w.shape[0] if per_channel else 1, -1)
    codes = codes.numpy().reshape(rows.shape)
    alpha = alpha.numpy().reshape(-1)
    signs = np.sign(w).reshape(rows.shape)
    for r, row in enumerate(rows):
        delta = threshold * row.mean()
        kept = row > delta
        assert np.array_equal(codes[r], np.where(kept, signs[r], 0))
        expected = row[kept].mean() if kept.any() else 0.0
        assert alpha[r] == pytest.approx(max(expected, EPS), rel=1e-6)


@pytest.mark.parametrize("per_channel", [False, True])
@settings(max_examples=60, deadline=None)
@given(w=weights)
def test_values_lie_in_minus_zero_plus_alpha_and_decode_is_forward_bitwise(per_channel, w):
    q = TernaryQuantizer(per_channel=per_channel).eval()
    x = torch.from_numpy(w)
    y = q(x)
    enc = q.encode(x)
    assert enc.kind == "ternary" and enc.bits == 2
    assert enc.codes.dtype == torch.int64 and set(enc.codes.unique().tolist()) <= {-1, 0, 1}
    scale = enc.params["scale"]
    assert scale.dtype == torch.float32 and (scale >= EPS).all()
    if per_channel:
        assert enc.meta == {"axis": 0} and scale.shape == (w.shape[0],)
        for c in range(w.shape[0]):
            assert set(y[c].unique().tolist()) <= {-scale[c].item(), 0.0, scale[c].item()}
    else:
        assert enc.meta == {"axis": None} and scale.dim() == 0
        assert set(y.unique().tolist()) <= {-scale.item(), 0.0, scale.item()}
    assert torch.equal(decode(enc), y)


@pytest.mark.parametrize("per_channel", [False, True])
def test_constant_quantizes_to_itself_and_zero_to_zero(per_channel):
    q = TernaryQuantizer(per_channel=per_channel)
    for c in [0.1, -3.0, EPS]:
        w = torch.full((3, 7), c)
        assert torch.equal(q(w), w)
    tiny = torch.full((2, 3), -SUBNORMAL)  # below the scale floor: alpha = EPS
    assert torch.equal(q(tiny), torch.full((2, 3), -EPS))
    zero = torch.zeros(2, 5)
    assert torch.equal(q(zero), zero)
    assert (q.encode(zero).params["scale"] == EPS).all()


def test_gradient_is_straight_through():
    w = torch.tensor([[0.1, -0.5, 1.0], [-2.0, 0.0, 0.4]], requires_grad=True)
    g = torch.tensor([[1.0, -2.0, 3.0], [0.5, 7.0, -1.0]])
    TernaryQuantizer()(w).backward(g)
    assert torch.equal(w.grad, g)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_inf_is_calibration_error_naming_tensor(bad):
    q = TernaryQuantizer()
    q.label = "classifier.weight"
    w = torch.ones(2, 2)
    w[0, 1] = bad
    with pytest.raises(CalibrationError, match="classifier.weight"):
        q(w)
    with pytest.raises(CalibrationError, match="classifier.weight"):
        q.encode(w)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), True, "0.7", None])
def test_bad_threshold_is_config_error(bad):
    with pytest.raises(ConfigError, match="threshold"):
        TernaryQuantizer(threshold=bad)


def test_bad_per_channel_and_scalar_per_channel_are_config_errors():
    with pytest.raises(ConfigError, match="per_channel"):
        TernaryQuantizer(per_channel="yes")
    with pytest.raises(ConfigError):
        TernaryQuantizer(per_channel=True)(torch.tensor(1.0))


@pytest.mark.parametrize("kwargs", [{}, {"threshold": 0.5}, {"per_channel": True},
                                    {"threshold": 1, "per_channel": True}])
def test_spec_round_trip(kwargs):
    q = TernaryQuantizer(**kwargs)
    spec = q.spec()
    assert set(spec) == {"name", "threshold", "per_channel"} and spec["name"] == "ternary"
    assert get(json.loads(json.dumps(spec))) == q
    assert q.bits == 2
