"""Adaptive per-layer input (activation) bit widths vs one input width for all layers, at equal input bytes.

The activation half of Zhou et al. (AAAI 2018) with ``lowbit.analysis``: for each network of
bench/mixed_precision.py (same cached float checkpoints, same seeded calibration images):

1. measure each layer's input alone at 2, 3, 4, 6, 8 bits (``measure_sensitivity(..., role="input")``:
   uniform affine input quantizer calibrated on the images; weights and other inputs float);
2. for each uniform input width b in ``--uniform``: every layer's input at b bits; its budget is the
   input bytes at batch 1 of that model, sum over layers of ceil(numel * b / 8);
3. allocate per-layer input bits of least predicted ``--objective`` within that budget (``allocate_bits``
   on the input table) and quantize with that config;
4. calibrate both on the calibration images and evaluate on the full test set (weights stay float, so
   only the activation choice differs).

    python bench/mixed_precision_inputs.py --threads 1   # bench/results/mixed_precision_inputs.json,
                                                         # docs/mixed_precision_inputs.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import lowbit
from lowbit import workflow
from lowbit.analysis.allocate import allocate_bits
from lowbit.analysis.plots_cost import plot_accuracy_vs_size
from lowbit.analysis.sensitivity import layer_config, measure_sensitivity
from mixed_precision import SETUPS, sample


def run_setup(name: str, setup: dict, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    trained, _ = workflow.cached_train(setup["model"], setup["data"], epochs=setup["epochs"], seed=args.seed,
                                       model_kwargs=setup["model_kwargs"], progress=False)
    model = trained.model.eval()
    test = workflow.eval_set(setup["data"], args.limit)
    calibration = sample(setup["data"], args.calib_size, args.seed)
    table = measure_sensitivity(model, *calibration, role="input")
    float_acc = workflow.accuracy(model, *test, progress=False)
    rows = []
    for b in args.uniform:
        uniform = {n: b for n in table.layers}
        budget = sum(table.row(n, b).bytes for n in table.layers)
        adaptive = allocate_bits(table, budget, objective=args.objective)
        for method, bits in (("uniform", uniform), (f"adaptive ({args.objective})", adaptive.bits)):
            quantized = lowbit.quantize(model, layer_config({}, None, bits))
            lowbit.calibrate(quantized, [calibration[0]])
            accuracy = workflow.accuracy(quantized.eval(), *test, progress=False)
            size = sum(table.row(n, bits[n]).bytes for n in table.layers)
            rows.append({"uniform_bits": b, "method": method, "bits": bits, "input_bytes": size, "budget": budget,
                         "accuracy": accuracy})
            print(f"{name}: {b}-bit inputs {method:<16} {size:>7,} B {100 * accuracy:6.2f}%  {bits}", flush=True)
    return {"model": setup["model"], "data": setup["data"], "float_acc": float_acc, "sensitivity": table.to_dict(),
            "rows": rows, "seconds": time.perf_counter() - start}


def markdown(results: dict) -> str:
    lines = ["| network | size (uniform input bits) | method | input bytes | per-layer input bits | accuracy |",
             "|---|---|---|---|---|---|"]
    for name, result in results.items():
        for row in result["rows"]:
            bits = ", ".join(f"{n} {b}" for n, b in row["bits"].items())
            lines.append(f"| {name} | {row['uniform_bits']}-bit ({row['budget']:,} B) | {row['method']} | "
                         f"{row['input_bytes']:,} | {bits} | {100 * row['accuracy']:.2f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/mixed_precision_inputs.json")
    parser.add_argument("--plot", default="docs/mixed_precision_inputs.png")
    parser.add_argument("--uniform", type=int, nargs="+", default=[2, 3, 4, 6])
    parser.add_argument("--objective", default="loss")
    parser.add_argument("--calib-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="first N test images (smoke runs)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = {name: run_setup(name, setup, args) for name, setup in SETUPS.items()}
    record = {"command": "python bench/mixed_precision_inputs.py --threads " + str(args.threads), "seed": args.seed,
              "calib_size": args.calib_size, "objective": args.objective, "results": results,
              "seconds": time.perf_counter() - start}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    panels = {f"{name} (float {100 * r['float_acc']:.2f}%)": {
        method: [(row["input_bytes"], row["accuracy"]) for row in r["rows"] if row["method"] == method]
        for method in dict.fromkeys(row["method"] for row in r["rows"])} for name, r in results.items()}
    plot_accuracy_vs_size(panels, args.plot, baselines={t: r["float_acc"] for t, r in zip(panels, results.values())})
    print(markdown(results))
    print(f"total {record['seconds']:.0f} s; wrote {args.out}, {args.plot}")


if __name__ == "__main__":
    main()
