"""The shared decoding rules of Encoded kinds, worked by hand."""

import pytest
import torch

from lowbit.errors import CalibrationError, ConfigError
from lowbit.quantizers.base import Encoded, check_axis, check_bits, check_finite, decode


def test_affine_per_tensor():
    enc = Encoded("affine", torch.tensor([0, 128, 255]), 8,
                  {"scale": torch.tensor(9 / 255), "zero_point": torch.tensor(85)}, {"qmin": 0, "qmax": 255})
    s = torch.tensor(9 / 255, dtype=torch.float32)
    expected = torch.stack([-85 * s, 43 * s, 170 * s])
    assert torch.equal(decode(enc), expected)
    assert decode(enc)[0].item() == pytest.approx(-3.0, abs=1e-6)
    assert decode(enc)[2].item() == pytest.approx(6.0, abs=1e-6)


def test_affine_per_channel_along_axis_0():
    codes = torch.tensor([[1, 2], [3, 4]])
    enc = Encoded("affine", codes, 4, {"scale": torch.tensor([0.5, 2.0]), "zero_point": torch.tensor([1, 0])},
                  {"qmin": 0, "qmax": 15, "axis": 0})
    assert torch.equal(decode(enc), torch.tensor([[0.0, 0.5], [6.0, 8.0]]))


def test_log_codes_are_powers_of_two_with_sign_and_zero():
    # bits=2, fsr=1: code c>0 stands for 2^(1 - 4 + c): 1 -> 1/4, 2 -> 1/2, 3 -> 1
    enc = Encoded("log", torch.tensor([0, 1, 2, 3]), 2, {"sign": torch.tensor([1, -1, 1, -1], dtype=torch.int8)},
                  {"fsr": 1, "signed": True})
    assert torch.equal(decode(enc), torch.tensor([0.0, -0.25, 0.5, -1.0]))


def test_binary_bit_one_is_plus_one():
    enc = Encoded("binary", torch.tensor([[1, 0], [0, 1]]), 1, {"scale": torch.tensor([0.5, 3.0])}, {"axis": 0})
    assert torch.equal(decode(enc), torch.tensor([[0.5, -0.5], [-3.0, 3.0]]))


def test_ternary_and_codebook():
    t = Encoded("ternary", torch.tensor([-1, 0, 1]), 2, {"scale": torch.tensor(0.25)}, {})
    assert torch.equal(decode(t), torch.tensor([-0.25, 0.0, 0.25]))
    c = Encoded("codebook", torch.tensor([2, 0, 1, 2]), 2, {"codebook": torch.tensor([-1.0, 0.0, 7.5])}, {})
    assert torch.equal(decode(c), torch.tensor([7.5, -1.0, 0.0, 7.5]))


def test_unknown_kind():
    with pytest.raises(ConfigError, match="affine"):
        decode(Encoded("nope", torch.tensor([0]), 1))


@pytest.mark.parametrize("bits", [1, 17, 2.0, True, "8"])
def test_check_bits_rejects(bits):
    with pytest.raises(ConfigError, match="2 to 16"):
        check_bits(bits, 2, 16)


def test_check_finite_names_tensor():
    with pytest.raises(CalibrationError, match="conv1.weight"):
        check_finite(torch.tensor([1.0, float("nan")]), "tensor 'conv1.weight'")
    check_finite(torch.tensor([1.0, 0.0]), "x")


def test_check_axis():
    check_axis(torch.zeros(2, 3), 0, "w")
    with pytest.raises(ConfigError, match="axis 2"):
        check_axis(torch.zeros(2, 3), 2, "w")
    with pytest.raises(ConfigError):
        check_axis(torch.tensor(1.0), 0, "w")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("position", [0, 500, 999])
def test_check_finite_finds_one_bad_value_anywhere(bad, position):
    x = torch.randn(1000)
    x[position] = bad
    with pytest.raises(CalibrationError, match="1 NaN/Inf"):
        check_finite(x, "x")


def test_check_finite_accepts_huge_finite_values_and_empty_tensors():
    big = torch.full((1000,), torch.finfo(torch.float32).max)  # their sum overflows; each value is finite
    check_finite(big, "x")
    check_finite(-big, "x")
    check_finite(torch.empty(0), "x")
    check_finite(torch.tensor([3, 4]), "integers")
