"""Range observers: min/max, percentile (numpy oracle), mse search, entropy (KL) search, calibration
histograms, and the kept range."""

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.ao.quantization import MinMaxObserver, MovingAverageMinMaxObserver

import lowbit
from lowbit.errors import CalibrationError, ConfigError, ShapeMismatchError
from lowbit.quantizers.observers import (
    HISTOGRAM_BINS,
    MSE_STEPS,
    OBSERVERS,
    Histogram,
    RangeObserver,
    batch_range,
    check_observer,
    check_percentile,
    entropy_divergences,
    entropy_levels,
    entropy_threshold,
    minmax_range,
    mse_range,
    percentile_range,
)
from lowbit.quantizers.uniform import UniformQuantizer, affine_qparams, fake_quantize_affine

finite32 = st.floats(min_value=-(2.0**60), max_value=2.0**60, allow_nan=False, allow_infinity=False, width=32)
special = st.sampled_from([0.0, -0.0, 1e-45, -1e-40, 1.0])
values = st.lists(st.one_of(finite32, special), min_size=1, max_size=30)


def fake_quant_4bit(x, lo, hi, axis=None):
    scale, zero_point = affine_qparams(lo, hi, 0, 15)
    return fake_quantize_affine(x, scale, zero_point, 0, 15, axis)


def fake_quant_4bit_rows(rows, lo, hi):
    """The observers' contract: [K, R, N], rows [R, N] under each candidate's ranges lo[k], hi[k] (one per row)."""
    return torch.stack([fake_quant_4bit(rows, lo[k], hi[k], axis=0) for k in range(len(lo))])


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
    lo, hi = mse_range(x, None, fake_quant_4bit_rows)
    mn, mx = minmax_range(x)
    assert -15.0 < lo.item() <= 0 <= hi.item() < 20.0  # the outliers are clipped
    best = (fake_quant_4bit(x, lo, hi) - x).square().mean()
    for k in range(1, MSE_STEPS + 1):  # the documented grid t = k / MSE_STEPS
        t = k / MSE_STEPS
        assert best <= (fake_quant_4bit(x, mn * t, mx * t) - x).square().mean()


def test_mse_range_keeps_the_full_range_when_nothing_is_gained_by_clipping():
    # 16 evenly spaced values fit the 4-bit grid exactly at t = 1 (error 0)
    x = torch.arange(16.0)
    lo, hi = mse_range(x, None, fake_quant_4bit_rows)
    assert (lo.item(), hi.item()) == (0.0, 15.0)
    # all zeros: every t has error 0 and the widest (t = 1) wins
    lo, hi = mse_range(torch.zeros(5), None, fake_quant_4bit_rows)
    assert (lo.item(), hi.item()) == (0.0, 0.0)


def test_mse_range_per_channel_picks_t_per_channel():
    g = torch.Generator().manual_seed(2)
    x = torch.stack([torch.randn(60, generator=g) * 0.1, torch.linspace(-4.0, 15.0, 60), torch.randn(60, generator=g)])
    x[0, 0] = 3.0  # one outlier in the first channel
    lo, hi = mse_range(x, 0, fake_quant_4bit_rows)
    for c in range(3):
        row_lo, row_hi = mse_range(x[c], None, fake_quant_4bit_rows)
        assert (lo[c].item(), hi[c].item()) == (row_lo.item(), row_hi.item())


def test_batch_range_dispatches_by_name():
    x = torch.tensor([-1.0, 0.0, 3.0])
    assert [t.item() for t in batch_range(x, "minmax", None, 99.0, fake_quant_4bit_rows)] == [-1.0, 3.0]
    assert [t.item() for t in batch_range(x, "percentile", None, 100.0, fake_quant_4bit_rows)] == [-1.0, 3.0]
    assert [t.item() for t in batch_range(x, "entropy", None, 99.0, fake_quant_4bit_rows)] == [-1.0, 3.0]
    with pytest.raises(ConfigError, match="minmax"):
        batch_range(x, "kl", None, 99.0, fake_quant_4bit_rows)
    with pytest.raises(ConfigError, match="per tensor"):
        batch_range(x[None], "entropy", 0, 99.0, fake_quant_4bit_rows)


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


# ---- entropy (TensorRT's KL search) -------------------------------------------------------


def naive_kl_search(counts, levels):
    """TensorRT's pseudocode, one candidate at a time: P with the outliers in its last bin, Q merged into
    ``levels`` levels and spread over the non-empty bins; divergences by scipy."""
    from scipy.stats import entropy

    b = np.asarray(counts, dtype=float)
    divergences = {}
    if len(b) <= levels or b.sum() == 0:
        return divergences
    for i in range(levels, len(b) + 1):
        p = b[:i].copy()
        p[-1] += b[i:].sum()
        q = np.zeros(i)
        for level in range(levels):
            members = [j for j in range(i) if j * levels // i == level]
            nonempty = [j for j in members if b[j] > 0]
            q[nonempty] = b[members].sum() / max(len(nonempty), 1)
        missing = bool(np.any((q == 0) & (p > 0)))
        divergences[i] = np.inf if missing else float(entropy(p / p.sum(), q / q.sum()))
    return divergences


def test_entropy_by_hand():
    # counts [6, 3, 1, 0, 1, 0] (N = 11), 2 levels:
    # i = 2: P = [6, 5] / 11, Q = [6, 3] / 9: 6/11 ln(9/11) + 5/11 ln(15/11) = 0.031523
    # i = 3: P = [6, 3, 2] / 11, Q = [4.5, 4.5, 1] / 10 (bins 0 and 1 share level 0): 0.077053
    # i = 4: bin 3 is empty but holds the outlier in P: +inf
    # i = 5: P = [6, 3, 1, 0, 1] / 11, Q = [10/3, 10/3, 10/3, 0, 1] / 11: 0.182424; i = 6: the same
    kept, divergence = entropy_divergences(np.array([6, 3, 1, 0, 1, 0]), 2)
    assert kept.tolist() == [2, 3, 4, 5, 6]
    np.testing.assert_allclose(divergence[[0, 1, 3, 4]], [0.031523, 0.077053, 0.182424, 0.182424], atol=2e-6)
    assert divergence[2] == np.inf
    assert entropy_threshold(np.array([6, 3, 1, 0, 1, 0]), 2) == 2
    # no clipping pays off on [5, 3, 1, 1]: KL 0.0323, 0.0585, 0.0253 for i = 2, 3, 4
    assert entropy_threshold(np.array([5, 3, 1, 1]), 2) == 4
    # as many bins as levels, or nothing counted: keep everything
    assert entropy_threshold(np.array([1, 2]), 2) == 2 and entropy_threshold(np.zeros(9), 2) == 9


@settings(max_examples=80, deadline=None)
@given(counts=st.lists(st.integers(0, 6), min_size=1, max_size=24), levels=st.integers(1, 8))
def test_entropy_matches_the_straightforward_search(counts, levels):
    kept = entropy_threshold(np.array(counts), levels)
    divergences = naive_kl_search(counts, levels)
    if not divergences:
        assert kept == len(counts)
        return
    best = min(divergences.values())
    ties = [i for i, d in divergences.items() if d <= best + 1e-9]
    assert kept == max(ties)  # the least divergence, the widest among equals
    got = dict(zip(*entropy_divergences(np.array(counts), levels)))
    for i, d in divergences.items():
        assert got[i] == d if np.isinf(d) else got[i] == pytest.approx(d, abs=1e-9)


def test_entropy_range_clips_a_long_tail():
    g = torch.Generator().manual_seed(5)
    relu = torch.cat([torch.randn(20000, generator=g).abs(), torch.tensor([40.0])])  # one far outlier
    histogram = Histogram()
    histogram.add(relu, "t")
    width = 40.0 / HISTOGRAM_BINS
    # int8 symmetric (TensorRT's case): 128 levels on [0, T], candidates from 128 bins (T = 2.5) up
    lo, hi = histogram.entropy_range(levels=256, symmetric=True)
    assert lo.item() == relu.min().item() and 2.5 <= hi.item() < 40.0
    assert hi.item() / width == pytest.approx(round(hi.item() / width), abs=1e-3)  # a bin edge of |x|
    # affine on one-signed data: 256 levels, so candidates start at 256 bins (T = 5), past the bulk (max 4.3):
    # every candidate below the outlier ends in an empty bin that P fills with it (KL = inf), and nothing is clipped
    assert relu[:-1].max().item() < 5.0
    assert histogram.entropy_range(levels=256, symmetric=False)[1].item() == 40.0


def test_entropy_range_keeps_the_background_of_a_normalised_image():
    # MNIST-style input (x - 0.1307) / 0.3081: most pixels are background at -0.4242, the strokes reach 2.82.
    # An affine grid clips each side on its own; folding |x| would put T at the background (about 0.42) and
    # clip the strokes to it.
    g = torch.Generator().manual_seed(7)
    background = torch.full((16000,), -0.1307 / 0.3081)
    strokes = (torch.rand(4000, generator=g) - 0.1307) / 0.3081
    x = torch.cat([background, strokes])
    histogram = Histogram()
    histogram.add(x, "input")
    lo, hi = histogram.entropy_range(levels=256, symmetric=False)
    assert lo.item() == x.min().item()  # nothing below the background to clip
    assert hi.item() > 2.5  # the strokes keep (nearly) their whole range
    # the grid's 256 levels are shared by the sides in proportion to their spans
    assert entropy_levels(256, False, -1.0, 3.0) == (64, 192)
    assert entropy_levels(256, False, 0.0, 3.0) == (0, 256) and entropy_levels(256, False, -2.0, 0.0) == (256, 0)
    assert entropy_levels(256, False, -1e-6, 3.0) == (1, 255) and entropy_levels(256, True, -1.0, 3.0) == (128, 128)


def test_entropy_range_clips_each_side_of_an_affine_grid():
    # a long tail on each side: both are clipped, each inside its own side, never beyond min / max
    g = torch.Generator().manual_seed(8)
    x = torch.cat([torch.randn(30000, generator=g), torch.tensor([-30.0, 60.0])])
    histogram = Histogram()
    histogram.add(x, "t")
    lo, hi = histogram.entropy_range(levels=16, symmetric=False)
    assert -30.0 < lo.item() < -1.0 and 1.0 < hi.item() < 60.0


# ---- calibration histograms ----------------------------------------------------------------


def split_batches(x, sizes):
    return list(torch.split(x, sizes))


def test_histogram_counts_everything_and_widens():
    g = torch.Generator().manual_seed(6)
    batches = [torch.randn(1000, generator=g) * scale for scale in (1.0, 3.0, 0.5, 10.0)]
    histogram = Histogram()
    for b in batches:
        histogram.add(b, "t")
    everything = torch.cat(batches)
    assert histogram.counts.sum() == everything.numel() and histogram.batches == 4
    assert histogram.lo == min(everything.min().item(), 0.0) and histogram.hi == everything.max().item()
    assert (histogram.min, histogram.max) == (everything.min().item(), everything.max().item())
    # the cumulative histogram at any point is within one bin's count of the truth
    for point in np.linspace(histogram.lo, histogram.hi, 37):
        exact = int((everything <= point).sum())
        nearby = int(((everything - point).abs() <= histogram.width).sum())
        assert abs(histogram.cdf(np.array([point]))[0] - exact) <= nearby + 1e-9


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 1000), p=st.sampled_from([50.0, 90.0, 99.0, 99.9, 99.99, 100.0]),
       shift=st.floats(-3, 3), pieces=st.integers(1, 5))
def test_histogram_percentile_within_a_bin_of_numpy(seed, p, shift, pieces):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3000, generator=g) * torch.rand(3000, generator=g) * 4 + shift
    histogram = Histogram()
    for b in x.chunk(pieces):  # later pieces may widen the range: the counts are re-binned
        histogram.add(b, "t")
    lo, hi = histogram.percentile_range(p)
    ref = np.percentile(x.double().numpy(), [100 - p, p])
    assert abs(lo.item() - ref[0]) <= histogram.width and abs(hi.item() - ref[1]) <= histogram.width


def test_histogram_mse_finds_the_brute_force_range():
    # 2000 values exactly on the 4-bit grid of [0, 5] (step 1/3) and one at 10: the range t = 1/2 of [0, 10]
    # quantizes the bulk without error and clips only the outlier; its neighbours t = 0.49, 0.51 miss the grid
    g = torch.Generator().manual_seed(7)
    x = torch.cat([torch.randint(0, 16, (2000,), generator=g) / 3.0, torch.tensor([10.0])])
    histogram = Histogram()
    histogram.add(x, "t")
    lo, hi = histogram.mse_range(fake_quant_4bit_rows)
    brute_lo, brute_hi = mse_range(x, None, fake_quant_4bit_rows)
    assert brute_hi.item() == 5.0
    assert abs(hi.item() - brute_hi.item()) <= histogram.width and lo.item() == brute_lo.item() == 0.0


def test_histogram_mse_error_near_the_brute_force_optimum():
    g = torch.Generator().manual_seed(8)
    x = torch.cat([torch.randn(4000, generator=g), torch.tensor([9.0, -6.0])])
    histogram = Histogram()
    for b in x.chunk(3):
        histogram.add(b, "t")

    def error(lo, hi):
        return float((fake_quant_4bit(x, lo, hi) - x).square().mean())

    best = error(*mse_range(x, None, fake_quant_4bit_rows))
    assert error(*histogram.mse_range(fake_quant_4bit_rows)) <= 1.02 * best
    assert error(*histogram.mse_range(fake_quant_4bit_rows)) < 0.5 * error(*minmax_range(x))


finite_values = st.lists(st.one_of(finite32, special), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(xs=finite_values, observer=st.sampled_from(["percentile", "mse", "entropy"]), bits=st.integers(2, 8),
       symmetric=st.booleans(), pieces=st.integers(1, 3))
def test_calibrated_range_lies_in_the_data_and_keeps_zero(xs, observer, bits, symmetric, pieces):
    x = torch.tensor(xs, dtype=torch.float32)
    q = UniformQuantizer(bits=bits, symmetric=symmetric, dynamic=False, observer=observer, percentile=99.0).eval()
    q.calibrating = True
    for b in x.chunk(pieces):
        assert torch.equal(q(b), b)  # the float input passes through while calibrating
    q.calibrating = False  # turning calibration off finishes it
    lo, hi = q.stats.min_val.item(), q.stats.max_val.item()
    # within the data's range widened to 0 (mse scales both ends toward 0: t * max(x) > max(x) when max(x) < 0)
    assert x.min().item() <= lo <= hi <= max(x.max().item(), 0.0)
    assert q.histogram is None and q.stats.batches.item() == len(x.chunk(pieces))
    scale, _ = q.qparams(x)
    assert math.isfinite(scale.item()) and scale.item() > 0
    assert q(torch.zeros(3)).tolist() == [0.0, 0.0, 0.0]  # the widened range holds 0 exactly


@pytest.mark.parametrize("observer", ["percentile", "mse", "entropy"])
def test_constants_and_zeros_calibrate(observer):
    for c in (0.0, 2.5, -4.0):
        q = UniformQuantizer(bits=8, dynamic=False, observer=observer).eval()
        q.calibrating = True
        q(torch.full((50,), c))
        q(torch.full((7,), c))
        q.calibrating = False
        assert (q.stats.min_val.item(), q.stats.max_val.item()) == (c, c)
        assert torch.allclose(q(torch.full((2,), c)), torch.full((2,), c))


@settings(max_examples=30, deadline=None)
@given(xs=finite_values, bad=st.sampled_from([math.nan, math.inf, -math.inf]),
       observer=st.sampled_from(OBSERVERS))
def test_nan_or_inf_while_calibrating_is_a_calibration_error(xs, bad, observer):
    q = UniformQuantizer(dynamic=False, observer=observer).eval()
    q.label = "conv.input"
    q.calibrating = True
    q(torch.tensor(xs))
    with pytest.raises(CalibrationError, match="conv.input.*NaN/Inf"):
        q(torch.tensor([*xs, bad]))
    with pytest.raises(CalibrationError, match="conv.input"):
        q(torch.empty(0))


def test_histogram_rejects_a_range_too_wide_for_float32():
    with pytest.raises(CalibrationError, match="too wide"):
        Histogram().add(torch.tensor([-3e38, 3e38]), "t")


def test_entropy_per_channel_is_a_config_error():
    with pytest.raises(ConfigError, match="per tensor"):
        UniformQuantizer(per_channel=True, observer="entropy")
    q = UniformQuantizer(per_channel=True, dynamic=False)
    q.label = "fc.input"
    with pytest.raises(ConfigError, match="fc.input"):
        q.observer = "entropy"


@pytest.mark.parametrize("observer", OBSERVERS)
def test_calibrate_each_observer_save_and_load(observer, tmp_path):
    from lowbit.models import get_model

    torch.manual_seed(0)
    model = lowbit.quantize(get_model("lenet5"), "w8a8")
    data = [torch.randn(8, 1, 28, 28) for _ in range(3)]
    lowbit.calibrate(model, data, observer=observer)
    static = [q for q in model.modules() if isinstance(q, UniformQuantizer) and not q.dynamic]
    assert static and all(q.observer == observer and q.histogram is None and q.observed for q in static)
    assert not any("histogram" in key for key in model.state_dict())
    lowbit.save(model, tmp_path / "m.lowbit")
    loaded = lowbit.load(tmp_path / "m.lowbit")
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_entropy_calibration_warns_when_it_clips_much():
    # a thin negative side gets 1 of a 4-bit grid's 16 levels and KL clips it hard (it counts the values it
    # clips, not how far they move); calibration says so, naming the tensor, and mse does not clip as much
    g = torch.Generator().manual_seed(9)
    x = torch.cat([torch.randn(5000, generator=g).abs() * 4, -torch.empty(5000).exponential_(10.0, generator=g)])
    histogram = Histogram()
    histogram.add(x, "t")
    lo, hi = histogram.entropy_range(levels=16, symmetric=False)
    assert histogram.outside(lo.item(), hi.item()) > 0.01 and x.min().item() < lo.item()
    assert histogram.outside(x.min().item(), x.max().item()) == 0.0
    assert histogram.outside(0.0, x.max().item()) == pytest.approx(0.5, abs=0.01)  # within the bin at 0
    for observer in ("entropy", "mse"):
        quantizer = UniformQuantizer(bits=4, dynamic=False, observer=observer).eval()
        quantizer.calibrating = True
        quantizer(x)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quantizer.calibrating = False  # turning calibration off finishes it
        said = [str(w.message) for w in caught]
        if observer == "entropy":
            assert len(said) == 1 and "tensor: the entropy observer clips" in said[0] and "'mse'" in said[0]
        else:
            assert said == []


def test_exact_zeros_are_a_point_mass():
    # ReLU output: half the values are exact zeros. They sit at 0 for the quantiles, carry no error for mse,
    # and do not move the entropy range, however many there are.
    g = torch.Generator().manual_seed(10)
    relu = torch.randn(20000, generator=g).relu()
    ranges = []
    for extra_zeros in (0, 100000):
        histogram = Histogram(exact_zeros=True)
        for piece in torch.cat([relu, torch.zeros(extra_zeros)]).chunk(3):
            histogram.add(piece, "t")
        assert histogram.zeros == int((relu == 0).sum()) + extra_zeros
        assert histogram.total == relu.numel() + extra_zeros
        ranges.append(histogram.entropy_range(levels=256, symmetric=False))
        values = np.concatenate([relu.numpy(), np.zeros(extra_zeros, dtype=np.float32)])
        for q in (0.3, 0.5, 0.9, 0.999):
            assert histogram.quantile(q) == pytest.approx(float(np.quantile(values, q)), abs=histogram.width)
        assert histogram.quantile(0.3) == 0.0  # inside the zeros
    assert ranges[0] == ranges[1]
    assert ranges[0][1].item() > 3.0  # the tail of a unit normal is kept
