"""ONNX export in onnxruntime: lowbit's w8a8 QDQ export against float32 and onnxruntime's own quantize_static.

    .venv/bin/python bench/onnx.py [--rounds 7] [--models mlp-wide vgg-small vgg-wide lenet5] [--preset w7a8]

Models (trained float, seed 0, then quantized post-training with preset w8a8, or ``--preset``, on
8 calibration batches of 64 training images):

- ``mlp-wide``: 784-2048-2048-10 MLP (ReLU), 1 epoch on MNIST (compute dominates);
- ``vgg-small``: the Fashion-MNIST CNN (``lowbit.models``, default layers
  32, 32, M, 64, 64, M, 128, M), 1 epoch;
- ``vgg-wide``: the same CNN twice as wide (64, 64, M, 128, 128, M, 256, M), 1 epoch;
- ``lenet5``: LeNet-5 on MNIST, 2 epochs (the MNIST parity check).

Variants, each an onnxruntime session on the CPU provider: ``float32`` (the
float model exported by ``lowbit.export.to_onnx``), ``lowbit`` (the w8a8 model
exported as QDQ with the default ``weight_type="safe"``: uint8 weight codes,
exact on every CPU), ``lowbit-int8`` (the same with ``weight_type="int8"``:
fastest on VNNI CPUs, saturating on x86 without VNNI), ``ort-qdq`` (``onnxruntime.quantization.quantize_static`` of
the float32 file: QDQ, per-channel int8 weights, uint8 activations, min/max on
the same calibration images). Accuracy on the full 10,000-image test set;
parity: argmax agreement and largest |logit| difference between the lowbit
torch model and its export. Timing: per (threads, batch) the variants run
interleaved for ``--rounds`` rounds of about 0.2 s each (after a warm-up); the
figure is the median time per call. Profile: onnxruntime's per-node times
(``SessionOptions.enable_profiling``) at one thread, batch 64, summed per operator type.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this file's directory comes first on sys.path and its name would shadow the onnx package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static  # noqa: E402
from torch import nn  # noqa: E402

from lowbit import workflow  # noqa: E402
from lowbit.data import load_dataset  # noqa: E402
from lowbit.export import export_onnx  # noqa: E402
from lowbit.export.onnx import local_vnni  # noqa: E402

VARIANTS = ("float32", "lowbit", "lowbit-int8", "ort-qdq")
#: benchmark name -> (lowbit model, dataset, epochs, model arguments)
MODELS = {"mlp-wide": ("mlp-wide", "mnist", 1, None),
          "vgg-small": ("vgg-small", "fashion-mnist", 1, None),
          "vgg-wide": ("vgg-small", "fashion-mnist", 1, {"layers": [64, 64, "M", 128, 128, "M", 256, "M"]}),
          "lenet5": ("lenet5", "mnist", 2, None)}
PROFILE_WARMUP, PROFILE_RUNS = 3, 20


def wide_mlp() -> nn.Module:
    """784-2048-2048-10, trained one epoch on MNIST (SGD 0.05, momentum 0.9, batch 64, seed 0)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(),
                          nn.Linear(2048, 10))
    images, labels = load_dataset("mnist", "train")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    for i in range(0, len(order), 64):
        batch = order[i:i + 64]
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
        optimizer.step()
    return model.eval()


def float_model(name: str) -> nn.Module:
    if name == "mlp-wide":
        return wide_mlp()
    model, data, epochs, kwargs = MODELS[name]
    result, _ = workflow.cached_train(model, data, epochs=epochs, model_kwargs=kwargs)
    trained, _ = workflow.load_trained(result.checkpoint)
    return trained.eval()


class _Reader(CalibrationDataReader):
    def __init__(self, name: str, batches: list[torch.Tensor]) -> None:
        self.items = iter([{name: b.numpy()} for b in batches])

    def get_next(self):
        return next(self.items, None)


def session(path: Path, threads: int, profile: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = str(path.with_suffix(""))
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def profile(path: Path, x: np.ndarray) -> dict[str, float]:
    """Milliseconds per call spent in each operator type (onnxruntime's profiler, one thread, after a warm-up)."""
    s = session(path, 1, profile=True)
    feed = {s.get_inputs()[0].name: x}
    for _ in range(PROFILE_WARMUP + PROFILE_RUNS):
        s.run(None, feed)
    trace = Path(s.end_profiling())
    events = json.loads(trace.read_text())
    os.remove(trace)
    runs = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    totals: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= runs[PROFILE_WARMUP]:
            op = e["args"]["op_name"]
            totals[op] = totals.get(op, 0.0) + e["dur"] / 1e3 / PROFILE_RUNS
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def logits(s: ort.InferenceSession, images: np.ndarray) -> np.ndarray:
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: images[i:i + 1000]})[0] for i in range(0, len(images), 1000)])


def per_call(s: ort.InferenceSession, x: np.ndarray, seconds: float = 0.2) -> float:
    feed = {s.get_inputs()[0].name: x}
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        s.run(None, feed)
        calls += 1
    return elapsed / calls


def bench_model(name: str, rounds: int, work: Path, preset: str = "w8a8") -> dict:
    data = MODELS[name][1]
    model = float_model(name)
    example = workflow.example_input(data)
    batches = workflow.calibration_batches(data, 8, seed=0)
    quantized = workflow.post_training_quantize(model, preset, batches)
    paths = {v: work / f"{name}-{v}.onnx" for v in VARIANTS}
    export_onnx(model, paths["float32"], example)
    export_onnx(quantized, paths["lowbit"], example)
    export_onnx(quantized, paths["lowbit-int8"], example, weight_type="int8")
    input_name = session(paths["float32"], 1).get_inputs()[0].name
    quantize_static(str(paths["float32"]), str(paths["ort-qdq"]), _Reader(input_name, batches),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    images, labels = load_dataset(data, "test")
    x, y = images.numpy(), labels.numpy()
    out: dict = {"model": name, "preset": preset, "data": data, "examples": len(y), "accuracy": {}, "timing": []}
    results = {v: logits(session(paths[v], 2), x) for v in VARIANTS}
    for v in VARIANTS:
        out["accuracy"][v] = float((results[v].argmax(1) == y).mean())
    with torch.no_grad():
        ref = torch.cat([quantized(images[i:i + 1000]) for i in range(0, len(images), 1000)]).numpy()
    out["accuracy"]["lowbit-torch"] = float((ref.argmax(1) == y).mean())
    out["parity"] = {v: {"argmax_agreement": float((ref.argmax(1) == results[v].argmax(1)).mean()),
                         "max_abs_logit_diff": float(np.abs(ref - results[v]).max()),
                         "max_abs_logit": float(np.abs(ref).max())} for v in ("lowbit", "lowbit-int8")}
    out["profile_ms"] = {v: profile(paths[v], x[:64]) for v in VARIANTS}
    for threads in (1, 2):
        sessions = {v: session(paths[v], threads) for v in VARIANTS}
        for batch in (1, 64):
            feed = x[:batch]
            for s in sessions.values():
                per_call(s, feed, 0.1)  # warm-up
            times: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for _ in range(rounds):
                for v in VARIANTS:
                    times[v].append(per_call(sessions[v], feed))
            med = {v: statistics.median(t) for v, t in times.items()}
            row = {"threads": threads, "batch": batch, **{f"{v}_ms": 1e3 * med[v] for v in VARIANTS},
                   "lowbit_speedup": med["float32"] / med["lowbit"],
                   "lowbit_int8_speedup": med["float32"] / med["lowbit-int8"],
                   "ort_qdq_speedup": med["float32"] / med["ort-qdq"],
                   "lowbit_vs_ort_qdq": med["ort-qdq"] / med["lowbit"]}
            out["timing"].append(row)
            print(f"{name} threads {threads} batch {batch}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()
                                                                          if isinstance(v, float)), flush=True)
    return out


def table(results: list[dict]) -> str:
    lines = ["| model | threads | batch | float32 | lowbit (safe) | lowbit int8 weights | ort quantize_static | "
             "lowbit vs float32 | lowbit int8 vs float32 | ort vs float32 | lowbit speed / ort speed |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for t in r["timing"]:
            lines.append(f"| {r['model']} | {t['threads']} | {t['batch']} | {t['float32_ms']:.3f} ms | "
                         f"{t['lowbit_ms']:.3f} ms | {t['lowbit-int8_ms']:.3f} ms | {t['ort-qdq_ms']:.3f} ms | "
                         f"{t['lowbit_speedup']:.2f}x | {t['lowbit_int8_speedup']:.2f}x | "
                         f"{t['ort_qdq_speedup']:.2f}x | {t['lowbit_vs_ort_qdq']:.2f} |")
    lines += ["", "| model | data | float32 acc | lowbit torch acc | lowbit onnx acc (safe / int8) | ort qdq acc | "
              "argmax agreement (safe / int8) | max logit diff, safe / int8 (of max logit) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results:
        a, p = r["accuracy"], r["parity"]
        safe, int8 = p["lowbit"], p["lowbit-int8"]
        lines.append(f"| {r['model']} | {r['data']} | {100 * a['float32']:.2f}% | {100 * a['lowbit-torch']:.2f}% | "
                     f"{100 * a['lowbit']:.2f}% / {100 * a['lowbit-int8']:.2f}% | {100 * a['ort-qdq']:.2f}% | "
                     f"{100 * safe['argmax_agreement']:.2f}% / {100 * int8['argmax_agreement']:.2f}% | "
                     f"{safe['max_abs_logit_diff']:.4f} / {int8['max_abs_logit_diff']:.4f} "
                     f"({safe['max_abs_logit']:.2f}) |")
    lines += ["", "| model | variant | ms per batch of 64 by operator type (one thread, onnxruntime profiler) |",
              "|---|---|---|"]
    for r in results:
        for v, ops in r["profile_ms"].items():
            lines.append(f"| {r['model']} | {v} | " + ", ".join(f"{op} {ms:.2f}" for op, ms in ops.items()
                                                               if ms >= 0.01) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (median; default 7)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--preset", default="w8a8", help="lowbit preset of the quantized model (default: w8a8)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "onnx.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        results = [bench_model(name, args.rounds, Path(work), args.preset) for name in args.models]
    vnni = local_vnni() or []
    Path(args.out).write_text(json.dumps({"onnxruntime": ort.__version__, "cpu_vnni": vnni, "results": results},
                                         indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
