"""The accuracy budget: the drop it reports is measured, it holds, the most sensitive layers go first."""

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import lowbit
from lowbit.analysis.budget import fit_budget, with_raised
from lowbit.analysis.sensitivity import measure_sensitivity
from lowbit.config import preset
from lowbit.errors import CalibrationError, ConfigError


@pytest.fixture(scope="module")
def digits():
    """A 3-layer MLP trained on scikit-learn's 8x8 digits: calibration batches, a held-out slice and the net."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16
    y = torch.tensor(data.target)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                        nn.Linear(32, 10))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x[:1200]), y[:1200]).backward()
        optimizer.step()
    return [x[:256], x[256:512]], x[1200:], y[1200:], net.eval()


def accuracy(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())


def test_the_budget_holds_and_the_reported_drop_is_measured(digits):
    batches, x, y, net = digits
    config = {**preset("w2a2").to_dict(), "first": "same", "last": "same"}
    plain = lowbit.calibrate(lowbit.quantize(net, config), batches)
    plain_drop = 100 * (accuracy(net, x, y) - accuracy(plain, x, y))
    assert plain_drop > 3  # 2-bit everywhere loses accuracy: the budget has work to do
    result = fit_budget(net, config, batches, x, y, max_drop=1.0)
    assert result.drop <= 1.0
    assert result.drop == pytest.approx(100 * (accuracy(net, x, y) - accuracy(result.model, x, y)))
    assert 0 < len(result.raised) <= 4
    assert result.trials[0] == (0, pytest.approx(plain_drop))
    # the raised layers are the noisiest ones alone, in that order
    table = measure_sensitivity(net, x, y, bits=[2], act_bits=2)
    noise = {row.layer: row.logit_mse for row in table.rows}
    ranked = sorted(noise, key=lambda n: -noise[n])
    assert [name for name, _ in result.raised] == ranked[:len(result.raised)]
    for name, module in result.model.named_modules():
        if name in dict(result.raised):
            assert module.weight_quantizer.bits == 8 and module.input_quantizer.bits == 8


def test_a_model_within_budget_is_left_as_configured(digits):
    batches, x, y, net = digits
    result = fit_budget(net, "w8a8", batches, x, None, max_drop=5.0)
    assert result.raised == [] and len(result.trials) == 1
    assert result.metric == "agreement" and result.float_score == 1.0


def test_an_unreachable_budget_is_a_typed_error(digits):
    batches, x, y, net = digits
    # a zero budget: even with every ranked layer at 8 bits some held-out example changes its class
    with pytest.raises(CalibrationError, match="no allocation meets a drop of 0 points"):
        fit_budget(net, {**preset("w2a2").to_dict(), "output": {"name": "uniform", "bits": 2, "dynamic": False}},
                   batches, x, y, max_drop=0.0)


def test_bad_budgets_and_non_uniform_configs_are_rejected(digits):
    batches, x, y, net = digits
    with pytest.raises(ConfigError, match="percentage points"):
        fit_budget(net, "w4a8", batches, x, y, max_drop=-1)
    with pytest.raises(ConfigError, match="uniform"):
        fit_budget(net, "log4", batches, x, y, max_drop=1)


def test_raised_layers_match_their_names_exactly():
    config = with_raised(preset("w4a8"), ["layer[1]", "a*b"])
    rules = config.rules[:2]
    assert [r.pattern for r in rules] == ["layer[[]1]", "a[*]b"]
    assert rules[0].matches("layer[1]", nn.Linear(1, 1)) and not rules[1].matches("axxb", nn.Linear(1, 1))
