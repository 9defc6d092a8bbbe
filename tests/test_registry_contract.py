"""One contract, every registered quantizer: spec round trip, shapes, gradients, encode/decode."""

import json

import pytest
import torch

from lowbit.errors import ConfigError
from lowbit.quantizers import Quantizer, decode, get, names

#: quantizers whose values are computed per input at run time and have no stored codes
NO_CODES = {"abc_act", "dorefa_grad"}

ALL = names()


def weight_like(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 4, 3, 3, generator=g)


def test_every_family_is_registered():
    expected = {"uniform", "linear", "log2", "binary", "xnor", "ternary", "dorefa_weight", "dorefa_act",
                "dorefa_grad", "kmeans", "abc_weight", "abc_act", "lsq", "pact"}
    assert expected <= set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_spec_round_trip_is_json_and_equal(name):
    q = get(name)
    assert isinstance(q, Quantizer) and q.name == name
    spec = json.loads(json.dumps(q.spec()))
    assert spec["name"] == name
    assert get(spec) == q
    assert get(q) is q


@pytest.mark.parametrize("name", ALL)
def test_forward_keeps_shape_and_gives_gradient(name):
    q = get(name)
    q.train()
    x = weight_like().requires_grad_(True)
    y = q(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all()
    y.square().sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", ALL)
def test_decode_of_encode_equals_forward_bitwise(name):
    q = get(name)
    x = weight_like(1)
    q.train()
    q(x)  # first call fits/initialises learned state where there is any
    q.eval()
    with torch.no_grad():
        y = q(x)
        if name in NO_CODES or getattr(q, "role", "weight") == "activation":
            with pytest.raises(ConfigError):
                q.encode(x)
            return
        enc = q.encode(x)
        assert enc.codes.shape == x.shape and not enc.codes.is_floating_point()
        assert 0 < enc.bits <= 16
        assert torch.equal(decode(enc), y)
        assert torch.equal(q.decode(enc), y)


def test_unknown_name_lists_known_names():
    with pytest.raises(ConfigError) as err:
        get("no-such-quantizer")
    for name in ALL:
        assert name in str(err.value)


@pytest.mark.parametrize("bad", [3, ["uniform"], {"bits": 4}])
def test_malformed_spec_is_config_error(bad):
    with pytest.raises(ConfigError):
        get(bad)


def test_unknown_parameter_is_config_error():
    with pytest.raises(ConfigError, match="uniform"):
        get({"name": "uniform", "no_such_option": 1})


def test_none_stays_none():
    assert get(None) is None


@pytest.mark.parametrize("bad_name", [{"name": "uniform"}, ["uniform"], 3, None])
def test_non_string_name_is_config_error(bad_name):
    with pytest.raises(ConfigError, match="known quantizers"):
        get({"name": bad_name})
