"""Adaptive per-layer weight bit widths vs one bit width for all layers, at equal size, post-training and
after a short quantization-aware fine-tune.

After Zhou, Moosavi-Dezfooli, Cheung & Frossard (AAAI 2018). For each trained float network:

1. measure each layer's sensitivity alone at 1, 2, 3, 4, 6, 8 bits on ``--calib-size`` seeded training
   images (``lowbit.analysis.sensitivity``);
2. for each uniform width b in ``--uniform``: quantize every layer's weights to b bits (1 bit: XNOR-Net
   binary weights with per-channel scales; otherwise uniform symmetric per-channel), inputs float;
   its size S_b is the summary byte rule's total (``lowbit.summary(q).total_bytes``);
3. allocate per-layer bits of least predicted loss within S_b (``allocate_bits``: exact knapsack on the
   isotonic, clipped costs, ties toward the fuller model), once per objective in ``--objectives``, and
   quantize with that config (a size where an allocation cannot be built is dropped and reported);
4. post-training: evaluate every model on the full 10,000-image test set;
5. short QAT: from the same float checkpoint, fine-tune the uniform model and the adaptive model of each
   objective in ``--qat-objectives`` with their weight fake-quantizers for one epoch over ``--qat-images``
   seeded training images (SGD, momentum 0.9, lr ``--qat-lr``, cosine schedule, batch 64, seed
   ``--seed``: the same optimizer, data order and seed for every model), then evaluate on the test set.
   An adaptive config equal to the uniform one is not trained twice (the run is deterministic).

Networks (float checkpoints shared with bench/linear_vs_log.py through the lowbit cache):
LeNet-5 / MNIST (2 epochs) and vgg-small (16, M, 32, M, 64, M; hidden 128) / Fashion-MNIST (3 epochs).

    python bench/mixed_precision.py --threads 1   # bench/results/mixed_precision.json,
                                                  # docs/mixed_precision.png, docs/mixed_precision_qat.png
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from torch import nn

import lowbit
from lowbit import workflow
from lowbit.analysis.allocate import allocate_bits
from lowbit.analysis.plots_cost import plot_accuracy_vs_size
from lowbit.analysis.sensitivity import DEFAULT_BITS, layer_config, measure_sensitivity
from lowbit.config import QuantConfig
from lowbit.data import load_dataset, make_loader
from lowbit.errors import ConfigError
from lowbit.train import Trainer

FASHION_VGG = {"layers": [16, "M", 32, "M", 64, "M"], "hidden": 128}
SETUPS = {
    "LeNet-5 / MNIST": {"model": "lenet5", "data": "mnist", "epochs": 2, "model_kwargs": None},
    "VGG-small / Fashion-MNIST": {"model": "vgg-small", "data": "fashion-mnist", "epochs": 3,
                                  "model_kwargs": FASHION_VGG},
}
PHASES = {"ptq": "post-training", "qat": "after short QAT"}
QAT_BATCH_SIZE = 64


def sample(data: str, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_dataset(data, "train")
    chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:count]
    return images[chosen], labels[chosen]


def short_qat(model: nn.Module, config: QuantConfig, train: tuple[torch.Tensor, torch.Tensor],
              args: argparse.Namespace) -> nn.Module:
    """A quantized copy of the float ``model`` fine-tuned for one epoch on ``train`` (same recipe for every config)."""
    quantized = lowbit.quantize(model, config)
    loader = make_loader(*train, QAT_BATCH_SIZE, shuffle=True, seed=args.seed)
    Trainer(quantized, loader, epochs=1, optimizer="sgd", lr=args.qat_lr, momentum=0.9, schedule="cosine",
            seed=args.seed, progress=False).fit()
    return quantized.eval()


def run_setup(name: str, setup: dict, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    trained, reused = workflow.cached_train(setup["model"], setup["data"], epochs=setup["epochs"], seed=args.seed,
                                            model_kwargs=setup["model_kwargs"], progress=False)
    model = trained.model.eval()
    test = workflow.eval_set(setup["data"], args.limit)
    float_acc = workflow.accuracy(model, *test, progress=False)
    table = measure_sensitivity(model, *sample(setup["data"], args.calib_size, args.seed), bits=DEFAULT_BITS)
    train = sample(setup["data"], args.qat_images, args.seed)
    print(f"{name}: float {100 * float_acc:.2f}%, sensitivity measured ({time.perf_counter() - start:.0f} s)",
          flush=True)
    rows = []
    for b in args.uniform:
        uniform_bits = {n: b for n in table.layers}
        size = lowbit.summary(lowbit.quantize(model, layer_config(uniform_bits))).total_bytes
        configs = {"uniform": uniform_bits}
        for objective in args.objectives:
            try:
                configs[f"adaptive ({objective})"] = allocate_bits(table, size, objective=objective).bits
            except ConfigError as exc:
                print(f"{name}: {b}-bit size: adaptive ({objective}) dropped: {exc}", flush=True)
        trained_qat: dict[str, tuple[str, float]] = {}  # config JSON -> (method trained, accuracy)
        for method, bits in configs.items():
            config = layer_config(bits)
            quantized = lowbit.quantize(model, config)
            real = lowbit.summary(quantized).total_bytes
            if real > size:
                raise SystemExit(f"{method} at the {b}-bit size: {real} bytes exceed the budget {size}")
            base = {"uniform_bits": b, "method": method, "size": real, "budget": size, "bits": bits}
            rows.append({**base, "phase": "ptq", "accuracy": workflow.accuracy(quantized, *test, progress=False)})
            if method != "uniform" and method.removeprefix("adaptive (").rstrip(")") not in args.qat_objectives:
                continue
            key = config.to_json()
            qat_start = time.perf_counter()
            if key in trained_qat:
                same_as, acc = trained_qat[key]
                rows.append({**base, "phase": "qat", "accuracy": acc, "same_as": same_as, "seconds": 0.0})
            else:
                acc = workflow.accuracy(short_qat(model, config, train, args), *test, progress=False)
                trained_qat[key] = (method, acc)
                rows.append({**base, "phase": "qat", "accuracy": acc, "seconds": time.perf_counter() - qat_start})
        for row in rows:
            if row["uniform_bits"] == b:
                print(f"{name}: {b}-bit size {row['phase']} {row['method']:<22} {row['size']:>9,} B "
                      f"{100 * row['accuracy']:6.2f}%  {row['bits']}", flush=True)
    return {"model": setup["model"], "data": setup["data"], "epochs": setup["epochs"],
            "model_kwargs": setup["model_kwargs"], "reused_checkpoint": reused, "float_acc": float_acc,
            "test_images": len(test[1]), "sensitivity": table.to_dict(), "rows": rows,
            "seconds": time.perf_counter() - start}


def compare(result: dict, phase: str, method: str) -> list[tuple[int, str]]:
    """Per size: ``method`` against uniform in ``phase``, as "win", "tie" or "loss" (test accuracy)."""
    by_key = {(r["uniform_bits"], r["method"]): r for r in result["rows"] if r["phase"] == phase}
    out = []
    for (b, m), row in by_key.items():
        if m == method:
            uniform = by_key[(b, "uniform")]["accuracy"]
            out.append((b, "win" if row["accuracy"] > uniform else "tie" if row["accuracy"] == uniform else "loss"))
    return out


def markdown(results: dict, args: argparse.Namespace) -> str:
    lines = []
    for name, result in results.items():
        lines += [f"**{name}** ({result['model']}, {result['epochs']} epochs float, float accuracy "
                  f"{100 * result['float_acc']:.2f}%)", "",
                  "| size (uniform bits) | method | bytes | per-layer bits | post-training | after short QAT |",
                  "|---|---|---|---|---|---|"]
        qat = {(r["uniform_bits"], r["method"]): r for r in result["rows"] if r["phase"] == "qat"}
        for row in (r for r in result["rows"] if r["phase"] == "ptq"):
            bits = ", ".join(f"{n} {b}" for n, b in row["bits"].items())
            after = qat.get((row["uniform_bits"], row["method"]))
            after_text = "-" if after is None else f"{100 * after['accuracy']:.2f}%"
            if after is not None and "same_as" in after:
                after_text += f" (= {after['same_as']})"
            lines.append(f"| {row['uniform_bits']}-bit ({row['budget']:,} B) | {row['method']} | {row['size']:,} | "
                         f"{bits} | {100 * row['accuracy']:.2f}% | {after_text} |")
        lines.append("")
    for phase in PHASES:
        for objective in args.objectives if phase == "ptq" else args.qat_objectives:
            method = f"adaptive ({objective})"
            verdicts = [(name, b, v) for name, r in results.items() for b, v in compare(r, phase, method)]
            counts = {v: sum(1 for *_, w in verdicts if w == v) for v in ("win", "tie", "loss")}
            lines.append(f"{PHASES[phase]}, {method} vs uniform: {counts['win']} wins, {counts['tie']} ties, "
                         f"{counts['loss']} losses of {len(verdicts)} sizes; not wins: "
                         + (", ".join(f"{name} {b}-bit ({v})" for name, b, v in verdicts if v != "win") or "none"))
    return "\n".join(lines)


def plot(results: dict, phase: str, path: str) -> None:
    panels = {f"{name}, {PHASES[phase]} (float {100 * r['float_acc']:.2f}%)": {
        method: [(row["size"], row["accuracy"]) for row in r["rows"] if row["method"] == method
                 and row["phase"] == phase]
        for method in dict.fromkeys(row["method"] for row in r["rows"] if row["phase"] == phase)}
        for name, r in results.items()}
    baselines = {title: r["float_acc"] for title, r in zip(panels, results.values())}
    plot_accuracy_vs_size(panels, path, baselines=baselines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results", help="directory of the JSON results")
    parser.add_argument("--plot", default="docs/mixed_precision.png", help="PNG of accuracy vs size, post-training")
    parser.add_argument("--plot-qat", default="docs/mixed_precision_qat.png",
                        help="PNG of accuracy vs size after short QAT")
    parser.add_argument("--uniform", type=int, nargs="+", default=[1, 2, 3, 4, 6])
    parser.add_argument("--objectives", nargs="+", default=["loss", "logit_mse"])
    parser.add_argument("--qat-objectives", nargs="+", default=["loss"],
                        help="adaptive objectives also fine-tuned (default: loss)")
    parser.add_argument("--qat-images", type=int, default=20_000, help="seeded training images of the QAT epoch")
    parser.add_argument("--qat-lr", type=float, default=0.01)
    parser.add_argument("--calib-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="first N test images (smoke runs)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = parser.parse_args()
    unknown = set(args.qat_objectives) - set(args.objectives)
    if unknown:
        parser.error(f"--qat-objectives {sorted(unknown)} must be among --objectives")
    torch.set_num_threads(args.threads)
    start, load_start = time.perf_counter(), os.getloadavg()
    results = {name: run_setup(name, setup, args) for name, setup in SETUPS.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"seed": args.seed, "calib_size": args.calib_size, "uniform": args.uniform,
              "objectives": args.objectives, "qat": {"objectives": args.qat_objectives, "images": args.qat_images,
                                                     "epochs": 1, "optimizer": "sgd", "momentum": 0.9,
                                                     "lr": args.qat_lr, "schedule": "cosine",
                                                     "batch_size": QAT_BATCH_SIZE},
              "torch_threads": torch.get_num_threads(), "load_average_start": load_start,
              "load_average_end": os.getloadavg(), "results": results, "seconds": time.perf_counter() - start}
    (out / "mixed_precision.json").write_text(json.dumps(record, indent=2) + "\n")
    plot(results, "ptq", args.plot)
    plot(results, "qat", args.plot_qat)
    print(markdown(results, args))
    print(f"total {record['seconds']:.0f} s, load average {load_start[0]:.2f} at start, "
          f"{record['load_average_end'][0]:.2f} at end; wrote {out / 'mixed_precision.json'}, {args.plot}, "
          f"{args.plot_qat}")


if __name__ == "__main__":
    main()
