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

from lowbit.ops.norm import batchnorm  # noqa: E402
from lowbit.ops.pool import maxpool2d  # noqa: E402
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
        y = maxpool2d(y, [2, 2], [2, 2], [0, 0])
    mean, var, gamma, beta = bn_parameters(rng, c_out, y.transpose(0, 2, 3, 1).reshape(-1, c_out))
    bn = lambda v: batchnorm(v, mean, var, gamma, beta, 1e-5)  # noqa: E731
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
    bn = lambda v: batchnorm(v, mean, var, gamma, beta, float(eps))  # noqa: E731
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


# ---------------------------------------------------------------- hostile arguments: threads, geometry, alignment

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from lowbit.runtime.kernels import MAX_THREADS, check_threads, gemm as gemm_packed  # noqa: E402
from lowbit.runtime.threshold import Threshold  # noqa: E402

NATIVE = [k for k in KERNELS if k != "numpy"]
needs_native = pytest.mark.skipif(native is None, reason="the native module did not build")
past_max_threads = st.one_of(st.integers(MAX_THREADS + 1, 2**80), st.integers(-(2**80), -1))


def isolated(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter, so that a crash or a hang fails this test instead of the suite."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def misaligned(a: np.ndarray, offset: int = 1) -> np.ndarray:
    """A C-contiguous writable copy of ``a`` whose data starts ``offset`` bytes past an aligned address."""
    a = np.asarray(a)
    raw = np.zeros(a.nbytes + a.itemsize, np.uint8)
    out = np.frombuffer(raw.data, a.dtype, a.size, offset=offset).reshape(a.shape)
    out[...] = a
    assert out.flags.c_contiguous and out.flags.writeable and (a.size == 0 or not out.flags.aligned)
    return out


def native_calls(threads=1, wrap=lambda name, a: a):
    """One call of every native entry point on small valid arguments (each array passed through ``wrap``)."""
    kid = dict(native.kernels())["scalar"]
    x2, bits = np.ones((2, 70), np.float32), pack_signs_numpy(np.ones((2, 70)))
    x4, px = np.ones((1, 3, 4, 4), np.float32), np.zeros((1, 4, 4, 1), np.uint64)
    w = wrap
    return {
        "pack_signs": lambda: native.pack_signs(w("x", x2), w("out", np.empty((2, 2), np.uint64)), kid, threads),
        "gemm": lambda: native.gemm(w("a", bits), w("b", bits), 70, w("out", np.empty((2, 2), np.int32)), kid,
                                    threads, None, None, None, 0, None, None),
        "pack_nchw": lambda: native.pack_nchw(w("x", x4), w("out", np.empty((1, 4, 4, 1), np.uint64)), threads),
        "max_pool": lambda: native.max_pool(w("x", px), (2, 2), (2, 2), (0, 0), w("and_mask", np.zeros(1, np.uint64)),
                                            w("out", np.empty((1, 2, 2, 1), np.uint64)), threads),
        "conv": lambda: native.conv(w("x", px), w("panel", np.zeros((1, 9, 8), np.uint64)), (3, 3), (1, 1), (1, 1),
                                    2, 27, w("out", np.empty((16, 2), np.int32)), kid, threads, None, None, None,
                                    None, None),
    }


@needs_native
def test_python_and_native_agree_on_the_thread_maximum():
    assert MAX_THREADS == native.MAX_THREADS == 1024
    assert check_threads(MAX_THREADS) == MAX_THREADS and check_threads(None) == 0


@needs_native
@settings(max_examples=25, deadline=None)
@given(threads=past_max_threads)
def test_threads_past_the_maximum_raise_in_every_entry_point(threads):
    with pytest.raises(ConfigError, match=f"threads must be None or an int in 0 .. {MAX_THREADS}"):
        check_threads(threads)
    for call in native_calls(threads).values():
        with pytest.raises(ValueError, match=f"threads must be in 0 .. {MAX_THREADS}"):
            call()
    a, bits = pack_signs_numpy(np.ones((2, 70))), np.zeros((1, 4, 4, 1), np.uint64)
    x, w = np.ones((1, 3, 4, 4), np.float32), np.ones((2, 3, 3, 3), np.float32)
    for kernel in KERNELS:  # the numpy kernels take no threads, but the argument is checked the same
        for call in (lambda: binary_gemm(a, a, 70, kernel=kernel, threads=threads),
                     lambda: binary_conv2d(x, w, kernel=kernel, threads=threads),
                     lambda: pack_signs(np.ones((2, 70), np.float32), kernel=kernel, threads=threads),
                     lambda: BinaryLinear(np.ones((3, 70)))(np.ones((2, 70), np.float32), kernel=kernel,
                                                            threads=threads),
                     lambda: max_pool_packed(bits, (2, 2), (2, 2), (0, 0), np.zeros(1, np.uint64), kernel, threads)):
            with pytest.raises(ConfigError, match=f"0 .. {MAX_THREADS}"):
                call()


@needs_native
def test_the_thread_maximum_itself_runs():
    for call in native_calls(MAX_THREADS).values():
        call()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1100, 128)).astype(np.float32)  # enough rows for a team of MAX_THREADS
    a, b = rng.standard_normal((130, 700)).astype(np.float32), rng.standard_normal((70, 700)).astype(np.float32)
    for kernel in NATIVE:
        np.testing.assert_array_equal(pack_signs(x, kernel=kernel, threads=MAX_THREADS), pack_signs_numpy(x))
        got = binary_gemm(pack_signs_numpy(a), pack_signs_numpy(b), 700, kernel=kernel, threads=MAX_THREADS)
        np.testing.assert_array_equal(got, (signs(a) @ signs(b).T).astype(np.int32))


@needs_native
def test_absurd_thread_counts_do_not_crash_the_process():
    code = ("import numpy as np\nfrom lowbit.runtime.kernels import native\n"
            "x, out = np.ones((4096, 64), np.float32), np.empty((4096, 1), np.uint64)\n"
            "try:\n    native.pack_signs(x, out, 0, 100000)\nexcept ValueError as e:\n    print(e)\n"
            "native.pack_signs(x, out, 0, 0)\nprint(int(out.all()))\n")
    done = isolated(code, {"OMP_NUM_THREADS": "100000"})  # 0 threads: OpenMP's default, capped too
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"threads must be in 0 .. {MAX_THREADS} (0: all cores), got 100000", "1"]


@needs_native
def test_native_geometry_is_checked_without_int_overflow():
    x, mask, out = np.zeros((1, 1, 1, 1), np.uint64), np.zeros(1, np.uint64), np.empty((1, 1, 1, 1), np.uint64)
    big = 2**31 - 1
    with pytest.raises(ValueError, match="padding must be at most half the kernel"):
        native.max_pool(x, (big, big), (1, 1), (2**30, 2**30), mask, out, 1)  # 2 * 2**30 overflows an int
    for geometry, message in [(((2**31, 1), (1, 1), (0, 0)), r"kernel and stride must be in 1 \.\. 2\*\*31 - 1"),
                              (((1, 1), (2**80, 1), (0, 0)), r"kernel and stride must be in 1 \.\. 2\*\*31 - 1"),
                              (((1, 1), (0, 1), (0, 0)), "kernel and stride"),
                              (((3, 3), (1, 1), (2**31, 0)), r"padding must be in 0 \.\. 2\*\*31 - 1"),
                              (((3, 3), (1, 1), (-1, 0)), "padding must be in 0"),
                              (((2, 2), (1, 1), (0, 0)), "larger than the padded input")]:
        with pytest.raises(ValueError, match=message):
            native.max_pool(x, *geometry, mask, out, 1)
    kid = dict(native.kernels())["scalar"]
    px, conv_out = np.zeros((1, 1, 1, 4), np.uint64), np.empty((1, 1), np.int32)
    with pytest.raises(ValueError, match="overflows"):  # (2**31 - 1)**2 * 4 words: past int64
        native.conv(px, np.zeros((1, 4, 8), np.uint64), (big, big), (1, 1), (big, big), 1, 1, conv_out, kid, 1,
                    None, None, None, None, None)
    with pytest.raises(ValueError, match=r"k must be in 1 \.\. min\(64 \* kh \* kw \* words, 2\*\*31 - 1\)"):
        native.conv(px, np.zeros((1, 4, 8), np.uint64), (1, 1), (1, 1), (0, 0), 1, 2**31, conv_out, kid, 1,
                    None, None, None, None, None)
    wide = np.zeros((0, 2**25), np.uint64)  # 2**31 bits per row, no rows
    with pytest.raises(ValueError, match=r"2\*\*31 - 1"):
        native.gemm(wide, wide, 2**31, np.empty((0, 0), np.int32), kid, 1, None, None, None, 0, None, None)
    native.gemm(wide, wide, 2**31 - 1, np.empty((0, 0), np.int32), kid, 1, None, None, None, 0, None, None)
    with pytest.raises(ConfigError, match=r"2\*\*31 - 1"):
        binary_gemm(wide, wide, 2**31)


@needs_native
def test_huge_kernels_and_empty_giant_arrays_take_no_time():
    """Loops bounded by the data: a kernel of 2**31 - 1 on a 1x1 input used to run 2**62 taps, a [2**59, 0]
    array 2**59 empty rows (in a subprocess: a hang there times out instead of stopping the suite)."""
    code = """
import numpy as np
from lowbit.runtime.kernels import max_pool_packed, native
big, kid = 2**31 - 1, dict(native.kernels())["scalar"]
x = np.arange(1, 19, dtype=np.uint64).reshape(2, 3, 3, 1)
mask = np.zeros(1, np.uint64)
for kernel in ["numpy", "scalar"]:
    out = max_pool_packed(x, (big, big), (1, 1), (big // 2, big // 2), mask, kernel, 1)
    print(out.shape, out[:, :, :, 0].max(axis=(1, 2)).tolist(), np.unique(out[0]).tolist() == [15])
native.pack_signs(np.empty((2**59, 0), np.float32), np.empty((2**59, 0), np.uint64), kid, 1)
native.max_pool(np.empty((2**59, 1, 1, 0), np.uint64), (1, 1), (1, 1), (0, 0), np.empty(0, np.uint64),
                np.empty((2**59, 1, 1, 0), np.uint64), 1)
native.pack_nchw(np.empty((2**59, 0, 1, 1), np.float32), np.empty((2**59, 1, 1, 0), np.uint64), 1)
print("done")
"""
    done = isolated(code)
    assert done.returncode == 0, done.stderr
    # every window covers the whole 3x3 image: the OR of 1..9 is 15, of 10..18 is 31
    assert done.stdout.splitlines() == ["(2, 3, 3, 1) [15, 31] True"] * 2 + ["done"]


def pool_oracle(bits, kernel_size, stride, padding, and_mask):
    """Max pool of packed signs by slicing each window's part inside the input (no padding taps at all)."""
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    n, h, w, words = bits.shape
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    out = np.empty((n, ho, wo, words), np.uint64)
    for oy in range(ho):
        for ox in range(wo):
            y0, x0 = oy * sh - ph, ox * sw - pw
            window = bits[:, max(y0, 0):min(y0 + kh, h), max(x0, 0):min(x0 + kw, w)]
            window = window.reshape(n, window.shape[1] * window.shape[2], words)
            any_, all_ = np.bitwise_or.reduce(window, axis=1), np.bitwise_and.reduce(window, axis=1)
            out[:, oy, ox] = (any_ & ~and_mask) | (all_ & and_mask)
    return out


sizes = st.one_of(st.integers(1, 4), st.integers(2**20, 2**31 - 1))


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 6), w=st.integers(1, 6), kh=sizes, kw=sizes, sh=st.one_of(st.integers(1, 3), sizes),
       sw=st.integers(1, 3), pad=st.tuples(st.floats(0, 1), st.floats(0, 1)), words=st.integers(0, 2),
       seed=st.integers(0, 2**16))
def test_max_pool_of_any_geometry_equals_the_window_slices(h, w, kh, kw, sh, sw, pad, words, seed):
    ph, pw = int(pad[0] * (kh // 2)), int(pad[1] * (kw // 2))
    if h + 2 * ph < kh or w + 2 * pw < kw:
        for kernel in KERNELS:
            with pytest.raises(ConfigError, match="smaller than the kernel"):
                max_pool_packed(np.zeros((1, h, w, words), np.uint64), (kh, kw), (sh, sw), (ph, pw),
                                np.zeros(words, np.uint64), kernel, 1)
        return
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2**64, (2, h, w, words), dtype=np.uint64)
    and_mask = rng.integers(0, 2**64, words, dtype=np.uint64)
    expected = pool_oracle(bits, (kh, kw), (sh, sw), (ph, pw), and_mask)
    for kernel in KERNELS:
        got = max_pool_packed(bits, (kh, kw), (sh, sw), (ph, pw), and_mask, kernel, 2)
        np.testing.assert_array_equal(got, expected)


def test_max_pool_packed_rejects_bad_arguments():
    bits, mask = np.zeros((1, 4, 4, 1), np.uint64), np.zeros(1, np.uint64)
    bad = [(((3, 3), (1, 1), (2, 1), mask), "padding .* must be at most half the kernel"),
           (((2**31, 1), (1, 1), (0, 0), mask), r"max pool kernel must be an int in 1 \.\. 2\*\*31 - 1"),
           (((1, 1), (0, 1), (0, 0), mask), "max pool stride must be an int in 1"),
           (((1, 1), (True, 1), (0, 0), mask), "max pool stride"),
           (((3, 3), (1, 1), (-1, 0), mask), "max pool padding must be an int in 0"),
           (((1, 2, 3), (1, 1), (0, 0), mask), "max pool kernel"),
           (((5, 5), (1, 1), (0, 0), mask), "smaller than the kernel"),
           (((2, 2), (1, 1), (0, 0), np.zeros(2, np.uint64)), "one word per pixel word"),
           (((2, 2), (1, 1), (0, 0), mask.astype(np.int64)), "uint64")]
    for kernel in KERNELS:
        for (size, stride, padding, and_mask), message in bad:
            with pytest.raises(ConfigError, match=message):
                max_pool_packed(bits, size, stride, padding, and_mask, kernel, 1)
        with pytest.raises(ConfigError, match="smaller than the kernel"):  # no pixel: windows all padding
            max_pool_packed(np.zeros((1, 0, 4, 1), np.uint64), (2, 2), (1, 1), (1, 1), mask, kernel, 1)
        with pytest.raises(ConfigError, match="uint64"):
            max_pool_packed(bits.astype(np.int64), (2, 2), (1, 1), (0, 0), mask, kernel, 1)


def test_binary_conv_geometry_is_bounded():
    w = np.ones((2, 1, 1, 1), np.float32)
    for stride, padding in [(2**31, 0), (1, 2**31), (2**80, 0), (1, -1)]:
        with pytest.raises(ConfigError, match=r"(stride|padding) must be an int in [01] \.\. 2\*\*31 - 1"):
            BinaryConv2d(w, stride, padding)
    layer = BinaryConv2d(w, 1, 2**30)  # a 1x1 input would give 2**31 + 1 rows and columns of padding
    for kernel in KERNELS:
        with pytest.raises(ConfigError, match=r"more than 2\*\*31 - 1 pixels"):
            layer(np.ones((1, 1, 1, 1), np.float32), kernel=kernel)
    assert BinaryConv2d(w, 1, 2**14).output_size(1, 1) == (2**15 + 1, 2**15 + 1)  # 2**30 + 2**16 + 1 pixels


@needs_native
@pytest.mark.parametrize("name,target", [("pack_signs", "x"), ("pack_signs", "out"), ("gemm", "a"), ("gemm", "b"),
                                         ("gemm", "out"), ("pack_nchw", "x"), ("pack_nchw", "out"),
                                         ("max_pool", "x"), ("max_pool", "and_mask"), ("max_pool", "out"),
                                         ("conv", "x"), ("conv", "panel"), ("conv", "out")])
def test_every_native_buffer_must_be_aligned(name, target):
    native_calls()[name]()  # aligned: accepted
    call = native_calls(1, lambda n, a: misaligned(a) if n == target else a)[name]
    with pytest.raises(ValueError, match=f"{target} must be aligned to (4|8) bytes"):
        call()


@needs_native
def test_native_rejects_misaligned_epilogue_vectors():
    kid = dict(native.kernels())["scalar"]
    bits = pack_signs_numpy(np.ones((2, 70)))
    vec = np.ones(2, np.float32)
    out = np.empty((2, 2), np.float32)
    for i, name in enumerate(["scale", "bias"]):
        args = [None, None]
        args[i] = misaligned(vec)
        with pytest.raises(ValueError, match=f"{name} must be aligned to 4 bytes"):
            native.gemm(bits, bits, 70, out, kid, 1, *args, None, 0, None, None)
    thr, direction = np.zeros(2, np.int32), np.ones(2, np.int32)
    packed = np.empty((2, 1), np.uint64)
    with pytest.raises(ValueError, match="threshold must be aligned"):
        native.gemm(bits, bits, 70, packed, kid, 1, None, None, None, 0, misaligned(thr), direction)
    with pytest.raises(ValueError, match="correction must be aligned"):
        native.gemm(bits, bits, 70, np.empty((2, 2), np.int32), kid, 1, None, None,
                    misaligned(np.zeros((1, 2), np.int32)), 0, None, None)


@pytest.mark.parametrize("kernel", KERNELS)
@settings(max_examples=10, deadline=None)
@given(offset=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_wrappers_copy_misaligned_arrays(kernel, offset, seed):
    rng = np.random.default_rng(seed)
    off4 = offset % 4 or 1  # float32 / int32 data: misaligned at 1, 2 or 3 bytes
    x = rng.standard_normal((5, 70)).astype(np.float32)
    np.testing.assert_array_equal(pack_signs(misaligned(x, off4), kernel=kernel), pack_signs_numpy(x))
    a, b = pack_signs_numpy(x), pack_signs_numpy(x[:3])
    np.testing.assert_array_equal(binary_gemm(misaligned(a, offset), misaligned(b, offset), 70, kernel=kernel),
                                  binary_gemm(a, b, 70, kernel="numpy"))
    w, scale, bias = rng.standard_normal((4, 70)), rng.random(4).astype(np.float32), np.ones(4, np.float32)
    np.testing.assert_array_equal(
        BinaryLinear(misaligned(w, offset), misaligned(scale, off4), misaligned(bias, off4))(misaligned(x, off4),
                                                                                            kernel=kernel),
        BinaryLinear(w, scale, bias)(x, kernel="numpy"))
    img, wt = rng.standard_normal((2, 70, 5, 4)).astype(np.float32), rng.standard_normal((9, 70, 3, 3))
    expected = torch_conv_of_signs(torch.from_numpy(img), torch.from_numpy(wt), 1, 1).numpy()
    np.testing.assert_array_equal(binary_conv2d(misaligned(img, off4), wt, 1, 1, kernel=kernel), expected)
    packed = pack_nchw(misaligned(img, off4), kernel, 1)
    np.testing.assert_array_equal(packed, pack_nchw(img, "numpy", 1))
    mask = rng.integers(0, 2**64, 2, dtype=np.uint64)
    np.testing.assert_array_equal(max_pool_packed(misaligned(packed, offset), (2, 2), (1, 1), (1, 1),
                                                  misaligned(mask, offset), kernel, 1),
                                  pool_oracle(packed, (2, 2), (1, 1), (1, 1), mask))
    # into a misaligned output: computed aside, then copied in
    out = misaligned(np.zeros((5, 3), np.int32), off4)
    gemm_packed(misaligned(a, offset), b, 70, out, kernel, 1)
    np.testing.assert_array_equal(out, binary_gemm(a, b, 70, kernel="numpy"))
    layer = BinaryConv2d(wt, 1, 1)
    dots = misaligned(np.zeros((2 * 5 * 4, 9), np.int32), off4)
    conv_packed(misaligned(packed, offset), layer.rows, misaligned(layer.panel, offset), 70 * 9, (3, 3), (1, 1),
                (1, 1), dots, kernel, 1, correction=misaligned(layer.correction(5, 4), off4))
    np.testing.assert_array_equal(dots, expected.transpose(0, 2, 3, 1).reshape(-1, 9))


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_batch_of_zero_gives_empty_outputs_of_the_right_shape(kernel):
    rng = np.random.default_rng(0)
    layer = BinaryConv2d(rng.standard_normal((9, 70, 3, 3)), (2, 1), 1, np.ones(9), np.zeros(9))
    out = layer(np.empty((0, 70, 7, 5), np.float32), kernel=kernel)
    assert out.shape == (0, 9, 4, 5) and out.dtype == np.float32
    threshold = Threshold(np.zeros(9, np.int32), np.ones(9, np.int32), None)
    packed = layer.forward_packed(np.empty((0, 7, 5, 2), np.uint64), kernel, 1, threshold)
    assert packed.shape == (0, 4, 5, 1) and packed.dtype == np.uint64
    pooled = max_pool_packed(packed, (2, 2), (2, 2), (1, 1), np.zeros(1, np.uint64), kernel, 1)
    assert pooled.shape == (0, 3, 3, 1)
    assert pack_nchw(np.empty((0, 70, 7, 5), np.float32), kernel, 1).shape == (0, 7, 5, 2)
    assert pack_signs(np.empty((0, 70), np.float32), kernel=kernel).shape == (0, 2)
    assert BinaryLinear(np.ones((4, 70)))(np.empty((0, 70), np.float32), kernel=kernel).shape == (0, 4)
