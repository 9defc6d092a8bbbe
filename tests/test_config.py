"""QuantConfig / LayerRule: resolution order, presets, JSON round trip, allowlisted reading."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lowbit.config import (
    CONFIG_VERSION,
    EIGHT_BIT,
    INHERIT,
    PRESETS,
    LayerRule,
    QuantConfig,
    as_config,
    preset,
)
from lowbit.errors import ConfigError
from lowbit.quantizers import get, names

BIN = {"name": "binary", "ste": "identity"}
TER = {"name": "ternary", "threshold": 0.5}


def specs(weight, input, output):
    return {"weight": weight, "input": input, "output": output}


def test_defaults_are_float_with_8bit_first_and_last():
    cfg = QuantConfig()
    assert (cfg.weight, cfg.input, cfg.output, cfg.first, cfg.last, cfg.rules) == (None, None, None, "8bit", "8bit", [])
    assert cfg.version == CONFIG_VERSION
    assert EIGHT_BIT["weight"] == {
        "name": "uniform", "bits": 8, "symmetric": True, "per_channel": True, "dynamic": True, "narrow": True
    }
    assert EIGHT_BIT["input"]["bits"] == 8 and EIGHT_BIT["input"]["dynamic"] is False and EIGHT_BIT["output"] is None


def test_first_last_policies():
    layer = nn.Linear(2, 2)
    cfg = QuantConfig(weight=BIN, input=BIN)
    assert cfg.layer_specs("mid", layer) == specs(BIN, BIN, None)
    assert cfg.layer_specs("a", layer, first=True) == EIGHT_BIT
    assert cfg.layer_specs("z", layer, last=True) == EIGHT_BIT
    cfg = QuantConfig(weight=BIN, input=BIN, first="float", last="same")
    assert cfg.layer_specs("a", layer, first=True) is None
    assert cfg.layer_specs("z", layer, last=True) == specs(BIN, BIN, None)
    cfg = QuantConfig(weight=BIN, input=BIN, first={"input": None}, last={"weight": TER, "output": BIN})
    assert cfg.layer_specs("a", layer, first=True) == specs(BIN, None, None)
    assert cfg.layer_specs("z", layer, last=True) == specs(TER, BIN, BIN)
    # a single layer that is both first and last takes the first policy
    assert cfg.layer_specs("a", layer, first=True, last=True) == specs(BIN, None, None)


def test_rules_first_match_wins_and_override_policy():
    conv, lin = nn.Conv2d(1, 1, 1), nn.Linear(1, 1)
    cfg = QuantConfig(
        weight=BIN,
        input=BIN,
        rules=[
            LayerRule(pattern="features.*", layer_type="Conv2d", weight=TER),
            LayerRule(layer_type="Linear", input=None),
            LayerRule(pattern="features.*", skip=True),
        ],
    )
    assert cfg.layer_specs("features.0", conv) == specs(TER, BIN, None)
    assert cfg.layer_specs("features.3", lin) == specs(BIN, None, None)  # second rule matches first
    assert cfg.layer_specs("features.3", nn.Conv1d(1, 1, 1)) is None  # third rule
    assert cfg.layer_specs("head", conv) == specs(BIN, BIN, None)  # no rule
    assert cfg.layer_specs("features.0", conv, first=True) == specs(TER, EIGHT_BIT["input"], None)
    # the name pattern is fnmatch, case-sensitive; the type is the class name
    assert not LayerRule(pattern="Features.*").matches("features.0", conv)
    assert LayerRule(pattern="*.[0-9]").matches("a.b.7", conv)
    assert not LayerRule(layer_type="Linear").matches("x", conv)


def test_rule_can_reinstate_a_float_first_layer():
    cfg = QuantConfig(first="float", rules=[LayerRule(pattern="stem", weight=BIN)])
    assert cfg.layer_specs("stem", nn.Linear(1, 1), first=True) == specs(BIN, None, None)


def test_round_trip_through_dict_and_json():
    cfg = QuantConfig(
        weight=TER,
        input="binary",
        output=None,
        first={"input": None},
        last="float",
        rules=[LayerRule(pattern="a.*", weight=None), LayerRule(layer_type="Linear", skip=True)],
    )
    data = json.loads(cfg.to_json())
    assert data["version"] == CONFIG_VERSION
    assert data["rules"] == [{"pattern": "a.*", "weight": None}, {"layer_type": "Linear", "skip": True}]
    assert QuantConfig.from_json(cfg.to_json()) == cfg
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    assert QuantConfig.from_json(cfg.to_json(indent=None)) == cfg


SPECS = st.sampled_from([None, "binary", BIN, TER, {"name": "dorefa_act", "bits": 3}])
RULES = st.builds(
    LayerRule,
    pattern=st.text(max_size=5) | st.just("x.*"),
    weight=SPECS | st.just(INHERIT),
    input=SPECS | st.just(INHERIT),
)
POLICY = st.sampled_from(["8bit", "same", "float", {"input": None}, {"weight": BIN, "output": TER}])


@settings(max_examples=40, deadline=None)
@given(weight=SPECS, input=SPECS, output=SPECS, first=POLICY, last=POLICY, rules=st.lists(RULES, max_size=3))
def test_round_trip_property(weight, input, output, first, last, rules):
    cfg = QuantConfig(weight=weight, input=input, output=output, first=first, last=last, rules=rules)
    assert QuantConfig.from_json(cfg.to_json()) == cfg


def test_version_may_be_left_out_when_reading():
    assert QuantConfig.from_dict({"weight": "binary"}) == QuantConfig(weight="binary")


@pytest.mark.parametrize("version", [0, 2, "1", True, None])
def test_unknown_version_is_rejected(version):
    with pytest.raises(ConfigError, match="version"):
        QuantConfig.from_dict({"version": version})


def test_unknown_keys_are_rejected_and_valid_ones_listed():
    with pytest.raises(ConfigError, match="'weights'.*valid keys: weight, input, output, first, last, rules, ptq, ptq_options, version"):
        QuantConfig.from_dict({"weights": "binary"})
    with pytest.raises(ConfigError, match="'name'.*pattern, layer_type"):
        QuantConfig.from_dict({"rules": [{"pattern": "a", "name": "x"}]})
    with pytest.raises(ConfigError, match="'bits'.*weight, input, output"):
        QuantConfig.from_dict({"first": {"bits": 8}})


@pytest.mark.parametrize(
    "data, message",
    [
        ({"weight": "no_such_quantizer"}, "config weight: unknown quantizer 'no_such_quantizer'"),
        ({"input": {"name": "binary", "nope": 1}}, "config input: bad parameters for quantizer 'binary'"),
        ({"first": "eight"}, "first policy 'eight' is not valid; valid: 8bit, same, float"),
        ({"last": {"weight": "nope"}}, "last.weight: unknown quantizer"),
        ({"rules": [{"skip": True}]}, "needs a name 'pattern' or a 'layer_type'"),
        ({"rules": [{"pattern": "a", "skip": True, "weight": None}]}, "skip=True and specs"),
        ({"rules": [{"pattern": 3}]}, "pattern must be a string"),
        ({"rules": [{"pattern": "a", "skip": "yes"}]}, "skip must be true or false"),
        ({"rules": {"pattern": "a"}}, "rules must be a list"),
        ({"rules": ["a"]}, "a rule must be a dict"),
        ({"weight": 8}, "config weight"),
    ],
)
def test_bad_values_are_config_errors_naming_the_field(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        QuantConfig.from_dict(data)


def test_unknown_quantizer_error_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        QuantConfig(weight="nope")
    assert all(name in str(err.value) for name in names())


def test_quantizer_objects_are_refused_in_a_config():
    with pytest.raises(ConfigError, match="q.spec"):
        QuantConfig(weight=get("binary"))


def test_bad_json_and_non_dict():
    with pytest.raises(ConfigError, match="not valid JSON"):
        QuantConfig.from_json("{")
    with pytest.raises(ConfigError, match="must be a dict"):
        QuantConfig.from_json("[1]")


def test_unknown_preset_lists_every_preset():
    with pytest.raises(ConfigError) as err:
        preset("w9a9")
    assert "unknown preset 'w9a9'" in str(err.value)
    assert all(name in str(err.value) for name in PRESETS)


def test_as_config_accepts_name_dict_and_config_only():
    assert as_config("bnn") == preset("bnn")
    assert as_config({"weight": "binary"}) == QuantConfig(weight="binary")
    cfg = QuantConfig()
    assert as_config(cfg) is cfg
    with pytest.raises(ConfigError, match="preset name, a dict or a QuantConfig"):
        as_config(3)
    cfg.first = "bogus"  # mutated after construction: checked again on use
    with pytest.raises(ConfigError, match="bogus"):
        as_config(cfg)


def test_presets_are_json_data():
    assert json.loads(json.dumps(PRESETS)) == PRESETS
    expected = {
        "w8a8", "w6a6", "w4a8", "w4a4", "w3a3", "w2a2", "w8", "bnn", "xnor", "bwn", "ternary",
        "dorefa-w1a2", "dorefa-w2a2", "dorefa-w1a2g6", "kmeans4", "kmeans5", "kmeans8",
        "lsq-w2a2", "lsq-w3a3", "lsq-w4a4", "pact-w2a2", "pact-w4a4", "abc-3-3", "abc-5-5",
    } | {f"{kind}{b}" for kind in ("linear", "log") for b in (2, 3, 4, 5, 6, 8)}
    assert expected <= set(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_round_trips(name):
    cfg = preset(name)
    assert QuantConfig.from_json(cfg.to_json()) == cfg
    assert cfg.first == cfg.last == PRESETS[name].get("first", "8bit")  # only w7a8 quantizes them like the rest
    assert get(cfg.weight).name == PRESETS[name]["weight"]["name"]


def test_w7a8_keeps_every_layer_at_seven_bits():
    """First and last layers too: an 8-bit layer would bring back onnxruntime's saturation (docs/onnx.md)."""
    import lowbit
    from lowbit.models import get_model

    model = lowbit.quantize(get_model("lenet5"), "w7a8")
    assert {(r.weight_bits, r.input_bits) for r in lowbit.summary(model).layers} == {(7, 8)}


@pytest.mark.parametrize(
    "name, weight, input, output",
    [
        ("w4a8", ("uniform", 4), ("uniform", 8), None),
        ("w8", ("uniform", 8), None, None),
        ("bnn", ("binary", 1), ("binary", 1), None),
        ("bwn", ("xnor", 1), None, None),
        ("dorefa-w1a2g6", ("dorefa_weight", 1), ("dorefa_act", 2), ("dorefa_grad", 6)),
        ("log3", ("log2", 3), ("uniform", 8), None),
        ("linear5", ("linear", 5), ("uniform", 8), None),
        ("kmeans5", ("kmeans", 5), None, None),
        ("abc-5-5", ("abc_weight", 5), ("abc_act", 5), None),
    ],
)
def test_preset_contents(name, weight, input, output):
    cfg = preset(name)

    def described(spec):
        q = get(spec)
        return None if q is None else (q.name, q.spec().get("bits", q.bits))

    assert (described(cfg.weight), described(cfg.input), described(cfg.output)) == (weight, input, output)
