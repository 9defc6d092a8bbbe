"""Speed of calibration and of the fake-quantized forward against the float forward of the same model and images.

    .venv/bin/python bench/calibration.py [--images 16] [--batch 8] [--size 224] [--threads 2] [--repeats 3]
                                          [--observers minmax percentile mse entropy]
                                          [--out bench/results/calibration.json]

Model: torchvision's ``mobilenet_v2(weights=None)`` (random weights; torchvision's model definitions are loaded
from its package folder without its compiled ops), eval mode. Data: ``--images`` random-normal images (seed 0)
of ``--size`` x ``--size``, fed in batches of ``--batch``; ``torch.set_num_threads(--threads)``.

Rows, each the seconds to run all the images once:

- ``float forward``: the float model under ``torch.no_grad``, the best of ``--repeats`` runs after a warm-up
  (timed again at the end, the best of both kept, so that load from other processes counts against neither);
- ``calibrate <observer>``: ``lowbit.calibrate(model, batches, observer=...)`` on a freshly quantized w8a8 model
  (``lowbit.quantize`` itself is not timed); one run each;
- ``fake-quant forward <preset>`` (w8a8, w4a8): the min/max-calibrated model under ``torch.no_grad`` in eval
  mode, best of ``--repeats`` runs after a warm-up.

Each row's ratio is its seconds over the float forward's. An observer the library does not know is recorded
as an error row and the run goes on. Results go to ``--out`` as JSON with the command that produced them.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this file's directory comes first on sys.path and bench/onnx.py would shadow the onnx package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import copy
import importlib
import importlib.util
import json
import platform
import time
import types

import torch

import lowbit
from lowbit.errors import LowbitError

OBSERVERS = ("minmax", "percentile", "mse", "entropy")
PRESETS = ("w8a8", "w4a8")


def torchvision_model(module: str, name: str, kwargs: dict) -> torch.nn.Module:
    """torchvision's model definition, imported without torchvision's ``__init__`` (its compiled ops are absent)."""
    if "torchvision" not in sys.modules:
        spec = importlib.util.find_spec("torchvision")
        if spec is None:
            raise RuntimeError("torchvision's model definitions are not installed")
        package = types.ModuleType("torchvision")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["torchvision"] = package
    return getattr(importlib.import_module(f"torchvision.models.{module}"), name)(**kwargs)


def seconds(run, repeats: int, warm_up: bool) -> float:
    """The best wall-clock seconds of ``repeats`` calls of ``run`` (after one untimed call when ``warm_up``)."""
    if warm_up:
        run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def forward_all(model: torch.nn.Module, batches: list[torch.Tensor]):
    """A callable running every batch through ``model`` without gradients."""

    def run() -> None:
        with torch.no_grad():
            for batch in batches:
                model(batch)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--observers", nargs="+", default=list(OBSERVERS))
    parser.add_argument("--out", type=Path, default=Path("bench/results/calibration.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.randn(args.images, 3, args.size, args.size)
    batches = list(images.split(args.batch))
    float_model = torchvision_model("mobilenetv2", "mobilenet_v2", {"weights": None}).eval()

    float_run = forward_all(float_model, batches)
    float_seconds = seconds(float_run, args.repeats, warm_up=True)
    rows: list[dict] = []

    def quantized(preset: str) -> torch.nn.Module:
        return lowbit.quantize(copy.deepcopy(float_model), preset).eval()

    for observer in args.observers:
        model = quantized("w8a8")
        try:
            rows.append({"name": f"calibrate {observer}",
                         "seconds": seconds(lambda: lowbit.calibrate(model, batches, observer=observer), 1, False)})
        except LowbitError as exc:
            rows.append({"name": f"calibrate {observer}", "error": f"{type(exc).__name__}: {exc}"})
    for preset in PRESETS:
        model = lowbit.calibrate(quantized(preset), batches)
        rows.append({"name": f"fake-quant forward {preset}",
                     "seconds": seconds(forward_all(model, batches), args.repeats, warm_up=True)})

    float_seconds = min(float_seconds, seconds(float_run, args.repeats, warm_up=False))
    rows.insert(0, {"name": "float forward", "seconds": float_seconds})
    for row in rows:
        if "seconds" in row:
            row["ratio"] = row["seconds"] / float_seconds

    print(f"{'':28s} {'seconds':>9s} {'x float':>8s}")
    for row in rows:
        if "seconds" in row:
            print(f"{row['name']:28s} {row['seconds']:9.3f} {row['ratio']:8.2f}")
        else:
            print(f"{row['name']:28s} {row['error']}")
    result = {
        "command": "python bench/calibration.py " + " ".join(sys.argv[1:]),
        "model": "torchvision mobilenet_v2(weights=None), eval",
        "images": args.images, "batch": args.batch, "size": args.size, "threads": args.threads,
        "repeats": args.repeats, "torch": torch.__version__, "machine": platform.machine(),
        "processor": platform.processor(), "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
