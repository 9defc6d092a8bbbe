"""Sensitivity: each entry against an independent fake-quantization of the one layer, computed by hand."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.analysis.sensitivity import SensitivityTable, measure_sensitivity, weight_spec
from lowbit.errors import ConfigError


def net() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()


def hand_quantized(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-row uniform as torch's observers (codes in [-2^(b-1), 2^(b-1) - 1], scale
    max|w| / ((2^b - 1) / 2)), or, at 1 bit, XNOR-Net's alpha sign(w) with alpha = mean |w| per row."""
    if bits == 1:
        return weight.abs().mean(1, keepdim=True) * torch.where(weight >= 0, 1.0, -1.0)
    scale = weight.abs().amax(1, keepdim=True) / ((2**bits - 1) / 2)
    return torch.clamp(torch.round(weight / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale


def test_entries_match_a_hand_quantized_layer():
    model = net()
    x = torch.randn(200, 6)
    y = torch.randint(0, 3, (200,))
    table = measure_sensitivity(model, x, y, bits=(1, 3, 8))
    w0, b0, w2, b2 = (t.detach() for t in (model[0].weight, model[0].bias, model[2].weight, model[2].bias))
    reference = F.linear(F.relu(F.linear(x, w0, b0)), w2, b2)
    assert table.float_accuracy == pytest.approx(float((reference.argmax(1) == y).float().mean()))
    assert table.float_loss == pytest.approx(float(F.cross_entropy(reference, y)), rel=1e-5)
    for bits in (1, 3, 8):
        logits = F.linear(F.relu(F.linear(x, hand_quantized(w0, bits), b0)), w2, b2)
        row = table.row("0", bits)
        noise = (logits - reference).pow(2)
        assert row.logit_mse == pytest.approx(float(noise.mean()), rel=1e-4)
        assert row.sqnr_db == pytest.approx(10 * math.log10(float(reference.pow(2).sum() / noise.sum())), rel=1e-4)
        assert row.loss_increase == pytest.approx(float(F.cross_entropy(logits, y)) - table.float_loss, abs=1e-5)
        accuracy = float((logits.argmax(1) == y).float().mean())
        assert row.accuracy_drop == pytest.approx(table.float_accuracy - accuracy)
    # bytes: codes ceil(30 b / 8) + per-row scale (5 float32) [+ zero points 5 int64 for uniform] + bias 5 float32
    assert [table.row("0", b).bytes for b in (1, 3, 8)] == [4 + 20 + 20, 12 + 20 + 40 + 20, 30 + 20 + 40 + 20]
    assert table.other_bytes == 0 and table.layers == ["0", "2"]


def test_more_bits_less_noise_and_the_model_is_untouched():
    model = net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(100, 6)
    table = measure_sensitivity(model, x, model(x).argmax(1), bits=(2, 4, 8))
    for layer in table.layers:
        noise = [table.row(layer, b).logit_mse for b in (2, 4, 8)]
        assert noise[0] > noise[1] > noise[2] >= 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(isinstance(m, lowbit.quantizers.Quantizer) for m in model.modules())


def test_float_candidate_is_noiseless_and_activations_are_measured():
    model = net()
    x = torch.randn(50, 6)
    y = model(x).argmax(1)
    table = measure_sensitivity(model, x, y, bits=(32,))
    assert table.row("2", 32).logit_mse == 0 and table.row("2", 32).sqnr_db is None
    assert table.row("2", 32).bytes == 4 * (15 + 3)
    with_acts = measure_sensitivity(model, x, y, bits=(32,), act_bits=2)
    assert with_acts.row("0", 32).logit_mse > 0  # 2-bit inputs alone add noise


def test_table_round_trips_through_json():
    model = net()
    x = torch.randn(20, 6)
    table = measure_sensitivity(model, x, model(x).argmax(1), bits=(2, 32))
    again = SensitivityTable.from_dict(json.loads(json.dumps(table.to_dict())))
    assert again == table
    assert "float: accuracy" in str(table)


def test_bad_input_is_config_error():
    model = net()
    x, y = torch.randn(10, 6), torch.zeros(10, dtype=torch.long)
    for bad in (0, 17, 33, 2.5, True):
        with pytest.raises(ConfigError, match="bit width"):
            measure_sensitivity(model, x, y, bits=(bad,))
    with pytest.raises(ConfigError, match="distinct"):
        measure_sensitivity(model, x, y, bits=(4, 4))
    with pytest.raises(ConfigError, match="act_bits"):
        measure_sensitivity(model, x, y, act_bits=1)
    with pytest.raises(ConfigError, match="labels"):
        measure_sensitivity(model, x, y[:5])
    with pytest.raises(ConfigError, match="float model"):
        measure_sensitivity(lowbit.quantize(model, "w8"), x, y)
    with pytest.raises(ConfigError, match="no entry for layer 'nope'"):
        measure_sensitivity(model, x, y, bits=(8,)).row("nope", 8)
    assert weight_spec(32) is None and weight_spec(1)["name"] == "xnor"
