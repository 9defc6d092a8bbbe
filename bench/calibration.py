"""Speed of calibration and of the fake-quantized forward against the float forward of the same model and images.

    .venv/bin/python bench/calibration.py [--images 16] [--batch 8] [--size 224] [--threads 2] [--repeats 3]
                                          [--observers minmax percentile mse entropy]
                                          [--out bench/results/calibration.json]

Model: torchvision's ``mobilenet_v2(weights=None)`` (random weights; torchvision's model definitions are loaded
from its package folder without its compiled ops), eval mode. Data: ``--images`` random-normal images (seed 0)
of ``--size`` x ``--size``, fed in batches of ``--batch``; ``torch.set_num_threads(--threads)``.

Rows, each the seconds to run all the images once:

- ``float forward``: the float model under ``torch.no_grad``;
- ``calibrate <observer>``: ``lowbit.calibrate(model, batches, observer=...)`` on a freshly quantized w8a8 model
  (``lowbit.quantize`` itself is not timed);
- ``fake-quant forward <preset>`` (w8a8, w4a8): the min/max-calibrated model under ``torch.no_grad`` in eval
  mode, after a warm-up call.

The rows are timed in ``--repeats`` rounds, each row once per round, and each row's figure is its best round.

Each row's ratio is its seconds over the float forward's. An observer the library does not know is recorded
as an error row and the run goes on. Results go to ``--out`` as JSON with the command that produced them and
the machine's load average at the start and the end (other processes on the same cores slow every row; the
best of several runs and the ratios within one run are the figures to compare).
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this file's directory comes first on sys.path and bench/onnx.py would shadow the onnx package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import collections
import copy
import importlib
import importlib.util
import json
import os
import platform
import time
import types
from collections.abc import Callable

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


def timed(run: Callable[[], object]) -> float:
    """Wall-clock seconds of one call of ``run``."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def forward_all(model: torch.nn.Module, batches: list[torch.Tensor]) -> Callable[[], None]:
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
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--observers", nargs="+", default=list(OBSERVERS))
    parser.add_argument("--out", type=Path, default=Path("bench/results/calibration.json"))
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.randn(args.images, 3, args.size, args.size)
    batches = list(images.split(args.batch))
    float_model = torchvision_model("mobilenetv2", "mobilenet_v2", {"weights": None}).eval()

    def quantized(preset: str) -> torch.nn.Module:
        return lowbit.quantize(copy.deepcopy(float_model), preset).eval()

    forwards = {"float forward": forward_all(float_model, batches)}
    for preset in PRESETS:  # min/max-calibrated, then warmed up (a dynamic weight quantizer keeps its output)
        forwards[f"fake-quant forward {preset}"] = forward_all(lowbit.calibrate(quantized(preset), batches), batches)
    for run in forwards.values():
        run()
    times: dict[str, list[float]] = collections.defaultdict(list)
    errors: dict[str, str] = {}
    for _ in range(args.repeats):  # rounds: every row once per round, so that load from elsewhere hits all alike
        for name, run in forwards.items():
            times[name].append(timed(run))
        for observer in args.observers:
            name = f"calibrate {observer}"
            if name in errors:
                continue
            model = quantized("w8a8")
            try:
                times[name].append(timed(lambda: lowbit.calibrate(model, batches, observer=observer)))
            except LowbitError as exc:
                errors[name] = f"{type(exc).__name__}: {exc}"
    order = ["float forward", *(f"calibrate {o}" for o in args.observers), *list(forwards)[1:]]
    float_seconds = min(times["float forward"])
    rows = [{"name": name, "error": errors[name]} if name in errors else
            {"name": name, "seconds": min(times[name]), "ratio": min(times[name]) / float_seconds,
             "all_seconds": times[name]} for name in order]

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
        "processor": platform.processor(), "load_average": [load_before, os.getloadavg()[0]], "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
