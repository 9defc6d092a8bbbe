"""Bit allocation: exact knapsack optimum against brute force, budgets respected, configs that round-trip."""

import argparse
import itertools
import json

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import lowbit
from lowbit.analysis.allocate import (TIE_RTOL, Allocation, allocate_bits, allocate_for_loss, allocate_like_uniform,
                                     combine, smallest_bytes)
from lowbit.analysis.sensitivity import Sensitivity, SensitivityTable, layer_config, measure_sensitivity
from lowbit.config import QuantConfig
from lowbit.errors import ConfigError


def synthetic(sizes: dict[str, dict[int, int]], losses: dict[str, dict[int, float]], other: int = 0):
    """A sensitivity table with the given bytes and logit MSE (= accuracy drop = loss increase) per entry."""
    layers = list(sizes)
    bits = sorted(next(iter(sizes.values())))
    rows = [Sensitivity(layer=n, bits=b, accuracy_drop=losses[n][b], loss_increase=losses[n][b],
                        logit_mse=losses[n][b], sqnr_db=None, bytes=sizes[n][b]) for n in layers for b in bits]
    return SensitivityTable(layers=layers, bits=bits, act_bits=None, examples=1, float_accuracy=1.0,
                            float_loss=0.0, other_bytes=other, rows=rows)


def two_layers(sensitive: str) -> SensitivityTable:
    # two layers of 1000 weights: 2 bits -> 250 bytes, 8 bits -> 1000 bytes; one is 100x more sensitive
    sizes = {name: {2: 250, 8: 1000} for name in ("a", "b")}
    losses = {name: {2: 10.0 if name == sensitive else 0.1, 8: 0.0} for name in ("a", "b")}
    return synthetic(sizes, losses, other=16)


@pytest.mark.parametrize("sensitive, dull", [("a", "b"), ("b", "a")])
def test_the_sensitive_layer_gets_the_bits(sensitive, dull):
    # budget 16 + 1250: exactly one layer can have 8 bits; giving them to the sensitive layer costs 0.1, not 10
    allocation = allocate_bits(two_layers(sensitive), 1266)
    assert allocation.bits == {sensitive: 8, dull: 2}
    assert allocation.predicted_bytes == 1266
    assert allocation.predicted_loss == pytest.approx(0.1)
    assert allocate_bits(two_layers(sensitive), 1265).bits == {"a": 2, "b": 2}  # one byte short: no room for 8 bits
    assert allocate_bits(two_layers(sensitive), 2016).bits == {"a": 8, "b": 8}


def test_ties_of_predicted_loss_spend_the_budget():
    # 4 and 8 bits both cost 0: (4, 4) at 1000 B, (4, 8) / (8, 4) at 1500 B and (8, 8) at 2000 B tie at loss 0
    sizes = {name: {2: 250, 4: 500, 8: 1000} for name in ("a", "b")}
    losses = {name: {2: 1.0, 4: 0.0, 8: 0.0} for name in ("a", "b")}
    table = synthetic(sizes, losses, other=16)
    assert allocate_bits(table, 1016).bits == {"a": 4, "b": 4}
    for budget in (1516, 1700, 2015):
        allocation = allocate_bits(table, budget)
        assert sorted(allocation.bits.values()) == [4, 8]
        assert allocation.predicted_bytes == 1516 and allocation.predicted_loss == 0
    assert allocate_bits(table, 2016).bits == {"a": 8, "b": 8}
    # bytes never buy loss: at 1515 B, (2, 8) would spend 1266 B for loss 1; (4, 4) spends 1016 B for 0
    assert allocate_bits(table, 1515).bits == {"a": 4, "b": 4}


@pytest.mark.parametrize("noisy", [{2: 1.0, 4: 0.001, 8: 0.002}, {2: 1.0, 4: -0.001, 8: 0.0}])
def test_noise_at_high_bits_does_not_keep_the_layer_at_fewer_bits(noisy):
    # measured 8 bits worse than 4 (or 4 better than float) is noise: the isotonic fit pools 4 and 8 bits,
    # so they tie and the budget buys 8 bits; minimising the raw measures would stop at 4 bits
    table = synthetic({"a": {2: 250, 4: 500, 8: 1000}}, {"a": noisy})
    assert table.cost("a", 4) == table.cost("a", 8) == max(0.0, (noisy[4] + noisy[8]) / 2)
    assert allocate_bits(table, 1000).bits == {"a": 8}
    assert allocate_bits(table, 999).bits == {"a": 4}


def test_a_far_more_sensitive_layer_still_gets_the_bits_under_noise():
    # b's measures are noise around 0 (negative at 8 bits, rising at 4), a's fall 1000-fold: room for one
    # layer at 8 bits goes to a (predicted 0.01 + 0.02 against 10 + 0)
    sizes = {name: {2: 250, 4: 500, 8: 1000} for name in ("a", "b")}
    losses = {"a": {2: 10.0, 4: 1.0, 8: 0.01}, "b": {2: 0.01, 4: 0.03, 8: -0.02}}
    table = synthetic(sizes, losses)
    assert [table.cost("b", b) for b in (2, 4, 8)] == [pytest.approx(0.02), pytest.approx(0.02), 0.0]
    allocation = allocate_bits(table, 1500)
    assert allocation.bits == {"a": 8, "b": 4}  # b at 4 rather than 2: same predicted loss, budget spent
    assert allocation.predicted_loss == pytest.approx(0.03)
    assert allocate_bits(table, 1250).bits == {"a": 8, "b": 2}


def brute_force(table: SensitivityTable, fits) -> list[tuple[float, int, dict[str, int]]]:
    """Every combination (loss, size, bits) that ``fits(loss, size)``."""
    out = []
    for combo in itertools.product(table.bits, repeat=len(table.layers)):
        bits = dict(zip(table.layers, combo))
        size = table.other_bytes + sum(table.row(n, b).bytes for n, b in bits.items())
        loss = sum(table.cost(n, b) for n, b in bits.items())
        if fits(loss, size):
            out.append((loss, size, bits))
    return out


tables = st.integers(1, 3).flatmap(lambda layers: st.tuples(
    st.lists(st.integers(0, 300), min_size=3 * layers, max_size=3 * layers),
    st.lists(st.one_of(st.just(0.0), st.floats(0, 50), st.floats(-1, 0)), min_size=3 * layers,
             max_size=3 * layers),
    st.integers(0, 20),
))


def table_of(draw) -> SensitivityTable:
    sizes, losses, other = draw
    names = [f"l{i}" for i in range(len(sizes) // 3)]
    bits = (2, 4, 8)
    return synthetic({n: {b: sizes[3 * i + j] for j, b in enumerate(bits)} for i, n in enumerate(names)},
                     {n: {b: losses[3 * i + j] for j, b in enumerate(bits)} for i, n in enumerate(names)}, other)


@settings(max_examples=60, deadline=None)
@given(tables, st.integers(0, 1000))
def test_budget_allocation_is_the_brute_force_optimum_and_fits_exactly(drawn, budget):
    table = table_of(drawn)
    feasible = brute_force(table, lambda loss, size: size <= budget)
    if budget < smallest_bytes(table):
        assert not feasible
        with pytest.raises(ConfigError, match="below the smallest model"):
            allocate_bits(table, budget)
        return
    allocation = allocate_bits(table, budget)
    size = table.other_bytes + sum(table.row(n, b).bytes for n, b in allocation.bits.items())
    assert allocation.predicted_bytes == size <= budget
    assert allocation.granularity == 1
    least = min(loss for loss, _, _ in feasible)
    assert allocation.predicted_loss == pytest.approx(least, abs=1e-9)
    # tie-break: of the least-loss choices, the one that spends the most bytes
    assert allocation.predicted_bytes == max(size for loss, size, _ in feasible if loss <= least * (1 + 1e-9))


@settings(max_examples=60, deadline=None)
@given(tables, st.floats(0, 100))
@example(([0] * 9, [0.0, 0.0, 2.220446049250313e-16, 0.0, 0.0, 0.0, 0.0, 0.0, 1.5], 0), 0.5)  # a float-sum tie
def test_loss_budget_gives_the_smallest_size(drawn, max_loss):
    table = table_of(drawn)
    # the budget holds within the relative TIE_RTOL the allocator grants float sums (max_loss 0.5 met by 0.5 + 2e-16)
    feasible = brute_force(table, lambda loss, size: loss <= max_loss * (1 + TIE_RTOL))
    if not feasible:
        with pytest.raises(ConfigError, match="least possible"):
            allocate_for_loss(table, max_loss, objective="logit_mse")
        return
    allocation = allocate_for_loss(table, max_loss, objective="logit_mse")
    assert allocation.predicted_loss <= max_loss * (1 + TIE_RTOL)
    assert allocation.predicted_bytes == min(size for _, size, _ in feasible)


def test_like_uniform_is_smaller_where_a_layer_is_insensitive():
    # a: small and sensitive, b: large and robust. Uniform 4 bits: 16 + 100 + 500 = 616 B at predicted loss
    # 0.2 + 0.05 = 0.25. (8, 2): 16 + 200 + 250 = 466 B at 0 + 0.1 predicts less loss in fewer bytes;
    # (4, 2) at 366 B predicts 0.3, too much; every choice with a at 2 bits predicts >= 1
    sizes = {"a": {2: 50, 4: 100, 8: 200}, "b": {2: 250, 4: 500, 8: 1000}}
    losses = {"a": {2: 1.0, 4: 0.2, 8: 0.0}, "b": {2: 0.1, 4: 0.05, 8: 0.0}}
    table = synthetic(sizes, losses, other=16)
    allocation = allocate_like_uniform(table, 4, objective="logit_mse")
    assert allocation.bits == {"a": 8, "b": 2}
    assert allocation.predicted_bytes == 466 and allocation.max_loss == pytest.approx(0.25)
    assert allocation.predicted_loss == pytest.approx(0.1)
    # equal sensitivities: nothing cheaper predicts as little loss, so the uniform model itself comes back
    even = synthetic({n: sizes["b"] for n in "ab"}, {n: {2: 1.0, 4: 0.5, 8: 0.0} for n in "ab"}, other=16)
    assert allocate_like_uniform(even, 4).bits == {"a": 4, "b": 4}
    with pytest.raises(ConfigError, match="3 bits is not a candidate"):
        allocate_like_uniform(table, 3)
    with pytest.raises(ConfigError, match="objective"):
        allocate_like_uniform(table, 4, objective="speed")


@settings(max_examples=40, deadline=None)
@given(tables, st.sampled_from([2, 4, 8]))
def test_like_uniform_never_predicts_more_loss_or_bytes_than_uniform(drawn, bits):
    table = table_of(drawn)
    uniform_bytes = table.other_bytes + sum(table.row(n, bits).bytes for n in table.layers)
    uniform_loss = sum(table.cost(n, bits, "logit_mse") for n in table.layers)
    allocation = allocate_like_uniform(table, bits, objective="logit_mse")
    assert allocation.predicted_bytes <= uniform_bytes
    assert allocation.predicted_loss <= uniform_loss * (1 + 1e-9) + 1e-12
    feasible = brute_force(table, lambda loss, size: loss <= uniform_loss * (1 + 1e-9))
    assert allocation.predicted_bytes == min(size for _, size, _ in feasible)


def test_coarse_granularity_still_fits_the_budget():
    sizes = {n: {2: 251 + i, 4: 503 + i, 8: 1001 + i} for i, n in enumerate("abc")}
    losses = {n: {2: 3.0 * (i + 1), 4: 1.0 * (i + 1), 8: 0.0} for i, n in enumerate("abc")}
    table = synthetic(sizes, losses)
    for budget in range(1000, 3100, 97):
        coarse = allocate_bits(table, budget, max_states=10)
        assert coarse.granularity == -(-budget // 10)
        assert coarse.predicted_bytes <= budget
        assert coarse.predicted_loss >= allocate_bits(table, budget).predicted_loss
    # 760 >= 756 bytes (all 2-bit) fits, but not once each size is rounded up to 76-byte units
    assert allocate_bits(table, 760).bits == {"a": 2, "b": 2, "c": 2}
    with pytest.raises(ConfigError, match="granularity=1"):
        allocate_bits(table, 760, max_states=10)


def test_bad_arguments_are_config_errors():
    table = two_layers("a")
    with pytest.raises(ConfigError, match="objective"):
        allocate_bits(table, 5000, objective="speed")
    with pytest.raises(ConfigError, match="budget_bytes"):
        allocate_bits(table, 1500.5)
    with pytest.raises(ConfigError, match="granularity"):
        allocate_bits(table, 1500, granularity=0)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="max_loss"):
            allocate_for_loss(table, bad)
    nan_table = synthetic({"a": {2: 1, 8: 4}}, {"a": {2: float("nan"), 8: 0.0}})
    with pytest.raises(ConfigError, match="'a'.*non-finite"):
        allocate_bits(nan_table, 10)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 16),
                         nn.ReLU(), nn.Linear(16, 3)).eval()


@pytest.mark.parametrize("act_bits", [None, 8])
def test_written_config_round_trips_through_quantize_at_the_predicted_size(tmp_path, act_bits):
    model = small_net()
    images = torch.randn(64, 1, 8, 8)
    labels = model(images).argmax(1)
    table = measure_sensitivity(model, images, labels, bits=(1, 2, 4, 8), act_bits=act_bits)
    budget = (smallest_bytes(table) + sum(table.row(n, 8).bytes for n in table.layers) + table.other_bytes) // 2
    allocation = allocate_bits(table, budget, objective="loss")
    path = tmp_path / "config.json"
    path.write_text(allocation.config().to_json())
    config = QuantConfig.from_json(path.read_text())
    assert config == allocation.config()
    quantized = lowbit.quantize(model, config)
    if act_bits is not None:
        lowbit.calibrate(quantized, [images])
    rows = lowbit.summary(quantized).layers
    assert {r.name: r.weight_bits for r in rows} == allocation.bits
    assert {r.input_bits for r in rows} == {act_bits or 32}
    assert lowbit.summary(quantized).total_bytes == allocation.predicted_bytes <= budget
    assert isinstance(allocation, Allocation)
    assert json.loads(json.dumps(allocation.to_dict()))["bits"] == allocation.bits


def test_allocate_command_writes_a_config_quantize_accepts(tmp_path):
    from lowbit import workflow
    from lowbit.analysis import allocate_command

    trained = workflow.train("lenet300", "digits", epochs=1, out_dir=tmp_path / "run", limit=200, progress=False)
    parser = argparse.ArgumentParser()
    allocate_command.add_arguments(parser)
    out = tmp_path / "config.json"
    args = parser.parse_args([str(tmp_path / "run"), "--budget-kb", "40", "--out", str(out),
                              "--calib-size", "100", "--bits", "2", "4", "8"])
    result = allocate_command.run(args)
    assert result.data["allocation"]["predicted_bytes"] <= 40_000
    quantized = lowbit.quantize(trained.model, QuantConfig.from_json(out.read_text()))
    assert lowbit.summary(quantized).total_bytes == result.data["allocation"]["predicted_bytes"]
    args = parser.parse_args([str(tmp_path / "run"), "--max-drop", "1", "--out", str(out),
                              "--calib-size", "100"])
    assert allocate_command.run(args).data["allocation"]["max_loss"] == pytest.approx(0.01)
    args = parser.parse_args([str(tmp_path / "run"), "--match-bits", "4", "--out", str(out),
                              "--calib-size", "100", "--bits", "2", "4", "8"])
    matched = allocate_command.run(args).data["allocation"]
    uniform = lowbit.summary(lowbit.quantize(trained.model, layer_config({n: 4 for n in matched["bits"]})))
    assert matched["predicted_bytes"] <= uniform.total_bytes
    quantized = lowbit.quantize(trained.model, QuantConfig.from_json(out.read_text()))
    assert lowbit.summary(quantized).total_bytes == matched["predicted_bytes"]


def test_input_table_bytes_are_the_layer_inputs_at_batch_one():
    """Hand count for small_net on 8x8 images: conv input 1x8x8 = 64 values, first linear 4*6*6 = 144, last 16."""
    model = small_net()
    images = torch.randn(64, 1, 8, 8)
    table = measure_sensitivity(model, images, model(images).argmax(1), bits=(2, 3, 8), role="input")
    numel = {"0": 64, "4": 144, "6": 16}
    assert table.role == "input" and table.other_bytes == 0 and table.act_bits is None
    for name, n in numel.items():
        for b in (2, 3, 8):
            assert table.row(name, b).bytes == -(-n * b // 8)
    # a quantized input changes the logits (8-bit noise is small but not zero)
    assert all(table.row(name, 2).logit_mse > table.row(name, 8).logit_mse > 0 for name in numel)


def test_input_allocation_spends_its_budget_on_the_sensitive_layer_and_combines_with_weights(tmp_path):
    model = small_net()
    images = torch.randn(64, 1, 8, 8)
    labels = model(images).argmax(1)
    inputs = synthetic({"a": {2: 100, 8: 400}, "b": {2: 100, 8: 400}}, {"a": {2: 1.0, 8: 0.0}, "b": {2: 0.1, 8: 0.0}})
    inputs.role, inputs.other_bytes = "input", 0
    chosen = allocate_bits(inputs, 500)
    assert chosen.bits == {"a": 8, "b": 2} and chosen.role == "input" and chosen.predicted_bytes == 500
    assert "input bits" in str(chosen) and chosen.to_dict()["role"] == "input"

    weight_table = measure_sensitivity(model, images, labels, bits=(2, 8))
    input_table = measure_sensitivity(model, images, labels, bits=(2, 4, 8), role="input")
    weights = allocate_bits(weight_table, smallest_bytes(weight_table) + 100)
    budget = sum(input_table.row(n, 4).bytes for n in input_table.layers)
    activations = allocate_bits(input_table, budget)
    assert activations.predicted_bytes <= budget
    config = QuantConfig.from_json(combine(weights, activations).to_json())
    quantized = lowbit.quantize(model, config)
    lowbit.calibrate(quantized, [images])
    rows = lowbit.summary(quantized).layers
    assert {r.name: r.weight_bits for r in rows} == weights.bits
    assert {r.name: r.input_bits for r in rows} == activations.bits
    only_inputs = lowbit.quantize(model, activations.config())
    assert {r.name: r.weight_bits for r in lowbit.summary(only_inputs).layers} == {"0": 32, "4": 32, "6": 32}
    with pytest.raises(ConfigError, match="roles"):
        combine(activations, weights)


def test_input_role_arguments_are_checked():
    model = small_net()
    images = torch.randn(8, 1, 8, 8)
    labels = torch.zeros(8, dtype=torch.long)
    with pytest.raises(ConfigError, match="role"):
        measure_sensitivity(model, images, labels, role="output")
    with pytest.raises(ConfigError, match="act_bits"):
        measure_sensitivity(model, images, labels, role="input", act_bits=8)
    with pytest.raises(ConfigError, match="act_bits"):  # 1 bit is not a uniform input width
        measure_sensitivity(model, images, labels, bits=(1, 4), role="input")


def test_allocate_command_chooses_input_bits_under_an_input_budget(tmp_path):
    from lowbit import workflow
    from lowbit.analysis import allocate_command

    trained = workflow.train("lenet300", "digits", epochs=1, out_dir=tmp_path / "run", limit=200, progress=False)
    parser = argparse.ArgumentParser()
    allocate_command.add_arguments(parser)
    out, tables = tmp_path / "config.json", tmp_path / "tables.json"
    plot = tmp_path / "bits.png"
    args = parser.parse_args([str(tmp_path / "run"), "--budget-kb", "40", "--act-budget-kb", "1", "--out", str(out),
                              "--calib-size", "100", "--bits", "2", "4", "8", "--table", str(tables),
                              "--plot", str(plot)])
    result = allocate_command.run(args)
    inputs = result.data["input_allocation"]
    assert inputs["role"] == "input" and inputs["predicted_bytes"] <= 1000  # inputs: 784 + 300 + 100 values
    assert [t["role"] for t in json.loads(tables.read_text())] == ["weight", "input"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    quantized = lowbit.quantize(trained.model, QuantConfig.from_json(out.read_text()))
    rows = lowbit.summary(quantized).layers
    assert {r.name: r.input_bits for r in rows} == inputs["bits"]
    assert {r.name: r.weight_bits for r in rows} == result.data["allocation"]["bits"]
    with pytest.raises(SystemExit):  # one input width for all, or a per-layer budget: not both
        parser.parse_args([str(tmp_path / "run"), "--budget-kb", "40", "--act-bits", "8", "--act-budget-kb", "1",
                           "--out", str(out)])


def test_allocation_figure_draws_the_chosen_bits_and_circles_them():
    from lowbit.analysis.plots_cost import allocation_figure, plot_allocation

    table = two_layers("a")
    allocation = allocate_bits(table, 1266)  # a 8 bits, b 2 bits
    figure = allocation_figure([(table, allocation)])
    bars, costs = figure.axes
    assert [p.get_height() for p in bars.patches] == [8, 2]
    assert [t.get_text() for t in bars.texts] == ["80%", "20%"]  # 1000 and 250 of the 1250 layer bytes
    circled = {tuple(line.get_xdata()): tuple(line.get_ydata()) for line in costs.lines if len(line.get_xdata()) == 1}
    assert circled == {(8,): (0.0,), (2,): (pytest.approx(0.1),)}
    with pytest.raises(ConfigError, match="at least one"):
        plot_allocation([], "never.png")
    titled = allocation_figure([(table, allocation)], titles=["net"])
    assert [ax.get_title() for ax in titled.axes] == ["net: weight bits per layer (1,266 B)",
                                                        "net: predicted loss (circled: chosen)"]
    with pytest.raises(ConfigError, match="2 titles for 1"):
        allocation_figure([(table, allocation)], titles=["a", "b"])
