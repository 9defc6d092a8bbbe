"""Uniform affine/symmetric quantizer: hand-worked examples, torch oracles, properties, errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.ao.quantization import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
)

from lowbit.errors import CalibrationError, ConfigError, ShapeMismatchError
from lowbit.quantizers import decode, get
from lowbit.quantizers.uniform import (
    UniformQuantizer,
    affine_codes,
    affine_encoded,
    affine_qparams,
    affine_qrange,
    fake_quantize_affine,
)

finite32 = st.floats(min_value=-(2.0**100), max_value=2.0**100, allow_nan=False, allow_infinity=False, width=32)
special = st.sampled_from([0.0, -0.0, 1e-45, -1e-45, 1e-40, -3e-39, 1.0, -1.0])
values = st.lists(st.one_of(finite32, special), min_size=1, max_size=24)
configs = st.tuples(st.integers(2, 16), st.booleans(), st.booleans())  # bits, symmetric, narrow


def random_tensor(seed: int, *shape: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 3 + 0.5


def torch_fake_quant(x, scale, zero_point, qmin, qmax, axis=None):
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero_point), qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale, zero_point.int(), axis, qmin, qmax)


# ---- hand-worked examples ---------------------------------------------------------------


def test_range_minus3_to_6_at_8_bits():
    q = UniformQuantizer(bits=8)
    enc = q.encode(torch.tensor([-3.0, 6.0, 0.0]))
    # s = 9 / 255, z = round(3 / s) = 85
    assert enc.params["scale"].item() == pytest.approx(9 / 255, rel=1e-7)
    assert enc.params["zero_point"].item() == 85
    assert enc.codes.tolist() == [0, 255, 85]
    assert enc.meta == {"qmin": 0, "qmax": 255, "axis": None}
    enc.codes = torch.tensor([128])
    assert decode(enc).item() == pytest.approx((128 - 85) * 9 / 255, abs=1e-6)  # ~1.518
    assert decode(enc).item() == pytest.approx(1.518, abs=1e-3)


def test_symmetric_full_range_rounds_half_to_even_and_saturates():
    # 4 bits full: codes [-8, 7], s = 7.5 / 7.5 = 1
    q = UniformQuantizer(bits=4, symmetric=True)
    x = torch.tensor([-7.5, -2.5, 0.4, 3.5, 7.5])
    assert q.encode(x).codes.tolist() == [-8, -2, 0, 4, 7]
    assert torch.equal(q(x), torch.tensor([-8.0, -2.0, 0.0, 4.0, 7.0]))
    assert q.encode(x).params["zero_point"].item() == 0


def test_symmetric_narrow_range():
    # 4 bits narrow: codes [-7, 7], s = 7 / 7 = 1
    q = UniformQuantizer(bits=4, symmetric=True, narrow=True)
    x = torch.tensor([-7.0, -2.5, 6.5, 7.0])
    assert q.encode(x).codes.tolist() == [-7, -2, 6, 7]
    assert torch.equal(q(x), torch.tensor([-7.0, -2.0, 6.0, 7.0]))


def test_affine_narrow_range_starts_at_code_1():
    # 2 bits narrow: codes [1, 3]; range [-1, 1]: s = 2 / 2 = 1, z = 1 - round(-1) = 2
    q = UniformQuantizer(bits=2, narrow=True)
    x = torch.tensor([-1.0, 0.0, 0.5, 1.0])
    enc = q.encode(x)
    assert enc.codes.tolist() == [1, 2, 2, 3] and enc.params["zero_point"].item() == 2
    assert enc.meta["qmin"] == 1 and enc.meta["qmax"] == 3
    assert torch.equal(q(x), torch.tensor([-1.0, 0.0, 0.0, 1.0]))


def test_per_channel_affine_along_axis_0():
    # channel 0: [0, 3] -> s = 1, z = 0;  channel 1: [-1, 2] -> s = 1, z = 1   (2 bits, codes 0..3)
    q = UniformQuantizer(bits=2, per_channel=True)
    x = torch.tensor([[0.0, 3.0, 1.5], [-1.0, 2.0, 0.5]])
    enc = q.encode(x)
    assert enc.params["scale"].tolist() == [1.0, 1.0]
    assert enc.params["zero_point"].tolist() == [0, 1]
    assert enc.codes.tolist() == [[0, 3, 2], [0, 3, 1]]
    assert enc.meta["axis"] == 0
    assert torch.equal(q(x), torch.tensor([[0.0, 3.0, 2.0], [-1.0, 2.0, 0.0]]))


def test_range_is_widened_to_include_zero():
    # all positive [2, 6] at 2 bits: range [0, 6], s = 2, z = 0; 0 stays exactly representable
    q = UniformQuantizer(bits=2)
    enc = q.encode(torch.tensor([2.0, 3.0, 6.0]))
    assert enc.params["scale"].item() == 2.0 and enc.params["zero_point"].item() == 0
    assert enc.codes.tolist() == [1, 2, 3]  # 3 / 2 = 1.5 rounds half to even -> 2


def test_constants_map_to_an_end_of_the_grid():
    # c = 3 at 2 bits: range [0, 3], s = 1 -> code 3 -> 3 exactly; c = -3: z = 3, code 0 -> -3
    for c, code in [(3.0, 3), (-3.0, 0)]:
        x = torch.full((5,), c)
        assert UniformQuantizer(bits=2).encode(x).codes.tolist() == [code] * 5
        assert torch.equal(UniformQuantizer(bits=2)(x), x)
    zeros = torch.zeros(4)
    enc = UniformQuantizer(bits=8).encode(zeros)
    assert enc.params["scale"].item() == pytest.approx(torch.finfo(torch.float32).eps)  # the EPS floor
    assert torch.equal(UniformQuantizer(bits=8)(zeros), zeros)


def test_symmetric_full_range_does_not_keep_constants():
    # max|c| = 127.5 at 8 bits: s = 127.5 / 127.5 = 1; 127.5 -> 128 (half to even) -> clamped to 127,
    # -127.5 -> -128 (torch's rule); narrow range keeps c: s = 127 / 127 = 1, 127 -> 127
    x = torch.full((3,), 127.5)
    assert torch.equal(UniformQuantizer(bits=8, symmetric=True)(x), torch.full((3,), 127.0))
    assert torch.equal(UniformQuantizer(bits=8, symmetric=True)(-x), torch.full((3,), -128.0))
    c = torch.full((3,), -127.0)
    assert torch.equal(UniformQuantizer(bits=8, symmetric=True, narrow=True)(c), c)


@settings(max_examples=60, deadline=None)
@given(c=st.one_of(finite32, special), bits=st.integers(2, 16), narrow=st.booleans())
def test_constant_decodes_to_itself_within_one_rounding(c, bits, narrow):
    q = UniformQuantizer(bits=bits, narrow=narrow)
    x = torch.full((4,), c)
    enc = q.encode(x)
    qmin, qmax = affine_qrange(bits, False, narrow)
    y = q(x)
    if abs(c) >= (qmax - qmin) * torch.finfo(torch.float32).eps:  # above the scale floor
        assert enc.codes.tolist() == [qmax if c > 0 else qmin] * 4
        ulp = torch.nextafter(x.abs(), torch.tensor(math.inf)) - x.abs()
        assert bool(((y - x).abs() <= ulp).all())
    if c == 0:
        assert torch.equal(y, torch.zeros(4))


# ---- torch oracles ----------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(2, 17))
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("narrow", [False, True])
def test_forward_matches_torch_fake_quantize_per_tensor(bits, symmetric, narrow):
    x = random_tensor(bits, 64)
    q = UniformQuantizer(bits=bits, symmetric=symmetric, narrow=narrow)
    scale, zero_point = q.qparams(x)
    assert torch.equal(q(x), torch_fake_quant(x, scale, zero_point, q.qmin, q.qmax))


@pytest.mark.parametrize("bits", range(2, 17))
@pytest.mark.parametrize("symmetric", [False, True])
def test_forward_matches_torch_fake_quantize_per_channel(bits, symmetric):
    x = random_tensor(100 + bits, 4, 3, 5)
    q = UniformQuantizer(bits=bits, symmetric=symmetric, per_channel=True)
    scale, zero_point = q.qparams(x)
    assert scale.shape == (4,) and zero_point.shape == (4,)
    assert torch.equal(q(x), torch_fake_quant(x, scale, zero_point, q.qmin, q.qmax, axis=0))


@pytest.mark.parametrize("bits", range(2, 9))
def test_clamping_and_gradient_match_torch_with_a_given_scale(bits):
    # a narrow range so that many values saturate on both sides
    qmin, qmax = 0, 2**bits - 1
    x = random_tensor(7, 200)
    scale, zero_point = torch.tensor(0.9 / qmax), torch.tensor(qmax // 3)
    ours_x = x.clone().requires_grad_(True)
    ref_x = x.clone().requires_grad_(True)
    ours = fake_quantize_affine(ours_x, scale, zero_point, qmin, qmax)
    ref = torch_fake_quant(ref_x, scale, zero_point, qmin, qmax)
    assert torch.equal(ours, ref)
    grad = torch.randn(200)
    ours.backward(grad)
    ref.backward(grad)
    assert torch.equal(ours_x.grad, ref_x.grad)
    assert 0 < int((ours_x.grad == 0).sum()) < 200  # some saturate, some pass


def test_per_channel_gradient_matches_torch():
    x = random_tensor(8, 3, 40)
    scale = torch.tensor([0.05, 0.1, 0.02])
    zero_point = torch.tensor([-3, 0, 5])
    ours_x, ref_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours = fake_quantize_affine(ours_x, scale, zero_point, -8, 7, axis=0)
    ref = torch_fake_quant(ref_x, scale, zero_point, -8, 7, axis=0)
    assert torch.equal(ours, ref)
    grad = torch.randn(3, 40)
    ours.backward(grad)
    ref.backward(grad)
    assert torch.equal(ours_x.grad, ref_x.grad)


def test_quantizer_gradient_is_straight_through_inside_the_range():
    q = UniformQuantizer(bits=4)
    x = random_tensor(9, 30).requires_grad_(True)
    q(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(30))  # dynamic min/max: every value is inside


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize(("symmetric", "narrow"), [(False, False), (True, False), (True, True)])
def test_qparams_match_torch_minmax_observers(bits, symmetric, narrow):
    # (affine narrow, codes from 1, has no torch counterpart: torch's code ranges must contain 0)
    qmin, qmax = affine_qrange(bits, symmetric, narrow)
    dtype = torch.qint8 if symmetric else torch.quint8
    x = random_tensor(bits, 6, 10)
    per_tensor = MinMaxObserver(
        dtype=dtype, qscheme=torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine,
        quant_min=qmin, quant_max=qmax,
    )
    per_tensor(x)
    ref_scale, ref_zero = per_tensor.calculate_qparams()
    scale, zero = UniformQuantizer(bits=bits, symmetric=symmetric, narrow=narrow).qparams(x)
    assert torch.equal(scale, ref_scale.reshape(())) and int(zero) == int(ref_zero)
    per_channel = PerChannelMinMaxObserver(
        ch_axis=0, dtype=dtype, qscheme=torch.per_channel_symmetric if symmetric else torch.per_channel_affine,
        quant_min=qmin, quant_max=qmax,
    )
    per_channel(x)
    ref_scale, ref_zero = per_channel.calculate_qparams()
    scale, zero = UniformQuantizer(bits=bits, symmetric=symmetric, narrow=narrow, per_channel=True).qparams(x)
    assert torch.equal(scale, ref_scale) and torch.equal(zero, ref_zero.long())


# ---- static quantizers ------------------------------------------------------------------


def batches(n: int = 4):
    return [random_tensor(20 + i, 3, 8) * (i + 1) for i in range(n)]


def test_calibration_with_minmax_matches_torch_minmax_observer():
    q = UniformQuantizer(bits=8, dynamic=False).eval()
    ref = MinMaxObserver(dtype=torch.quint8, quant_min=0, quant_max=255)
    q.calibrating = True
    for b in batches():
        q(b)
        ref(b)
    q.calibrating = False
    ref_scale, ref_zero = ref.calculate_qparams()
    scale, zero = q.qparams(batches(1)[0])
    assert torch.equal(scale, ref_scale.reshape(())) and int(zero) == int(ref_zero)


@pytest.mark.parametrize("per_channel", [False, True])
def test_training_keeps_a_moving_average_like_torch(per_channel):
    q = UniformQuantizer(bits=8, dynamic=False, per_channel=per_channel).train()
    ref = (MovingAveragePerChannelMinMaxObserver(ch_axis=0, averaging_constant=0.01) if per_channel
           else MovingAverageMinMaxObserver(averaging_constant=0.01))
    for b in batches():
        q(b)
        ref(b)
    assert torch.equal(q.stats.min_val, ref.min_val.reshape(q.stats.min_val.shape))
    assert torch.equal(q.stats.max_val, ref.max_val.reshape(q.stats.max_val.shape))


def test_eval_freezes_the_observed_range():
    # observed [-1, 2] at 2 bits: s = 1, z = 1; later inputs saturate at -1 and 2
    q = UniformQuantizer(bits=2, dynamic=False)
    q.calibrating = True
    q.eval()(torch.tensor([-1.0, 2.0]))
    q.calibrating = False
    before = {k: v.clone() for k, v in q.state_dict().items()}
    assert torch.equal(q(torch.tensor([-5.0, 0.5, 5.0])), torch.tensor([-1.0, 0.0, 2.0]))
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())


def test_static_eval_before_observation_names_the_tensor():
    q = UniformQuantizer(dynamic=False).eval()
    q.label = "features.0.input"
    assert not q.observed
    with pytest.raises(CalibrationError, match="features.0.input"):
        q(torch.ones(3))
    with pytest.raises(CalibrationError, match="features.0.input"):
        q.encode(torch.ones(3))
    assert UniformQuantizer().observed  # dynamic quantizers always have their range


def test_static_state_dict_round_trip_per_channel():
    q = UniformQuantizer(bits=4, per_channel=True, dynamic=False)
    q.calibrating = True
    x = random_tensor(3, 5, 7)
    q(x)
    q.calibrating = False
    fresh = UniformQuantizer(bits=4, per_channel=True, dynamic=False).eval()
    fresh.load_state_dict(q.state_dict())
    assert fresh.observed and fresh.stats.min_val.shape == (5,)
    assert torch.equal(fresh(x), q.eval()(x))
    assert torch.equal(decode(fresh.encode(x)), fresh(x))


def test_static_percentile_calibration_reads_one_histogram_of_all_batches():
    import numpy as np

    from lowbit.quantizers.observers import HISTOGRAM_BINS

    q = UniformQuantizer(bits=8, dynamic=False, observer="percentile", percentile=90.0).eval()
    q.calibrating = True
    data = batches(3)
    for b in data:
        assert q(b) is b  # calibration passes the float input through
    assert not q.observed and q.histogram is not None  # the range comes when calibration finishes
    q.calibrating = False
    everything = torch.cat([b.reshape(-1) for b in data]).numpy()
    bin_width = (max(everything.max(), 0) - min(everything.min(), 0)) / HISTOGRAM_BINS
    assert abs(q.stats.min_val.item() - np.percentile(everything, 10)) <= bin_width
    assert abs(q.stats.max_val.item() - np.percentile(everything, 90)) <= bin_width
    assert q.histogram is None and q.stats.batches.item() == 3
    assert set(q.state_dict()) == {"stats.min_val", "stats.max_val", "stats.batches"}


def test_static_per_channel_percentile_calibration_averages_batch_percentiles():
    import numpy as np

    q = UniformQuantizer(bits=8, dynamic=False, per_channel=True, observer="percentile", percentile=90.0).eval()
    q.calibrating = True
    data = batches(3)
    for b in data:
        q(b)
    lows = np.mean([np.percentile(b.numpy(), 10, axis=1) for b in data], axis=0)
    highs = np.mean([np.percentile(b.numpy(), 90, axis=1) for b in data], axis=0)
    np.testing.assert_allclose(q.stats.min_val.numpy(), lows, rtol=1e-5)
    np.testing.assert_allclose(q.stats.max_val.numpy(), highs, rtol=1e-5)


def test_a_new_calibration_replaces_a_histogram_range():
    q = UniformQuantizer(bits=8, dynamic=False, observer="percentile", percentile=100.0).eval()
    for data in (torch.tensor([-50.0, 7.0, 100.0]), torch.tensor([-1.0, 0.5, 2.0])):
        q.calibrating = True
        q(data)
        q.calibrating = False
    assert (q.stats.min_val.item(), q.stats.max_val.item(), q.stats.batches.item()) == (-1.0, 2.0, 1)


def test_eval_reuses_the_weight_output_while_the_weight_is_unchanged():
    q = UniformQuantizer(bits=4, symmetric=True, per_channel=True).eval()
    weight = torch.nn.Parameter(random_tensor(11, 6, 5))
    with torch.no_grad():
        first = q(weight)
        assert q(weight) is first
        assert q(weight.detach().clone()) is not first  # another tensor: computed afresh
        weight.mul_(2)  # in place: the version changes
        again = q(weight)
    assert again is not first and torch.equal(again, UniformQuantizer(bits=4, symmetric=True, per_channel=True)(
        weight.detach()))
    with torch.no_grad():
        q.train()
        assert q(weight) is not q(weight)  # training never reuses
    q.eval()
    needs_grad = q(weight)
    assert needs_grad.requires_grad and q(weight) is not needs_grad  # a gradient to pass: computed afresh
    assert "_last" not in str(q.state_dict().keys())


def test_forward_keeps_positive_zero_and_saturates_huge_values_like_the_codes():
    # small negative values round to -0.0 in float; (q - z) s gives +0.0, as torch's kernels do
    scale, zero_point = torch.tensor([0.5, 0.25]), torch.tensor([0, 3])
    x = torch.tensor([[-0.1, -0.0, 0.1, 1e30, -1e30, 3e12], [-0.1, -0.0, 0.1, 1e30, -1e30, -3e12]])
    ours = fake_quantize_affine(x, scale, zero_point, -8, 7, axis=0)
    codes, _ = affine_codes(x, scale, zero_point, -8, 7, axis=0)
    by_codes = decode(affine_encoded(codes, scale, zero_point, -8, 7, axis=0))
    assert torch.equal(ours.view(torch.int32), by_codes.view(torch.int32))
    small = x[:, :3]
    assert torch.equal(ours[:, :3].view(torch.int32), torch_fake_quant(small, scale, zero_point, -8, 7, 0).view(
        torch.int32))
    per_tensor = fake_quantize_affine(x[0], scale[0], zero_point[0], -8, 7)
    assert torch.equal(per_tensor.view(torch.int32), by_codes[0].view(torch.int32))


def test_mse_observer_clips_an_outlier_and_lowers_the_error():
    x = torch.cat([random_tensor(5, 500) * 0.1, torch.tensor([50.0])])
    minmax, mse = UniformQuantizer(bits=4), UniformQuantizer(bits=4, observer="mse")
    assert float(mse.qparams(x)[0]) < float(minmax.qparams(x)[0])
    assert float((mse(x) - x).square().mean()) <= float((minmax(x) - x).square().mean())


def test_channel_count_change_is_a_shape_mismatch():
    q = UniformQuantizer(per_channel=True, dynamic=False)
    q.calibrating = True
    q(torch.randn(3, 4))
    with pytest.raises(ShapeMismatchError):
        q(torch.randn(5, 4))
    q.calibrating = False
    with pytest.raises(ShapeMismatchError):
        q.eval()(torch.randn(5, 4))


# ---- properties ---------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(xs=values, config=configs, per_channel=st.booleans())
def test_codes_in_range_decode_equals_forward_and_torch(xs, config, per_channel):
    bits, symmetric, narrow = config
    x = torch.tensor(xs, dtype=torch.float32)
    if per_channel:
        x = x.reshape(len(xs), 1)
    q = UniformQuantizer(bits=bits, symmetric=symmetric, narrow=narrow, per_channel=per_channel).eval()
    enc = q.encode(x)
    assert int(enc.codes.min()) >= q.qmin and int(enc.codes.max()) <= q.qmax
    y = q(x)
    assert torch.equal(decode(enc), y)
    assert torch.isfinite(y).all()
    scale, zero_point = q.qparams(x)
    assert bool((scale >= torch.finfo(torch.float32).eps).all())
    assert torch.equal(y, torch_fake_quant(x, scale, zero_point, q.qmin, q.qmax, q.axis))


@settings(max_examples=60, deadline=None)
@given(xs=values, bits=st.integers(2, 16))
def test_dynamic_narrow_symmetric_is_idempotent_up_to_scale_rounding(xs, bits):
    """max|q(x)| = qmax s = max|x| up to float32 rounding, so q(q(x)) keeps the codes of q(x) and
    its values agree with q(x) to a few ulps (the scale is recomputed)."""
    q = UniformQuantizer(bits=bits, symmetric=True, narrow=True)
    x = torch.tensor(xs, dtype=torch.float32)
    once = q(x)
    twice = q(once)
    assert torch.equal(q.encode(once).codes, q.encode(x).codes)
    assert torch.allclose(twice, once, rtol=1e-5, atol=float(q.qparams(x)[0]) * 1e-4)


def test_affine_and_full_symmetric_are_not_idempotent():
    # affine [-1, 1] at 3 bits: s = 2/7, -1/s = -3.5 in exact arithmetic, so the zero point rounds
    # and the grid moves by s/2: one end no longer fits and is clamped, the range of q(x) shrinks
    q = UniformQuantizer(bits=3)
    x = torch.tensor([1.0, -1.0])
    assert not torch.equal(q(q(x)), q(x))
    assert float(q(x).max() - q(x).min()) < 2.0
    # full-range symmetric: max|x| -> qmax s = max|x| qmax / (qmax + 1/2)
    s = UniformQuantizer(bits=3, symmetric=True)
    assert not torch.equal(s(s(x)), s(x))


@settings(max_examples=30, deadline=None)
@given(xs=values, bad=st.sampled_from([math.nan, math.inf, -math.inf]), dynamic=st.booleans())
def test_nan_or_inf_is_a_calibration_error_naming_the_tensor(xs, bad, dynamic):
    q = UniformQuantizer(dynamic=dynamic)
    q.label = "fc.weight"
    q.calibrating = True
    x = torch.tensor([*xs, bad])
    with pytest.raises(CalibrationError, match="fc.weight"):
        q(x)
    with pytest.raises(CalibrationError, match="fc.weight"):
        q.encode(x)


# ---- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"bits": 4, "symmetric": True, "per_channel": True, "narrow": True},
     {"bits": 16, "dynamic": False, "observer": "percentile", "percentile": 99.0}, {"observer": "mse"}],
)
def test_spec_round_trip(kwargs):
    q = UniformQuantizer(**kwargs)
    spec = q.spec()
    assert set(spec) == {"name", "bits", "symmetric", "per_channel", "narrow", "dynamic", "observer", "percentile"}
    assert spec["name"] == "uniform" and get(spec) == q
    assert isinstance(get(spec), UniformQuantizer)


@pytest.mark.parametrize(
    "kwargs",
    [{"bits": 1}, {"bits": 17}, {"bits": 8.0}, {"bits": True}, {"symmetric": "yes"}, {"per_channel": 1},
     {"observer": "histogram"}, {"percentile": 101}, {"percentile": 10}, {"dynamic": None}],
)
def test_bad_options_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        UniformQuantizer(**kwargs)


def test_per_channel_on_a_scalar_is_a_config_error():
    q = UniformQuantizer(per_channel=True)
    q.label = "scale"
    with pytest.raises(ConfigError, match="scale"):
        q(torch.tensor(1.0))


def test_empty_and_overflowing_ranges_are_calibration_errors():
    with pytest.raises(CalibrationError):
        UniformQuantizer()(torch.empty(0))
    with pytest.raises(CalibrationError, match="too wide"):
        UniformQuantizer()(torch.tensor([-3e38, 3e38]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_output_keeps_dtype_and_gradient_flows(dtype):
    x = random_tensor(2, 10).to(dtype).requires_grad_(True)
    y = UniformQuantizer(bits=8)(x)
    assert y.dtype == dtype
    y.sum().backward()
    assert x.grad.dtype == dtype


def test_affine_codes_function_matches_formula_by_hand():
    # s = 0.5, z = 2, codes [0, 7]: x = [-2, -0.25, 0.75, 9] -> round(x / s) + z = [-2, 1.5->2, 3.5->4, 20]
    codes, inside = affine_codes(torch.tensor([-2.0, -0.25, 0.75, 9.0]), torch.tensor(0.5), torch.tensor(2), 0, 7)
    assert codes.tolist() == [0, 2, 4, 7]
    assert inside.tolist() == [False, True, True, False]
    scale, zero = affine_qparams(torch.tensor(-1.0), torch.tensor(2.5), 0, 7)  # s = 3.5 / 7
    assert scale.item() == 0.5 and zero.item() == 2


def test_a_histogram_range_waits_for_the_end_of_calibration():
    q = UniformQuantizer(dynamic=False, observer="entropy").eval()
    q.label = "head.input"
    q.calibrating = True
    q(random_tensor(1, 100))
    with pytest.raises(CalibrationError, match="head.input.*finish_calibration"):
        q.encode(random_tensor(1, 100))
    q.finish_calibration()
    assert q.observed and q.histogram is None and q.calibrating
    q.calibrating = False  # nothing left to finish
    assert q(random_tensor(1, 100)).shape == (100,)
