"""The Deep Compression settings search: sensitivity curves, the one-dial candidates, the bisection's choice
against a scripted recipe, the settings file, and a real search on scikit-learn's digits within its budget."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lowbit.compress import search as search_module
from lowbit.compress.search import (
    Curves,
    Settings,
    candidates,
    error_points,
    probe_epochs,
    search,
    sensitivity,
    settings_at,
    split_validation,
)
from lowbit.data import load_dataset
from lowbit.data.loaders import make_loader
from lowbit.errors import ConfigError
from lowbit.train import Trainer

_increase = st.floats(-2, 30, allow_nan=False)


@st.composite
def _curves(draw):
    layers = draw(st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=4, unique=True))
    sparsity = {n: {s: draw(_increase) for s in (0.5, 0.8, 0.9, 0.95)} for n in layers}
    bits = {n: {b: draw(_increase) for b in (2, 4, 6, 8)} for n in layers}
    return Curves(1.0, sparsity, bits)


@settings(max_examples=80, deadline=None)
@given(_curves(), st.floats(0, 30), st.floats(0, 30))
def test_a_higher_tolerance_never_gives_a_larger_setting(curves, t1, t2):
    low, high = sorted((t1, t2))
    a, b = settings_at(curves, low), settings_at(curves, high)
    for name in curves.sparsity:
        assert b.sparsity[name] >= a.sparsity[name] and b.bits[name] <= a.bits[name]
        # each choice is the extreme one within the tolerance
        within = [s for s, e in curves.sparsity[name].items() if e <= high]
        assert b.sparsity[name] == max(within, default=0.0)


@settings(max_examples=50, deadline=None)
@given(_curves())
def test_candidates_are_distinct_and_ordered_from_the_most_cautious(curves):
    found = candidates(curves)
    assert found[0][0] == 0.0
    tolerances = [t for t, _ in found]
    assert tolerances == sorted(tolerances) and len(set(tolerances)) == len(tolerances)
    assert all(found[i][1] != found[i + 1][1] for i in range(len(found) - 1))
    assert found[-1][1] == settings_at(curves, 1e9)  # the last one: every layer at its extreme


def test_hand_worked_settings():
    curves = Curves(1.0, {"fc1": {0.5: 0.0, 0.9: 0.3, 0.95: 2.0}, "fc2": {0.5: 0.1, 0.9: 5.0, 0.95: 9.0}},
                    {"fc1": {2: 4.0, 4: 0.2, 8: 0.0}, "fc2": {2: 1.0, 4: 0.5, 8: -0.1}})
    assert settings_at(curves, 0.0) == Settings({"fc1": 0.5, "fc2": 0.0}, {"fc1": 8, "fc2": 8})
    assert settings_at(curves, 0.3) == Settings({"fc1": 0.9, "fc2": 0.5}, {"fc1": 4, "fc2": 8})
    assert [t for t, _ in candidates(curves)] == [0.0, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 4.0, 5.0, 9.0]


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


def test_sensitivity_restores_every_weight_and_measures_each_layer_alone():
    model, _, val = _digits()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    curves = sensitivity(model, val, sparsities=(0.0, 0.5, 0.99), bits=(1, 8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert curves.error == error_points(model, val)
    assert set(curves.sparsity) == {"1", "3"} and all(c[0.0] == 0.0 for c in curves.sparsity.values())
    assert curves.sparsity["1"][0.99] > 10  # 99% of the first layer gone: far worse
    assert curves.bits["1"][1] > curves.bits["1"][8]


def test_the_bisection_finds_the_last_candidate_within_budget(monkeypatch):
    """A scripted recipe whose error grows with the candidate's tolerance: the search must pick the last
    candidate within budget, spend the epochs it says and never probe past ``max_epochs``."""
    curves = Curves(2.0, {"fc": {s: 10 * s for s in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)}}, {"fc": {8: 0.0}})
    monkeypatch.setattr(search_module, "sensitivity", lambda *a, **k: curves)
    probed = []

    def fake(model, train, val, config):
        probed.append(config.sparsity["fc"])
        error = 2.0 + (1.0 if config.sparsity["fc"] > 0.55 else 0.1)  # within +0.5 up to 0.5 sparsity
        stats = [SimpleNamespace(bytes_huffman=int(1000 * (1 - config.sparsity["fc"])))]
        return SimpleNamespace(accuracy={"finetune": 1 - error / 100}, layers=stats)

    monkeypatch.setattr(search_module, "deep_compress", fake)
    options = {"rounds": 2, "retrain_epochs": 1, "finetune_epochs": 1}
    result = search(nn.Linear(2, 2), [], [], 0.5, options, max_epochs=30)
    # the reference (nothing pruned: 2.1%), then candidates 0.0, 0.1, ..., 0.8: probes 0.4 (in), 0.6 (out), 0.5 (in)
    assert probed == [0.0, 0.4, 0.6, 0.5] and result.best.settings.sparsity == {"fc": 0.5} and result.epochs == 12
    assert result.reference.error == pytest.approx(2.1)
    assert probe_epochs(options) == 3
    limited = search(nn.Linear(2, 2), [], [], 0.5, options, max_epochs=8)
    assert limited.epochs <= 8 and len(limited.probes) == 1
    with pytest.raises(ConfigError, match="at least 6 epochs"):
        search(nn.Linear(2, 2), [], [], 0.5, options, max_epochs=5)
    with pytest.raises(ConfigError, match="chooses sparsity"):
        search(nn.Linear(2, 2), [], [], 0.5, {"sparsity": 0.9}, max_epochs=30)


def test_a_real_search_meets_its_budget_on_the_validation_slice():
    model, train, val = _digits()
    options = {"rounds": 1, "retrain_epochs": 1, "finetune_epochs": 1, "lr": 0.01}
    result = search(model, train, val, 5.0, options, max_epochs=20)
    assert result.best is not None and result.epochs <= 20
    assert result.best.error - result.reference.error <= 5.0
    layers = {s.name: s for s in result.best.result.layers}
    assert all(abs(layers[n].kept - (1 - s)) < 0.01 for n, s in result.best.settings.sparsity.items())
    assert all(p.layer_bytes >= result.best.layer_bytes for p in result.probes
               if p.error - result.reference.error <= 5.0)


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
                       "--no-progress", "--out", str(tmp_path / "run")])
    assert status == 0, out.err
    base = ["compress", str(tmp_path / "run" / "best.safetensors"), "--data", "mnist", "--limit", "600",
            "--rounds", "1", "--finetune-epochs", "0"]
    status, out = run([*base, "--out", str(tmp_path / "s.lowbit"), "--max-error-increase", "100",
                       "--search-epochs", "2", "--val-size", "100"])  # the reference and one probe
    assert status == 0, out.err
    found = json.loads(out.out)
    settings_file = tmp_path / "s.settings.json"
    assert found["search"]["settings_file"] == str(settings_file) and found["search"]["epochs"] == 2
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
