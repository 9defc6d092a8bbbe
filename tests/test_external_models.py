"""Models from outside lowbit (--model package.module:function, --model-args, --weights, --input-shape) and the
commands that take them, on a tiny folder of images and a model module written to tmp_path."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import lowbit
from lowbit.errors import ConfigError
from lowbit.models.external import (build_external, load_weights_file, parse_import_path, parse_input_shape,
                                    parse_model_args, read_state_dict)
from test_cli_hardening import json_error
from test_cli_workflow import run_error, run_json

MODULE = "tiny_external_nets"
SOURCE = '''
import torch
from torch import nn

def build(width=4, classes=3, channels=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))

class Factory:
    @staticmethod
    def make(**kwargs):
        return build(**kwargs)

def not_a_model():
    return 42

def fails(width=4):
    raise ValueError(f"width {width} is not supported")

answer = 42
'''


@pytest.fixture
def nets(tmp_path, monkeypatch):
    """The module MODULE on sys.path (and a second one whose import fails), removed from sys.modules after."""
    (tmp_path / f"{MODULE}.py").write_text(SOURCE)
    (tmp_path / "broken_external_nets.py").write_text("import a_dependency_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in (MODULE, "broken_external_nets"):
        sys.modules.pop(name, None)


def reference(**kwargs):
    namespace: dict = {}
    exec(SOURCE, namespace)
    return namespace["build"](**kwargs)


@pytest.fixture
def weights(tmp_path, nets):
    """A trained-looking state of build(width=4): random weights and batch-norm statistics."""
    model = reference(width=4)
    generator = torch.Generator().manual_seed(1)
    state = {k: (torch.rand(v.shape, generator=generator) + 0.5 if v.is_floating_point() else v)
             for k, v in model.state_dict().items()}
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    return path, state


@pytest.fixture
def images(tmp_path):
    """imagefolder:DIR with classes a, b, c, four 8x8 PNGs each."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for label in "abc":
        (root / label).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    return root


# ------------------------------------------------------------------------------------------- the library side


def test_build_with_arguments_and_safetensors_weights(nets, weights):
    path, state = weights
    model = build_external(f"{MODULE}:build", {"width": 4}, path)
    assert not model.training
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    also = build_external(f"{MODULE}:Factory.make", {"width": 4, "classes": 3}, path)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(model(x), also(x))


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_torch_state_dicts_plain_or_wrapped(nets, weights, tmp_path, wrap):
    _, state = weights
    path = tmp_path / "w.pth"
    torch.save(state if wrap is None else {"epoch": 3, wrap: state, "optimizer": {"lr": 0.1}}, path)
    assert read_state_dict(path).keys() == state.keys()
    model = build_external(f"{MODULE}:build", {}, path)
    assert torch.equal(model[0].weight, state["0.weight"])


@pytest.mark.parametrize("text", ["tiny", "tiny:", ":build", "a-b:build", "tiny:build:x", "tiny:1x", "./m.py:f"])
def test_malformed_import_paths(text):
    with pytest.raises(ConfigError, match=f"--model {text!r} is not an import path: give package.module:function"):
        parse_import_path(text)


@pytest.mark.parametrize("text, kwargs, message", [
    ("no_such_module_here:build", {}, "module 'no_such_module_here' is not importable \\(no module named "
                                      "'no_such_module_here'"),
    ("broken_external_nets:build", {}, "importing module 'broken_external_nets' failed: No module named "
                                       "'a_dependency_that_is_not_installed'"),
    (f"{MODULE}:missing", {}, f"'{MODULE}' has no attribute 'missing'"),
    (f"{MODULE}:Factory.nothing", {}, "'Factory' has no attribute 'nothing'"),
    (f"{MODULE}:answer", {}, "names a int, not a function or class to call"),
    (f"{MODULE}:fails", {"width": 5}, f"{MODULE}:fails\\(width=5\\) raised ValueError: width 5 is not supported"),
    (f"{MODULE}:build", {"depth": 2}, "build\\(depth=2\\) raised TypeError: .*unexpected keyword argument 'depth'"),
    (f"{MODULE}:not_a_model", {}, "not_a_model\\(\\) returned a int, not a torch nn.Module"),
])
def test_import_and_construction_errors(nets, text, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        build_external(text, kwargs)


def test_weights_errors_name_the_file(nets, weights, tmp_path):
    path, state = weights
    model = reference(width=4)
    with pytest.raises(ConfigError, match=f"weights {str(tmp_path / 'none.safetensors')!r} does not exist"):
        build_external(f"{MODULE}:build", {}, tmp_path / "none.safetensors")
    with pytest.raises(ConfigError, match="give a .safetensors file or a .pt / .pth state_dict"):
        build_external(f"{MODULE}:build", {}, tmp_path / "w.ckpt")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ConfigError, match=f"weights {str(tmp_path / 'bad.safetensors')!r} cannot be read"):
        load_weights_file(model, tmp_path / "bad.safetensors")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="bad.pt' cannot be read"):
        load_weights_file(model, tmp_path / "bad.pt")
    torch.save({"layer": torch.nn.Linear(2, 2)}, tmp_path / "module.pt")  # a pickled module: weights_only refuses
    with pytest.raises(ConfigError, match="module.pt' cannot be read: UnpicklingError"):
        load_weights_file(model, tmp_path / "module.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ConfigError, match="hold a list, not a state_dict"):
        load_weights_file(model, tmp_path / "list.pt")
    # width 6 against width-4 weights: every tensor of the first layers differs in shape
    with pytest.raises(ConfigError, match=f"weights {str(path)!r} do not fit {MODULE}:build: shape mismatch: "
                                          r"0.weight \[4, 3, 3, 3\] in the file, \[6, 3, 3, 3\] in the model"):
        build_external(f"{MODULE}:build", {"width": 6}, path)
    partial = {k: v for k, v in state.items() if k != "5.bias"} | {"extra.weight": torch.zeros(1)}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ConfigError, match=r"missing keys \(in the model, not in the file\): 5.bias; unexpected keys "
                                          r"\(in the file, not in the model\): extra.weight"):
        load_weights_file(model, tmp_path / "partial.safetensors")


def test_option_parsers():
    assert parse_model_args(None) == {} and parse_model_args('{"width": 4}') == {"width": 4}
    with pytest.raises(ConfigError, match="--model-args is not valid JSON"):
        parse_model_args("{width: 4}")
    with pytest.raises(ConfigError, match="must be a JSON object of keyword arguments, got a JSON list"):
        parse_model_args("[4]")
    assert parse_input_shape("3, 32,32") == (3, 32, 32) and parse_input_shape(None) is None
    for bad in ("3,32", "3,0,32", "a,b,c", "3,32,32,1"):
        with pytest.raises(ConfigError, match="--input-shape must be C,H,W"):
            parse_input_shape(bad)


# ------------------------------------------------------------------------------------------- the command line


def test_quantize_an_external_model_on_an_image_folder(nets, weights, images, tmp_path, capsys):
    path, _ = weights
    out = tmp_path / "ext.lowbit"
    status, done, _ = run_json(capsys, ["quantize", "--model", f"{MODULE}:build", "--model-args", '{"width": 4}',
                                        "--weights", str(path), "--data", f"imagefolder:{images}", "--image-size", "8",
                                        "--resize", "8", "--calib-batches", "1", "--out", str(out)])
    assert status == 0 and out.is_file()
    assert done["model"] == f"{MODULE}:build" and done["data"] == f"imagefolder:{images}"
    loaded = lowbit.load(out)
    assert tuple(loaded.lowbit_input_shape) == (1, 3, 8, 8)
    assert loaded(torch.zeros(2, 3, 8, 8)).shape == (2, 3)
    # eval crops the folder to the file's input shape (8x8, from the file) with the same resize
    status, evaluated, _ = run_json(capsys, ["eval", str(out), "--data", f"imagefolder:{images}", "--resize", "8"])
    assert status == 0 and evaluated["examples"] == 12 and 0 <= evaluated["accuracy"] <= 1
    assert evaluated["data"] == f"imagefolder:{images}"


def test_quantize_without_data_needs_an_input_shape(nets, weights, tmp_path, capsys):
    path, _ = weights
    out = tmp_path / "m.lowbit"
    argv = ["quantize", "--model", f"{MODULE}:build", "--weights", str(path), "--preset", "w8a8", "--out", str(out)]
    assert "needs --data to calibrate on (or --calib-batches 0 and --input-shape C,H,W)" in run_error(capsys, argv)
    status, done, _ = run_json(capsys, [*argv[:-2], "--calib-batches", "0", "--input-shape", "3,16,16",
                                        "--out", str(out)])
    assert status == 2 and done["error"]["type"] == "CalibrationError"  # w8a8's input ranges need calibration
    argv = ["quantize", "--model", f"{MODULE}:build", "--weights", str(path), "--config", str(tmp_path / "c.json"),
            "--calib-batches", "0", "--input-shape", "3,16,16", "--out", str(out)]
    config = lowbit.QuantConfig(weight={"name": "uniform", "bits": 4, "symmetric": True}, input=None,
                                first="float", last="float")
    (tmp_path / "c.json").write_text(config.to_json())
    status, done, _ = run_json(capsys, argv)
    assert status == 0 and done["data"] is None and tuple(lowbit.load(out).lowbit_input_shape) == (1, 3, 16, 16)


def test_export_and_allocate_take_an_external_model(nets, weights, images, tmp_path, capsys):
    path, _ = weights
    onnx_file = tmp_path / "m.onnx"
    status, done, _ = run_json(capsys, ["export", "--model", f"{MODULE}:build", "--weights", str(path),
                                        "--input-shape", "3,8,8", "--out", str(onnx_file)])
    assert status == 0 and onnx_file.is_file() and done["input_shape"] == [-1, 3, 8, 8]
    assert done["source"] == f"{MODULE}:build"
    config = tmp_path / "config.json"
    status, done, _ = run_json(capsys, ["allocate", "--model", f"{MODULE}:build", "--weights", str(path),
                                        "--data", f"imagefolder:{images}", "--image-size", "8", "--resize", "8",
                                        "--calib-size", "12", "--bits", "4", "8", "--budget-kb", "1",
                                        "--out", str(config)])
    assert status == 0 and config.is_file() and done["model"] == f"{MODULE}:build"
    assert done["data"] == f"imagefolder:{images}"
    lowbit.QuantConfig.from_json(config.read_text())


def test_a_folder_with_more_classes_than_outputs_is_named(nets, weights, images, tmp_path, capsys):
    path, _ = weights
    (images / "d").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / "d" / "0.png")
    error = json_error(capsys, ["allocate", "--model", f"{MODULE}:build", "--weights", str(path), "--data",
                                f"imagefolder:{images}", "--image-size", "8", "--budget-kb", "1",
                                "--out", str(tmp_path / "c.json")])
    assert error["type"] == "ConfigError" and "the model has 3 outputs but the labels reach 3" in error["message"]


@pytest.mark.parametrize("extra, message", [
    (["--model-args", "[1]"], "--model-args must be a JSON object of keyword arguments, got a JSON list"),
    (["--model-args", "{"], "--model-args is not valid JSON"),
    (["--input-shape", "3x8x8"], "--input-shape must be C,H,W"),
    (["--weights", "nowhere.safetensors"], "weights 'nowhere.safetensors' does not exist"),
    (["--data", "cifar10", "--input-shape", "3,8,8"], "--input-shape 3,8,8 does not match cifar10 images, 3,32,32"),
    (["--data", "digits", "--image-size", "8"], "--image-size goes with --data imagefolder:DIR, not 'digits'"),
    (["--data", "imagefolder:x", "--image-size", "9", "--input-shape", "3,8,8"],
     "--image-size 9 does not match --input-shape 3,8,8"),
    (["--data", "imagefolder:x", "--input-shape", "4,8,8"], "the model takes 4 input channels"),
])
def test_bad_external_options_are_one_json_error(nets, tmp_path, capsys, extra, message):
    argv = ["quantize", "--model", f"{MODULE}:build", "--calib-batches", "1", "--out", str(tmp_path / "m.lowbit"),
            *extra]
    error = json_error(capsys, argv)
    assert error["type"] == "ConfigError" and message in error["message"], error
    assert not (tmp_path / "m.lowbit").exists()


@pytest.mark.parametrize("argv, message", [
    (["quantize", "lenet5", "--weights", "w.safetensors"], "--weights goes with --model package.module:function"),
    (["quantize", "lenet5", "--model-args", "{}", "--input-shape", "1,28,28"],
     "--model-args and --input-shape go with --model package.module:function"),
    (["quantize", "somewhere", "--model", "tiny:build"], "give its weights with --weights, not as the source"),
    (["quantize"], "quantize needs a checkpoint or a model name, or --model package.module:function"),
    (["quantize", "--model", "no_such_module_here:build", "--calib-batches", "0", "--input-shape", "3,8,8"],
     "module 'no_such_module_here' is not importable"),
    (["quantize", "--model", "not a path:x"], "is not an import path"),
    (["export", "--model", "tiny:build"], "has no recorded input shape: give --input-shape C,H,W or --data"),
    (["export"], "export needs a .lowbit file or a training checkpoint"),
    (["allocate", "--budget-kb", "1"], "allocate needs a float training checkpoint"),
    (["allocate", "--budget-kb", "1", "--model", "tiny:build"], "needs --data, the images its sensitivity"),
    (["eval", "missing.lowbit", "--image-size", "8"], "does not exist"),
])
def test_misplaced_options_are_named(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    line = run_error(capsys, [*argv, "--out", "m.out"] if argv[0] != "eval" else argv)
    assert message in line, line


def test_eval_checks_image_options_before_reading(tmp_path, capsys):
    model = lowbit.quantize(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2)), "w8a8")
    lowbit.calibrate(model, [torch.randn(4, 3, 2, 2)])
    lowbit.save(model.eval(), tmp_path / "m.lowbit", example_input=torch.zeros(1, 3, 2, 2))
    line = run_error(capsys, ["eval", str(tmp_path / "m.lowbit"), "--data", "digits", "--mean", "0.5,0.5,0.5"])
    assert "--mean goes with --data imagefolder:DIR" in line
    line = run_error(capsys, ["eval", str(tmp_path / "m.lowbit"), "--data", f"imagefolder:{tmp_path / 'none'}"])
    assert f"image folder {tmp_path / 'none'} does not exist" in line


def test_a_module_in_the_current_directory_imports(tmp_path, monkeypatch):
    (tmp_path / "cwd_external_nets.py").write_text(SOURCE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    before = list(sys.path)
    try:
        model = build_external("cwd_external_nets:build", {"width": 2})
    finally:
        sys.modules.pop("cwd_external_nets", None)
    assert model[0].out_channels == 2 and sys.path == before
