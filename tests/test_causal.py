"""Decoder-only language models with causal attention: nn.TransformerEncoder with is_causal and the model's own
causal mask, and F.scaled_dot_product_attention(is_causal=True), quantized whole-graph at w8a8, saved, loaded, run
by the Engine and by onnxruntime; causality checked in each; the positional table sliced to the sequence length."""

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
from lowbit.errors import ConfigError, FormatError, ShapeMismatchError
from lowbit.export.onnx import to_onnx
from lowbit.format.container import pack_safetensors, parse_safetensors
from lowbit.ops import REGISTRY
from lowbit.ops.activation import softmax
from lowbit.runtime import Engine

VOCAB, CTX = 64, 16


class GPT(nn.Module):
    """Token and learned positional embedding, pre-norm blocks with causal self-attention, an LM head."""

    def __init__(s, vocab=VOCAB, d=32, heads=4, n=2, ctx=CTX):
        super().__init__()
        s.tok = nn.Embedding(vocab, d)
        s.pos = nn.Parameter(torch.randn(1, ctx, d) * 0.02)
        s.blocks = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, heads, 4 * d, batch_first=True,
                                                                    norm_first=True, activation="gelu"), n,
                                         enable_nested_tensor=False)
        s.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(ctx))
        s.ln = nn.LayerNorm(d)
        s.head = nn.Linear(d, vocab)

    def forward(s, x):
        h = s.tok(x) + s.pos[:, :x.shape[1]]
        return s.head(s.ln(s.blocks(h, mask=s.mask[:x.shape[1], :x.shape[1]], is_causal=True)))


class MaskOnly(GPT):
    """The causal mask alone, without the is_causal hint (torch detects it): an additive -inf constant in the
    graph, added to the scores before the softmax."""

    def forward(s, x):
        h = s.tok(x) + s.pos[:, :x.shape[1]]
        return s.head(s.ln(s.blocks(h, mask=s.mask[:x.shape[1], :x.shape[1]])))


class SDPA(nn.Module):
    """Hand-written causal blocks: packed qkv, F.scaled_dot_product_attention(is_causal=True), an MLP."""

    def __init__(s, vocab=VOCAB, d=32, heads=4, n=2, ctx=CTX):
        super().__init__()
        s.heads = heads
        s.tok, s.pos = nn.Embedding(vocab, d), nn.Parameter(torch.randn(1, ctx, d) * 0.02)
        s.blocks = nn.ModuleList(nn.ModuleDict({"ln1": nn.LayerNorm(d), "qkv": nn.Linear(d, 3 * d),
                                                "proj": nn.Linear(d, d), "ln2": nn.LayerNorm(d),
                                                "fc1": nn.Linear(d, 4 * d), "fc2": nn.Linear(4 * d, d)})
                                 for _ in range(n))
        s.head = nn.Linear(d, vocab)

    def forward(s, x):
        h = s.tok(x) + s.pos[:, :x.shape[1]]
        n, length, d = h.shape
        for b in s.blocks:
            qkv = b["qkv"](b["ln1"](h)).chunk(3, -1)
            q, k, v = (qkv[i].reshape(n, length, s.heads, d // s.heads).transpose(1, 2) for i in range(3))
            y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + b["proj"](y.transpose(1, 2).reshape(n, length, d))
            h = h + b["fc2"](nn.functional.gelu(b["fc1"](b["ln2"](h))))
        return s.head(h)


def _random(n: int, seed: int, length: int = CTX) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _next(x: torch.Tensor) -> torch.Tensor:
    """The next token of the chain ``x_{t+1} = 7 x_t + 3 mod VOCAB`` at every position."""
    return (7 * x + 3) % VOCAB


def _trained(cls: type[nn.Module]) -> nn.Module:
    """60 Adam steps of next-token prediction on random tokens, so that the logits are decisive."""
    torch.manual_seed(0)
    model = cls()
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for step in range(60):
        x = _random(32, step)
        loss = nn.functional.cross_entropy(model(x).reshape(-1, VOCAB), _next(x).reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def _quantized(cls, tmp_path, length: int = CTX):
    model = _trained(cls)
    report = lowbit.quantize_report(model, "w8a8", example_input=_random(1, 0, length))
    q = lowbit.calibrate(report.model, [_random(16, 100 + i, length) for i in range(4)])
    path = tmp_path / "lm.lowbit"
    lowbit.save(q, path)
    return model, report, q, path


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a.ravel(), b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b))


def _changed_later(x: torch.Tensor, position: int, seed: int) -> torch.Tensor:
    """``x`` with every token from ``position`` on replaced by another."""
    y = x.clone()
    y[:, position:] = (y[:, position:] + torch.randint(1, VOCAB, y[:, position:].shape,
                                                       generator=torch.Generator().manual_seed(seed))) % VOCAB
    return y


@pytest.mark.parametrize("cls", [GPT, MaskOnly, SDPA])
def test_a_causal_language_model_quantizes_whole_graph_at_w8a8(cls, tmp_path, one_thread):
    model, report, q, path = _quantized(cls, tmp_path)
    assert report.weight_fraction >= 0.95 and report.mac_fraction >= 0.95
    loaded = lowbit.load(path)  # the file alone: the graph holds the causal form
    ops = {(n["op"], n["attrs"].get("causal")) for n in loaded.ir["nodes"]}
    assert {GPT: ("softmax", True), SDPA: ("attention", True), MaskOnly: ("softmax", None)}[cls] in ops
    masks = [n for n in loaded.ir["nodes"] if n["params"].get("value") == "mask"]
    assert len(masks) == (cls is MaskOnly)  # with is_causal the mask is never read (torch does not read it either)
    if cls is not SDPA:
        assert torch.equal(loaded.mask, model.mask)  # but stored, and held by the loaded model
    x = _random(50, 501)
    with torch.no_grad():
        expected = q(x)
        assert torch.equal(loaded(x), expected)
        assert (model(x).argmax(-1) == _next(x)).float().mean() >= 0.99  # trained: decisive logits
        assert (expected.argmax(-1) == model(x).argmax(-1)).float().mean() >= 0.99
    ref = expected.numpy()
    got = Engine(path).run(x.numpy())
    assert np.array_equal(got.argmax(-1), ref.argmax(-1)) and _cosine(got, ref) >= 0.999
    session = ort.InferenceSession(to_onnx(loaded, x[:1]).SerializeToString(), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert np.isfinite(onnx_out).all() and (onnx_out.argmax(-1) == ref.argmax(-1)).mean() >= 0.99

    # causality: tokens from position p on never change the logits before p, in torch, the Engine and ONNX
    engine = Engine(path)
    for p in (1, 7, CTX - 1):
        y = _changed_later(x[:8], p, p)
        with torch.no_grad():
            a, b = loaded(x[:8]), loaded(y)
            assert torch.equal(a[:, :p], b[:, :p]) and not torch.equal(a[:, p:], b[:, p:])
            fa, fb = model(x[:8]), model(y)
            torch.testing.assert_close(fa[:, :p], fb[:, :p], rtol=1e-5, atol=1e-5)
        ea, eb = engine.run(x[:8].numpy()), engine.run(y.numpy())
        np.testing.assert_allclose(ea[:, :p], eb[:, :p], rtol=1e-5, atol=1e-5)
        assert not np.allclose(ea[:, p:], eb[:, p:])
        oa, ob = (session.run(None, {session.get_inputs()[0].name: t.numpy()})[0] for t in (x[:8], y))
        np.testing.assert_allclose(oa[:, :p], ob[:, :p], rtol=1e-5, atol=1e-5)
        assert not np.allclose(oa[:, p:], ob[:, p:])


def test_a_sequence_shorter_than_the_context_reads_the_head_of_the_positional_table(tmp_path, one_thread):
    model, _, q, path = _quantized(GPT, tmp_path, length=10)
    loaded = lowbit.load(path)
    (pos,) = [n for n in loaded.ir["nodes"] if n["params"].get("value") == "pos"]
    assert pos["attrs"]["crop"] == [1, 10, 32] and pos["shape"] == [1, 10, 32]
    assert torch.equal(loaded.pos, model.pos)  # the whole table is stored; the graph reads its first 10 rows
    x = _random(20, 600, 10)
    with torch.no_grad():
        expected = q(x)
        assert torch.equal(loaded(x), expected)
        torch.testing.assert_close(expected, model(x), rtol=0.2, atol=0.5)  # 8 bits: close, not equal
    got = Engine(path).run(x.numpy())
    assert np.array_equal(got.argmax(-1), expected.numpy().argmax(-1))
    session = ort.InferenceSession(to_onnx(loaded, x[:1]).SerializeToString(), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert (onnx_out.argmax(-1) == expected.numpy().argmax(-1)).mean() >= 0.99
    assert _cosine(onnx_out, expected.numpy()) >= 0.999
    with pytest.raises(ConfigError, match="engine input .* must have shape \\[batch, 10\\]"):
        Engine(path).run(_random(2, 1, 12).numpy())  # a file runs at the length it was recorded at


@pytest.mark.parametrize("cls", [GPT, SDPA])
def test_a_sequence_longer_than_the_positional_table_is_a_typed_error_naming_it(cls):
    torch.manual_seed(0)
    with pytest.raises(ShapeMismatchError, match=r"node 'getitem\w*' slices 'pos' to 20 along axis 1, but it holds "
                                                 r"16: .*longer than the recorded maximum 16"):
        lowbit.quantize_report(cls().eval(), "w8a8", example_input=_random(1, 0, 20))


def test_causal_softmax_against_torch_and_hand_worked_values():
    scores = np.array([[[1.0, 5.0, -3.0], [0.0, 0.0, 9.0], [2.0, 2.0, 2.0]]], np.float32)
    got = softmax(scores, -1, causal=True)
    e = np.exp(np.float32(-1.0))
    np.testing.assert_allclose(got[0], [[1, 0, 0], [0.5, 0.5, 0], [1 / 3, 1 / 3, 1 / 3]], rtol=1e-6)
    assert got[0, 1, 2] == 0.0 and got[0, 0, 1] == 0.0 and e > 0  # masked keys weigh exactly 0
    schema = REGISTRY["softmax"]
    torch_got = schema.torch(torch, [torch.from_numpy(scores)], {"axis": -1, "causal": True})
    np.testing.assert_allclose(torch_got.numpy(), got, rtol=1e-6)


@settings(max_examples=30, deadline=None)
@given(lq=st.integers(1, 6), lk=st.integers(1, 6), head=st.integers(1, 5), seed=st.integers(0, 2**16),
       special=st.sampled_from([None, 0.0, 1e30, -1e30, float("nan")]))
def test_causal_attention_equals_torchs_and_is_never_nan(lq, lk, head, seed, special):
    """The attention op's numpy form against torch's scaled_dot_product_attention(is_causal=True), for any query
    and key lengths (top-left aligned), with zeros, huge scores and NaN (which stays in its own query's row): key 0
    is never masked, so no row is all -inf."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((2, lq if i == 0 else lk, head)).astype(np.float32) for i in range(3))
    if special is not None:
        q[:, 0] = special
    attrs = {"scale": 0.5, "causal": True}
    got = REGISTRY["attention"].numpy([q, k, v], attrs)
    expected = torch.nn.functional.scaled_dot_product_attention(*map(torch.from_numpy, (q, k, v)), is_causal=True,
                                                                scale=0.5)
    assert np.isfinite(got).all() == bool(torch.isfinite(expected).all())
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-5)
    assert np.isfinite(got[:, 1:]).all()  # only a NaN query's own row is NaN
    torch.testing.assert_close(REGISTRY["attention"].torch(torch, list(map(torch.from_numpy, (q, k, v))), attrs),
                               expected, rtol=0, atol=0, equal_nan=True)


def _edited(path, tmp_path, edit) -> object:
    arrays, metadata, _ = parse_safetensors(path.read_bytes())
    doc = json.loads(metadata["lowbit"])
    edit(doc["graph"]["nodes"])
    bad = tmp_path / "bad.lowbit"
    bad.write_bytes(pack_safetensors(dict(arrays), {"lowbit": json.dumps(doc)}))
    return bad


def _first(nodes: list, op: str, **attrs) -> dict:
    return next(n for n in nodes if n["op"] == op and all(n["attrs"].get(k) == v for k, v in attrs.items()))


@pytest.mark.parametrize("edit, match", [
    (lambda ns: _first(ns, "constant", crop=[1, 10, 32])["attrs"].update(crop=[1, 20, 32]), "crop .* from 1 to"),
    (lambda ns: _first(ns, "constant", crop=[1, 10, 32])["attrs"].update(crop=[10, 32]), "crop .* 3 axes"),
    (lambda ns: _first(ns, "constant", crop=[1, 10, 32])["attrs"].update(crop=[1, 0, 32]), "crop must be a list"),
    (lambda ns: _first(ns, "constant", crop=[1, 10, 32])["attrs"].update(crop=[1, 9, 32]), "records the output"),
    (lambda ns: _first(ns, "softmax", causal=True)["attrs"].update(causal=1), "causal must be true or false"),
    (lambda ns: _first(ns, "softmax", causal=True)["attrs"].update(axis=-2), "causal softmax runs over the last"),
])
def test_hostile_causal_and_crop_attributes_are_refused_alike(edit, match, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "gpt.lowbit"
    lowbit.save(GPT().eval(), path, _random(1, 0, 10))
    bad = _edited(path, tmp_path, edit)
    for reader in (lowbit.load, Engine):
        with pytest.raises(FormatError, match=match):
            reader(bad)
