"""Python numbers in graph arithmetic (``x * 0.5``, ``1 - x``, ``x / 6``): captured as the ``scalar`` attribute of
add / sub / mul / div, no join for whole-graph quantization, and a w8a8 model with them saved, loaded, run by the
Engine and exported to onnxruntime."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import UnsupportedLayerError
from lowbit.export.onnx import to_onnx
from lowbit.nn import QuantAct
from lowbit.ops import REGISTRY
from lowbit.runtime import Engine


class ScalarBlock(nn.Module):
    """``conv(x) * 0.5 + 1`` and ``1 - conv(x)``, each through a non-clamping activation into its own conv."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.a(x)
        return self.b(torch.sigmoid(y * 0.5 + 1)) + self.c(torch.tanh(1 - y))


def test_a_scalar_operand_is_no_join_and_the_w8a8_model_saves_loads_runs_and_exports(tmp_path):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    quantized = lowbit.quantize(ScalarBlock().eval(), "w8a8")
    # the products and sums with a number requantize nothing: only the layers quantize (inputs and outputs)
    assert [name for name, m in quantized.named_modules() if isinstance(m, QuantAct)] == []
    assert quantized.b.input_quantizer is not None and quantized.c.input_quantizer is not None
    lowbit.calibrate(quantized, [torch.randn(8, 3, 8, 8, generator=generator) for _ in range(2)])
    x = torch.randn(4, 3, 8, 8, generator=generator)
    path = tmp_path / "scalar.lowbit"
    lowbit.save(quantized, path, x[:1])
    loaded = lowbit.load(path)
    arithmetic = [(n["op"], n["inputs"][0], n["attrs"]) for n in loaded.ir["nodes"] if n["op"] in ("mul", "add", "sub")]
    assert arithmetic == [("mul", "a", {"scalar": 0.5, "scalar_first": False}),
                          ("add", "mul", {"scalar": 1.0, "scalar_first": False}),
                          ("sub", "a", {"scalar": 1.0, "scalar_first": True}),
                          ("add", "b", {})]
    with torch.no_grad():
        expected = quantized(x)
        assert torch.equal(loaded(x), expected)
    step = float(expected.abs().max()) / 127  # another float order may move one 8-bit rounding by a step
    np.testing.assert_allclose(Engine(path).run(x.numpy()), expected.numpy(), atol=step)
    for model in (loaded, quantized):
        session = ort.InferenceSession(to_onnx(model, x[:1]).SerializeToString(), providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        np.testing.assert_allclose(got, expected.numpy(), atol=step)


class Body(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.conv, self.body = nn.Conv2d(3, 4, 1), body

    def forward(self, x):
        return self.body(self.conv(x))


@pytest.mark.parametrize("body, match", [
    (lambda y: torch.add(y, y, alpha=2), "add with alpha=2 is not supported"),
    (lambda y: torch.sub(y, 1.5, alpha=0.5), "sub with alpha=0.5 is not supported"),
    (lambda y: torch.div(y, 2, rounding_mode="floor"), "rounding_mode='floor'"),
    (lambda y: y * float("inf"), "not a finite float32 number"),
    (lambda y: y / 1e39, "not a finite float32 number"),
    (lambda y: y * True, "neither a tensor nor a real number"),
    (lambda y: y / y.size(1), "is a size read off a tensor's shape"),
])
def test_forms_a_scalar_node_cannot_express_are_refused_naming_the_node(tmp_path, body, match):
    with pytest.raises(UnsupportedLayerError, match=f"node '\\w+': .*{match}"):
        lowbit.save(Body(body).eval(), tmp_path / "m.lowbit", torch.zeros(1, 3, 4, 4))
    assert not (tmp_path / "m.lowbit").exists()


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div"])
@pytest.mark.parametrize("first", [False, True])
def test_numpy_and_torch_halves_compute_what_torch_does_bit_for_bit(op, first):
    import operator

    function = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv}[op]
    x = torch.cat([torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 100,
                   torch.tensor([0.0, -0.0, 1e-40, 3e38, -3e38])])
    schema = REGISTRY[op]
    for number in (0.1, 1 / 3, -2.5, 7, 1e-3, 1e30, 0):
        attrs = {"scalar": float(number), "scalar_first": first}
        expected = function(number, x) if first else function(x, number)  # s / x is reciprocal(x) * s in torch
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            np.testing.assert_array_equal(schema.numpy([x.numpy()], attrs), expected.numpy())
        torch.testing.assert_close(schema.torch(torch, [x], attrs), expected, rtol=0, atol=0, equal_nan=True)
