"""Deep Compression end to end on a few hundred digits: compress -> save -> load_state_dict -> same accuracy.

Huffman and relative-index coding themselves are tested in tests/test_huffman.py (bit-exact round
trip, mean length within 1 bit of the entropy, single-symbol streams) and tests/test_sparse.py
(round trips, gaps that need filler zeros); here: the pipeline, the byte accounting and the command.
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lowbit.compress import (
    DeepCompressionConfig,
    cli_command,
    deep_compress,
    layer_stats,
    paper_sparsity,
    save_compressed,
    share_weights,
    shared_layers,
)
from lowbit.compress import pipeline, report
from lowbit.compress.pipeline import accuracy, file_layer_bytes, store_and_verify
from lowbit.compress.report import best_index_bits, coded_bytes, format_table
from lowbit.compress.rule import rule_bits, rule_kept, rule_rounds, rule_sparsity
from lowbit.data import load_dataset, make_loader
from lowbit.errors import ConfigError
from lowbit.models import LeNet5, LeNet300
from lowbit.serialize import load_state_dict
from lowbit.train import Trainer, seed_everything


@pytest.fixture(scope="module")
def digits():
    x, y = load_dataset("digits", "train")
    tx, ty = load_dataset("digits", "test")
    return make_loader(x[:600], y[:600], 64, shuffle=True), make_loader(tx[:300], ty[:300], 100)


@pytest.fixture(scope="module")
def trained(digits):
    seed_everything(0)
    model = LeNet300(input_size=8)
    Trainer(model, digits[0], epochs=4, lr=0.05, schedule="none", progress=False).fit()
    return model


@pytest.fixture(scope="module")
def compressed(trained, digits):
    config = DeepCompressionConfig(sparsity={"ip1": 0.9, "ip2": 0.9, "ip3": 0.7}, bits=4, rounds=2,
                                   retrain_epochs=1, finetune_epochs=1)
    return deep_compress(trained, *digits, config)


def test_stages_reach_the_targets(compressed, trained, digits):
    assert list(compressed.accuracy) == ["float", "prune1", "retrain1", "prune2", "retrain2", "share", "finetune"]
    assert compressed.accuracy["float"] == accuracy(trained, digits[1])  # the input model is left alone
    assert compressed.kept == pytest.approx({"ip1": 0.1, "ip2": 0.1, "ip3": 0.3}, abs=1e-3)
    assert compressed.accuracy["finetune"] > 0.5  # far above chance (0.1) on 10 classes
    for name, layer in shared_layers(compressed.model).items():
        q = layer.weight_quantizer
        values = q(layer.weight)
        assert (values != 0).float().mean().item() == pytest.approx(compressed.kept[name], abs=1e-6)
        assert len(values[values != 0].unique()) <= 2**4 - 1


@pytest.mark.parametrize("entropy", ["huffman", "ans"])
def test_save_then_load_state_dict_gives_the_same_accuracy(compressed, digits, tmp_path, entropy):
    path = save_compressed(compressed, tmp_path / f"m-{entropy}.lowbit", entropy)
    dense = LeNet300(input_size=8)
    dense.load_state_dict(load_state_dict(path))
    shared = compressed.model.eval()
    x = next(iter(digits[1]))[0]
    torch.testing.assert_close(dense(x), shared(x), rtol=0, atol=0)
    assert accuracy(dense, digits[1]) == compressed.accuracy["finetune"]
    for name, layer in shared_layers(shared).items():
        torch.testing.assert_close(dense.get_submodule(name).weight, layer.weight_quantizer(layer.weight),
                                   rtol=0, atol=0)


def test_file_layer_bytes_account_for_every_byte(compressed, tmp_path):
    path = save_compressed(compressed, tmp_path / "m.lowbit")
    per_layer, header = file_layer_bytes(path, ["ip1", "ip2", "ip3"])
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        arrays = json.loads(f.read(n))
    everything = sum(end - begin for k, v in arrays.items() if k != "__metadata__"
                     for begin, end in [v["data_offsets"]])
    assert header == 8 + n
    assert sum(per_layer.values()) == everything  # LeNet-300 has nothing besides its three layers
    assert header + everything == path.stat().st_size
    # the sparse, Huffman-coded file holds far fewer bytes than the float32 parameters
    assert sum(per_layer.values()) < compressed.float_bytes() / 5


def test_store_and_verify_writes_both_files_and_plots(compressed, digits, tmp_path):
    stored = store_and_verify(compressed, LeNet300(input_size=8), tmp_path, digits[1])
    for entropy in ("huffman", "ans"):
        assert stored[entropy]["loaded_accuracy"] == compressed.accuracy["finetune"]
        layer_bytes = stored[entropy]["layer_bytes"]
        assert stored[entropy]["ratio_layers"] == pytest.approx(compressed.float_bytes() / layer_bytes)
    for plot in stored["plots"]:
        assert open(plot, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_layer_stats_by_hand():
    # 1 x 40 weights, non-zeros at positions 0, 1 and 39; 2-bit gaps (at most 3): 37 zeros before
    # position 39 need 9 fillers (every 4 positions), so 3 + 9 = 12 entries
    layer = nn.Linear(40, 1)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[0, [0, 1, 39]] = torch.tensor([1.0, -1.0, 1.0])
    shared = share_weights(nn.Sequential(layer), bits=2)
    stats = layer_stats("0", shared_layers(shared)["0"], index_bits=2)
    assert (stats.weights, stats.nonzero, stats.entries, stats.biases) == (40, 3, 12, 1)
    assert stats.kept == pytest.approx(3 / 40)
    # P+Q: 12 entries x (2 + 2) bits = 6 bytes, plus 4 float32 centroids and 1 float32 bias
    assert stats.bytes_pq == 6 + 4 * 4 + 4
    assert stats.float_bytes == 4 * 41
    # values: 9 filler zeros, 1.0 twice, -1.0 once; gaps: 0, 0, nine 3s, 1. Both have counts 9, 2, 1,
    # i.e. Huffman lengths 1, 2, 2: 9 + 4 + 2 = 15 bits, stored in 2 bytes -> 16 / 12 bits per entry
    assert stats.huffman_weight_bits == pytest.approx(16 / 12)
    assert stats.huffman_index_bits == pytest.approx(16 / 12)


def test_paper_sparsity_and_unknown_layers():
    assert paper_sparsity(LeNet5()) == pytest.approx({"conv1": 0.34, "conv2": 0.88, "ip1": 0.92, "ip2": 0.81})
    assert paper_sparsity(LeNet300()) == pytest.approx({"ip1": 0.92, "ip2": 0.91, "ip3": 0.74})
    with pytest.raises(ConfigError, match="sparsity"):
        paper_sparsity(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ConfigError, match="not both"):
        DeepCompressionConfig(sparsity=0.9, quality=1.0)
    with pytest.raises(ConfigError, match="rounds"):
        DeepCompressionConfig(rounds=0)


def test_cli_command_compresses_a_checkpoint(trained, digits, tmp_path):
    checkpoint = Trainer(trained, digits[0], epochs=1, progress=False).save_checkpoint(tmp_path / "float.safetensors")
    parser = argparse.ArgumentParser()
    cli_command.add_arguments(parser)
    out = tmp_path / "new" / "model.lowbit"  # a directory that does not exist yet
    args = parser.parse_args([str(checkpoint), "--data", "digits", "--out", str(out), "--rounds", "1",
                              "--sparsity", "ip1=0.8,ip2=0.8,ip3=0.5", "--bits", "4", "--limit", "300",
                              "--finetune-epochs", "0"])
    text, data = cli_command.run(args)
    assert out.is_file() and data["file_bytes"] == out.stat().st_size
    assert "ip1" in text and "compression" in text
    header = next(line for line in text.splitlines() if line.startswith("layer"))
    assert header.split() == ["layer", "weights", "kept", "w", "bits", "i", "bits", "w", "huff", "i", "huff", "w",
                              "ans", "i", "ans", "P+Q", "+Huff", "+ANS", "file"]  # the paper's Tables 2-3, + ANS
    assert sum(line.startswith(("ip1 ", "ip2 ", "ip3 ", "total ")) for line in text.splitlines()) == 4
    assert [Path(p).name for p in data["plots"]] == ["model-weight_distribution.png", "model-tradeoff.png"]
    assert all(Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in data["plots"])
    assert data["kept"] == pytest.approx({"ip1": 0.2, "ip2": 0.2, "ip3": 0.5}, abs=1e-3)
    assert data["accuracy"]["loaded"] == data["accuracy"]["share"]
    assert data["ratio_layers"] > data["ratio_file"] > 1
    json.dumps(data)  # JSON-able
    with pytest.raises(ConfigError, match="whole numbers"):
        cli_command.run(parser.parse_args([str(checkpoint), "--data", "digits", "--out", str(out), "--bits", "4.5"]))


def test_best_index_bits_trades_fillers_against_table_size():
    dense = np.arange(1, 50)  # no zeros: every gap is 0 whatever the width, so the narrowest wins
    assert best_index_bits(dense) == 2
    # rows of 64 codes whose first 48 are dead inputs: the paper's 5-bit gaps need a filler per row,
    # 6-bit gaps none
    rows = np.zeros((200, 64), dtype=np.int64)
    rows[:, 48:] = np.random.default_rng(0).integers(1, 4, size=(200, 16))
    flat = rows.reshape(-1)
    assert best_index_bits(flat) >= 6
    assert coded_bytes(flat, best_index_bits(flat)) < coded_bytes(flat, 5)
    assert coded_bytes(flat, best_index_bits(flat)) == min(coded_bytes(flat, b) for b in range(2, 13))


def test_auto_index_bits_and_no_ans_package(trained, digits, monkeypatch):
    monkeypatch.setattr(report, "ans_available", lambda: False)
    monkeypatch.setattr(pipeline, "ans_available", lambda: False)
    config = DeepCompressionConfig(sparsity=0.8, bits=3, rounds=1, retrain_epochs=0, finetune_epochs=0,
                                   index_bits="auto")
    result = deep_compress(trained, *digits, config)
    for s in result.layers:
        codes = shared_layers(result.model)[s.name].weight_quantizer.indices.numpy()
        assert s.index_bits == best_index_bits(codes)
        assert s.bytes_ans is None and s.ans_weight_bits is None
    assert result.to_dict()["bytes_ans"] is None
    assert "+ANS" not in [p["stage"] for p in pipeline.tradeoff_points(result)]
    assert "-" in format_table(result.layers)


def test_the_default_rule_by_hand():
    # weights: conv 72 (share 0.009, fan-in 9), fc 1000 (share 1/8, fan-in 125), fc 6928 (share 0.866, fan-in 433)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.Linear(125, 8), nn.Linear(433, 16))
    kept = rule_kept(model)
    assert kept["0"] == 1.0  # 16 inputs per output asked of a 9-input conv: kept whole
    assert kept["1"] == pytest.approx(16 / 125)  # the fan-in floor beats 0.05 * 8^(1/3) = 0.1
    assert kept["2"] == pytest.approx(0.05 * (8000 / 6928) ** (1 / 3))  # 5.25%
    assert rule_sparsity(model) == pytest.approx({name: 1 - k for name, k in kept.items()})
    # 4 + round(log10(1 / share)) + 1 for a conv: log10 111.1 = 2.05, log10 8 = 0.90, log10 1.155 = 0.06; the conv
    # keeps 72 weights: 7 bits capped at floor(log2(72 / 4)) = 4 (a centroid per 4 kept weights at least)
    assert rule_bits(model) == {"0": 4, "1": 5, "2": 4}
    # strength 2: kept doubled (the conv stays whole), one more bit; 0.5: one bit fewer, never below 2
    assert rule_kept(model, 2.0) == pytest.approx({"0": 1.0, "1": 2 * 16 / 125, "2": 2 * kept["2"]})
    assert rule_bits(model, 2.0) == {"0": 4, "1": 6, "2": 5} and rule_bits(model, 0.5) == {"0": 4, "1": 4, "2": 3}
    assert rule_bits(nn.Linear(1000, 2), 0.01) == {"": 2}
    assert rule_rounds(rule_sparsity(model)) == 5  # 1 / 0.0525 = 19.1 -> 2^5 = 32 >= 19.1 > 2^4
    assert rule_rounds({"a": 0.5}) == 1 and rule_rounds({"a": 0.0}) == 1 and rule_rounds({"a": 0.75}) == 2
    assert rule_rounds({"a": 1.0}) == 10  # pruned to nothing: counted as 1/1000 kept


def test_the_rule_on_the_lenets_prunes_the_big_fc_layers_hardest():
    lenet300 = rule_kept(LeNet300())  # 0.05 * (266200 / n)^(1/3) for n = 235200, 30000, 1000
    assert lenet300 == pytest.approx({"ip1": 0.05211, "ip2": 0.10351, "ip3": 0.32164}, abs=1e-5)
    assert rule_bits(LeNet300()) == {"ip1": 4, "ip2": 5, "ip3": 6}
    lenet5 = rule_kept(LeNet5())
    assert lenet5 == pytest.approx({"conv1": 0.64, "conv2": 0.1291, "ip1": 0.05124, "ip2": 0.22077}, abs=1e-4)
    assert rule_bits(LeNet5()) == {"conv1": 6, "conv2": 6, "ip1": 4, "ip2": 6}  # conv1: 8 capped, 320 kept


def test_the_default_config_follows_the_rule(trained, digits):
    config = DeepCompressionConfig(retrain_epochs=0, finetune_epochs=0)
    result = deep_compress(trained, *digits, config)
    assert len(result.rounds) == rule_rounds(rule_sparsity(trained))
    # LeNet300(input_size=8): ip1 64x300, ip2 300x100, ip3 100x10 -> ip1's share is 0.38, ip2's fan-in 300
    assert result.kept == pytest.approx(rule_kept(trained), abs=1e-3)
    bits = rule_bits(trained)
    for s in result.layers:
        assert s.weight_bits == bits[s.name]
        codes = shared_layers(result.model)[s.name].weight_quantizer.indices.numpy()
        assert s.index_bits == best_index_bits(codes)  # index widths chosen per layer by default


def test_the_paper_recipe_keeps_the_papers_choices(trained, digits, tmp_path):
    checkpoint = Trainer(trained, digits[0], epochs=1, progress=False).save_checkpoint(tmp_path / "float.safetensors")
    parser = argparse.ArgumentParser()
    cli_command.add_arguments(parser)
    base = [str(checkpoint), "--data", "digits", "--out", str(tmp_path / "p.lowbit"), "--rounds", "1",
            "--retrain-epochs", "0", "--finetune-epochs", "0", "--limit", "300", "--recipe", "deep-compression-paper"]
    _, data = cli_command.run(parser.parse_args(base))
    assert data["kept"] == pytest.approx({"ip1": 0.08, "ip2": 0.09, "ip3": 0.26}, abs=1e-3)
    assert {s["name"]: (s["weight_bits"], s["index_bits"]) for s in data["layers"]} == {
        "ip1": (6, 5), "ip2": (6, 5), "ip3": (6, 5)}
    _, data = cli_command.run(parser.parse_args([*base, "--bits", "3"]))  # an explicit option wins
    assert {s["weight_bits"] for s in data["layers"]} == {3}
    with pytest.raises(ConfigError, match="fixes the per-layer settings"):
        cli_command.run(parser.parse_args([*base, "--max-error-increase", "1"]))
