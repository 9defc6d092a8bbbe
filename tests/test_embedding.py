"""Token inputs: nn.Embedding quantized per row (w8a8), int64 batches through calibrate, save / load, the Engine and
onnxruntime; the gather against numpy, refusals named."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import CalibrationError, ConfigError, FormatError
from lowbit.export.onnx import to_onnx
from lowbit.format.container import pack_safetensors, parse_safetensors
from lowbit.nn import QuantEmbedding
from lowbit.ops.embedding import embedding
from lowbit.runtime import Engine


class Bag(nn.Module):
    """Embedding, a position table added, relu, mean over the sequence, a linear head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 16)
        self.pos = nn.Parameter(torch.randn(12, 16) * 0.1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.emb(x) + self.pos).mean(1))


def _tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 100, (n, 12), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = Bag().eval()
    report = lowbit.quantize_report(model, "w8a8", example_input=_tokens(1, 0))
    q = lowbit.calibrate(report.model, [_tokens(16, i) for i in range(4)])
    path = tmp_path_factory.mktemp("emb") / "bag.lowbit"
    lowbit.save(q, path)  # the graph from the calibrated input shape: an int64 zero batch
    return model, report, q, path


def test_the_embedding_is_quantized_per_row_on_the_narrow_8_bit_grid(saved):
    model, report, q, _ = saved
    assert "emb" in report.converted and isinstance(q.emb, QuantEmbedding)
    assert not report.unsupported or [n for n, _ in report.unsupported] == ["pos"]
    w = model.emb.weight.detach()
    scale = w.abs().amax(1, keepdim=True) / 127  # hand-worked: one scale per embedding row
    expected = torch.clamp(torch.round(w / scale), -127, 127) * scale
    with torch.no_grad():
        got = q.emb.weight_quantizer(q.emb.weight)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert report.mac_fraction == 1.0  # a gather has no multiply-accumulates; the head is quantized


def test_int64_batches_calibrate_and_float_batches_are_refused_by_name(saved):
    _, _, q, _ = saved
    with pytest.raises(CalibrationError, match="int64 token indices"):
        lowbit.calibrate(q, [torch.randint(0, 100, (2, 12), dtype=torch.int32)])


def test_save_load_engine_and_onnxruntime_agree(saved):
    _, _, q, path = saved
    x = _tokens(32, 9)
    loaded = lowbit.load(path)
    with torch.no_grad():
        expected = q(x)
        assert torch.equal(loaded(x), expected)
    doc = json.loads(parse_safetensors(path.read_bytes())[1]["lowbit"])
    assert doc["graph"]["inputs"][0]["dtype"] == "int64"
    engine = Engine(path)
    np.testing.assert_allclose(engine.run(x.numpy()), expected.numpy(), rtol=1e-5, atol=1e-5)
    proto = to_onnx(loaded, x[:1])
    assert "Gather" in [n.op_type for n in proto.graph.node]
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert (got.argmax(1) == expected.numpy().argmax(1)).mean() >= 0.95
    with pytest.raises(ConfigError, match="int64"):
        engine.run(x.numpy().astype(np.float32))


def test_the_gather_matches_numpy_and_refuses_indices_outside_the_table():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((7, 3)).astype(np.float32)
    x = np.array([[0, 6, 2], [2, 2, 5]], np.int64)
    np.testing.assert_array_equal(embedding(x, table), np.stack([[table[i] for i in row] for row in x]))
    for bad in (np.array([[7]]), np.array([[-1]])):
        with pytest.raises(ConfigError, match="layer 'emb'.*\\[0, 7\\)"):
            embedding(bad, table, "layer 'emb'")


def test_the_engine_names_the_layer_for_an_index_outside_the_table(saved):
    _, _, _, path = saved
    with pytest.raises(ConfigError, match="layer 'emb'"):
        Engine(path).run(np.full((1, 12), 100, np.int64))


def test_int64_inputs_feed_only_embeddings(saved, tmp_path):
    _, _, _, path = saved
    arrays, metadata, _ = parse_safetensors(path.read_bytes())
    target = tmp_path / "bad.lowbit"
    relu = lambda g: next(n for n in g["nodes"] if n["op"] == "relu")  # noqa: E731
    for edit, match in [(lambda g: relu(g).update(inputs=[g["inputs"][0]["name"]]), "token indices"),
                        (lambda g: g["inputs"][0].update(dtype="int32"), "dtype")]:
        doc = json.loads(metadata["lowbit"])
        edit(doc["graph"])
        target.write_bytes(pack_safetensors(dict(arrays), {"lowbit": json.dumps(doc)}))
        for reader in (lowbit.load, Engine):
            with pytest.raises(FormatError, match=match):
                reader(target)


def test_max_norm_is_refused_by_name():
    with pytest.raises(ConfigError, match="max_norm"):
        QuantEmbedding(10, 4, max_norm=1.0)
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0), nn.Flatten(), nn.Linear(12, 2)).eval()
    with pytest.raises(lowbit.errors.UnsupportedLayerError, match="max_norm"):
        lowbit.save(model, "/tmp/unused.lowbit", torch.zeros(1, 3, dtype=torch.int64))


def test_the_cost_report_of_a_token_model_runs_on_token_indices(saved):
    from lowbit.analysis.cost import file_cost_report

    _, _, _, path = saved
    report = file_cost_report(path)
    assert "fc" in str(report)
