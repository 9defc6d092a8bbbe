"""Sensitivity: each entry against an independent fake-quantization of the one layer, computed by hand."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.isotonic import IsotonicRegression
from torch import nn

import lowbit
from lowbit.analysis.sensitivity import (Sensitivity, SensitivityTable, measure_sensitivity, nonincreasing_fit,
                                         weight_spec)
from lowbit.errors import ConfigError


def net() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()


def hand_quantized(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-row uniform: below 8 bits codes in [-2^(b-1), 2^(b-1) - 1] with scale max|w| / ((2^b - 1) / 2),
    from 8 bits torch's symmetric observer (codes in +-(2^(b-1) - 1), scale max|w| / (2^(b-1) - 1)); at 1 bit
    XNOR-Net's alpha sign(w) with alpha = mean |w| per row."""
    if bits == 1:
        return weight.abs().mean(1, keepdim=True) * torch.where(weight >= 0, 1.0, -1.0)
    narrow = bits >= 8
    scale = weight.abs().amax(1, keepdim=True) / ((2 ** (bits - 1) - 1) if narrow else (2**bits - 1) / 2)
    return torch.clamp(torch.round(weight / scale), -(2 ** (bits - 1)) + narrow, 2 ** (bits - 1) - 1) * scale


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


def test_nonincreasing_fit_by_hand():
    assert nonincreasing_fit([3.0, 1.0, 2.0]) == [3.0, 1.5, 1.5]
    assert nonincreasing_fit([1.0, 2.0, 3.0]) == [2.0, 2.0, 2.0]
    assert nonincreasing_fit([5.0, 2.0, 2.0, -1.0]) == [5.0, 2.0, 2.0, -1.0]  # already non-increasing: unchanged
    # pooling cascades: 0.2 pools with -0.3, then 0.1 rises above that mean and joins: (-0.3 + 0.2 + 0.1) / 3 = 0
    assert nonincreasing_fit([0.5, -0.3, 0.2, 0.1]) == pytest.approx([0.5, 0.0, 0.0, 0.0], abs=1e-15)
    assert nonincreasing_fit([]) == []


finite = st.one_of(st.just(0.0), st.floats(-1e6, 1e6), st.floats(-1e-300, 1e-300, allow_subnormal=True))


@settings(max_examples=80, deadline=None)
@given(st.one_of(st.lists(finite, min_size=1, max_size=8),
                 st.tuples(finite, st.integers(1, 6)).map(lambda vc: [vc[0]] * vc[1])))
def test_nonincreasing_fit_is_scikit_learns_isotonic_regression(values):
    fitted = nonincreasing_fit(values)
    assert all(a >= b for a, b in zip(fitted, fitted[1:]))
    oracle = IsotonicRegression(increasing=False).fit_transform(np.arange(len(values)), np.array(values))
    assert fitted == pytest.approx(oracle.tolist(), rel=1e-9, abs=1e-9)


def table_with_losses(losses: dict[int, float]) -> SensitivityTable:
    rows = [Sensitivity(layer="a", bits=b, accuracy_drop=0.0, loss_increase=v, logit_mse=0.0, sqnr_db=None, bytes=b)
            for b, v in losses.items()]
    return SensitivityTable(layers=["a"], bits=list(losses), act_bits=None, examples=1, float_accuracy=1.0,
                            float_loss=0.0, other_bytes=0, rows=rows)


def test_costs_are_the_isotonic_fit_over_ascending_bits_clipped_at_zero():
    # measured loss increases of a LeNet-5 conv layer at 1, 2, 3, 4, 6, 8 bits, listed in a shuffled order:
    # 4, 6 and 8 bits pool to (-0.00033 + 0.00020 + 0.00001) / 3 = -0.00004, clipped to 0
    raw = {8: 0.00001, 1: 0.06157, 4: -0.00033, 2: 0.00682, 6: 0.00020, 3: 0.00068}
    table = table_with_losses(raw)
    assert table.costs("a") == pytest.approx({1: 0.06157, 2: 0.00682, 3: 0.00068, 4: 0.0, 6: 0.0, 8: 0.0})
    assert table.cost("a", 3) == 0.00068 and table.measure("a", 4) == -0.00033  # rows keep the raw measure
    # a noisy rise in the middle pools: 0.1 at 4 bits and 0.3 at 6 bits become 0.2 each
    assert table_with_losses({2: 0.5, 4: 0.1, 6: 0.3, 8: 0.05}).costs("a") == pytest.approx(
        {2: 0.5, 4: 0.2, 6: 0.2, 8: 0.05})
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ConfigError, match="'a' at 6 bits has a non-finite loss"):
            table_with_losses({2: 0.5, 6: bad}).cost("a", 2)
    with pytest.raises(ConfigError, match="no entry for layer 'a' at 5 bits"):
        table.cost("a", 5)
    with pytest.raises(ConfigError, match="unknown objective"):
        table.costs("a", "speed")
