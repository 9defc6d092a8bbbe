"""torchvision's classifiers, quantized w8a8, through save, load from the file alone, the Engine and onnxruntime.

torchvision's PyPI wheel is built for the CUDA torch, so ``import torchvision`` fails beside the CPU torch
(its compiled ops); its model definitions are pure Python and load from its package folder without them.
Random weights, batch-norm statistics from a few train-mode passes, 64x64 inputs (32x32 where a model's last
feature map is still at least 1x1 there: VGG's pools it up to 7x7), no weights downloaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import numpy as np
import onnxruntime as ort
import pytest
import torch

import lowbit
from lowbit.export.onnx import to_onnx
from lowbit.runtime import Engine

#: model -> (module of torchvision.models, constructor, keyword arguments)
MODELS = {
    "resnet18": ("resnet", "resnet18", {}),
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
    return getattr(importlib.import_module(f"torchvision.models.{module}"), name)(**kwargs)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_w8a8_model_saves_loads_runs_and_exports_alike(name, tmp_path):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = torchvision_model(*MODELS[name]).train()
    size = SIZES.get(name, 64)
    with torch.no_grad():
        for _ in range(2):  # batch-norm statistics
            model(torch.randn(8, 3, size, size, generator=generator))
    quantized = lowbit.quantize(model.eval(), "w8a8")
    lowbit.calibrate(quantized, [torch.randn(8, 3, size, size, generator=generator) for _ in range(2)])
    x = torch.randn(4, 3, size, size, generator=generator)
    path = tmp_path / f"{name}.lowbit"
    lowbit.save(quantized, path, x[:1])
    loaded = lowbit.load(path)
    with torch.no_grad():
        expected = quantized(x)
        assert torch.equal(loaded(x), expected)
    engine = Engine(path).run(x.numpy())
    assert (engine.argmax(1) == expected.numpy().argmax(1)).all()
    assert cosine(engine, expected.numpy()) > 0.999  # float sums in another order flip a few 8-bit roundings
    session = ort.InferenceSession(to_onnx(loaded, x[:1]).SerializeToString(), providers=["CPUExecutionProvider"])
    (exported,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert cosine(exported, expected.numpy()) > 0.999
