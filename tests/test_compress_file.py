"""The file `lowbit compress` writes holds the model's graph: the README's command sequence on a slice of MNIST.

train -> quantize (w8a8) -> compress -> eval -> eval --against -> inspect -> run -> export, through the
``lowbit`` entry point, for LeNet-300-100 and LeNet-5; each result is checked against an independent
computation: the plain float architecture with the file's dequantized tensors, the numpy Engine, onnxruntime.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.compress import DeepCompressionConfig, deep_compress, save_compressed
from lowbit.compress.pipeline import file_layer_bytes
from lowbit.compress.share import fold_batch_norms, shared_layers
from lowbit.format.container import read_file
from lowbit.data import load_dataset, make_loader
from lowbit.models import LeNet300, get_model
from lowbit.runtime import Engine

LIMIT = 400
TINY = ["--limit", str(LIMIT), "--no-progress"]


def run_json(capsys, argv):
    status = main([*argv, "--json"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    return json.loads(captured.out)


@pytest.fixture(scope="module")
def images():
    x, y = load_dataset("mnist", "test")
    return x[:LIMIT], y[:LIMIT]


@pytest.mark.parametrize("net", ["lenet300", "lenet5"])
def test_readme_sequence_runs_from_the_compressed_file_alone(net, images, tmp_path, capsys):
    run, w8a8, dc = tmp_path / "run", tmp_path / f"{net}-w8a8.lowbit", tmp_path / f"{net}-dc.lowbit"
    run_json(capsys, ["train", "--model", net, "--data", "mnist", "--epochs", "1", "--batch-size", "32",
                      "--out", str(run), *TINY])
    run_json(capsys, ["quantize", str(run / "best.safetensors"), "--model", net, "--preset", "w8a8",
                      "--calib-batches", "1", "--out", str(w8a8), "--no-progress"])
    compressed = run_json(capsys, ["compress", str(run / "best.safetensors"), "--data", "mnist", "--recipe",
                                   "deep-compression", "--out", str(dc), "--limit", str(LIMIT), "--rounds", "1",
                                   "--batch-size", "32"])

    # the file alone rebuilds the model: it predicts as the float architecture given the file's tensors
    x, y = images
    loaded = lowbit.load(dc)
    dense = get_model(net)
    dense.load_state_dict(lowbit.load_state_dict(dc))
    with torch.no_grad():
        logits = loaded(x)
        torch.testing.assert_close(logits, dense.eval()(x), rtol=0, atol=1e-5)
    predicted = logits.argmax(1)
    assert len(predicted.unique()) >= 5  # not a constant classifier, so the agreements below mean something
    accuracy = float((predicted == y).double().mean())

    # eval prints the accuracy compress reported for the loaded file, on the same images
    evaluated = run_json(capsys, ["eval", str(dc), "--data", "mnist", *TINY])
    assert evaluated["examples"] == LIMIT
    assert evaluated["accuracy"] == compressed["accuracy"]["loaded"] == pytest.approx(accuracy, abs=1 / LIMIT)

    # against the 8-bit file: the paired counts recomputed from the two models
    compared = run_json(capsys, ["eval", str(dc), "--against", str(w8a8), "--data", "mnist", *TINY])
    with torch.no_grad():
        other = lowbit.load(w8a8)(x).argmax(1) == y
    mine = predicted == y
    assert compared["comparison"]["only_a"] == int((mine & ~other).sum())
    assert compared["comparison"]["only_b"] == int((~mine & other).sum())

    # inspect: the graph and the sparse, entropy-coded k-means weights
    info = run_json(capsys, ["inspect", str(dc)])
    assert info["has_graph"] and info["file_bytes"] == dc.stat().st_size == compressed["file_bytes"]
    chains = {t["name"]: t["chain"] for t in info["tensors"] if t["name"].endswith(".weight")}
    assert chains and all(c.startswith("codebook+sparse") and c.endswith("+huffman") for c in chains.values())
    assert info["cost"]  # the per-layer cost needs the graph

    # the numpy Engine and `lowbit run`
    engine_logits = Engine(dc, threads=1).run(x.numpy())
    assert np.mean(engine_logits.argmax(1) == predicted.numpy()) >= 0.99
    ran = run_json(capsys, ["run", str(dc), "--data", "mnist", "--limit", "100", "--threads", "1"])
    on_100 = float((predicted[:100] == y[:100]).double().mean())
    assert ran["images"] == 100 and abs(ran["accuracy"] - on_100) <= 0.01  # at most one image on a float tie

    # ONNX in onnxruntime: the same argmax on >= 99% of the images
    import onnxruntime

    onnx_path = tmp_path / f"{net}-dc.onnx"
    run_json(capsys, ["export", str(dc), "--format", "onnx", "--out", str(onnx_path)])
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.mean(got.argmax(1) == predicted.numpy()) >= 0.99


def test_the_graph_goes_into_the_header_and_the_layer_arrays_keep_their_bytes(tmp_path):
    x, y = load_dataset("digits", "train")
    tx, ty = load_dataset("digits", "test")
    torch.manual_seed(0)
    config = DeepCompressionConfig(sparsity=0.8, bits=4, rounds=1, retrain_epochs=0, finetune_epochs=0)
    result = deep_compress(LeNet300(input_size=8), make_loader(x[:64], y[:64], 32),
                           make_loader(tx[:50], ty[:50], 25), config)
    assert result.example_input.shape == (1, 1, 8, 8) and not result.example_input.any()
    with_graph = save_compressed(result, tmp_path / "graph.lowbit")
    bare = tmp_path / "bare.lowbit"  # what save_compressed wrote before: no example input, so no graph
    lowbit.save(result.model, bare, entropy="huffman", sparse={f"{s.name}.weight": s.index_bits for s in result.layers})
    (layers, header), (bare_layers, bare_header) = (file_layer_bytes(p, ["ip1", "ip2", "ip3"]) for p in (with_graph,
                                                                                                      bare))
    assert layers == bare_layers and header > bare_header
    assert with_graph.read_bytes()[header:] == bare.read_bytes()[bare_header:]  # the same data section, byte for byte
    with open(with_graph, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        document = json.loads(json.loads(f.read(n))["__metadata__"]["lowbit"])
    assert document["graph"] is not None and document["model"]["input_shape"] == [1, 1, 8, 8]
    shared = result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(lowbit.load(with_graph)(tx[:50]), shared(tx[:50]), rtol=0, atol=0)


def test_a_residual_net_with_batch_norms_is_compressed_with_them_folded(tmp_path):
    """Batch norms fold into the layers before sharing: the file holds no batchnorm node, the codebooks hold the
    folded weights, pruned zeros stay zero, and the file alone (or with its float architecture) predicts as the
    Engine does."""
    x, y = load_dataset("digits", "train")
    tx, ty = load_dataset("digits", "test")
    torch.manual_seed(0)
    float_net = get_model("resnet-small", in_channels=1, input_size=8, widths=(8, 16, 16), blocks=(1, 1, 1))
    with torch.no_grad():  # batch norms with statistics far from identity, so folding changes the weights
        for m in float_net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    folded = fold_batch_norms(float_net.eval())
    with torch.no_grad():
        torch.testing.assert_close(folded(tx[:20]), float_net(tx[:20]), rtol=1e-4, atol=1e-5)
    config = DeepCompressionConfig(sparsity=0.7, bits=4, rounds=1, retrain_epochs=0, finetune_epochs=0)
    result = deep_compress(float_net.train(), make_loader(x[:64], y[:64], 32), make_loader(tx[:50], ty[:50], 25),
                           config)
    path = save_compressed(result, tmp_path / "resnet.lowbit")
    document = read_file(path).document
    assert "batchnorm" not in {n["op"] for n in document["graph"]["nodes"]} and document["model"]["fold_bn"]
    for name, layer in shared_layers(result.model).items():
        zero = layer.weight == 0
        assert zero.float().mean() > 0.5 and (layer.weight_quantizer(layer.weight)[zero] == 0).all(), name
    loaded, engine = lowbit.load(path), Engine(path, threads=1)
    arch = get_model("resnet-small", in_channels=1, input_size=8, widths=(8, 16, 16), blocks=(1, 1, 1))
    with torch.no_grad():
        logits = loaded(tx[:50])
        torch.testing.assert_close(lowbit.load(path, model=arch)(tx[:50]), logits, rtol=0, atol=0)
    np.testing.assert_allclose(engine.run(tx[:50].numpy()), logits.numpy(), rtol=1e-4, atol=1e-4)
