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
