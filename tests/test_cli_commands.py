"""`lowbit run` (torch-free runtime) and `lowbit quantize --config` (a config written by `lowbit allocate`)."""

import json

import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.data import load_dataset
from lowbit.models import get_model


def test_run_matches_the_torch_model_on_real_images(tmp_path, capsys):
    torch.manual_seed(0)
    config = {"weight": {"name": "xnor"}, "input": {"name": "binary"}, "first": "float", "last": "float"}
    model = lowbit.quantize(get_model("lenet5"), config).eval()
    images, labels = load_dataset("mnist", "test")
    images, labels = images[:96], labels[:96]
    path = tmp_path / "binary.lowbit"
    lowbit.save(model, path, example_input=images[:1])
    assert main(["run", str(path), "--limit", "96", "--batch-size", "40", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    with torch.no_grad():
        expected = (lowbit.load(path)(images).argmax(1) == labels).float().mean().item()
    assert out["images"] == 96 and out["binary_layers"]
    assert abs(out["accuracy"] - expected) <= 1 / 96  # at most one image on a float tie


def test_run_of_a_missing_file_is_one_line(tmp_path, capsys):
    assert main(["run", str(tmp_path / "none.lowbit")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_quantize_takes_a_config_file(tmp_path, capsys):
    config = lowbit.QuantConfig(weight={"name": "uniform", "bits": 4, "symmetric": True}, input=None,
                                first="float", last="float")
    (tmp_path / "config.json").write_text(config.to_json())
    out_file = tmp_path / "m.lowbit"
    argv = ["quantize", "lenet300", "--config", str(tmp_path / "config.json"), "--calib-batches", "0",
            "--out", str(out_file), "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["preset"].endswith("config.json") and out_file.is_file()
    rows = {r["name"]: r for r in lowbit.serialize.inspect_file(out_file)["tensors"]}
    assert rows["ip2.weight"]["codec"] == "affine" and rows["ip1.weight"]["codec"] == "float32"


def test_quantize_refuses_preset_and_config_together(tmp_path, capsys):
    argv = ["quantize", "lenet300", "--config", "c.json", "--preset", "w8a8", "--out", str(tmp_path / "m")]
    assert main(argv) == 2
    assert "either --preset or --config" in capsys.readouterr().err


def test_train_with_a_recipe_on_digits(tmp_path, capsys):
    argv = ["train", "--recipe", "bwn", "--data", "digits", "--model", "vgg-small", "--epochs", "1",
            "--limit", "256", "--out", str(tmp_path / "run"), "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["recipe"] == "bwn" and 0.0 <= out["final_acc"] <= 1.0
    assert (tmp_path / "run" / "last.safetensors").is_file()


def test_recipe_refuses_quant_and_train_needs_model_or_recipe(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--recipe", "bnn", "--quant", "w8a8", "--data", "digits", "--out", out]) == 2
    assert "drop --quant" in capsys.readouterr().err
    assert main(["train", "--data", "digits", "--out", out]) == 2
    assert "train needs --model" in capsys.readouterr().err
    assert main(["train", "--model", "vgg-small", "--data", "digits", "--out", out]) == 2
    assert "'vgg-small' has no default epochs" in capsys.readouterr().err


def test_compress_runs_deep_compression_end_to_end(tmp_path, capsys):
    torch.manual_seed(0)
    checkpoint = tmp_path / "run" / "last.safetensors"
    from lowbit.train.checkpoint import save_checkpoint

    model = get_model("lenet300")
    save_checkpoint(checkpoint, {f"model.{k}": v for k, v in model.state_dict().items()}, {})
    # the run directory stands for its last checkpoint, as for quantize, allocate and export
    argv = ["compress", str(checkpoint.parent), "--data", "mnist", "--model", "lenet300", "--limit", "256",
            "--rounds", "1", "--retrain-epochs", "1", "--finetune-epochs", "1", "--sparsity", "0.9",
            "--out", str(tmp_path / "dc.lowbit"), "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert (tmp_path / "dc.lowbit").is_file()
    state = lowbit.load_state_dict(tmp_path / "dc.lowbit")
    assert float((state["ip1.weight"] == 0).float().mean()) >= 0.85
    assert json.dumps(out)  # one JSON object


def test_export_writes_an_onnx_file_that_onnxruntime_runs(tmp_path, capsys):
    import numpy as np
    import onnxruntime

    model = lowbit.quantize(get_model("lenet5"), "w8a8")
    images, _ = load_dataset("mnist", "test")
    lowbit.calibrate(model, [images[:64]])
    lowbit.save(model, tmp_path / "m.lowbit", example_input=images[:1])
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", str(tmp_path / "m.lowbit"), "--format", "onnx", "--out", str(onnx_path), "--json"]) == 0
    json.loads(capsys.readouterr().out)
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = images[:32].numpy()
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        want = lowbit.load(tmp_path / "m.lowbit")(images[:32]).numpy()
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()
    assert callable(lowbit.export_onnx)


@pytest.mark.parametrize("multiple, pads", [(1, 0), (4, 1)])
def test_export_channel_multiple_pads_the_one_channel_int8_conv(tmp_path, multiple, pads):
    import onnx

    model = lowbit.quantize(get_model("vgg-small", layers=(8, "M"), hidden=16), "w8a8")
    images, _ = load_dataset("mnist", "test")
    lowbit.calibrate(model, [images[:64]])
    lowbit.save(model, tmp_path / "m.lowbit", example_input=images[:1])
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", str(tmp_path / "m.lowbit"), "--out", str(onnx_path),
                 "--channel-multiple", str(multiple), "--weight-type", "int8"]) == 0
    assert [node.op_type for node in onnx.load(onnx_path).graph.node].count("Pad") == pads


@pytest.mark.parametrize("binary_ops, custom", [("float", 0), ("custom", 1)])  # first and last layers 8-bit
def test_export_binary_ops_writes_sign_bit_ops_for_binary_weights(tmp_path, binary_ops, custom):
    import onnx

    model = lowbit.quantize(get_model("vgg-small", layers=(8, "M"), hidden=16), "bwn")
    images, _ = load_dataset("mnist", "test")
    lowbit.calibrate(model, [images[:64]])
    lowbit.save(model, tmp_path / "m.lowbit", example_input=images[:1])
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", str(tmp_path / "m.lowbit"), "--out", str(onnx_path), "--binary-ops", binary_ops]) == 0
    nodes = onnx.load(onnx_path).graph.node
    assert sum(node.domain == "ai.lowbit" for node in nodes) == custom


def _lenet5_file(tmp_path, config="w8a8"):
    torch.manual_seed(0)
    model = lowbit.quantize(get_model("lenet5"), config)
    lowbit.calibrate(model, [torch.randn(8, 1, 28, 28)])
    path = tmp_path / "m.lowbit"
    lowbit.save(model.eval(), path, example_input=torch.zeros(1, 1, 28, 28))
    return model, path


def test_inspect_reports_the_cost_of_one_inference(tmp_path, capsys):
    from lowbit.analysis.cost import cost_report

    model, path = _lenet5_file(tmp_path, "xnor")
    assert main(["inspect", str(path), "--plot", str(tmp_path / "cost.png"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    expected = cost_report(model, (1, 1, 28, 28)).to_dict()
    assert info["cost"]["total"] == pytest.approx(expected["total"])
    assert [r["bops"] for r in info["cost"]["layers"]] == [r["bops"] for r in expected["layers"]]
    assert info["cost"]["total"]["macs_binary"] > 0  # xnor's inner layers are binary x binary
    assert (tmp_path / "cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "conv1.weight" in text and "BOPs" in text and "energy" in text


def test_inspect_takes_an_energy_table(tmp_path, capsys):
    _, path = _lenet5_file(tmp_path)
    (tmp_path / "energy.json").write_text(json.dumps({"dram_read_32bit": 0, "sram_read_32bit": 0}))
    assert main(["inspect", str(path), "--energy-table", str(tmp_path / "energy.json"), "--json"]) == 0
    total = json.loads(capsys.readouterr().out)["cost"]["total"]
    assert total["weight_pj"] == 0 and total["activation_pj"] == 0 and total["energy_pj"] == total["compute_pj"] > 0
    (tmp_path / "energy.json").write_text(json.dumps({"dram": 1}))
    assert main(["inspect", str(path), "--energy-table", str(tmp_path / "energy.json")]) == 2
    assert "unknown key" in capsys.readouterr().err


def test_inspect_without_a_graph_has_no_cost_report(tmp_path, capsys):
    path = tmp_path / "m.lowbit"
    config = {"weight": {"name": "uniform", "bits": 8}, "input": None, "first": "same", "last": "same"}
    lowbit.save(lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(16, 4)), config), path)  # no example input
    assert main(["inspect", str(path), "--json"]) == 0
    assert "cost" not in json.loads(capsys.readouterr().out)
    assert main(["inspect", str(path), "--plot", str(tmp_path / "cost.png")]) == 2
    assert "no cost report" in capsys.readouterr().err and not (tmp_path / "cost.png").exists()


def test_train_takes_a_config_file_from_allocate(tmp_path, capsys):
    assert main(["train", "--model", "lenet300", "--data", "digits", "--epochs", "1", "--limit", "200",
                 "--out", str(tmp_path / "float"), "--no-progress"]) == 0
    config = tmp_path / "config.json"
    assert main(["allocate", str(tmp_path / "float"), "--data", "digits", "--budget-kb", "40", "--calib-size", "100",
                 "--bits", "2", "4", "8", "--out", str(config), "--json"]) == 0
    bits = json.loads(capsys.readouterr().out.splitlines()[-1])["allocation"]["bits"]
    assert main(["train", "--model", "lenet300", "--data", "digits", "--epochs", "1", "--limit", "200",
                 "--config", str(config), "--out", str(tmp_path / "qat"), "--no-progress", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["run"]["quant"] == lowbit.QuantConfig.from_json(config.read_text()).to_dict()
    # the checkpoint is rebuilt with the config, and quantize reuses it
    assert main(["quantize", str(tmp_path / "qat"), "--calib-batches", "0", "--out", str(tmp_path / "m.lowbit")]) == 0
    out = capsys.readouterr().out
    assert "its training config" in out and f"quantized 0 layer(s), {len(bits)} already quantized (" in out
    assert {r.name: r.weight_bits for r in lowbit.summary(lowbit.load(tmp_path / "m.lowbit")).layers} == bits
    assert main(["train", "--model", "lenet300", "--data", "digits", "--epochs", "1", "--config", str(config),
                 "--quant", "w8a8", "--out", str(tmp_path / "both")]) == 2
    assert "either --quant or --config" in capsys.readouterr().err


def test_train_with_a_recipe_picks_the_recipe_model(tmp_path, capsys):
    from lowbit.recipes import get_recipe

    argv = ["train", "--recipe", "ternary", "--data", "mnist", "--epochs", "1", "--limit", "128",
            "--out", str(tmp_path / "run"), "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == get_recipe("ternary").model and (tmp_path / "run" / "last.safetensors").is_file()


def test_train_recipe_with_ddp_runs_two_processes(tmp_path, capsys):
    from lowbit import workflow

    argv = ["train", "--recipe", "lsq-w2a2", "--data", "mnist", "--limit", "256", "--ddp", "2",
            "--out", str(tmp_path / "run"), "--json"]
    assert main([*argv, "--epochs", "1"]) == 2  # two stages need two epochs: said before any process starts
    assert "needs epochs >= 2" in capsys.readouterr().err
    assert main([*argv, "--epochs", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["world_size"] == 2 and 0.0 <= out["final_acc"] <= 1.0
    model, run = workflow.load_trained(tmp_path / "run" / "last.safetensors")  # rank 0's checkpoint and run.json
    steps = [m for m in model.modules() if getattr(m, "name", None) == "lsq"]
    assert run["recipe"] == "lsq-w2a2" and steps and all(bool(q.initialized) for q in steps)  # learned steps kept


def test_export_takes_a_quantization_aware_checkpoint(tmp_path, capsys):
    import numpy as np
    import onnxruntime

    from lowbit import workflow
    from lowbit.export.onnx import local_vnni

    run = tmp_path / "run"
    assert main(["train", "--model", "lenet300", "--data", "digits", "--epochs", "1", "--limit", "200",
                 "--quant", "w8a8", "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "m.onnx"), "--json"]) == 0  # a directory: its last
    out = json.loads(capsys.readouterr().out)
    assert out["input_shape"] == [-1, 1, 8, 8] and out["weight_type"] == "safe"
    assert out["uint8_weight_layers"] == ["ip1", "ip2", "ip3"]  # 8-bit codes past +-64 in every layer
    assert out["local_vnni"] == local_vnni()
    assert main(["export", str(run), "--out", str(tmp_path / "m.onnx")]) == 0
    text = capsys.readouterr().out
    assert "3 layer(s) store their 8-bit weights as uint8" in text
    assert ("this CPU has none" if local_vnni() == [] else "this CPU has " if local_vnni() else "unknown here") in text
    model, _ = workflow.load_trained(run / "last.safetensors")  # rebuilt with its preset, from run.json
    images, _ = workflow.eval_set("digits", 64)
    session = onnxruntime.InferenceSession(out["path"], providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    with torch.no_grad():
        want = model(images).numpy()
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()  # the 8-bit tolerance of tests/test_onnx.py
