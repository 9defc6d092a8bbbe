"""torchvision's classifiers, quantized w8a8, through save, load from the file alone, the Engine and onnxruntime.

torchvision's PyPI wheel is built for the CUDA torch, so ``import torchvision`` fails beside the CPU torch
(its compiled ops); its model definitions are pure Python and load from its package folder without them.
Random weights, batch-norm statistics from a few train-mode passes, 64x64 inputs (32x32 where a model's last
feature map is still at least 1x1 there: VGG's pools it up to 7x7), no weights downloaded.
"""

from __future__ import annotations

import collections
import importlib
import importlib.util
import sys
import types

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import lowbit
from lowbit.export.onnx import to_onnx
from lowbit.runtime import Engine

#: model -> (module of torchvision.models, constructor, keyword arguments)
MODELS = {
    "resnet18": ("resnet", "resnet18", {}),
    "resnet50": ("resnet", "resnet50", {}),
    "mobilenet_v3_large": ("mobilenetv3", "mobilenet_v3_large", {}),
    "mobilenet_v2": ("mobilenetv2", "mobilenet_v2", {}),
    "mobilenet_v3_small": ("mobilenetv3", "mobilenet_v3_small", {}),
    "shufflenet_v2_x1_0": ("shufflenetv2", "shufflenet_v2_x1_0", {}),
    "squeezenet1_1": ("squeezenet", "squeezenet1_1", {}),
    "efficientnet_b0": ("efficientnet", "efficientnet_b0", {}),
    "regnet_y_400mf": ("regnet", "regnet_y_400mf", {}),
    "googlenet": ("googlenet", "googlenet", {"aux_logits": False, "init_weights": False}),
    "densenet121": ("densenet", "densenet121", {}),
    "vgg11_bn": ("vgg", "vgg11_bn", {}),
    "convnext_tiny": ("convnext", "convnext_tiny", {}),
    # timm's own layers: BatchNormAct2d (functional batch norm), SqueezeExcite, hard-swish, ...
    "timm/efficientnet_b0": ("timm", "efficientnet_b0", {}),
    "timm/mobilenetv3_large_100": ("timm", "mobilenetv3_large_100", {}),
    "timm/cspresnet50": ("timm", "cspresnet50", {}),
}
#: input height and width per model (64 where not listed)
SIZES = {"vgg11_bn": 32, "convnext_tiny": 32}


def torchvision_model(module: str, name: str, kwargs: dict) -> torch.nn.Module:
    if "torchvision" not in sys.modules:
        spec = importlib.util.find_spec("torchvision")
        if spec is None:
            pytest.skip("torchvision's model definitions are not installed")
        package = types.ModuleType("torchvision")  # its __init__ would load the compiled ops
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["torchvision"] = package
    if module == "timm":  # timm imports torchvision: after the package stub above
        return pytest.importorskip("timm").create_model(name, pretrained=False, **kwargs)
    return getattr(importlib.import_module(f"torchvision.models.{module}"), name)(**kwargs)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))


#: logits cosine the Engine and onnxruntime reach against torch, where not 0.999: float sums in another order flip
#: a few 8-bit roundings, one step each, and resnet50's 53 requantized layers of random weights give logits with a
#: spread (std 0.08) that such steps move by 0.3%; pretrained weights keep 0.999 (tests/test_pretrained.py)
COSINE = {"resnet50": 0.995}


def same_decisions(got: np.ndarray, expected: np.ndarray, name: str) -> bool:
    """Same argmax wherever the top-2 margin of ``expected`` is wider than twice the largest difference (random
    weights give near-ties that one flipped 8-bit rounding may turn), and the logits' cosine of COSINE."""
    top2 = np.sort(expected, axis=1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > 2 * np.abs(got - expected).max()
    agree = got.argmax(1) == expected.argmax(1)
    return bool(agree[decided].all()) and cosine(got, expected) > COSINE.get(name, 0.999)


#: onnxruntime's integer forms of a conv / linear
INTEGER_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_w8a8_model_saves_loads_runs_and_exports_alike(name, tmp_path):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = torchvision_model(*MODELS[name]).train()
    size = SIZES.get(name, 64)
    with torch.no_grad():
        for _ in range(2):  # batch-norm statistics
            model(torch.randn(8, 3, size, size, generator=generator))
    report = lowbit.quantize_report(model.eval(), "w8a8", example_input=(1, 3, size, size))
    assert report.mac_fraction >= 0.98
    quantized = lowbit.calibrate(report.model, [torch.randn(8, 3, size, size, generator=generator)
                                                for _ in range(2)])
    x = torch.randn(4, 3, size, size, generator=generator)
    path = tmp_path / "model.lowbit"
    lowbit.save(quantized, path, x[:1])
    loaded = lowbit.load(path)
    with torch.no_grad():
        expected = quantized(x)
        assert torch.equal(loaded(x), expected)
    expected = expected.numpy()
    assert same_decisions(Engine(path).run(x.numpy()), expected, name)  # float sums in another order flip roundings
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(to_onnx(loaded, x[:1]).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    (exported,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert same_decisions(exported, expected, name)
    ops = collections.Counter(n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node)
    assert sum(ops[op] for op in INTEGER_OPS) == len(report.converted), ops  # every layer an integer op
    assert ops["Conv"] == ops["Gemm"] == 0, ops  # (a float MatMul may remain: an adaptive pool's bin averages)
