"""Native XNOR + popcount kernels against independent oracles (numpy / torch arithmetic on +-1 values)."""

from __future__ import annotations

import platform

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lowbit.errors import ConfigError, FormatError
from lowbit.format.bitpack import pack_signs as pack_signs_numpy
from lowbit.runtime import (
    BinaryLinear,
    available_kernels,
    binary_conv2d,
    binary_gemm,
    native_available,
    pack_signs,
    unpack_signs,
)

KERNELS = available_kernels()


def signs(x: np.ndarray) -> np.ndarray:
    return np.where(x >= 0, 1.0, -1.0)


def test_native_module_builds_on_x86_64():
    if platform.machine() in ("x86_64", "AMD64"):
        assert native_available(), "the native kernels must build on x86_64 (pip install -e .)"
        assert "scalar" in KERNELS
    assert KERNELS[-1] == "numpy"


def test_every_kernel_the_cpu_flags_allow_is_available():
    if platform.machine() != "x86_64":
        pytest.skip("CPU flags are read from x86 /proc/cpuinfo")
    flags = set(open("/proc/cpuinfo").read().split())
    assert ("avx512" in KERNELS) == ({"avx512f", "avx512_vpopcntdq"} <= flags)
    assert ("avx2" in KERNELS) == ("avx2" in flags)
    assert "scalar" in KERNELS


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (3, 5, 63), (7, 4, 64), (5, 9, 65), (17, 13, 200), (9, 70, 1000),
                                   (66, 67, 129)])
def test_gemm_equals_matmul_of_signs(kernel, m, n, k):
    rng = np.random.default_rng(m * 1000 + k)
    a, b = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((n, k)).astype(np.float32)
    a[0, 0] = 0.0  # sign(0) = +1
    got = binary_gemm(pack_signs(a, kernel=kernel), pack_signs(b, kernel=kernel), k, kernel=kernel, threads=2)
    expected = torch.from_numpy(signs(a)) @ torch.from_numpy(signs(b)).T
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, expected.numpy().astype(np.int32))


@pytest.mark.parametrize("kernel", KERNELS)
def test_gemm_kernel_from_environment(kernel, monkeypatch):
    monkeypatch.setenv("LOWBIT_KERNEL", kernel)
    a = pack_signs_numpy(np.array([[1.0, -1.0, 1.0]]))
    b = pack_signs_numpy(np.array([[1.0, 1.0, 1.0], [-1.0, 1.0, -1.0]]))
    np.testing.assert_array_equal(binary_gemm(a, b, 3), [[1, -3]])  # hand-worked: 1-1+1, -1-1-1


def test_unknown_or_unavailable_kernel(monkeypatch):
    monkeypatch.setenv("LOWBIT_KERNEL", "sse9")
    a = pack_signs_numpy(np.ones((1, 3)))
    with pytest.raises(ConfigError, match="sse9"):
        binary_gemm(a, a, 3)
    missing = next((k for k in ("avx512", "avx2", "neon") if k not in KERNELS), None)
    if missing:
        with pytest.raises(ConfigError, match="does not run"):
            binary_gemm(a, a, 3, kernel=missing)


floats = hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=150),
                    elements=st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True))


@settings(max_examples=40, deadline=None)
@given(x=floats)
def test_pack_signs_matches_numpy_and_round_trips(x):
    expected = pack_signs_numpy(x)
    for kernel in KERNELS:
        np.testing.assert_array_equal(pack_signs(x, kernel=kernel), expected)
    np.testing.assert_array_equal(unpack_signs(expected, x.shape[1]), np.where(x >= 0, 1.0, -1.0))


def test_pack_signs_hand_worked():
    x = np.array([[0.0, -0.0, -1.0, np.nan, 2.0] + [-1.0] * 60 + [3.0]], dtype=np.float32)  # K = 66
    for kernel in KERNELS:
        words = pack_signs(x, kernel=kernel)
        assert words.tolist() == [[0b10011, 0b10]]  # bits 0, 1, 4 (+1, +1, +1) then bit 65 -> word 1, bit 1


def torch_conv_of_signs(x, w, stride, padding):
    return F.conv2d(torch.where(x >= 0, 1.0, -1.0), torch.where(w >= 0, 1.0, -1.0), stride=stride, padding=padding)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("c,stride,padding", [(3, 1, 0), (64, 1, 1), (70, 2, 1), (130, (2, 1), (2, 0)), (5, 3, 2)])
def test_conv_equals_torch_conv_of_signs_with_zero_padding(kernel, c, stride, padding):
    g = torch.Generator().manual_seed(c)
    x, w = torch.randn(2, c, 7, 9, generator=g), torch.randn(6, c, 3, 3, generator=g)
    scale, bias = torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g)
    expected = torch_conv_of_signs(x, w, stride, padding)
    got = binary_conv2d(x.numpy(), w.numpy(), stride, padding, kernel=kernel)
    np.testing.assert_array_equal(got, expected.numpy())
    fused = binary_conv2d(x.numpy(), w.numpy(), stride, padding, scale.numpy(), bias.numpy(), kernel=kernel)
    np.testing.assert_array_equal(fused, (expected * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)).numpy())


def test_padding_contributes_zero_hand_worked():
    # 1x1 input of +1, 3x3 kernel of +1, padding 1: only the centre tap sees the input -> 1 (not 1 - 8)
    out = binary_conv2d(np.ones((1, 1, 1, 1), np.float32), np.ones((1, 1, 3, 3), np.float32), 1, 1)
    assert out.tolist() == [[[[1.0]]]]


@pytest.mark.parametrize("kernel", KERNELS)
def test_binary_linear_with_scale_and_bias(kernel):
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((4, 100)).astype(np.float32), rng.standard_normal((7, 100)).astype(np.float32)
    scale, bias = rng.random(7).astype(np.float32), rng.standard_normal(7).astype(np.float32)
    got = BinaryLinear(w, scale, bias)(x, kernel=kernel)
    expected = F.linear(torch.from_numpy(signs(x)).float(), torch.from_numpy(signs(w)).float()) * torch.from_numpy(
        scale) + torch.from_numpy(bias)
    np.testing.assert_array_equal(got, expected.numpy())


def test_malformed_gemm_inputs_raise():
    a = pack_signs_numpy(np.ones((4, 70)))
    with pytest.raises(ConfigError, match="uint64"):
        binary_gemm(a.astype(np.int64), a, 70)
    with pytest.raises(ConfigError, match="C-contiguous"):
        binary_gemm(np.asfortranarray(a), a, 70)
    with pytest.raises(ConfigError, match="C-contiguous"):
        binary_gemm(np.ones((4, 4), np.uint64)[:, ::2], a[:, :2], 100)
    with pytest.raises(ConfigError, match="2-D"):
        binary_gemm(a.reshape(-1), a, 70)
    with pytest.raises(ConfigError, match="words per row"):
        binary_gemm(a, a, 200)
    for k in (0, -1, 2.5, True, None):
        with pytest.raises(ConfigError, match="k"):
            binary_gemm(a, a, k)
    with pytest.raises(FormatError, match="bad-padding"):
        binary_gemm(a, a, 66)
    with pytest.raises(ConfigError, match="threads"):
        binary_gemm(a, a, 70, threads=-1)


def test_malformed_pack_and_conv_inputs_raise():
    with pytest.raises(ConfigError, match="real numbers"):
        pack_signs(np.array([["a"]]))
    with pytest.raises(ConfigError, match="C-contiguous"):
        pack_signs(np.ones((4, 4), np.float32).T)
    with pytest.raises(ConfigError, match="2-D"):
        pack_signs(np.ones(4, np.float32))
    with pytest.raises(ConfigError):
        pack_signs([[1.0]])
    x, w = np.ones((1, 3, 5, 5), np.float32), np.ones((2, 3, 3, 3), np.float32)
    with pytest.raises(ConfigError, match="float32"):
        binary_conv2d(x.astype(np.float64), w)
    with pytest.raises(ConfigError, match="channels"):
        binary_conv2d(np.ones((1, 4, 5, 5), np.float32), w)
    with pytest.raises(ConfigError, match="smaller than the kernel"):
        binary_conv2d(np.ones((1, 3, 2, 2), np.float32), w)
    with pytest.raises(ConfigError, match="stride"):
        binary_conv2d(x, w, stride=0)
    with pytest.raises(ConfigError, match="one value per output channel"):
        binary_conv2d(x, w, scale=np.ones(3))
    with pytest.raises(ConfigError, match="C-contiguous"):
        binary_conv2d(np.ones((1, 5, 5, 3), np.float32).transpose(0, 3, 1, 2), w)


# ---------------------------------------------------------------- NCHW packing, packed pooling, folded thresholds

from lowbit.runtime import ops  # noqa: E402
from lowbit.runtime.binary import BinaryConv2d  # noqa: E402
from lowbit.runtime.kernels import max_pool_packed, pack_nchw  # noqa: E402
from lowbit.runtime.threshold import fold_threshold  # noqa: E402


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("c", [1, 64, 70, 130])
def test_pack_nchw_equals_packing_the_nhwc_rows(kernel, c):
    rng = np.random.default_rng(c)
    x = rng.standard_normal((2, c, 5, 3)).astype(np.float32)
    x[0, 0, 0, 0], x[1, -1, 1, 1] = 0.0, -0.0  # sign(+-0) = +1
    got = pack_nchw(x, kernel, 2)
    expected = pack_signs_numpy(x.transpose(0, 2, 3, 1).reshape(-1, c)).reshape(2, 5, 3, -1)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("kernel", KERNELS)
def test_packed_max_pool_is_or_and_where_masked_and(kernel):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 70, 7, 6)).astype(np.float32)
    falling = rng.random(70) < 0.5
    and_mask = pack_signs_numpy(np.where(falling, 1.0, -1.0)[None, :])[0]
    got = max_pool_packed(pack_nchw(x, kernel, 2), (3, 2), (2, 2), (1, 1), and_mask, kernel, 2)
    # oracle: torch's max pool of +-1 values; for "falling" channels the pool of -x (a min pool of the signs)
    s = torch.from_numpy(signs(x)).float()
    pooled_max = F.max_pool2d(s, (3, 2), (2, 2), (1, 1))
    pooled_min = -F.max_pool2d(-s, (3, 2), (2, 2), (1, 1))
    expected = torch.where(torch.from_numpy(falling)[None, :, None, None], pooled_min, pooled_max).numpy()
    np.testing.assert_array_equal(got, pack_nchw(np.ascontiguousarray(expected), "numpy", 1))


@pytest.mark.parametrize("kernel", KERNELS)
def test_conv_epilogue_writes_nchw(kernel):
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((2, 70, 6, 5)).astype(np.float32), rng.standard_normal((9, 70, 3, 3))
    got = binary_conv2d(x, w, 1, 1, scale=np.arange(1, 10), bias=np.arange(9), kernel=kernel, threads=2)
    expected = F.conv2d(torch.from_numpy(signs(x)).float(), torch.from_numpy(signs(w)).float(), padding=1)
    expected = expected * torch.arange(1, 10).view(1, -1, 1, 1) + torch.arange(9).view(1, -1, 1, 1)
    np.testing.assert_array_equal(got, expected.numpy())


def bn_parameters(rng: np.random.Generator, channels: int, values: np.ndarray) -> tuple[np.ndarray, ...]:
    """Random eval-mode BN with gamma < 0, gamma == 0 and gamma > 0 channels, and means that make ties: the
    mean of every third channel is a value the layer really outputs, with a zero BN bias, so BN gives exactly 0."""
    gamma = rng.choice([-1.5, -0.3, 0.0, 0.4, 2.0], channels).astype(np.float32)
    beta = rng.uniform(-0.5, 0.5, channels).astype(np.float32)
    mean = rng.uniform(-5, 5, channels).astype(np.float32)
    var = rng.uniform(0.1, 3, channels).astype(np.float32)
    tie = np.arange(channels) % 3 == 0
    mean[tie] = values[rng.integers(0, values.shape[0], tie.sum()), np.flatnonzero(tie)]
    beta[tie] = 0.0
    beta[1] = 0.0
    gamma[1] = 0.0  # gamma == 0 and beta == 0: BN is 0 everywhere, sign +1
    return mean, var, gamma, beta


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_folded_threshold_equals_the_float_path_bit_for_bit(kernel, pool, seed):
    """conv -> (max pool) -> BN -> hardtanh -> sign, folded into the GEMM epilogue, equals the float32 path."""
    rng = np.random.default_rng(seed)
    c_in, c_out = 3, 70
    x = rng.standard_normal((2, c_in, 8, 8)).astype(np.float32)
    scale = np.where(rng.random(c_out) < 0.2, 1.0, rng.uniform(0.01, 2, c_out)).astype(np.float32)
    bias = np.where(rng.random(c_out) < 0.5, 0.0, rng.uniform(-3, 3, c_out)).astype(np.float32)
    layer = BinaryConv2d(rng.standard_normal((c_out, c_in, 3, 3)), 1, 1, scale, bias)
    y = layer(x, kernel=kernel, threads=2)
    if pool:
        y = ops.maxpool2d(y, [2, 2], [2, 2], [0, 0])
    mean, var, gamma, beta = bn_parameters(rng, c_out, y.transpose(0, 2, 3, 1).reshape(-1, c_out))
    bn = lambda v: ops.batchnorm(v, mean, var, gamma, beta, 1e-5)  # noqa: E731
    hardtanh = lambda v: np.clip(v, np.float32(-1), np.float32(1))  # noqa: E731
    z = hardtanh(bn(y))
    assert (z == 0).any() and (z > 0).any() and (z < 0).any()  # ties happen
    expected = pack_nchw(np.ascontiguousarray(z), "numpy", 1)

    threshold = fold_threshold(27, scale, bias, c_out, [] if pool else [bn, hardtanh],
                               [bn, hardtanh] if pool else [], pool)
    assert threshold is not None
    assert (threshold.direction[gamma >= 0] == 1).all() and (threshold.direction[gamma < 0] == -1).any()
    got = layer.forward_packed(pack_nchw(x, kernel, 2), kernel, 2, threshold)
    if pool:
        got = max_pool_packed(got, (2, 2), (2, 2), (0, 0), threshold.and_mask, kernel, 2)
    np.testing.assert_array_equal(got, expected)


def test_fold_threshold_hand_worked():
    """K = 4, so d is in {-4..4}; v = d * 0.5 + 0.25; BN with mean 0.75, var 1 - eps (factor 1), bias 0:
    v - 0.75 >= 0 iff d >= 1 (tie at d = 1); gamma = -1 flips to d <= 1; gamma = 0, beta = -1: never."""
    eps = np.float32(0.0)
    mean, var = np.full(3, 0.75, np.float32), np.ones(3, np.float32)
    gamma, beta = np.array([1, -1, 0], np.float32), np.array([0, 0, -1], np.float32)
    bn = lambda v: ops.batchnorm(v, mean, var, gamma, beta, float(eps))  # noqa: E731
    t = fold_threshold(4, np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32), 3, [bn], [], False)
    d = np.arange(-4, 5)[:, None]
    assert (t.direction * d >= t.threshold).T.tolist() == [[v >= 1 for v in range(-4, 5)],
                                                           [v <= 1 for v in range(-4, 5)], [False] * 9]


def test_fold_threshold_refuses_nan():
    nan_bn = lambda v: v * np.float32(np.nan)  # noqa: E731
    assert fold_threshold(8, None, None, 2, [nan_bn], [], True) is None


# ---------------------------------------------------------------- direct convolution (every dispatch path)

from lowbit.runtime.kernels import conv as conv_packed, conv_panel, native  # noqa: E402


def test_conv_panel_puts_eight_channels_side_by_side():
    rows = np.arange(1, 19, dtype=np.uint64).reshape(9, 2)  # 9 channels of 2 words
    panel = conv_panel(rows)
    assert panel.shape == (2, 2, 8)
    assert panel[0].tolist() == [[1, 3, 5, 7, 9, 11, 13, 15], [2, 4, 6, 8, 10, 12, 14, 16]]
    assert panel[1].tolist() == [[17, 0, 0, 0, 0, 0, 0, 0], [18, 0, 0, 0, 0, 0, 0, 0]]  # channels 9..15: zero


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("batch,c,o,h,w,size,stride,padding", [
    (3, 70, 70, 9, 11, 3, 1, 1),        # 297 pixels: several blocks of 64 and a partial pixel tile; O % 8 != 0
    (1, 256, 130, 6, 6, 3, 1, 1),      # 36 words per window: past the 31-word byte counters of AVX2 / NEON
    (2, 130, 9, 7, 5, 3, (2, 1), (2, 0)),
    (1, 2050, 3, 3, 3, 1, 1, 0),        # 33 words at one kernel position
    (2, 5, 66, 5, 4, (2, 3), 3, 2),
])
def test_direct_conv_equals_torch_conv_of_signs(kernel, batch, c, o, h, w, size, stride, padding):
    g = torch.Generator().manual_seed(c + o)
    kh, kw = size if isinstance(size, tuple) else (size, size)
    x, wt = torch.randn(batch, c, h, w, generator=g), torch.randn(o, c, kh, kw, generator=g)
    x[0, 0, 0, 0] = 0.0  # sign(0) = +1
    layer = BinaryConv2d(wt.numpy(), stride, padding)
    expected = torch_conv_of_signs(x, wt, stride, padding).numpy()
    for threads in (1, 2):
        np.testing.assert_array_equal(layer(x.numpy(), kernel=kernel, threads=threads), expected)
    # int32 output [N Ho Wo, O] through the correction: the same dot products, pixel-major
    bits = pack_nchw(x.numpy(), kernel, 2)
    dots = np.empty((expected.shape[0] * expected.shape[2] * expected.shape[3], o), dtype=np.int32)
    conv_packed(bits, layer.rows, layer.panel, c * kh * kw, layer.kernel_size, layer.stride, layer.padding, dots,
                kernel, 2, correction=layer.correction(h, w))
    np.testing.assert_array_equal(dots, expected.transpose(0, 2, 3, 1).reshape(-1, o))


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 2), c=st.integers(1, 140), o=st.integers(1, 72), h=st.integers(1, 8),
       w=st.integers(1, 8), kh=st.integers(1, 3), kw=st.integers(1, 3), stride=st.integers(1, 3),
       padding=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_direct_conv_property_every_kernel(batch, c, o, h, w, kh, kw, stride, padding, seed):
    if h + 2 * padding < kh or w + 2 * padding < kw:
        return
    g = torch.Generator().manual_seed(seed)
    x, wt = torch.randn(batch, c, h, w, generator=g), torch.randn(o, c, kh, kw, generator=g)
    scale, bias = torch.rand(o, generator=g) + 0.5, torch.randn(o, generator=g)
    expected = torch_conv_of_signs(x, wt, stride, padding) * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    layer = BinaryConv2d(wt.numpy(), stride, padding, scale.numpy(), bias.numpy())
    for kernel in KERNELS:
        np.testing.assert_array_equal(layer(x.numpy(), kernel=kernel, threads=2), expected.numpy())


@pytest.mark.skipif(native is None, reason="the native module did not build")
def test_native_conv_rejects_a_panel_of_the_wrong_shape():
    bits = np.zeros((1, 4, 4, 1), np.uint64)
    out = np.empty((16, 9), np.int32)
    kernel_id = dict(native.kernels())["scalar"]
    args = ((3, 3), (1, 1), (1, 1), 9, 27, out, kernel_id, 1, None, None, None, None, None)
    native.conv(bits, np.zeros((2, 9, 8), np.uint64), *args)  # ceil(9 / 8) groups of 9 words: accepted
    for panel in (np.zeros((1, 9, 8), np.uint64), np.zeros((2, 8, 8), np.uint64), np.zeros((2, 9, 4), np.uint64)):
        with pytest.raises(ValueError, match="panel"):
            native.conv(bits, panel, *args)
    with pytest.raises(ValueError, match="k must"):
        native.conv(bits, np.zeros((2, 9, 8), np.uint64), (3, 3), (1, 1), (1, 1), 9, 9 * 64 + 1, out, kernel_id, 1,
                    None, None, None, None, None)
