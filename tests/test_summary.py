"""lowbit.summary: parameters, bytes and MACs checked against hand counts on tiny models."""

import json

import pytest
import torch
from torch import nn

import lowbit
from lowbit.analysis.summary import summary
from lowbit.config import uniform_weight
from lowbit.errors import CalibrationError, ConfigError
from lowbit.nn import QuantConv2d, QuantLinear
from lowbit.quantizers import Encoded, Quantizer


class StepAffine(Quantizer):
    """Test-only 4-bit quantizer (unregistered): codes round(x / 0.25) in [-8, 7], scalar scale and zero point."""

    bits = 4

    def spec(self):
        return {"name": "step_affine"}

    def forward(self, x):
        return self.decode(self.encode(x))

    def encode(self, x):
        codes = torch.round(x / 0.25).clamp(-8, 7).long()
        params = {"scale": torch.tensor(0.25), "zero_point": torch.tensor(0)}
        return Encoded("affine", codes, 4, params, {"qmin": -8, "qmax": 7, "axis": None})


class HeldRange(Quantizer):
    """Test-only activation quantizer holding a 2-value float32 buffer (8 bytes of state)."""

    bits = 8

    def __init__(self):
        super().__init__()
        self.register_buffer("range", torch.tensor([-1.0, 1.0]))

    def spec(self):
        return {"name": "held_range"}

    def forward(self, x):
        return x


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(
        QuantConv2d(1, 2, 3, weight_quantizer=StepAffine(), input_quantizer=HeldRange()),
        nn.BatchNorm2d(2),
        nn.Flatten(),
        nn.Linear(18, 4),
    )


def test_hand_count():
    # conv 1->2, 3x3 on 5x5: output 2x3x3 = 18 values, each 1*3*3 MACs -> 162; linear 18->4: 4 * 18 = 72
    # conv params 18 + 2 = 20; bytes: 18 * 4 bits = 9, scale 4 + zero point 8, bias 2 * 4, input state 2 * 4 -> 37
    # linear params 72 + 4 = 76, float: 304 bytes; batch norm weight + bias: 4 params, 16 bytes
    s = summary(tiny(), example_input=(1, 1, 5, 5))
    conv, linear = s.layers
    assert (conv.name, conv.type, conv.weight_bits, conv.input_bits) == ("0", "QuantConv2d", 4, 8)
    assert (conv.params, conv.bytes, conv.macs) == (20, 37, 162)
    assert (linear.name, linear.type, linear.weight_bits, linear.input_bits) == ("3", "Linear", 32, 32)
    assert (linear.params, linear.bytes, linear.macs) == (76, 304, 72)
    assert (s.other_params, s.other_bytes) == (4, 16)
    assert (s.total_params, s.total_bytes, s.float_bytes, s.total_macs) == (100, 357, 400, 234)
    assert s.compression == pytest.approx(400 / 357)


def test_real_quantizers_bytes_follow_their_encoding():
    torch.manual_seed(1)
    model = nn.Sequential(
        QuantConv2d(1, 2, 3, weight_quantizer="binary"),  # 18 bits -> 3 bytes, scale 4, bias 8
        QuantLinear(18, 4, weight_quantizer=uniform_weight(8)),  # 72 + scale 4x4 + zero point 4x8, bias 16
        QuantLinear(4, 4, bias=False, weight_quantizer={"name": "log2", "bits": 3}),  # 16 * 3 bits = 6, sign 2
        QuantLinear(4, 2, bias=False, weight_quantizer={"name": "kmeans", "bits": 2}),  # 8 * 2 bits = 2, codebook 4x4
    )
    model[3](torch.randn(1, 4))  # k-means fits its codebook on first use
    rows = summary(model).layers
    assert [r.bytes for r in rows] == [3 + 4 + 8, 72 + 16 + 32 + 16, 6 + 2, 2 + 16]
    assert [r.weight_bits for r in rows] == [1, 8, 4, 2]  # log2: 3 code bits + sign bit
    assert [r.macs for r in rows] == [None] * 4


def test_macs_for_groups_sequences_and_repeated_calls():
    conv = nn.Conv2d(4, 6, 3, groups=2, padding=1, bias=False)  # 6 x 4 x 4 outputs, each 2 * 9 MACs
    assert summary(conv, torch.zeros(1, 4, 4, 4)).layers[0].macs == 96 * 18

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 5)

        def forward(self, x):
            return self.fc(self.fc(x))

    # input (2, 3, 5): 6 rows of 5 outputs, 5 MACs each, called twice
    assert summary(Twice(), (2, 3, 5)).layers[0].macs == 2 * 6 * 5 * 5


def test_tensor_or_shape_give_the_same_summary_and_restore_the_model():
    model = tiny().train()
    by_shape = summary(model, (1, 1, 5, 5)).to_dict()
    assert summary(model, torch.randn(1, 1, 5, 5)).to_dict() == by_shape
    assert model.training and model[1].training
    assert all(not m._forward_hooks for m in model.modules())
    assert torch.equal(model[1].running_mean, torch.zeros(2))  # eval pass: batch norm statistics untouched


def test_to_dict_is_json_and_matches_the_properties():
    s = summary(tiny(), (1, 1, 5, 5))
    data = json.loads(json.dumps(s.to_dict()))
    assert data["total"] == {"params": 100, "bytes": 357, "float_bytes": 400, "compression": 400 / 357, "macs": 234,
                             "quantized_mac_fraction": 162 / 234}
    assert data["other"] == {"params": 4, "bytes": 16}
    assert data["layers"][0] == {
        "name": "0", "type": "QuantConv2d", "weight_bits": 4, "input_bits": 8, "params": 20, "bytes": 37, "macs": 162,
    }


def test_table_is_aligned():
    text = str(summary(tiny(), (1, 1, 5, 5)))
    lines = text.splitlines()
    table = lines[:-2]
    assert len({len(line) for line in table}) == 1
    assert lines[0].split() == ["layer", "type", "w", "bits", "a", "bits", "params", "bytes", "MACs"]
    assert lines[2].split() == ["0", "QuantConv2d", "4", "8", "20", "37", "162"]
    assert lines[4].split() == ["(other)", "-", "32", "-", "4", "16", "-"]
    assert lines[-3].split() == ["total", "100", "357", "234"]
    assert lines[-2] == "float32 400 bytes -> 357 bytes, compression 1.12x"
    assert lines[-1] == "69.2% of MACs in layers with quantized weights"
    assert "-" == str(summary(tiny())).splitlines()[2].split()[-1]  # MACs unknown without an example


def test_bad_example_input_is_config_error():
    for bad in ((1, 0, 5), "1x5", (1.5, 2)):
        with pytest.raises(ConfigError, match="example_input"):
            summary(tiny(), bad)


def test_uncalibrated_static_quantizer_is_named():
    model = lowbit.quantize(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)), "w8a8")
    assert summary(model).layers[0].input_bits == 8
    with pytest.raises(CalibrationError, match="'0.input'"):
        summary(model, (1, 3))
