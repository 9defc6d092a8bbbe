"""Transformer encoders: captured through their reference path (never the fused eval-mode one), multi-head
attention as q/k/v/out linears and two matmuls, quantized whole-graph at w8a8, saved, loaded, run by the Engine and
by onnxruntime; masks checked by name; the MAC report counts float parts too."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lowbit
from lowbit.errors import FormatError, ShapeMismatchError, UnsupportedLayerError
from lowbit.export.graph import trace
from lowbit.export.onnx import to_onnx
from lowbit.export.transformer import Attention
from lowbit.format.container import pack_safetensors, parse_safetensors
from lowbit.nn import QuantEmbedding, QuantLinear
from lowbit.ops import REGISTRY
from lowbit.ops.schema import Node
from lowbit.runtime import Engine

#: the two encoder layers of the tests: post-norm with relu (torch's default) and pre-norm with gelu
VARIANTS = {"post-norm relu": {}, "pre-norm gelu": {"norm_first": True, "activation": "gelu"}}


class TC(nn.Module):
    """A text classifier: token embedding, a 2-layer Transformer encoder, mean over the sequence, a linear head."""

    def __init__(self, mask: torch.Tensor | None = None, batch_first: bool = True, **layer):
        super().__init__()
        self.emb = nn.Embedding(100, 32)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=batch_first, **layer), 2,
                                         enable_nested_tensor=False)
        self.fc = nn.Linear(32, 5)
        self.register_buffer("mask", mask)

    def forward(self, x):
        return self.fc(self.enc(self.emb(x), mask=self.mask).mean(1))


def _tokens(n: int, seed: int, length: int = 12) -> torch.Tensor:
    return torch.randint(0, 100, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: several threads only contend
    yield
    torch.set_num_threads(threads)


def _trained(layer: dict) -> TC:
    """A classifier trained briefly to count the tokens below 20 (0 .. 4+), so that its logits are decisive on
    random token inputs, as a real model's are."""
    torch.manual_seed(0)
    model = TC(**layer)
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for step in range(80):
        x = _tokens(64, 100 + step)
        loss = nn.functional.cross_entropy(model(x), (x < 20).sum(1).clamp(max=4))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_capture_equals_torchs_fused_eval_path(variant):
    torch.manual_seed(0)
    model = TC(**VARIANTS[variant]).eval()
    traced = trace(model)
    attention = traced.get_submodule("enc.layers.1.self_attn")
    assert all(isinstance(getattr(attention, p), nn.Linear) for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
    q, k, v = model.enc.layers[1].self_attn.in_proj_weight.detach().chunk(3)  # the packed projection, split
    assert torch.equal(attention.q_proj.weight, q) and torch.equal(attention.v_proj.weight, v)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in traced.modules())
    assert isinstance(model.enc.layers[1].self_attn, nn.MultiheadAttention)  # the model itself is not changed
    x = _tokens(8, 1)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_classifier_quantizes_whole_graph_at_w8a8(variant, tmp_path, one_thread):
    model = _trained(VARIANTS[variant])
    report = lowbit.quantize_report(model, "w8a8", example_input=_tokens(1, 0))
    assert report.weight_fraction >= 0.95 and report.mac_fraction >= 0.95 and not report.unsupported
    q = report.model
    assert isinstance(q.emb, QuantEmbedding)
    for i in range(2):
        for path in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "linear1",
                     "linear2"):
            assert isinstance(q.get_submodule(f"enc.layers.{i}.{path}"), QuantLinear), path
    lowbit.calibrate(q, [_tokens(32, 10 + i) for i in range(4)])  # in eval mode: every quantizer is reached
    path = tmp_path / "tc.lowbit"
    lowbit.save(q, path)
    x = _tokens(200, 7)
    loaded = lowbit.load(path)
    with torch.no_grad():
        expected = q(x)
        assert torch.equal(loaded(x), expected)
        assert (expected.argmax(1) == model(x).argmax(1)).float().mean() >= 0.95
    got = Engine(path).run(x.numpy())
    ref = expected.numpy()
    assert np.array_equal(got.argmax(1), ref.argmax(1))
    assert float(np.dot(got.ravel(), ref.ravel()) / np.linalg.norm(got) / np.linalg.norm(ref)) >= 0.999
    proto = to_onnx(loaded, x[:1])
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMul") == 2 * (6 + 2) and "Gather" in ops  # per layer: 6 linears on [N, L, E], 2 products
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert (onnx_out.argmax(1) == ref.argmax(1)).mean() >= 0.99


def test_the_mac_report_counts_the_parts_left_float():
    model = TC().eval()
    x = _tokens(1, 0)
    whole = lowbit.quantize_report(model, "w8a8", example_input=x)
    assert whole.mac_fraction == 1.0  # linears and both products per head, their inputs quantized
    with pytest.warns(UserWarning, match="enc"):
        kept = lowbit.quantize_report(model, "w8a8", example_input=x, leaves=["enc"])
    # the float encoder's MACs count: 12 tokens x (4 x 32 x 32 + 2 x 32 x 64 + 2 x 4 x 12 x 8) per layer, 2 layers
    encoder = 2 * 12 * (4 * 32 * 32 + 2 * 32 * 64 + 2 * 4 * 12 * 8)
    assert kept.mac_fraction == pytest.approx(32 * 5 / (32 * 5 + encoder))
    binary = lowbit.quantize_report(model, "bnn", example_input=x)  # products of real-valued activations
    assert binary.mac_fraction == pytest.approx(1 - 2 * 2 * 4 * 12 * 12 * 8 / (32 * 5 + encoder))


def test_an_additive_mask_is_a_constant_of_the_graph(tmp_path):
    mask = torch.zeros(12, 12)
    mask[:, -4:] = -1e4  # the last four positions are never attended to
    torch.manual_seed(0)
    model = TC(mask).eval()
    q = lowbit.calibrate(lowbit.quantize(model, "w8a8"), [_tokens(16, 3)])
    path = tmp_path / "masked.lowbit"
    lowbit.save(q, path, _tokens(1, 0))
    x = _tokens(20, 5)
    with torch.no_grad():
        expected = q(x)
        torch.testing.assert_close(trace(model)(x), model(x), rtol=1e-5, atol=1e-5)
    loaded = lowbit.load(path)
    assert torch.equal(loaded(x), expected)
    np.testing.assert_allclose(Engine(path).run(x.numpy()), expected.numpy(), atol=0.05)
    session = ort.InferenceSession(to_onnx(loaded, x[:1]).SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(got, expected.numpy(), atol=0.1)


@pytest.mark.parametrize("model, error, match", [
    (lambda: TC(torch.zeros(10, 10)), ShapeMismatchError, r"'enc\.layers\.0\.self_attn'.*\[12, 12\], got \[10, 10\]"),
    (lambda: TC(torch.zeros(12, 12, dtype=torch.bool)), UnsupportedLayerError, "layer 'enc.layers.0.self_attn'.*float"),
    (lambda: TC(batch_first=False), UnsupportedLayerError, "layer 'enc.layers.0.self_attn'.*batch_first"),
])
def test_masks_and_layouts_it_cannot_take_are_typed_errors_naming_the_layer(model, error, match):
    with pytest.raises(error, match=match):
        lowbit.quantize_report(model().eval(), "w8a8", example_input=_tokens(1, 0))


def test_a_key_padding_mask_is_refused_by_name():
    class Padded(TC):
        def forward(self, x):
            return self.fc(self.enc(self.emb(x), src_key_padding_mask=self.mask).mean(1))

    with pytest.raises(UnsupportedLayerError, match="self_attn.*key-padding"):
        lowbit.quantize(Padded(torch.zeros(1, 12, dtype=torch.bool)).eval(), "w8a8")


def test_matmul_shapes_follow_numpy_and_mismatches_are_refused():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 3, 4, 5), np.float32), rng.standard_normal((2, 3, 5, 6), np.float32)
    schema = REGISTRY["matmul"]
    np.testing.assert_allclose(schema.numpy([a, b], {}), torch.matmul(torch.from_numpy(a), torch.from_numpy(b)),
                               rtol=1e-5, atol=1e-5)
    assert schema.shape(Node("m", "matmul", {}, [(3, 4, 5), (3, 5, 6)], {})) == (3, 4, 6)
    for shapes in ([(3, 4, 5), (3, 4, 6)], [(3, 4, 5), (2, 5, 6)], [(4, 5), (5, 6, 1)], [(5,), (5,)]):
        with pytest.raises(FormatError, match="multiplies"):
            schema.shape(Node("m", "matmul", {}, shapes, {}))


def test_a_stored_product_of_mismatched_operands_is_refused(tmp_path):
    torch.manual_seed(0)
    model = TC().eval()
    path = tmp_path / "float.lowbit"
    lowbit.save(model, path, _tokens(1, 0))
    arrays, metadata, _ = parse_safetensors(path.read_bytes())
    doc = json.loads(metadata["lowbit"])
    second = [n for n in doc["graph"]["nodes"] if n["op"] == "matmul"][1]  # weights [4, 12, 12] @ values [4, 12, 8]
    second["inputs"] = second["inputs"][::-1]
    path.write_bytes(pack_safetensors(dict(arrays), {"lowbit": json.dumps(doc)}))
    for reader in (lowbit.load, Engine):
        with pytest.raises(FormatError, match="multiplies"):
            reader(path)


@settings(max_examples=25, deadline=None)
@given(heads=st.integers(1, 4), head_dim=st.integers(1, 6), lq=st.integers(1, 7), lk=st.integers(1, 7),
       bias=st.booleans(), kdim=st.sampled_from([None, 3]), masked=st.booleans(), seed=st.integers(0, 2**16))
def test_the_decomposed_attention_equals_torchs_multi_head_attention(heads, head_dim, lq, lk, bias, kdim, masked,
                                                                      seed):
    """Against nn.MultiheadAttention itself (eval mode, which may take its fused path): any heads, head sizes,
    query and key lengths, with and without biases, separate key/value sizes and an additive mask (zeros among
    its values, and -inf-like entries that never mask a whole row)."""
    torch.manual_seed(seed)
    e = heads * head_dim
    mha = nn.MultiheadAttention(e, heads, bias=bias, kdim=kdim, vdim=kdim, batch_first=True).eval()
    attention = Attention(mha, "attn").eval()
    query, key = torch.randn(2, lq, e), torch.randn(2, lk, kdim or e)
    mask = None
    if masked:
        mask = torch.where(torch.rand(lq, lk) < 0.3, -1e4, 0.0)
        mask[:, 0] = 0.0
    with torch.no_grad():
        expected, _ = mha(query, key, key, attn_mask=mask, need_weights=False)
        got, weights = attention(query, key, key, attn_mask=mask)
    assert weights is None
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_the_classifier_of_the_issue_quantizes_whole_graph():
    class Classifier(nn.Module):
        def __init__(s):
            super().__init__()
            s.emb = nn.Embedding(100, 32)
            s.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2)
            s.fc = nn.Linear(32, 5)

        def forward(s, x):
            return s.fc(s.enc(s.emb(x)).mean(1))

    torch.manual_seed(0)
    report = lowbit.quantize_report(Classifier().eval(), "w8a8", example_input=torch.randint(0, 100, (1, 12)))
    assert str(report).startswith("quantized 14 layer(s) (96.5% of weights, 100.0% of MACs)")
    lowbit.calibrate(report.model, [torch.randint(0, 100, (4, 12))])  # int64 batches, eval mode: all reached


class SelfAttention(nn.Module):
    """Custom attention as models write it: one packed qkv linear, its pieces split into heads,
    F.scaled_dot_product_attention (``mode``: its call, or a form it cannot capture)."""

    def __init__(self, mode: str = "plain", e: int = 16, heads: int = 2):
        super().__init__()
        self.mode, self.heads = mode, heads
        self.emb, self.qkv = nn.Embedding(50, e), nn.Linear(e, 3 * e)
        self.out, self.fc = nn.Linear(e, e), nn.Linear(e, 3)

    def forward(self, tokens):
        x = self.emb(tokens)
        n, length, e = x.shape
        qkv = self.qkv(x).chunk(3, -1)
        q, k, v = (qkv[i].reshape(n, length, self.heads, e // self.heads).transpose(1, 2) for i in range(3))
        options = {"plain": {}, "causal": {"is_causal": True}, "dropout": {"dropout_p": 0.1}}[self.mode]
        y = nn.functional.scaled_dot_product_attention(q, k, v, **options)
        return self.fc(self.out(y.transpose(1, 2).reshape(n, length, e)).mean(1))


def test_scaled_dot_product_attention_is_one_op_quantized_at_its_three_inputs(tmp_path):
    torch.manual_seed(0)
    model = SelfAttention().eval()
    report = lowbit.quantize_report(model, "w8a8", example_input=_tokens(1, 0, 10) % 50)
    assert report.mac_fraction == 1.0 and report.weight_fraction >= 0.95
    q = lowbit.calibrate(report.model, [_tokens(16, 1, 10) % 50])
    path = tmp_path / "sdpa.lowbit"
    lowbit.save(q, path)
    loaded = lowbit.load(path)
    assert "attention" in [n["op"] for n in loaded.ir["nodes"]]
    x = _tokens(40, 2, 10) % 50
    with torch.no_grad():
        expected = q(x)
        assert torch.equal(loaded(x), expected)
    np.testing.assert_allclose(Engine(path).run(x.numpy()), expected.numpy(), rtol=1e-4, atol=1e-4)
    session = ort.InferenceSession(to_onnx(loaded, x[:1]).SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(got, expected.numpy(), atol=0.02)
    binary = lowbit.quantize_report(model, "bnn", example_input=_tokens(1, 0, 10) % 50)
    products = 2 * 2 * 10 * 10 * 8  # two heads: q k^T and weights v, 10 x 10 x 8 each
    assert binary.mac_fraction == pytest.approx(1 - products / (10 * (16 * 48 + 16 * 16) + 16 * 3 + products))


@pytest.mark.parametrize("mode", ["dropout"])  # is_causal is taken (tests/test_causal.py)
def test_attention_forms_it_cannot_capture_are_refused_by_name(mode, tmp_path):
    model = SelfAttention(mode).eval()
    with pytest.raises(UnsupportedLayerError, match="node 'scaled_dot_product_attention'.*dropout"):
        lowbit.save(model, tmp_path / "refused.lowbit", _tokens(1, 0, 10) % 50)


@pytest.mark.parametrize("kdim", [None, 8])
def test_load_state_dict_gives_the_float_architecture_its_packed_projections(kdim, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.MultiheadAttention(32, 4, kdim=kdim, vdim=kdim, batch_first=True)).eval()

    class Self(nn.Module):  # self-attention over the embedded tokens, its keys and values read from 8 features
        def __init__(self):
            super().__init__()
            self.emb, self.attn, self.fc = nn.Embedding(100, 32), model[0], nn.Linear(32, 5)
            self.kv = nn.Linear(32, kdim or 32)

        def forward(self, x):
            e = self.emb(x)
            kv = self.kv(e)
            return self.fc(self.attn(e, kv, kv, need_weights=False)[0].mean(1))

    float_model = Self().eval()
    for source in (float_model, lowbit.calibrate(lowbit.quantize(float_model, "w8a8"), [_tokens(8, 1)])):
        path = tmp_path / "attn.lowbit"
        lowbit.save(source, path, _tokens(1, 0))
        state = lowbit.load_state_dict(path)
        fresh = Self()
        fresh.load_state_dict(state, strict=True)  # the keys of nn.MultiheadAttention: in_proj_weight, ...
        if source is float_model:
            for key, value in float_model.state_dict().items():
                assert torch.equal(state[key], value), key
        again = tmp_path / "again.lowbit"
        lowbit.save(lowbit.load(path), again)  # a loaded model records the attention paths again
        assert set(lowbit.load_state_dict(again)) == set(state)


@pytest.mark.parametrize("attention, match", [("enc", "list of module paths"), ([3], "list of module paths"),
                                              (["enc.__class__"], "list of module paths"),
                                              (["emb"], "emb.q_proj.weight is not stored")])
def test_a_hostile_attention_record_is_a_format_error(attention, match, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tc.lowbit"
    lowbit.save(TC().eval(), path, _tokens(1, 0))
    arrays, metadata, _ = parse_safetensors(path.read_bytes())
    doc = json.loads(metadata["lowbit"])
    doc["model"]["attention"] = attention
    path.write_bytes(pack_safetensors(dict(arrays), {"lowbit": json.dumps(doc)}))
    with pytest.raises(FormatError, match=match):
        lowbit.load_state_dict(path)
