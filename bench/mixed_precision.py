"""Adaptive per-layer weight bit widths vs one bit width for all layers, at equal size (post-training).

After Zhou, Moosavi-Dezfooli, Cheung & Frossard (AAAI 2018). For each trained float network:

1. measure each layer's sensitivity alone at 1, 2, 3, 4, 6, 8 bits on ``--calib-size`` seeded training
   images (``lowbit.analysis.sensitivity``);
2. for each uniform width b in ``--uniform``: quantize every layer's weights to b bits (1 bit: XNOR-Net
   binary weights with per-channel scales; otherwise uniform symmetric per-channel), inputs float;
   its size S_b is the summary byte rule's total (``lowbit.summary(q).total_bytes``);
3. allocate per-layer bits of least predicted loss within S_b (``allocate_bits``, exact knapsack), once
   per objective in ``--objectives``, and quantize with that config;
4. evaluate every model on the full 10,000-image test set.

Networks (float checkpoints shared with bench/linear_vs_log.py through the lowbit cache):
LeNet-5 / MNIST (2 epochs) and vgg-small (16, M, 32, M, 64, M; hidden 128) / Fashion-MNIST (3 epochs).

    python bench/mixed_precision.py [--out bench/results] [--plot docs/mixed_precision.png]
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
from lowbit.analysis.sensitivity import DEFAULT_BITS, layer_config, measure_sensitivity
from lowbit.data import load_dataset

FASHION_VGG = {"layers": [16, "M", 32, "M", 64, "M"], "hidden": 128}
SETUPS = {
    "LeNet-5 / MNIST": {"model": "lenet5", "data": "mnist", "epochs": 2, "model_kwargs": None},
    "VGG-small / Fashion-MNIST": {"model": "vgg-small", "data": "fashion-mnist", "epochs": 3,
                                  "model_kwargs": FASHION_VGG},
}


def sample(data: str, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_dataset(data, "train")
    chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:count]
    return images[chosen], labels[chosen]


def run_setup(name: str, setup: dict, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    trained, reused = workflow.cached_train(setup["model"], setup["data"], epochs=setup["epochs"], seed=args.seed,
                                            model_kwargs=setup["model_kwargs"], progress=False)
    model = trained.model.eval()
    test = workflow.eval_set(setup["data"], args.limit)
    float_acc = workflow.accuracy(model, *test, progress=False)
    table = measure_sensitivity(model, *sample(setup["data"], args.calib_size, args.seed), bits=DEFAULT_BITS)
    rows = []
    for b in args.uniform:
        uniform = lowbit.quantize(model, layer_config({n: b for n in table.layers}))
        size = lowbit.summary(uniform).total_bytes
        rows.append({"method": "uniform", "size": size, "bits": {n: b for n in table.layers},
                     "accuracy": workflow.accuracy(uniform, *test, progress=False)})
        for objective in args.objectives:
            allocation = allocate_bits(table, size, objective=objective)
            adaptive = lowbit.quantize(model, allocation.config())
            real = lowbit.summary(adaptive).total_bytes
            if real != allocation.predicted_bytes:
                raise SystemExit(f"predicted {allocation.predicted_bytes} bytes, summary says {real}")
            rows.append({"method": f"adaptive ({objective})", "size": real, "budget": size, "bits": allocation.bits,
                         "accuracy": workflow.accuracy(adaptive, *test, progress=False)})
        for row in rows[-1 - len(args.objectives):]:
            print(f"{name}: {row['method']:<22} {row['size']:>9,} B  {100 * row['accuracy']:6.2f}%  {row['bits']}",
                  flush=True)
    return {"model": setup["model"], "data": setup["data"], "epochs": setup["epochs"],
            "model_kwargs": setup["model_kwargs"], "reused_checkpoint": reused, "float_acc": float_acc,
            "test_images": len(test[1]), "sensitivity": table.to_dict(), "rows": rows,
            "seconds": time.perf_counter() - start}


def markdown(results: dict, objectives: list[str]) -> str:
    lines = []
    for name, result in results.items():
        lines += [f"**{name}** (float {100 * result['float_acc']:.2f}%)", "",
                  "| uniform bits | size (bytes) | uniform | " + " | ".join(f"adaptive ({o})" for o in objectives)
                  + " | adaptive bits (" + objectives[0] + ") |", "|---" * (4 + len(objectives)) + "|"]
        rows = result["rows"]
        step = 1 + len(objectives)
        for i in range(0, len(rows), step):
            uniform, adaptive = rows[i], rows[i + 1: i + step]
            bits = next(iter(uniform["bits"].values()))
            cells = " | ".join(f"{100 * r['accuracy']:.2f}% ({r['size']:,} B)" for r in adaptive)
            chosen = ", ".join(f"{n} {b}" for n, b in adaptive[0]["bits"].items())
            lines.append(f"| {bits} | {uniform['size']:,} | {100 * uniform['accuracy']:.2f}% | {cells} | {chosen} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results", help="directory of the JSON results")
    parser.add_argument("--plot", default="docs/mixed_precision.png", help="PNG of accuracy vs size")
    parser.add_argument("--uniform", type=int, nargs="+", default=[2, 3, 4, 6])
    parser.add_argument("--objectives", nargs="+", default=["logit_mse", "loss"])
    parser.add_argument("--calib-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="first N test images (smoke runs)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = {name: run_setup(name, setup, args) for name, setup in SETUPS.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"seed": args.seed, "calib_size": args.calib_size, "uniform": args.uniform,
              "objectives": args.objectives, "torch_threads": torch.get_num_threads(), "results": results,
              "seconds": time.perf_counter() - start}
    (out / "mixed_precision.json").write_text(json.dumps(record, indent=2) + "\n")
    panels = {f"{name} (float {100 * r['float_acc']:.2f}%)": {
        method: [(row["size"], row["accuracy"]) for row in r["rows"] if row["method"] == method]
        for method in dict.fromkeys(row["method"] for row in r["rows"])} for name, r in results.items()}
    baselines = {title: r["float_acc"] for title, r in zip(panels, results.values())}
    plot_accuracy_vs_size(panels, args.plot, baselines=baselines)
    print(markdown(results, args.objectives))
    print(f"total {record['seconds']:.0f} s; wrote {out / 'mixed_precision.json'} and {args.plot}")


if __name__ == "__main__":
    main()
