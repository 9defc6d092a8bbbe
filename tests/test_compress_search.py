"""The Deep Compression settings search: the dial around the default rule, the bisection's choice against a
scripted recipe, the settings file, and a real search on scikit-learn's digits within its budget."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lowbit.compress import save_compressed
from lowbit.compress import search as search_module
from lowbit.compress.rule import rule_bits, rule_kept
from lowbit.compress.search import (
    Settings,
    ladder,
    noise_points,
    probe_epochs,
    scaled,
    search,
    split_validation,
)
from lowbit.data import load_dataset
from lowbit.data.loaders import make_loader
from lowbit.errors import ConfigError
from lowbit.format.container import read_file
from lowbit.models import LeNet300, get_model
from lowbit.train import Trainer


def test_the_dial_scales_the_rule_by_hand():
    model = LeNet300()
    assert scaled(model, 1.0) == Settings({n: 1 - k for n, k in rule_kept(model).items()}, rule_bits(model))
    # kept 0.0521 / 0.1035 / 0.3216 and bits 4 / 5 / 6 at f = 1
    assert scaled(model, 2.0).sparsity == pytest.approx({"ip1": 1 - 0.10421, "ip2": 1 - 0.20703, "ip3": 1 - 0.64328},
                                                        abs=1e-5)
    assert scaled(model, 2.0).bits == {"ip1": 5, "ip2": 6, "ip3": 7}  # log2 2 = 1 more bit
    assert scaled(model, 3.0).sparsity["ip3"] == pytest.approx(1 - 3 * 0.32164, abs=1e-5)
    assert scaled(model, 4.0).sparsity["ip3"] == 0.0  # 4 x 32% is over 1: kept whole
    assert scaled(model, 3.0).bits == {"ip1": 6, "ip2": 7, "ip3": 7}  # round(log2 3) = 2; ip3: 965 kept -> 7 bits
    assert scaled(model, 0.5).bits == {"ip1": 3, "ip2": 4, "ip3": 5}


def test_the_ladder_runs_from_the_most_cautious_and_drops_repeats():
    found = ladder(LeNet300())
    factors = [f for f, _ in found]
    assert factors == sorted(factors, reverse=True) and 1.0 in factors
    for (_, a), (_, b) in zip(found, found[1:]):
        assert a != b
        assert all(b.sparsity[n] >= a.sparsity[n] and b.bits[n] <= a.bits[n] for n in a.sparsity)
    # a 4-input layer keeps every weight whatever the factor (16 inputs per output asked): one setting per bit width
    tiny = ladder(nn.Linear(4, 2), (1.0, 1.1, 1.2))
    assert [f for f, _ in tiny] == [1.2] and tiny[0][1].sparsity == {"": 0.0}


def test_settings_round_trip_and_refuse_bad_files():
    s = Settings({"fc1": 0.9, "fc2": 0.5}, {"fc1": 4, "fc2": 6})
    assert Settings.from_dict(s.to_dict(), ["fc1", "fc2"]) == s
    with pytest.raises(ConfigError, match="model has"):
        Settings.from_dict(s.to_dict(), ["fc1", "fc3"])
    for bad, match in [({**s.to_dict(), "version": 9}, "version"),
                       ({**s.to_dict(), "bits": {"fc1": 4, "fc2": 12}}, "bits of layer 'fc2'"),
                       ({**s.to_dict(), "sparsity": {"fc1": 1.5, "fc2": 0.1}}, "sparsity of layer 'fc1'"),
                       ({**s.to_dict(), "bits": {"fc1": 4}}, "same layers"),
                       ([1, 2], "an object")]:
        with pytest.raises(ConfigError, match=match):
            Settings.from_dict(bad)


def _digits():
    torch.manual_seed(0)
    x, y = load_dataset("digits", "train")
    (tx, ty), (vx, vy) = split_validation(x, y, 300)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    train = make_loader(tx, ty, 64, shuffle=True)
    Trainer(model, train, None, epochs=20, progress=False, optimizer="adam", lr=3e-3).fit()
    return model, train, make_loader(vx, vy, 300)


def test_the_bisection_starts_at_the_default_and_finds_the_last_candidate_within_budget(monkeypatch):
    """A scripted recipe whose error grows as the dial prunes harder: the search must probe the default first,
    pick the last candidate within budget, spend the epochs it says and never probe past ``max_epochs``."""
    model = nn.Linear(1000, 10)  # fan-in 1000: kept = 5% x factor for every factor of the dial
    probed = []

    def fake(model, train, val, config):
        kept = 1 - config.sparsity[""]
        probed.append(round(kept, 4))
        error = 2.0 + 0.005 / kept  # the reference 2.005; kept 5% (f = 1) 2.1, 3.5% (f = 0.7) 2.143, 3% 2.167
        stats = [SimpleNamespace(bytes_huffman=int(1000 * kept))]
        return SimpleNamespace(accuracy={"finetune": 1 - error / 100}, layers=stats)

    monkeypatch.setattr(search_module, "deep_compress", fake)
    monkeypatch.setattr(search_module, "error_points", lambda model, loader: 1.0)
    options = {"rounds": 2, "retrain_epochs": 1, "finetune_epochs": 1}
    result = search(model, [], [], 0.15, options, max_epochs=30)
    # the reference (nothing pruned), the default (f = 1, kept 5%: +0.095, in), f = 0.6 (3%: +0.162, out),
    # f = 0.7 (3.5%: +0.138, in)
    assert probed == [1.0, 0.05, 0.03, 0.035] and result.best.factor == 0.7 and result.epochs == 12
    assert result.reference.error == pytest.approx(2.005) and result.float_error == 1.0
    assert probe_epochs(options, {"": 0.9}) == 3 and probe_epochs({}, {"": 0.95}) == 5 * 3 + 1  # the rule's rounds
    probed.clear()
    limited = search(model, [], [], 0.15, options, max_epochs=8)  # the reference and the default only
    assert limited.epochs <= 8 and len(limited.probes) == 1 and probed == [1.0, 0.05]
    probed.clear()
    cautious = search(model, [], [], 0.05, options, max_epochs=30)  # the default misses: the cautious half
    assert probed[1:] == [0.05, 0.075, 0.1] and cautious.best.factor == 2.0  # f = 1.5 +0.062 out, f = 2 +0.045 in
    probed.clear()
    missed = search(model, [], [], 0.01, options, max_epochs=30)
    assert missed.best is None and probed[1:] == [0.05, 0.075, 0.1, 0.15]
    with pytest.raises(ConfigError, match="at least 6 epochs"):
        search(model, [], [], 0.5, options, max_epochs=5)
    with pytest.raises(ConfigError, match="chooses sparsity"):
        search(model, [], [], 0.5, {"sparsity": 0.9}, max_epochs=30)


def test_a_real_search_meets_its_budget_on_the_validation_slice():
    model, train, val = _digits()
    options = {"rounds": 1, "retrain_epochs": 1, "finetune_epochs": 1, "lr": 0.01}
    result = search(model, train, val, 5.0, options, max_epochs=20)
    assert result.best is not None and result.epochs <= 20 and result.probes[0].factor == 1.0
    assert result.best.error - result.reference.error <= 5.0
    layers = {s.name: s for s in result.best.result.layers}
    assert all(abs(layers[n].kept - (1 - s)) < 0.01 for n, s in result.best.settings.sparsity.items())
    assert all(p.layer_bytes >= result.best.layer_bytes for p in result.probes
               if p.error - result.reference.error <= 5.0)


def test_a_conv_net_with_batch_norms_is_searched_with_them_folded(tmp_path):
    """The search on a residual conv net: its settings name the convs and linears (the batch norms fold into
    them), each probe keeps what its settings say, and the chosen model's file holds no batch norm."""
    x, y = load_dataset("digits", "train")
    (tx, ty), (vx, vy) = split_validation(x, y, 300)
    torch.manual_seed(0)
    model = get_model("resnet-small", in_channels=1, input_size=8, widths=(8, 16, 16), blocks=(1, 1, 1))
    train = make_loader(tx, ty, 64, shuffle=True)
    Trainer(model, train, None, epochs=3, progress=False, optimizer="adam", lr=3e-3).fit()
    options = {"rounds": 1, "retrain_epochs": 1, "finetune_epochs": 0, "lr": 0.01}
    result = search(model, train, make_loader(vx, vy, 300), 100.0, options, max_epochs=3)
    convs = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert result.best is not None and set(result.best.settings.sparsity) == convs and result.epochs == 3
    for probe in result.probes:
        kept = {s.name: s.kept for s in probe.result.layers}
        assert all(abs(kept[n] - (1 - s)) < 0.02 for n, s in probe.settings.sparsity.items())
    path = save_compressed(result.best.result, tmp_path / "searched.lowbit")
    document = read_file(path).document
    assert "batchnorm" not in {n["op"] for n in document["graph"]["nodes"]} and document["model"]["fold_bn"]


def test_the_validation_slice_is_held_out_of_the_training_images():
    x, y = torch.arange(10).float(), torch.arange(10)
    (tx, _), (vx, _) = split_validation(x, y, 3)
    assert tx.tolist() == list(range(7)) and vx.tolist() == [7, 8, 9]
    with pytest.raises(ConfigError, match="from 1 to 9"):
        split_validation(x, y, 10)


def test_the_command_searches_writes_reusable_settings_and_refuses_mixed_choices(tmp_path, capsys):
    from lowbit.cli import main

    def run(argv):
        status = main([*argv, "--json"])
        captured = capsys.readouterr()
        return status, captured

    status, out = run(["train", "--model", "lenet300", "--data", "mnist", "--epochs", "1", "--limit", "600",
                       "--val-size", "100", "--batch-size", "50", "--no-progress", "--out", str(tmp_path / "run")])
    assert status == 0, out.err
    trained = json.loads(out.out)
    assert trained["run"]["val_size"] == 100 and trained["history"][-1]["step"] == 500 // 50  # 100 images held out
    status, out = run(["train", "--model", "lenet300", "--data", "mnist", "--epochs", "1", "--limit", "600",
                       "--val-size", "600", "--no-progress", "--out", str(tmp_path / "none")])
    assert status == 2 and "validation slice must hold from 1 to 599 training examples, got 600" in out.err
    base = ["compress", str(tmp_path / "run" / "best.safetensors"), "--data", "mnist", "--limit", "600",
            "--rounds", "1", "--finetune-epochs", "0"]
    status, out = run([*base, "--out", str(tmp_path / "s.lowbit"), "--max-error-increase", "100",
                       "--search-epochs", "6"])  # the reference and the default: 3 epochs each
    assert status == 0, out.err
    assert "the last 100 training images, held out of the float model's training" in out.err
    found = json.loads(out.out)
    settings_file = tmp_path / "s.settings.json"
    assert found["search"]["settings_file"] == str(settings_file) and found["search"]["epochs"] == 6
    settings = json.loads(settings_file.read_text())
    assert settings == found["search"]["best"]["settings"] and set(settings["sparsity"]) == {"ip1", "ip2", "ip3"}
    status, out = run([*base, "--out", str(tmp_path / "again.lowbit"), "--settings", str(settings_file)])
    assert status == 0, out.err
    kept = {layer["name"]: layer["kept"] for layer in json.loads(out.out)["layers"]}
    assert all(abs(kept[n] - (1 - s)) < 0.01 for n, s in settings["sparsity"].items())
    status, out = run([*base, "--out", str(tmp_path / "x.lowbit"), "--settings", str(settings_file),
                       "--sparsity", "0.5"])
    assert status == 2 and "cannot be combined with --sparsity" in out.err
    assert not (tmp_path / "x.lowbit").exists()


def test_noise_points_by_hand():
    # 1.96 sqrt(2 * 0.5 * 0.5 / 100) = 0.1386 -> 13.86 points; a perfect or hopeless model has no sampling spread
    assert noise_points(50.0, 100) == pytest.approx(13.859, abs=1e-3)
    assert noise_points(1.4, 5000) == pytest.approx(100 * 1.96 * (2 * 0.014 * 0.986 / 5000) ** 0.5)
    assert noise_points(0.0, 5000) == noise_points(100.0, 5000) == 0.0 and noise_points(1.0, 0) == math.inf

