"""Dynamic per-token activation quantization: one range per token (row) or per column, read at run time, in torch,
the numpy Engine and ONNX alike; placed on linear inputs, on both operands of activation products and on a
recurrent layer's input sequence; whole language models at w8a8-dynamic saved, loaded, run and exported."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import TensorProto, helper
from torch import nn

import lowbit
from lowbit.errors import CalibrationError, ConfigError, FormatError
from lowbit.export.onnx import _Builder, to_onnx
from lowbit.ops.specs import check_spec
from lowbit.quantizers import get
from lowbit.runtime import Engine
from lowbit.runtime.activations import uniform

sys.path.insert(0, str(Path(__file__).parent))
from test_causal import GPT, SDPA, _random, _trained  # noqa: E402


def _token(bits: int = 8, symmetric: bool = False, axis: int = -1):
    return get({"name": "uniform", "bits": bits, "symmetric": symmetric, "dynamic": True, "per_token": True,
                "token_axis": axis})


def _oracle(x: torch.Tensor, bits: int, symmetric: bool, axis: int) -> torch.Tensor:
    """Each vector along ``axis`` (0: each sample whole) through torch's own per-channel fake quantization, its
    range widened to 0."""
    if axis == 0:
        return _oracle(x.reshape(len(x), -1), bits, symmetric, -1).reshape(x.shape)
    rows = x.transpose(axis, -1).reshape(-1, x.shape[axis])
    lo, hi = rows.amin(1).clamp(max=0), rows.amax(1).clamp(min=0)
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        scale = torch.clamp(torch.maximum(-lo, hi) / torch.full_like(lo, (qmax - qmin) / 2), min=1.1920929e-07)
        zero = torch.zeros_like(scale, dtype=torch.int32)
    else:
        qmin, qmax = 0, 2**bits - 1
        scale = torch.clamp((hi - lo) / torch.full_like(lo, qmax - qmin), min=1.1920929e-07)
        zero = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax).int()
    out = torch.fake_quantize_per_channel_affine(rows, scale, zero, 0, qmin, qmax)
    return out.reshape(x.transpose(axis, -1).shape).transpose(axis, -1)


_finite = st.floats(-1e4, 1e4, width=32)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 9)), elements=_finite),
       st.sampled_from([2, 4, 8]), st.booleans(), st.sampled_from([-1, -2, 0]))
@example(np.zeros((2, 3, 4), np.float32), 8, False, -1)
@example(np.full((2, 3, 4), 2.5, np.float32), 4, True, -2)
def test_each_token_is_torch_fake_quantize_with_its_own_range(x, bits, symmetric, axis):
    x = torch.from_numpy(x)
    q = _token(bits, symmetric, axis)
    y = q(x)
    assert torch.equal(y, _oracle(x, bits, symmetric, axis))
    assert np.array_equal(uniform(q.spec(), {}, "x")(x.numpy()), y.numpy())  # the Engine's numpy form


def _onnx_quantize(spec: dict, x: np.ndarray, opset: int = 21) -> np.ndarray:
    b = _Builder(opset, False)
    out = b.dynamic_affine("x", spec, "q")
    graph = helper.make_graph(b.nodes, "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info(out.name, TensorProto.FLOAT, None)], b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("bits,symmetric,axis,opset", [(8, False, -1, 21), (8, True, -1, 21), (8, False, -2, 17),
                                                       (4, True, -2, 13), (3, False, -1, 18), (8, False, 0, 21),
                                                       (8, True, 0, 13)])
def test_onnx_form_gives_the_same_bits(bits, symmetric, axis, opset):
    torch.manual_seed(bits + opset)
    x = torch.randn(4, 6, 33) * torch.rand(4, 6, 1) * 10
    x[0, 0] = 0.0
    x[1, 1] = 3.0  # a constant row
    x[2, :, 0] = 1e-9
    q = _token(bits, symmetric, axis)
    assert np.array_equal(_onnx_quantize(q.spec(), x.numpy(), opset), q(x).numpy())


def test_hand_worked_rows():
    x = torch.tensor([[-1.0, 0.0, 2.0], [0.0, 1.5, 3.0]])
    # 2 bits, codes 0..3. Row 0: [lo, hi] = [-1, 2], s = 1, z = 1: exact. Row 1: [0, 3], s = 1, z = 0; 1.5 -> 2
    assert torch.equal(_token(2)(x), torch.tensor([[-1.0, 0.0, 2.0], [0.0, 2.0, 3.0]]))
    # per column (token_axis -2): column 1 is [0, 1.5] -> s = 0.5, exact; column 2 [2, 3] -> [0, 3], s = 1
    assert torch.equal(_token(2, axis=-2)(x), torch.tensor([[-1.0, 0.0, 2.0], [0.0, 1.5, 3.0]]))


def test_a_sample_never_depends_on_the_rest_of_its_batch():
    torch.manual_seed(0)
    x = torch.randn(5, 7, 16)
    x[3] *= 1000  # an outlier sample
    q = _token()
    assert torch.equal(q(x)[0], q(x[:1])[0])
    per_tensor = get({"name": "uniform", "bits": 8, "dynamic": True})
    assert not torch.equal(per_tensor(x)[0], per_tensor(x[:1])[0])  # what a per-tensor dynamic range does


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_are_calibration_errors(bad):
    x = torch.randn(2, 3, 4)
    x[1, 2, 3] = bad
    q = _token()
    with pytest.raises(CalibrationError, match="NaN/Inf"):
        q(x)
    with pytest.raises(CalibrationError, match="NaN/Inf"):
        uniform(q.spec(), {}, "layer 'fc' input")(x.numpy())


def test_invalid_settings_are_typed_errors():
    with pytest.raises(ConfigError, match="dynamic=True"):
        get({"name": "uniform", "dynamic": False, "per_token": True})
    with pytest.raises(ConfigError, match="per_channel=False"):
        get({"name": "uniform", "per_channel": True, "per_token": True})
    with pytest.raises(ConfigError, match="token_axis"):
        get({"name": "uniform", "per_token": True, "token_axis": 1})
    with pytest.raises(ConfigError, match="'minmax'"):
        _token().observer = "mse"
    with pytest.raises(FormatError, match="per_token"):
        check_spec({"name": "uniform", "dynamic": False, "per_token": True}, "node 'fc'")
    with pytest.raises(FormatError, match="token_axis"):
        check_spec({"name": "uniform", "per_token": True, "token_axis": 1}, "node 'fc'")
    assert "per_token" not in check_spec({"name": "uniform"}, "old file")  # written only when set, as spec() does


def test_a_conv_reads_one_range_per_sample_through_file_engine_and_onnx(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 8, 3), nn.ReLU(), nn.Conv1d(8, 4, 1),
                          nn.Flatten(), nn.Linear(4 * 6, 3)).eval()
    q = lowbit.quantize(model, "w8a8-dynamic")
    specs = [q.get_submodule(p).input_quantizer.spec() for p in ("0", "2", "4")]
    assert [s["token_axis"] for s in specs] == [0, 0, -1] and all(s["per_token"] for s in specs)
    x = torch.randn(16, 4, 8)
    outlier = x.clone()
    outlier[3] *= 100  # an outlier sample changes no other sample's result
    with torch.no_grad():
        y = q(x)
        others = torch.arange(16) != 3
        assert torch.equal(q(outlier)[others], y[others])
    path = tmp_path / "conv.lowbit"
    lowbit.save(q, path, x[:1])
    with torch.no_grad():
        assert torch.equal(lowbit.load(path)(x), y)
    assert np.allclose(Engine(path).run(x.numpy()), y.numpy(), rtol=1e-4, atol=1e-4)
    session = ort.InferenceSession(to_onnx(q, x[:1]).SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.allclose(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0], y.numpy(), rtol=1e-4,
                       atol=1e-4)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a.ravel(), b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("cls", [GPT, SDPA])
def test_a_language_model_at_w8a8_dynamic(cls, tmp_path):
    model = _trained(cls)
    report = lowbit.quantize_report(model, "w8a8-dynamic", example_input=_random(1, 0))
    assert report.weight_fraction >= 0.95 and report.mac_fraction >= 0.95
    q = report.model
    specs = [m.quantizer.spec() for m in q.modules() if isinstance(m, lowbit.nn.QuantAct)]
    assert specs and all(s["per_token"] for s in specs)
    assert {s["token_axis"] for s in specs} == {-1, -2}  # rows of a, columns of b in every a @ b
    q = lowbit.calibrate(q, [_random(8, 1)])  # nothing to observe: every range is read at run time
    path = tmp_path / "lm.lowbit"
    lowbit.save(q, path)
    x = _random(64, 9)
    with torch.no_grad():
        expected = q(x)
        assert torch.equal(lowbit.load(path)(x), expected)
        assert (expected.argmax(-1) == model(x).argmax(-1)).float().mean() >= 0.95
    got, ref = Engine(path).run(x.numpy()), expected.numpy()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.99 and _cosine(got, ref) >= 0.999
    session = ort.InferenceSession(to_onnx(q, x[:1]).SerializeToString(), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert (onnx_out.argmax(-1) == ref.argmax(-1)).mean() >= 0.99 and _cosine(onnx_out, ref) >= 0.999
