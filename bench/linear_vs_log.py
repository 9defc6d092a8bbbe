"""Linear vs logarithmic post-training weight quantization (Miyashita, Lee, Murmann 2016, arXiv:1603.01025).

The claim tested: with log (power-of-two) weight codes a network keeps its accuracy down to 3 bits,
where linear codes of the same width lose more. Two trained networks:

- LeNet-5 on MNIST (Caffe's layout, ``lowbit.models.LeNet5``);
- a small VGG-style CNN on Fashion-MNIST (``vgg-small`` with ``layers=(16, M, 32, M, 64, M)``,
  ``hidden=128``: the default widths take ~10 min per epoch on 2 CPU cores).

Each is trained in float (SGD, momentum 0.9, lr 0.05, cosine, batch 64; checkpoints cached under
the lowbit cache dir), then quantized post-training with *every* Linear/Conv2d layer at the same
setting (first/last policy "same"): weights ``linear`` (LinearQuant, b bits including the sign) or
``log2`` (LogQuant, b exponent bits plus a sign bit), per tensor, full-scale range the smallest
power of two >= max|w|; layer inputs 8- or 4-bit uniform affine per tensor, min/max ranges from
``--calib-batches`` batches of 64 training images. Accuracy on the full 10,000-image test sets.

    python bench/linear_vs_log.py [--out bench/results] [--plot docs/linear_vs_log.png]

Writes OUT/linear_vs_log.json and the PNG, prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lowbit import workflow
from lowbit.analysis.plots import plot_accuracy_vs_bits
from lowbit.config import uniform_act

FASHION_VGG = {"layers": [16, "M", 32, "M", 64, "M"], "hidden": 128}
SETUPS = {
    "LeNet-5 / MNIST": {"model": "lenet5", "data": "mnist", "epochs": 1, "model_kwargs": None},
    "VGG-small / Fashion-MNIST": {"model": "vgg-small", "data": "fashion-mnist", "epochs": 3,
                                  "model_kwargs": FASHION_VGG},
}
FAMILIES = {"linear": "linear", "log": "log2"}


def config(family: str, weight_bits: int, act_bits: int) -> dict:
    """Every layer: ``family`` weights at ``weight_bits``, inputs uniform ``act_bits`` (min/max calibrated)."""
    return {"weight": {"name": FAMILIES[family], "bits": weight_bits}, "input": uniform_act(act_bits),
            "first": "same", "last": "same"}


def run_setup(name: str, setup: dict, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    trained, reused = workflow.cached_train(setup["model"], setup["data"], epochs=setup["epochs"], seed=args.seed,
                                            model_kwargs=setup["model_kwargs"], progress=args.progress)
    test = workflow.eval_set(setup["data"], args.limit)
    batches = workflow.calibration_batches(setup["data"], args.calib_batches, seed=args.seed)
    float_acc = workflow.accuracy(trained.model, *test, progress=args.progress)
    rows = []
    for act_bits in args.act_bits:
        for family in FAMILIES:
            for bits in args.bits:
                quantized = workflow.post_training_quantize(trained.model, config(family, bits, act_bits), batches)
                acc = workflow.accuracy(quantized, *test, progress=args.progress)
                rows.append({"method": f"{family} a{act_bits}", "family": family, "bits": bits, "act_bits": act_bits,
                             "accuracy": acc})
                print(f"{name}: {family} w{bits} a{act_bits}: {100 * acc:.2f}%", flush=True)
    return {"model": setup["model"], "data": setup["data"], "epochs": setup["epochs"],
            "model_kwargs": setup["model_kwargs"], "reused_checkpoint": reused, "float_acc": float_acc,
            "test_images": len(test[1]), "rows": rows, "seconds": time.perf_counter() - start}


def markdown(results: dict, bits: list[int], act_bits: list[int]) -> str:
    lines = []
    for name, result in results.items():
        columns = [f"{family} a{a}" for a in act_bits for family in FAMILIES]
        lines += [f"**{name}** (float {100 * result['float_acc']:.2f}%)", "",
                  "| weight bits | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        table = {(r["method"], r["bits"]): r["accuracy"] for r in result["rows"]}
        for b in sorted(bits, reverse=True):
            lines.append(f"| {b} | " + " | ".join(f"{100 * table[(c, b)]:.2f}" for c in columns) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results", help="directory of the JSON results")
    parser.add_argument("--plot", default="docs/linear_vs_log.png", help="PNG of accuracy vs weight bits")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 5, 6, 7, 8])
    parser.add_argument("--act-bits", type=int, nargs="+", default=[8, 4])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="first N test images (smoke runs)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = {name: run_setup(name, setup, args) for name, setup in SETUPS.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"seed": args.seed, "calib_batches": args.calib_batches, "bits": args.bits, "act_bits": args.act_bits,
              "torch_threads": torch.get_num_threads(), "results": results,
              "seconds": time.perf_counter() - start}
    (out / "linear_vs_log.json").write_text(json.dumps(record, indent=2) + "\n")
    panels = {f"{name} (float {100 * r['float_acc']:.2f}%)": r["rows"] for name, r in results.items()}
    baselines = {f"{name} (float {100 * r['float_acc']:.2f}%)": r["float_acc"] for name, r in results.items()}
    plot_accuracy_vs_bits(panels, args.plot, baselines=baselines)
    print(markdown(results, args.bits, args.act_bits))
    print(f"total {record['seconds']:.0f} s; wrote {out / 'linear_vs_log.json'} and {args.plot}")


if __name__ == "__main__":
    main()
