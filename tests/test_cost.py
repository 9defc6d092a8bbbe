"""Cost report: LeNet-5's MACs, BOPs, memory and energy against a hand count; user energy tables; the PNG."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.analysis.cost import EnergyTable, cost_report, file_cost_report, mac_precision
from lowbit.analysis.plots_cost import plot_cost
from lowbit.config import LayerRule, QuantConfig, uniform_act, uniform_weight
from lowbit.errors import ConfigError
from lowbit.models import get_model

# LeNet-5 on 28x28: conv1 20 maps of 24x24, 5x5x1 kernels; pool -> 12x12; conv2 50 maps of 8x8, 5x5x20 kernels;
# pool -> 4x4; ip1 800 -> 500; ip2 500 -> 10
MACS = {"conv1": 20 * 24 * 24 * 25, "conv2": 50 * 8 * 8 * 20 * 25, "ip1": 500 * 800, "ip2": 10 * 500}
IN_OUT = {"conv1": (28 * 28, 20 * 24 * 24), "conv2": (20 * 12 * 12, 50 * 8 * 8), "ip1": (800, 500), "ip2": (500, 10)}
BITS = {"conv1": (8, 32), "conv2": (1, 1), "ip1": (4, 4), "ip2": (32, 32)}  # (weight bits, input bits)


def lenet5_mixed():
    torch.manual_seed(0)
    config = QuantConfig(first="same", last="same", rules=[
        LayerRule(pattern="conv1", weight=uniform_weight(8)),
        LayerRule(pattern="conv2", weight={"name": "binary"}, input={"name": "binary"}),
        LayerRule(pattern="ip1", weight=uniform_weight(4), input=uniform_act(4)),
        LayerRule(pattern="ip2", skip=True),
    ])
    model = lowbit.quantize(get_model("lenet5"), config)
    return lowbit.calibrate(model, [torch.randn(8, 1, 28, 28)])


def test_lenet5_macs_and_bops_equal_a_hand_count():
    assert MACS == {"conv1": 288_000, "conv2": 1_600_000, "ip1": 400_000, "ip2": 5_000}
    report = cost_report(lenet5_mixed(), (1, 1, 28, 28))
    rows = {r.name: r for r in report.layers}
    assert list(rows) == list(MACS)
    for name, macs in MACS.items():
        w, a = BITS[name]
        assert (rows[name].weight_bits, rows[name].input_bits) == (w, a)
        assert rows[name].macs == macs
        assert rows[name].bops == macs * w * a
    assert (rows["conv1"].macs_float, rows["conv2"].macs_binary, rows["ip1"].macs_int, rows["ip2"].macs_float) \
        == (288_000, 1_600_000, 400_000, 5_000)
    total = report.total()
    assert total["macs"] == 2_293_000
    assert (total["macs_binary"], total["macs_int"], total["macs_float"]) == (1_600_000, 400_000, 293_000)
    assert total["bops"] == 288_000 * 8 * 32 + 1_600_000 + 400_000 * 16 + 5_000 * 1024
    assert lowbit.summary(lenet5_mixed(), (1, 1, 28, 28)).total_bops == total["bops"]


def test_lenet5_memory_and_energy_by_hand():
    model = lenet5_mixed()
    report = cost_report(model, torch.zeros(1, 1, 28, 28))
    rows = {r.name: r for r in report.layers}
    sizes = {r.name: r.bytes for r in lowbit.summary(model).layers}
    for name, (n_in, n_out) in IN_OUT.items():
        a = BITS[name][1]
        assert rows[name].activation_bytes == math.ceil(n_in * a / 8) + 4 * n_out  # outputs stay float32
        assert rows[name].weight_bytes == sizes[name]
        assert rows[name].weight_pj == pytest.approx(math.ceil(sizes[name] / 4) * 640)
        assert rows[name].activation_pj == pytest.approx(math.ceil(rows[name].activation_bytes / 4) * 5)
    # per MAC: float 3.7 + 0.9; binary 0.03 / 4; 4x4-bit 0.2 * 16 / 64 + 0.1; conv1 has float inputs
    assert rows["conv1"].compute_pj == pytest.approx(288_000 * 4.6)
    assert rows["conv2"].compute_pj == pytest.approx(1_600_000 * 0.0075)
    assert rows["ip1"].compute_pj == pytest.approx(400_000 * 0.15)
    assert rows["ip2"].compute_pj == pytest.approx(5_000 * 4.6)
    total = report.total()
    assert total["activation_peak_bytes"] == 784 * 4 + 20 * 24 * 24 * 4
    assert total["weight_bytes"] == lowbit.summary(model).total_bytes
    assert total["energy_pj"] == pytest.approx(sum(r.energy_pj for r in report.layers))
    assert json.loads(json.dumps(report.to_dict()))["total"]["macs"] == 2_293_000
    assert "total" in str(report)


def test_user_energy_table():
    table = EnergyTable.from_json('{"fp32_mult": 1.0, "fp32_add": 1.0, "xnor_popcount": 0.5}')
    assert table.mac_pj(32, 32) == 2.0 and table.mac_pj(1, 32) == 1.0 and table.mac_pj(1, 1) == 0.5
    assert table.mac_pj(8, 8) == pytest.approx(0.2 + 0.1)  # untouched keys keep Horowitz's values
    assert EnergyTable().mac_pj(16, 16) == pytest.approx(0.2 * 4 + 0.1)
    report = cost_report(lenet5_mixed(), (1, 1, 28, 28), {"dram_read_32bit": 0.0, "sram_read_32bit": 0.0})
    assert report.total()["energy_pj"] == pytest.approx(report.total()["compute_pj"])
    with pytest.raises(ConfigError, match="unknown key"):
        EnergyTable.from_dict({"fp64_mult": 1.0})
    with pytest.raises(ConfigError, match="not valid JSON"):
        EnergyTable.from_json("{")


@settings(max_examples=30, deadline=None)
@given(st.one_of(st.just(float("nan")), st.just(float("inf")), st.just(-float("inf")), st.floats(max_value=-1e-300),
                 st.floats(min_value=1e6, exclude_min=True), st.just("1"), st.just(True)))
def test_bad_energy_values_are_config_errors(value):
    with pytest.raises(ConfigError, match="'int8_add' must be a number of pJ from 0 to 1e\\+06"):
        EnergyTable(int8_add=value)


@pytest.mark.parametrize("text", ['{"fp32_add": Infinity}', '{"fp32_add": NaN}', '{"fp32_add": 1e400}',
                                  '{"fp32_add": 2e6}', '{"fp32_add": -0.5}'])
def test_energy_tables_from_json_reject_absurd_values_by_key(text):
    with pytest.raises(ConfigError, match="energy table entry 'fp32_add'"):
        EnergyTable.from_json(text)
    assert EnergyTable.from_json('{"fp32_add": 1e6}').fp32_add == 1e6


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 16), st.integers(1, 16), st.floats(0, 1e6), st.floats(0, 1e6))
def test_integer_mac_energy_grows_with_bits(w, a, mult, add):
    table = EnergyTable(int8_mult=mult, int32_add=add)
    if (w, a) != (1, 1):
        assert mac_precision(w, a) == "int"
        assert table.mac_pj(w, a) <= table.mac_pj(min(w + 1, 16), a) + 1e-9 * table.mac_pj(16, 16)


def test_batch_must_be_one_and_plot_and_file(tmp_path):
    model = lenet5_mixed()
    with pytest.raises(ConfigError, match="batch 1"):
        cost_report(model, (2, 1, 28, 28))
    path = plot_cost(cost_report(model, (1, 1, 28, 28)), tmp_path / "cost.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lowbit.save(model, tmp_path / "m.lowbit", example_input=torch.zeros(1, 1, 28, 28))
    from_file = file_cost_report(tmp_path / "m.lowbit")
    assert [(r.macs, r.bops) for r in from_file.layers] == [(MACS[n], MACS[n] * w * a) for n, (w, a) in BITS.items()]
