"""Group-wise uniform weights (group_uniform / the group_affine codec): an independent numpy reference, torch's
fake_quantize as an oracle, hand-worked values and byte counts, the file round trip, the Engine and onnxruntime."""

from __future__ import annotations

import json
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lowbit
from lowbit.config import PRESETS, preset
from lowbit.errors import CalibrationError, ConfigError, FormatError
from lowbit.export import to_onnx
from lowbit.format.codecs import NumpyEncoded, decode, encode, values
from lowbit.nn import QuantConv1d, QuantLinear
from lowbit.quantizers import decode as torch_decode
from lowbit.quantizers import get
from lowbit.runtime import Engine
from lowbit.serialize import inspect_file

F32 = np.float32
EPS = np.finfo(np.float32).eps


def group_spec(bits=4, group_size=128, symmetric=False):
    return {"name": "group_uniform", "bits": bits, "group_size": group_size, "symmetric": symmetric}


# ---------------------------------------------------------------- an independent numpy reference


def reference(w: np.ndarray, bits: int, g: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """(codes, values) of group-wise quantization, one group at a time in float32 numpy (module docstring)."""
    rows = w.reshape(w.shape[0], -1).astype(F32)
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    else:
        qmin, qmax = 0, 2**bits - 1
    codes = np.zeros(rows.shape, np.int64)
    out = np.zeros(rows.shape, F32)
    for o in range(rows.shape[0]):
        for start in range(0, rows.shape[1], g):
            v = rows[o, start:start + g]
            lo, hi = min(F32(v.min()), F32(0)), max(F32(v.max()), F32(0))
            if symmetric:
                s = max(F32(max(-lo, hi)) / F32(qmax), F32(EPS))
                z = 0
            else:
                s = max(F32(hi - lo) / F32(qmax - qmin), F32(EPS))
                z = int(np.clip(qmin - np.rint(lo / s), qmin, qmax))
            q = np.clip(np.rint(v * (F32(1) / s)) + z, qmin, qmax).astype(np.int64)
            codes[o, start:start + g] = q
            out[o, start:start + g] = (q - z).astype(F32) * s
    return codes.reshape(w.shape), out.reshape(w.shape)


floats = st.one_of(st.floats(-1e6, 1e6, width=32, allow_subnormal=True),
                   st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-30, 3.0]))


@st.composite
def weights(draw):
    rows, k = draw(st.integers(1, 4)), draw(st.integers(1, 40))
    if draw(st.booleans()):  # some constant groups / rows
        data = [draw(floats)] * (rows * k)
    else:
        data = draw(st.lists(floats, min_size=rows * k, max_size=rows * k))
    return np.array(data, dtype=F32).reshape(rows, k)


@settings(max_examples=200, deadline=None)
@given(weights(), st.integers(2, 8), st.sampled_from([1, 2, 3, 7, 8, 32, 64, 128]), st.booleans())
def test_codes_and_values_equal_the_numpy_reference(w, bits, g, symmetric):
    q = get(group_spec(bits, g, symmetric)).eval()
    x = torch.from_numpy(w)
    enc = q.encode(x)
    codes, want = reference(w, bits, g, symmetric)
    assert np.array_equal(enc.codes.numpy(), codes)
    got = q(x).numpy()
    assert np.array_equal(got.view(np.uint32), (want + F32(0)).view(np.uint32))  # +0: no -0.0 in decoded values
    assert torch.equal(torch_decode(enc), q(x))
    assert enc.params["scale"].shape == (w.shape[0], math.ceil(w.shape[1] / g))


@settings(max_examples=60, deadline=None)
@given(weights(), st.integers(2, 8), st.sampled_from([1, 2, 4, 8]), st.booleans())
def test_dividing_groups_equal_torch_fake_quantize_per_channel(w, bits, g, symmetric):
    """Rows of whole groups as channels: torch's fake_quantize_per_channel_affine with the groups' scales."""
    w = np.concatenate([w] * g, axis=1)  # K a multiple of g
    q = get(group_spec(bits, g, symmetric))
    x = torch.from_numpy(w)
    enc = q.encode(x)
    zero = enc.params["zero_point"] if not symmetric else torch.zeros_like(enc.params["scale"], dtype=torch.int64)
    oracle = torch.fake_quantize_per_channel_affine(
        x.reshape(-1, g), enc.params["scale"].reshape(-1), zero.reshape(-1).int(), 0, q.qmin, q.qmax).reshape(x.shape)
    assert torch.equal(q(x), oracle + 0.0)


def test_hand_worked_group():
    q = get(group_spec(4, 128))
    enc = q.encode(torch.tensor([[-1.0, 0.5, 2.0]]))
    assert enc.codes.tolist() == [[0, 7, 15]]  # s = 0.2, z = 5; 0.5 / 0.2 = 2.5 rounds to 2
    assert torch.allclose(enc.params["scale"], torch.tensor([[0.2]])) and enc.params["zero_point"].tolist() == [[5]]
    assert torch.allclose(q(torch.tensor([[-1.0, 0.5, 2.0]])), torch.tensor([[-1.0, 0.4, 2.0]]))
    sym = get(group_spec(3, 2, symmetric=True)).encode(torch.tensor([[-3.0, 1.0, 0.5, 0.25]]))
    # groups [-3, 1] (s = 3/3 = 1) and [0.5, 0.25] (s = 0.5/3); narrow 3-bit codes in [-3, 3]
    assert sym.codes.tolist() == [[-3, 1, 3, 2]] and "zero_point" not in sym.params


def test_a_group_size_that_does_not_divide_pads_the_last_group():
    """K = 7, g = 3: groups of 3, 3 and 1; the short group is quantized as if alone (zero padding is in range)."""
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    enc = get(group_spec(4, 3)).encode(x)
    assert enc.params["scale"].shape == (5, 3) and enc.codes.shape == (5, 7)
    alone = get(group_spec(4, 3)).encode(x[:, 6:])
    assert torch.equal(enc.params["scale"][:, 2:], alone.params["scale"])
    assert torch.equal(enc.codes[:, 6:], alone.codes)
    whole = get(group_spec(4, 3)).encode(x[:, :6])
    assert torch.equal(enc.codes[:, :6], whole.codes)


def test_a_group_covering_all_inputs_is_per_channel_uniform():
    x = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    mine = get(group_spec(4, 36)).encode(x)
    theirs = get({"name": "uniform", "bits": 4, "per_channel": True}).encode(x)
    assert torch.equal(mine.codes, theirs.codes)
    assert torch.equal(mine.params["scale"].reshape(-1), theirs.params["scale"])
    assert torch.equal(get(group_spec(4, 1000))(x), get({"name": "uniform", "bits": 4, "per_channel": True})(x))


def test_zero_and_constant_groups():
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0], [3.0, 3.0, -2.0, -2.0]])
    q = get(group_spec(4, 2))
    y = q(x)
    assert torch.equal(y[0], torch.zeros(4)) and not torch.signbit(y[0]).any()  # +0.0, never -0.0
    assert torch.allclose(y[1], x[1], rtol=1e-6)  # a constant group takes an end code: itself up to one rounding
    assert (q.encode(x).params["scale"] > 0).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_are_calibration_errors_naming_the_tensor(bad):
    q = get(group_spec())
    q.label = "fc.weight"
    x = torch.ones(3, 8)
    x[1, 2] = bad
    for call in (q, q.encode):
        with pytest.raises(CalibrationError, match="fc.weight"):
            call(x)


@settings(max_examples=40, deadline=None)
@given(weights(), st.sampled_from([float("nan"), float("inf"), -float("inf")]), st.integers(0, 1000))
def test_any_nonfinite_value_is_rejected(w, bad, where):
    w.reshape(-1)[where % w.size] = bad
    with pytest.raises(CalibrationError):
        get(group_spec(4, 4))(torch.from_numpy(w))


def test_typed_errors_name_the_tensor():
    q = get(group_spec())
    q.label = "net.bias"
    with pytest.raises(ConfigError, match="net.bias"):
        q(torch.ones(5))
    with pytest.raises(CalibrationError, match="empty"):
        q(torch.ones(0, 4))
    for bad in ({"group_size": 0}, {"group_size": 2.0}, {"group_size": True}, {"bits": 1}, {"bits": 9},
                {"symmetric": 1}):
        with pytest.raises(ConfigError):
            get({**group_spec(), **bad})


def test_gradient_is_straight_through_inside_the_grid():
    x = torch.tensor([[-1.0, 0.5, 2.0, 0.3]], requires_grad=True)
    q = get(group_spec(2, 4)).train()
    q(x).mul(torch.tensor([[1.0, 2.0, 3.0, 4.0]])).sum().backward()
    # 2 bits: s = 1, z = 1: round(2) + 1 = 3 = qmax is inside; every value is inside
    assert x.grad.tolist() == [[1.0, 2.0, 3.0, 4.0]]


def test_a_group_quantized_layer_trains():
    torch.manual_seed(0)
    layer = QuantLinear(16, 4, weight_quantizer=group_spec(3, 8))
    x, target = torch.randn(64, 16), torch.randn(64, 4)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    losses = []
    for _ in range(30):
        loss = (layer(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


# ---------------------------------------------------------------- the codec


def _numpy(enc) -> NumpyEncoded:
    return NumpyEncoded(enc.kind, enc.codes.numpy(), enc.bits, {k: v.numpy() for k, v in enc.params.items()},
                        dict(enc.meta))


@pytest.mark.parametrize("symmetric", [False, True])
def test_codec_bytes_by_hand_and_bit_exact_round_trip(symmetric):
    x = torch.randn(10, 100, generator=torch.Generator().manual_seed(2))
    enc = _numpy(get(group_spec(3, 64, symmetric)).encode(x))
    arrays, meta = encode(enc, "fc.weight")
    # 1000 codes x 3 bits = 375 bytes; 10 x 2 groups: 20 float32 scales, 20 zero points x 3 bits = 8 bytes
    assert arrays["codes"].nbytes == 375 and arrays["scale"].shape == (10, 2)
    assert ("zero_point" in arrays) is not symmetric
    if not symmetric:
        assert arrays["zero_point"].dtype == np.uint8 and arrays["zero_point"].nbytes == 8
    back = decode(arrays, json.loads(json.dumps(meta)), "fc.weight")
    assert np.array_equal(back.codes, enc.codes) and back.params.keys() == enc.params.keys()
    assert all(np.array_equal(back.params[k], enc.params[k]) for k in enc.params)
    assert np.array_equal(values(back).view(np.uint32), get(group_spec(3, 64, symmetric))(x).numpy().view(np.uint32))


def test_codec_rejections_are_typed_and_named():
    enc = _numpy(get(group_spec(4, 3)).encode(torch.randn(4, 7)))
    arrays, meta = encode(enc, "fc.weight")

    def rejects(code, arrays, meta):
        with pytest.raises(FormatError) as err:
            decode(arrays, meta, "fc.weight")
        assert err.value.code == code and "fc.weight" in str(err.value)

    rejects("bad-meta", arrays, {**meta, "group_size": 0})
    rejects("bad-meta", arrays, {**meta, "symmetric": "no"})
    rejects("bad-arrays", arrays, {**meta, "symmetric": True})  # a stored zero point it does not expect
    rejects("bad-length", arrays, {**meta, "group_size": 2})  # 4 groups per row: 16 zero points, 12 stored
    sym = _numpy(get(group_spec(4, 3, symmetric=True)).encode(torch.randn(4, 7)))
    sym_arrays, sym_meta = encode(sym, "fc.weight")
    rejects("bad-shape", sym_arrays, {**sym_meta, "group_size": 2})  # 4 groups per row, 3 scales stored
    rejects("bad-shape", {**arrays, "codes": arrays["codes"][:14]}, {**meta, "shape": [28]})
    rejects("bad-scale", {**arrays, "scale": -arrays["scale"]}, meta)
    rejects("bad-length", {**arrays, "zero_point": arrays["zero_point"][:-1]}, meta)
    with pytest.raises(FormatError) as err:
        encode(NumpyEncoded(enc.kind, enc.codes, 4, {**enc.params, "zero_point": enc.params["zero_point"] + 16},
                            enc.meta), "fc.weight")
    assert err.value.code == "bad-param"


# ---------------------------------------------------------------- models: file, Engine, ONNX, bits per weight


class Net(nn.Module):
    """Conv1d [N, 3, 8] -> [N, 8, 6], viewed as a 1-channel image; Conv2d -> [N, 4, 6, 4]; Linear 96 -> 100 -> 10."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(3, 8, 3)
        self.conv2 = nn.Conv2d(1, 4, 3)
        self.fc1 = nn.Linear(96, 100)
        self.fc2 = nn.Linear(100, 10)

    def forward(self, x):
        a = torch.relu(self.conv1(x)).reshape(x.shape[0], 1, 8, 6)
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv2(a)).flatten(1))))


@pytest.mark.parametrize("name,kind", [("w4g128", "group_affine"), ("w3g64", "group_affine"),
                                       ("w3-kmeans-g64", "group_codebook"), ("w2-log-g64", "group_log")])
def test_preset_saves_loads_runs_and_exports(name, kind, tmp_path):
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(3, 3, 8)
    q = lowbit.quantize(model, name)
    assert isinstance(q.get_submodule("conv1"), QuantConv1d)
    with torch.no_grad():
        ref = q(x)
    path = tmp_path / "m.lowbit"
    lowbit.save(q, path, x[:1])
    loaded = lowbit.load(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)
    stored = lowbit.format.container.read_file(path).tensors["fc1.weight"]
    assert stored.kind == kind
    assert torch.equal(torch_decode(q.get_submodule("fc1").weight_quantizer.encode(q.get_submodule("fc1").weight)),
                       torch.from_numpy(values(stored)))
    lowbit.save(loaded, tmp_path / "again.lowbit", x[:1])
    assert (tmp_path / "again.lowbit").read_bytes() == path.read_bytes()
    np.testing.assert_allclose(Engine(path).run(x.numpy()), ref.numpy(), rtol=1e-5, atol=1e-5)
    proto = to_onnx(q, x[:1])
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-5)


def test_bits_per_weight_by_hand(tmp_path):
    """fc1 [100, 96], w4g128: one group of 96 per row. Codes 9600 x 4 bits = 4800 bytes, scales 100 x 4 bytes,
    zero points 100 x 4 bits = 50 bytes: 5250 bytes, 8 * 5250 / 9600 = 4.375 bits per weight.
    w3g64: 2 groups per row (64 + 32): codes 3600, scales 200 x 4 = 800, zero points 200 x 3 bits = 75 bytes:
    4475 bytes, 3.729 bits per weight."""
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(1, 3, 8)
    for name, total in (("w4g128", 5250), ("w3g64", 4475)):
        q = lowbit.quantize(model, name)
        lowbit.save(q, tmp_path / f"{name}.lowbit", x)
        rows = {r["name"]: r for r in inspect_file(tmp_path / f"{name}.lowbit")["tensors"]}
        assert rows["fc1.weight"]["bytes"] == total and rows["fc1.weight"]["codec"] == "group_affine"
        assert rows["fc1.weight"]["bits_per_weight"] == pytest.approx(8 * total / 9600)
        summary = lowbit.summary(q)
        fc1 = next(r for r in summary.layers if r.name == "fc1")
        assert fc1.bytes == total + 4 * 100  # the summary row adds the float32 bias


def test_presets_are_weight_only_in_every_layer():
    for name, (bits, g) in (("w4g128", (4, 128)), ("w3g64", (3, 64))):
        config = preset(name)
        assert PRESETS[name]["weight"] == {"name": "group_uniform", "bits": bits, "group_size": g}
        assert config.input is None and config.output is None
        assert config.first == config.last == "same"


@pytest.mark.parametrize("spec", [group_spec(4, 32), {"name": "group_ternary", "group_size": 32},
                                  {"name": "group_binary", "group_size": 32},
                                  {"name": "group_kmeans", "bits": 2, "group_size": 32},
                                  {"name": "group_log2", "bits": 3, "group_size": 32}])
def test_sparse_and_entropy_coding_keep_the_codes(spec, tmp_path):
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 3, 8)
    q = lowbit.quantize(model, {"weight": spec, "first": "same", "last": "same"})
    with torch.no_grad():
        ref = q(x)
    for kwargs, chain in (({"entropy": "huffman"}, "+huffman"), ({"sparse": True}, "+sparse5"),
                          ({"sparse": 3, "entropy": "ans"}, "+sparse3+ans")):
        lowbit.save(q, tmp_path / "m.lowbit", x[:1], **kwargs)
        with torch.no_grad():
            assert torch.equal(lowbit.load(tmp_path / "m.lowbit")(x), ref)
        rows = {r["name"]: r for r in inspect_file(tmp_path / "m.lowbit")["tensors"]}
        assert rows["fc1.weight"]["chain"].endswith(chain)


def test_lowbit_inspect_prints_bits_per_weight_with_the_group_scales(tmp_path, capsys):
    from lowbit.cli import main

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(1, 3, 8)
    lowbit.save(lowbit.quantize(model, "w4g128"), tmp_path / "m.lowbit", x)
    assert main(["inspect", str(tmp_path / "m.lowbit")]) == 0
    line = next(row for row in capsys.readouterr().out.splitlines() if row.startswith("fc1.weight"))
    assert line.split()[1:4] == ["group_affine", "100x96", "4.38"]  # 8 * 5250 / 9600 = 4.375


# ---------------------------------------------------------------- binary and ternary groups


def scaled_reference(w: np.ndarray, g: int, ternary: bool, threshold: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """(codes, values) of BWN / TWN per group, one group at a time (float64 statistics, alpha rounded once)."""
    rows = w.reshape(w.shape[0], -1)
    codes = np.zeros(rows.shape, np.int64)
    out = np.zeros(rows.shape, F32)
    for o in range(rows.shape[0]):
        for start in range(0, rows.shape[1], g):
            v = rows[o, start:start + g]
            a = np.abs(v.astype(np.float64))
            if ternary:
                keep = a > threshold * a.mean()
                alpha = max(F32(a[keep].sum() / max(keep.sum(), 1)), F32(EPS))
                q = np.sign(v).astype(np.int64) * keep
            else:
                alpha = max(F32(a.mean()), F32(EPS))
                q = (v >= 0).astype(np.int64)
            codes[o, start:start + g] = q
            out[o, start:start + g] = (q if ternary else 2 * q - 1).astype(F32) * alpha
    return codes.reshape(w.shape), out.reshape(w.shape)


@settings(max_examples=150, deadline=None)
@given(weights(), st.sampled_from([1, 2, 3, 7, 8, 32, 128]), st.booleans(), st.sampled_from([0.0, 0.5, 0.7, 1.0]))
def test_binary_and_ternary_groups_equal_the_numpy_reference(w, g, ternary, threshold):
    spec = {"name": "group_ternary", "group_size": g, "threshold": threshold} if ternary else \
        {"name": "group_binary", "group_size": g}
    q = get(spec)
    x = torch.from_numpy(w)
    enc = q.encode(x)
    codes, want = scaled_reference(w, g, ternary, threshold)
    assert np.array_equal(enc.codes.numpy(), codes)
    assert np.array_equal(q(x).numpy().view(np.uint32), (want + F32(0)).view(np.uint32))
    assert torch.equal(torch_decode(enc), q(x))


def test_binary_and_ternary_groups_by_hand():
    x = torch.tensor([[1.0, -3.0, 0.0, 0.5, -0.5]])  # g = 2: [1, -3], [0, 0.5], [-0.5]
    binary = get({"name": "group_binary", "group_size": 2})
    assert binary.encode(x).codes.tolist() == [[1, 0, 1, 1, 0]]
    assert binary(x).tolist() == [[2.0, -2.0, 0.25, 0.25, -0.5]]
    ternary = get({"name": "group_ternary", "group_size": 2})
    # deltas 1.4, 0.175, 0.35: [0, -1], [0, 1], [-1]; alphas 3, 0.5, 0.5
    assert ternary.encode(x).codes.tolist() == [[0, -1, 0, 1, -1]]
    assert ternary(x).tolist() == [[0.0, -3.0, 0.0, 0.5, -0.5]]
    constant = torch.full((2, 6), -0.3)
    for q in (binary, ternary):
        assert torch.equal(q(constant), constant)  # alpha = |c| exactly
        with pytest.raises(CalibrationError):
            q(torch.tensor([[1.0, float("nan")]]))
        with pytest.raises(ConfigError):
            q(torch.ones(4))
    assert torch.equal(ternary(torch.zeros(2, 3)), torch.zeros(2, 3))


@pytest.mark.parametrize("spec, total", [({"name": "group_binary", "group_size": 32}, 1200 + 1200),
                                         ({"name": "group_ternary", "group_size": 32}, 2400 + 1200),
                                         ({"name": "group_kmeans", "bits": 2, "group_size": 32}, 2400 + 4800),
                                         ({"name": "group_log2", "bits": 3, "group_size": 32}, 3600 + 1200)])
def test_binary_ternary_and_codebook_groups_through_file_engine_and_onnx(spec, total, tmp_path):
    """fc1 [100, 96], g = 32: 3 groups per row; binary / ternary: 300 float32 scales (1200 bytes) besides the codes
    (9600 x 1 bit = 1200 bytes, x 2 bits = 2400): 1 + 32/32 = 2 and 2 + 1 = 3 bits per weight; 2-bit k-means:
    codes 2400 bytes, 300 codebooks of 4 float32 levels 4800 bytes: 2 + 4 * 32 / 32 = 6 bits per weight; 3-bit
    powers of two: codes 3600 bytes and 300 scales: 3 + 1 = 4 bits per weight."""
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(3, 3, 8)
    q = lowbit.quantize(model, {"weight": spec, "first": "same", "last": "same"})
    with torch.no_grad():
        ref = q(x)
    lowbit.save(q, tmp_path / "m.lowbit", x[:1])
    with torch.no_grad():
        assert torch.equal(lowbit.load(tmp_path / "m.lowbit")(x), ref)
    rows = {r["name"]: r for r in inspect_file(tmp_path / "m.lowbit")["tensors"]}
    codec = {"group_kmeans": "group_codebook", "group_log2": "group_log"}.get(spec["name"], spec["name"])
    assert rows["fc1.weight"]["bytes"] == total and rows["fc1.weight"]["codec"] == codec
    assert rows["fc1.weight"]["bits_per_weight"] == total * 8 / 9600
    assert next(r for r in lowbit.summary(q).layers if r.name == "fc1").bytes == total + 400  # + float32 bias
    np.testing.assert_allclose(Engine(tmp_path / "m.lowbit").run(x.numpy()), ref.numpy(), rtol=1e-5, atol=1e-5)
    session = ort.InferenceSession(to_onnx(q, x[:1]).SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0], ref.numpy(),
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- a k-means codebook per group


@settings(max_examples=80, deadline=None)
@given(weights(), st.integers(1, 4), st.sampled_from([1, 3, 8, 32, 128]))
def test_kmeans_groups_take_their_nearest_level(w, bits, g):
    q = get({"name": "group_kmeans", "bits": bits, "group_size": g})
    x = torch.from_numpy(w)
    enc = q.encode(x)
    book = enc.params["codebook"].numpy()
    assert book.shape == (w.shape[0], math.ceil(w.shape[1] / g), 2**bits)
    y = q(x).numpy()
    assert torch.equal(torch_decode(enc), q(x))
    for o in range(w.shape[0]):
        for j, start in enumerate(range(0, w.shape[1], g)):
            v, levels = w[o, start:start + g], book[o, j]
            codes = enc.codes[o, start:start + g].numpy()
            nearest = np.abs(v[:, None].astype(np.float64) - levels[None, :]).argmin(axis=1)
            assert np.array_equal(codes, nearest)  # nearest float32 level, the lower one on ties
            assert np.array_equal(y[o, start:start + g], levels[codes])


@pytest.mark.parametrize("bits, g", [(1, 8), (2, 16), (3, 32), (4, 128), (3, 7)])
def test_kmeans_groups_follow_lloyd_as_kmeans_1d_does(bits, g):
    """The same Lloyd rounds as the per-tensor k-means (another implementation: midpoints, bincount), group by
    group, on continuous values (where no value lies exactly between two levels)."""
    from lowbit.quantizers.kmeans import kmeans_1d

    w = np.random.default_rng(bits * 100 + g).standard_normal((6, 100)).astype(F32)
    book = get({"name": "group_kmeans", "bits": bits, "group_size": g}).encode(torch.from_numpy(w)).params["codebook"]
    for o in range(w.shape[0]):
        for j, start in enumerate(range(0, w.shape[1], g)):
            want, _ = kmeans_1d(w[o, start:start + g].astype(np.float64), 2**bits)
            np.testing.assert_allclose(np.sort(book[o, j].numpy()), want.astype(F32), rtol=1e-6, atol=1e-30)


def test_kmeans_groups_by_hand():
    q = get({"name": "group_kmeans", "bits": 1, "group_size": 4})
    x = torch.tensor([[0.0, 0.0, 10.0, 10.0, 1.0, 2.0, 3.0]])  # groups [0, 0, 10, 10] and [1, 2, 3]
    enc = q.encode(x)
    assert enc.codes.tolist() == [[0, 0, 1, 1, 0, 0, 1]]
    # [1, 2, 3] from levels [1, 3]: 2 ties and goes to 1 -> {1, 2} mean 1.5, {3}; then stable
    assert enc.params["codebook"].tolist() == [[[0.0, 10.0], [1.5, 3.0]]]
    assert q(x).tolist() == [[0.0, 0.0, 10.0, 10.0, 1.5, 1.5, 3.0]]
    assert torch.equal(q(torch.full((2, 5), -0.3)), torch.full((2, 5), -0.3))
    with pytest.raises(CalibrationError):
        q(torch.tensor([[1.0, float("inf")]]))
    for bad in ({"bits": 0}, {"bits": 9}, {"iters": -1}, {"group_size": 0}):
        with pytest.raises(ConfigError):
            get({"name": "group_kmeans", **bad})


# ---------------------------------------------------------------- powers of two per group


def log_reference(w: np.ndarray, bits: int, g: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes, values): s = max |w| per group, |w| -> s 2^-k with k = round(log2(s / |w|)) (math.log2), 0 past
    the E = 2^(b-1) - 1 levels."""
    levels = 2 ** (bits - 1) - 1
    rows = w.reshape(w.shape[0], -1)
    codes = np.zeros(rows.shape, np.int64)
    out = np.zeros(rows.shape, F32)
    for o in range(rows.shape[0]):
        for start in range(0, rows.shape[1], g):
            v = rows[o, start:start + g]
            s = max(F32(np.abs(v).max()), F32(EPS))
            for i, value in enumerate(v):
                if value == 0:
                    continue
                k = round(math.log2(float(s) / abs(float(value))))
                if k < levels:
                    codes[o, start + i] = int(np.sign(value)) * (levels - k)
                    out[o, start + i] = F32(np.sign(value)) * F32(float(s) * 2.0**-k)
    return codes.reshape(w.shape), out.reshape(w.shape)


@settings(max_examples=150, deadline=None)
@given(weights(), st.integers(2, 6), st.sampled_from([1, 2, 3, 8, 32, 128]))
def test_log_groups_equal_the_numpy_reference(w, bits, g):
    q = get({"name": "group_log2", "bits": bits, "group_size": g})
    x = torch.from_numpy(w)
    enc = q.encode(x)
    codes, want = log_reference(w, bits, g)
    assert np.array_equal(enc.codes.numpy(), codes)
    assert np.array_equal(q(x).numpy().view(np.uint32), (want + F32(0)).view(np.uint32))
    assert torch.equal(torch_decode(enc), q(x))


def test_log_groups_by_hand():
    q = get({"name": "group_log2", "bits": 3, "group_size": 4})  # E = 3 levels: s, s/2, s/4, and 0
    x = torch.tensor([[8.0, 4.0, 6.0, -5.0, 1.0, 0.0, 2.0, 2.9]])
    enc = q.encode(x)
    # s = 8: 6/8 = 0.75 -> 2^0 (log2 -0.415), 5/8 -> 2^-1; s = 2.9: 1/2.9 -> 2^-2 (log2 -1.54), 2/2.9 -> 2^-1
    assert enc.codes.tolist() == [[3, 2, 3, -2, 1, 0, 2, 3]]
    assert torch.allclose(q(x), torch.tensor([[8.0, 4.0, 8.0, -4.0, 0.725, 0.0, 1.45, 2.9]]))
    assert q.encode(torch.tensor([[1.0, 0.1]])).codes.tolist() == [[3, 0]]  # 0.1 = 2^-3.3: past the last level
    assert torch.equal(q(torch.full((2, 5), -0.3)), torch.full((2, 5), -0.3))
    assert torch.equal(q(torch.zeros(2, 5)), torch.zeros(2, 5))
    with pytest.raises(CalibrationError):
        q(torch.tensor([[1.0, float("nan")]]))
    for bad in ({"bits": 1}, {"bits": 7}, {"group_size": -1}):
        with pytest.raises(ConfigError):
            get({"name": "group_log2", **bad})
