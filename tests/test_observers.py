"""Range observers: min/max, percentile (numpy oracle), mse search, and the kept range."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.ao.quantization import MinMaxObserver, MovingAverageMinMaxObserver

from lowbit.errors import CalibrationError, ConfigError, ShapeMismatchError
from lowbit.quantizers.observers import (
    MSE_STEPS,
    RangeObserver,
    batch_range,
    check_observer,
    check_percentile,
    minmax_range,
    mse_range,
    percentile_range,
)
from lowbit.quantizers.uniform import affine_qparams, fake_quantize_affine

finite32 = st.floats(min_value=-(2.0**60), max_value=2.0**60, allow_nan=False, allow_infinity=False, width=32)
special = st.sampled_from([0.0, -0.0, 1e-45, -1e-40, 1.0])
values = st.lists(st.one_of(finite32, special), min_size=1, max_size=30)


def fake_quant_4bit(x, lo, hi, axis=None):
    scale, zero_point = affine_qparams(lo, hi, 0, 15)
    return fake_quantize_affine(x, scale, zero_point, 0, 15, axis)


def test_minmax_per_tensor_and_per_channel():
    x = torch.tensor([[1.0, -2.0, 5.0], [0.5, 0.25, 0.75]])
    lo, hi = minmax_range(x)
    assert lo.item() == -2.0 and hi.item() == 5.0 and lo.dim() == 0
    lo, hi = minmax_range(x, axis=0)
    assert lo.tolist() == [-2.0, 0.25] and hi.tolist() == [5.0, 0.75]


def test_percentile_by_hand():
    # 0, 1, ..., 100: the p-th percentile is p; [0, 1, 2, 3] at 90: position 0.9 * 3 = 2.7 -> 2.7
    lo, hi = percentile_range(torch.arange(101.0), percentile=99.0)
    assert lo.item() == pytest.approx(1.0) and hi.item() == pytest.approx(99.0)
    lo, hi = percentile_range(torch.tensor([3.0, 0.0, 2.0, 1.0]), percentile=90.0)
    assert lo.item() == pytest.approx(0.3) and hi.item() == pytest.approx(2.7)
    lo, hi = percentile_range(torch.tensor([4.0, -1.0]), percentile=100.0)
    assert (lo.item(), hi.item()) == (-1.0, 4.0)


@settings(max_examples=60, deadline=None)
@given(xs=values, p=st.floats(50, 100))
def test_percentile_matches_numpy(xs, p):
    x = torch.tensor(xs, dtype=torch.float32)
    lo, hi = percentile_range(x, percentile=p)
    ref = np.percentile(x.double().numpy(), [100 - p, p])
    # float32 interpolation errs by a few ulps of the values it mixes (at least the smallest subnormal)
    tolerance = 1e-6 * float(x.abs().max()) + 2 * 2.0**-149
    assert abs(lo.item() - ref[0]) <= tolerance and abs(hi.item() - ref[1]) <= tolerance


def test_percentile_per_channel_matches_numpy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 50, generator=g)
    lo, hi = percentile_range(x, axis=0, percentile=95.0)
    rows = x.reshape(3, -1).double().numpy()
    np.testing.assert_allclose(lo.numpy(), np.percentile(rows, 5, axis=1), rtol=1e-5)
    np.testing.assert_allclose(hi.numpy(), np.percentile(rows, 95, axis=1), rtol=1e-5)


def test_mse_range_beats_every_other_candidate():
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(400, generator=g) * 0.1, torch.tensor([20.0, -15.0])])
    lo, hi = mse_range(x, None, fake_quant_4bit)
    mn, mx = minmax_range(x)
    assert -15.0 < lo.item() <= 0 <= hi.item() < 20.0  # the outliers are clipped
    best = (fake_quant_4bit(x, lo, hi) - x).square().mean()
    for k in range(1, MSE_STEPS + 1):  # the documented grid t = k / MSE_STEPS
        t = k / MSE_STEPS
        assert best <= (fake_quant_4bit(x, mn * t, mx * t) - x).square().mean()


def test_mse_range_keeps_the_full_range_when_nothing_is_gained_by_clipping():
    # 16 evenly spaced values fit the 4-bit grid exactly at t = 1 (error 0)
    x = torch.arange(16.0)
    lo, hi = mse_range(x, None, fake_quant_4bit)
    assert (lo.item(), hi.item()) == (0.0, 15.0)
    # all zeros: every t has error 0 and the widest (t = 1) wins
    lo, hi = mse_range(torch.zeros(5), None, fake_quant_4bit)
    assert (lo.item(), hi.item()) == (0.0, 0.0)


def test_mse_range_per_channel_picks_t_per_channel():
    g = torch.Generator().manual_seed(2)
    x = torch.stack([torch.randn(60, generator=g) * 0.1, torch.linspace(-4.0, 15.0, 60), torch.randn(60, generator=g)])
    x[0, 0] = 3.0  # one outlier in the first channel
    lo, hi = mse_range(x, 0, lambda v, a, b: fake_quant_4bit(v, a, b, axis=0))
    for c in range(3):
        row_lo, row_hi = mse_range(x[c], None, fake_quant_4bit)
        assert (lo[c].item(), hi[c].item()) == (row_lo.item(), row_hi.item())


def test_batch_range_dispatches_by_name():
    x = torch.tensor([-1.0, 0.0, 3.0])
    assert [t.item() for t in batch_range(x, "minmax", None, 99.0, fake_quant_4bit)] == [-1.0, 3.0]
    assert [t.item() for t in batch_range(x, "percentile", None, 100.0, fake_quant_4bit)] == [-1.0, 3.0]
    with pytest.raises(ConfigError, match="minmax"):
        batch_range(x, "kl", None, 99.0, fake_quant_4bit)


def test_extremes_match_torch_minmax_observer():
    obs, ref = RangeObserver(), MinMaxObserver()
    g = torch.Generator().manual_seed(3)
    for i in range(4):
        x = torch.randn(20, generator=g) * (i + 1)
        obs.update(*minmax_range(x), merge="extremes", where="t")
        ref(x)
    assert torch.equal(obs.min_val, ref.min_val) and torch.equal(obs.max_val, ref.max_val)
    assert obs.batches.item() == 4


def test_moving_average_matches_torch():
    obs, ref = RangeObserver(), MovingAverageMinMaxObserver(averaging_constant=0.01)
    g = torch.Generator().manual_seed(4)
    for i in range(5):
        x = torch.randn(20, generator=g) + i
        obs.update(*minmax_range(x), merge="moving", where="t")
        ref(x)
    assert torch.equal(obs.min_val, ref.min_val) and torch.equal(obs.max_val, ref.max_val)


def test_mean_by_hand():
    obs = RangeObserver()
    for lo, hi in [(-1.0, 2.0), (-3.0, 4.0), (-2.0, 9.0)]:
        obs.update(torch.tensor(lo), torch.tensor(hi), merge="mean", where="t")
    assert obs.min_val.item() == pytest.approx(-2.0) and obs.max_val.item() == pytest.approx(5.0)


def test_range_before_observation_names_the_tensor():
    obs = RangeObserver()
    assert not obs.observed
    with pytest.raises(CalibrationError, match="conv1.input"):
        obs.range("tensor 'conv1.input'")


def test_shape_change_and_unknown_merge_are_errors():
    obs = RangeObserver()
    obs.update(torch.zeros(3), torch.ones(3), merge="extremes", where="t")
    with pytest.raises(ShapeMismatchError, match="t"):
        obs.update(torch.zeros(4), torch.ones(4), merge="extremes", where="t")
    with pytest.raises(ConfigError, match="moving"):
        obs.update(torch.zeros(3), torch.ones(3), merge="median", where="t")


def test_state_dict_load_takes_the_stored_shape():
    obs = RangeObserver()
    obs.update(torch.tensor([-1.0, -2.0]), torch.tensor([1.0, 2.0]), merge="extremes", where="t")
    fresh = RangeObserver()
    fresh.load_state_dict(obs.state_dict())
    assert fresh.observed
    assert torch.equal(fresh.min_val, obs.min_val) and torch.equal(fresh.max_val, obs.max_val)


@pytest.mark.parametrize("bad", ["histogram", "", None])
def test_unknown_observer_is_config_error(bad):
    with pytest.raises(ConfigError, match="percentile"):
        check_observer(bad)


@pytest.mark.parametrize("bad", [49.9, 100.5, -1, True, "99"])
def test_bad_percentile_is_config_error(bad):
    with pytest.raises(ConfigError, match="50 to 100"):
        check_percentile(bad)
    assert check_percentile(99) == 99.0
