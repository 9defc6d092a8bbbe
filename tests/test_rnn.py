"""Recurrent layers: the numpy LSTM / GRU recurrences (ops/rnn.py) against torch's float nn.LSTM / nn.GRU, their ONNX
form against onnxruntime, QuantLSTM / QuantGRU against torch with the dequantized weights, and the typed errors."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from lowbit.errors import UnsupportedLayerError
from lowbit.export.onnx import _Builder
from lowbit.ops.rnn import check_module, gru, lstm, onnx_rnn, onnx_weights

KINDS = {"lstm": nn.LSTM, "gru": nn.GRU}


def _layers(m: nn.Module) -> list[tuple]:
    def get(name: str):
        t = getattr(m, name, None)
        return None if t is None else t.detach().numpy()

    return [(get(f"weight_ih_l{k}"), get(f"weight_hh_l{k}"), get(f"bias_ih_l{k}"), get(f"bias_hh_l{k}"))
            for k in range(m.num_layers)]


def _torch(m: nn.Module, x: np.ndarray):
    with torch.no_grad():
        out, state = m(torch.from_numpy(x))
    states = state if isinstance(state, tuple) else (state,)
    return out.numpy(), [s.numpy() for s in states]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_layers,batch_first,bias", [(1, True, True), (2, False, True), (3, True, False)])
def test_numpy_recurrence_matches_torch(kind, num_layers, batch_first, bias):
    torch.manual_seed(num_layers)
    m = KINDS[kind](7, 5, num_layers=num_layers, batch_first=batch_first, bias=bias).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(3)  # saturating gates too
    x = np.random.default_rng(num_layers).normal(0, 2, (4, 9, 7) if batch_first else (9, 4, 7)).astype(np.float32)
    want_out, want_states = _torch(m, x)
    got = lstm(x, _layers(m), batch_first) if kind == "lstm" else gru(x, _layers(m), batch_first)
    np.testing.assert_allclose(got[0], want_out, rtol=0, atol=2e-5)
    for g, w in zip(got[1:], want_states):
        np.testing.assert_allclose(g, w, rtol=0, atol=2e-5)


def test_hand_worked_one_step_lstm_and_gru():
    # one unit, one feature, weights 1 and biases 0, x = 1 from zero state
    one = (np.ones((4, 1), np.float32), np.ones((4, 1), np.float32), None, None)
    out, h, c = lstm(np.ones((1, 1, 1), np.float32), [one])
    s = 1 / (1 + np.exp(-1))
    assert c[0, 0, 0] == pytest.approx(s * np.tanh(1), abs=1e-6)  # f * 0 + i * g
    assert h[0, 0, 0] == pytest.approx(s * np.tanh(s * np.tanh(1)), abs=1e-6)
    one = (np.ones((3, 1), np.float32), np.ones((3, 1), np.float32), None, None)
    out, h = gru(np.ones((1, 1, 1), np.float32), [one])
    assert h[0, 0, 0] == pytest.approx((1 - s) * np.tanh(1), abs=1e-6)  # n = tanh(1 + r * 0), h = (1 - z) n


def test_sigmoid_saturates_without_nan():
    big = (np.full((4, 1), 1e4, np.float32), np.zeros((4, 1), np.float32), None, None)
    out, h, c = lstm(np.array([[[1.0], [-1.0]]], np.float32), [big])
    assert np.isfinite(out).all() and np.isfinite(c).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch_first", [True, False])
def test_onnx_lstm_gru_match_torch(kind, batch_first):
    torch.manual_seed(3)
    m = KINDS[kind](6, 8, num_layers=2, batch_first=batch_first).eval()
    x = np.random.default_rng(0).normal(size=(3, 10, 6) if batch_first else (10, 3, 6)).astype(np.float32)
    b = _Builder(17, False)
    y = onnx_rnn(b, "rnn", "x", kind, _layers(m), batch_first)
    graph = helper.make_graph(b.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, [None] * 3)], b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, _torch(m, x)[0], rtol=0, atol=1e-5)


def test_onnx_gate_order():
    # blocks tagged by their torch index: LSTM i f g o -> i o f c, GRU r z n -> z r h
    w = np.repeat(np.arange(4, dtype=np.float32), 2)[:, None]
    assert onnx_weights("lstm", (w, w, None, None))[0][0, ::2, 0].tolist() == [0, 3, 1, 2]
    w = np.repeat(np.arange(3, dtype=np.float32), 2)[:, None]
    W, R, B = onnx_weights("gru", (w, w, w[:, 0], None))
    assert W[0, ::2, 0].tolist() == [1, 0, 2] and B.shape == (1, 12) and B[0, 6:].tolist() == [0] * 6


@pytest.mark.parametrize("make,message", [
    (lambda: nn.LSTM(4, 4, bidirectional=True), "bidirectional"),
    (lambda: nn.GRU(4, 4, bidirectional=True), "bidirectional"),
    (lambda: nn.LSTM(4, 4, proj_size=2), "proj_size"),
    (lambda: nn.LSTM(4, 4, num_layers=2, dropout=0.5).train(), "dropout"),
])
def test_refused_recurrent_layers_name_the_layer(make, message):
    with pytest.raises(UnsupportedLayerError, match=f"encoder.rnn.*{message}"):
        check_module(make(), "layer 'encoder.rnn'")
    check_module(nn.LSTM(4, 4, num_layers=2, dropout=0.5).eval(), "layer 'ok'")  # eval mode: no dropout


# ------------------------------------------------------------------ quantized layers and quantize

W8 = {"name": "uniform", "bits": 8, "symmetric": True, "per_channel": True, "dynamic": True, "narrow": True}


def _per_row_int8(w: torch.Tensor) -> torch.Tensor:
    """The narrow symmetric 8-bit per-row grid, computed here independently of the quantizer."""
    scale = w.abs().amax(1, keepdim=True) / 127
    return torch.round(w / scale).clamp(-127, 127) * scale


@pytest.mark.parametrize("cls", ["QuantLSTM", "QuantGRU"])
def test_quant_rnn_is_torch_rnn_on_per_row_8bit_weights(cls):
    from lowbit.nn import recurrent

    torch.manual_seed(0)
    float_cls = nn.LSTM if cls == "QuantLSTM" else nn.GRU
    m = float_cls(16, 32, num_layers=2, batch_first=False).eval()
    q = getattr(recurrent, cls).from_float(m, weight_quantizer=W8).eval()
    assert sorted(q.weight_quantizers) == ["weight_hh_l0", "weight_hh_l1", "weight_ih_l0", "weight_ih_l1"]
    reference = float_cls(16, 32, num_layers=2).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            getattr(reference, name).copy_(_per_row_int8(p) if name.startswith("weight") else p)
    x = torch.randn(10, 3, 16)
    with torch.no_grad():
        got, want = q(x), reference(x)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-6)
    assert not torch.equal(got[0], m(x)[0])  # the weights are really quantized
    assert q.weight_ih_l0 is not None and torch.equal(q.weight_ih_l0, m.weight_ih_l0)  # stored float, as the layer's


def test_quant_rnn_refuses_activation_quantizers_and_unsupported_layers():
    from lowbit.errors import ConfigError
    from lowbit.nn.recurrent import QuantGRU, QuantLSTM

    with pytest.raises(ConfigError, match="activations float"):
        QuantLSTM(4, 4, weight_quantizer=W8, input_quantizer=W8)
    with pytest.raises(UnsupportedLayerError, match="bidirectional"):
        QuantGRU.from_float(nn.GRU(4, 4, bidirectional=True), weight_quantizer=W8)


class Classifier(nn.Module):
    """16 features, hidden 32, a Linear head on the last step; ``indexed``: ``rnn(x)[0][:, -1]``, else
    ``out, _ = rnn(x)``."""

    def __init__(self, kind: str = "lstm", indexed: bool = False, **kwargs) -> None:
        super().__init__()
        self.indexed = indexed
        self.rnn = KINDS[kind](16, 32, batch_first=True, **kwargs)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.indexed:
            return self.head(self.rnn(x)[0][:, -1])
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


@pytest.mark.parametrize("kind,indexed", [("lstm", False), ("gru", True), ("lstm", True)])
def test_classifier_quantizes_at_least_95_percent_of_weights(kind, indexed):
    import lowbit

    torch.manual_seed(0)
    model = Classifier(kind, indexed).eval()
    report = lowbit.quantize_report(model, "w8a8", example_input=(1, 10, 16))
    assert report.weight_fraction >= 0.95 and "rnn" in report.converted and not report.unsupported
    x = torch.randn(8, 10, 16)
    lowbit.calibrate(report.model, [x])
    with torch.no_grad():
        got, want = report.model(x), model(x)
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), 0) > 0.999


def test_unsupported_recurrent_layer_is_left_float_and_named_or_refused_with_strict():
    import lowbit

    model = Classifier("lstm", bidirectional=False, proj_size=4)
    model.head = nn.Linear(4, 5)
    with pytest.warns(UserWarning, match="proj_size"):
        report = lowbit.quantize_report(model.eval(), "w8a8")
    assert report.unsupported and report.unsupported[0][0] == "rnn" and "proj_size" in report.unsupported[0][1]
    with pytest.raises(UnsupportedLayerError, match="'rnn'.*proj_size"):
        lowbit.quantize(model.eval(), "w8a8", strict=True)


# ------------------------------------------------------------------ end to end: save, load, Engine, onnxruntime


def _sequences(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 10, 16, generator=torch.Generator().manual_seed(seed))


def _trained(kind: str, indexed: bool, num_layers: int = 1) -> Classifier:
    """Trained briefly to tell which fifth of the features has the largest mean, so that its logits are
    decisive on random sequences."""
    torch.manual_seed(0)
    model = Classifier(kind, indexed, num_layers=num_layers)
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for step in range(60):
        x = _sequences(64, 100 + step)
        target = x[..., :15].mean(1).reshape(64, 5, 3).mean(2).argmax(1)
        loss = nn.functional.cross_entropy(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("kind,indexed,num_layers,preset", [
    ("lstm", False, 1, "w8a8"), ("gru", True, 1, "w8a8"), ("lstm", True, 2, "w8a8"),
    ("lstm", False, 1, "w8a8-dynamic"), ("gru", True, 2, "w8a8-dynamic")])
def test_classifier_saves_loads_and_runs_alike_in_the_engine_and_onnxruntime(kind, indexed, num_layers, preset,
                                                                              tmp_path):
    import lowbit
    from lowbit.export.onnx import to_onnx
    from lowbit.nn.recurrent import QUANT_RNNS
    from lowbit.runtime import Engine

    model = _trained(kind, indexed, num_layers)
    report = lowbit.quantize_report(model, preset, example_input=(1, 10, 16))
    assert report.weight_fraction >= 0.95 and not report.unsupported
    q = report.model
    # dynamic: the input sequence is quantized per step (per token) before the recurrence, and so is the head's
    rnn_input = next(n for n in q.graph.nodes if n.target == "rnn").args[0]
    assert (rnn_input.op == "call_module") == (preset == "w8a8-dynamic")
    if preset == "w8a8-dynamic":
        assert q.get_submodule(rnn_input.target).quantizer.spec()["per_token"]
    lowbit.calibrate(q, [_sequences(32, 10 + i) for i in range(4)])
    path = tmp_path / f"{kind}.lowbit"
    lowbit.save(q, path, _sequences(1, 0))
    x = _sequences(200, 7)
    loaded = lowbit.load(path)
    assert any(isinstance(m, QUANT_RNNS) for m in loaded.modules())
    with torch.no_grad():
        expected = q(x)
        assert torch.equal(loaded(x), expected)
        assert (expected.argmax(1) == model(x).argmax(1)).float().mean() >= 0.95
    got = Engine(path).run(x.numpy())
    ref = expected.numpy()
    assert np.array_equal(got.argmax(1), ref.argmax(1))
    assert float(np.dot(got.ravel(), ref.ravel()) / np.linalg.norm(got) / np.linalg.norm(ref)) >= 0.999
    proto = to_onnx(loaded, x[:1])
    assert [n.op_type for n in proto.graph.node].count(kind.upper()) == num_layers
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert (onnx_out.argmax(1) == ref.argmax(1)).mean() >= 0.99
    # the stored weights are 8-bit codes, one scale per gate row
    from lowbit.format.container import read_file

    enc = read_file(path).tensors["rnn.weight_hh_l0"]
    assert enc.kind != "float32" and enc.bits == 8


class LastState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(16, 8, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[1][0]


@pytest.mark.parametrize("make,message", [
    (lambda: _time_major(), "'rnn'.*batch_first=True"),
    (LastState, "item 1 .*final state.*'rnn'"),
])
def test_capture_refuses_time_major_layers_and_the_final_state_by_name(make, message, tmp_path):
    import lowbit

    with pytest.raises(UnsupportedLayerError, match=message):
        lowbit.save(make().eval(), tmp_path / "m.lowbit", _sequences(1, 0))


def _time_major() -> nn.Module:
    model = Classifier("lstm")
    model.rnn = nn.LSTM(16, 32)  # [L, N, features]: the IR keeps the batch on axis 0
    return model


def test_loaded_again_with_the_architecture_and_as_float_tensors(tmp_path):
    import lowbit
    from lowbit.quantizers import get

    model = Classifier("gru", num_layers=2).eval()
    q = lowbit.quantize(model, "w8a8")
    lowbit.calibrate(q, [_sequences(16, 1)])
    path, again = tmp_path / "g.lowbit", tmp_path / "again.lowbit"
    lowbit.save(q, path, _sequences(1, 0))
    x = _sequences(20, 3)
    with torch.no_grad():
        expected = q(x)
        assert torch.equal(lowbit.load(path, model=Classifier("gru", num_layers=2).eval())(x), expected)
        lowbit.save(lowbit.load(path), again)  # the loaded (frozen) codes written again
        assert torch.equal(lowbit.load(again)(x), expected)
    float_model = Classifier("gru", num_layers=2)
    float_model.load_state_dict(lowbit.load_state_dict(path), strict=True)
    # a Quantizer instance given is copied per weight matrix, so each holds its own codes
    from lowbit.nn.recurrent import QuantLSTM

    layer = QuantLSTM(4, 4, weight_quantizer=get(W8))
    assert len({id(m) for m in layer.weight_quantizers.values()}) == 2
