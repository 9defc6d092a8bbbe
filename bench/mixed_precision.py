"""Adaptive per-layer weight bit widths vs one bit width for all layers, at equal size, post-training and
after a short quantization-aware fine-tune.

After Zhou, Moosavi-Dezfooli, Cheung & Frossard (AAAI 2018). For each trained float network:

1. measure each layer's sensitivity alone at 1, 2, 3, 4, 6, 8 bits on ``--calib-size`` seeded training
   images (``lowbit.analysis.sensitivity``);
2. for each uniform width b in ``--uniform``: quantize every layer's weights to b bits (1 bit: XNOR-Net
   binary weights with per-channel scales; otherwise uniform symmetric per-channel), inputs float;
   its size S_b is the summary byte rule's total (``lowbit.summary(q).total_bytes``);
3. allocate per-layer bits of least predicted loss within S_b (``allocate_bits``: exact knapsack on the
   isotonic, clipped costs, ties toward the fuller model: "adaptive"), and the smallest per-layer bits whose
   predicted loss is at most the uniform model's (``allocate_like_uniform``: "smallest adaptive", the paper's
   "smaller model at equal accuracy"), once per objective in ``--objectives`` (a method whose allocation
   cannot be built is dropped and reported);
4. post-training: evaluate every model on the full 10,000-image test set (accuracy and cross-entropy),
   and each against the uniform model by the exact McNemar test (``lowbit.analysis.significance``);
5. short QAT: from the same float checkpoint, fine-tune the uniform model and both adaptive models of each
   objective in ``--qat-objectives`` with their weight fake-quantizers for one epoch over ``--qat-images``
   seeded training images (SGD, momentum 0.9, lr ``--qat-lr``, cosine schedule, batch 64), once per seed of
   ``--qat-seeds`` (the data order: the same optimizer, data and order for every model of a seed), then
   evaluate and test as in 4. A config equal to one already trained is not trained again (deterministic).

The verdict per size compares the mean test accuracy over the QAT seeds (one value post-training); the
McNemar verdicts say which differences are larger than the test set's sampling noise (p < 0.05).

Networks (float checkpoints shared with bench/linear_vs_log.py through the lowbit cache):
LeNet-5 / MNIST (2 epochs) and vgg-small (16, M, 32, M, 64, M; hidden 128) / Fashion-MNIST (3 epochs).

    python bench/mixed_precision.py --threads 2   # bench/results/mixed_precision.json, docs/mixed_precision.png,
                                                  # docs/mixed_precision_qat.png, docs/mixed_precision_bits.png
    python bench/mixed_precision.py --plot-only   # the plots and tables again, from the recorded results
"""

from __future__ import annotations

import argparse
import json
import os
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

import lowbit
from lowbit import workflow
from lowbit.analysis.allocate import allocate_bits, allocate_like_uniform
from lowbit.analysis.plots_cost import plot_accuracy_vs_size, plot_allocation
from lowbit.analysis.significance import PairedComparison, paired_comparison
from lowbit.analysis.sensitivity import DEFAULT_BITS, SensitivityTable, layer_config, measure_sensitivity
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


def short_qat(model: nn.Module, config: QuantConfig, train: tuple[torch.Tensor, torch.Tensor], seed: int,
              args: argparse.Namespace) -> nn.Module:
    """A quantized copy of the float ``model`` fine-tuned for one epoch on ``train`` (same recipe for every config)."""
    quantized = lowbit.quantize(model, config)
    loader = make_loader(*train, QAT_BATCH_SIZE, shuffle=True, seed=seed)
    Trainer(quantized, loader, epochs=1, optimizer="sgd", lr=args.qat_lr, momentum=0.9, schedule="cosine",
            seed=seed, progress=False).fit()
    return quantized.eval()


def configs_at(table, model: nn.Module, b: int, args: argparse.Namespace, name: str) -> tuple[int, dict]:
    """The size of the all-``b``-bit model and the per-layer bits of every method at that size: uniform, the
    least predicted loss within it (``adaptive``) and the smallest predicted to lose no more than uniform
    (``smallest adaptive``), once per objective. A method whose allocation cannot be built is dropped."""
    uniform_bits = {n: b for n in table.layers}
    size = lowbit.summary(lowbit.quantize(model, layer_config(uniform_bits))).total_bytes
    configs = {"uniform": uniform_bits}
    for objective in args.objectives:
        for method, allocate in ((f"adaptive ({objective})", partial(allocate_bits, table, size, objective)),
                                 (f"smallest adaptive ({objective})",
                                  partial(allocate_like_uniform, table, b, objective))):
            try:
                configs[method] = allocate().bits
            except ConfigError as exc:
                print(f"{name}: {b}-bit size: {method} dropped: {exc}", flush=True)
    return size, configs


def objective_of(method: str) -> str:
    return method.rsplit("(", 1)[1].rstrip(")") if "(" in method else ""


def run_setup(name: str, setup: dict, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    trained, reused = workflow.cached_train(setup["model"], setup["data"], epochs=setup["epochs"], seed=args.seed,
                                            model_kwargs=setup["model_kwargs"], progress=False)
    model = trained.model.eval()
    test = workflow.eval_set(setup["data"], args.limit)
    float_correct, float_losses = workflow.outcomes(model, *test, progress=False)
    table = measure_sensitivity(model, *sample(setup["data"], args.calib_size, args.seed), bits=DEFAULT_BITS)
    train = sample(setup["data"], args.qat_images, args.seed)
    print(f"{name}: float {100 * float(float_correct.double().mean()):.2f}%, sensitivity measured "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    rows = []
    for b in args.uniform:
        size, configs = configs_at(table, model, b, args, name)
        trained_qat: dict[tuple[str, int], tuple[str, torch.Tensor, float]] = {}  # (config, seed) -> first result
        uniform_correct = {}
        for method, bits in configs.items():
            config = layer_config(bits)
            quantized = lowbit.quantize(model, config)
            real = lowbit.summary(quantized).total_bytes
            if real > size:
                raise SystemExit(f"{method} at the {b}-bit size: {real} bytes exceed the budget {size}")
            base = {"uniform_bits": b, "method": method, "size": real, "budget": size, "bits": bits}
            runs = [("ptq", None, lambda: quantized)]
            if method == "uniform" or objective_of(method) in args.qat_objectives:
                runs += [("qat", seed, lambda seed=seed: short_qat(model, config, train, seed, args))
                         for seed in args.qat_seeds]
            for phase, seed, build in runs:
                key, run_start, extra = (config.to_json(), seed), time.perf_counter(), {}
                if phase == "qat" and key in trained_qat:
                    extra["same_as"], correct, loss = trained_qat[key]
                else:
                    correct, losses = workflow.outcomes(build(), *test, progress=False)
                    loss = float(losses.mean())
                    if phase == "qat":
                        trained_qat[key] = (method, correct, loss)
                if method == "uniform":
                    uniform_correct[phase, seed] = correct
                row = {**base, "phase": phase, "seed": seed, "accuracy": float(correct.double().mean()),
                       "test_loss": loss, "vs_uniform": paired_comparison(correct, uniform_correct[phase, seed])
                       .to_dict(), "seconds": time.perf_counter() - run_start, **extra}
                rows.append(row)
                print(f"{name}: {b}-bit size {phase} {'' if seed is None else f'seed {seed} '}{method:<30} "
                      f"{real:>9,} B {100 * row['accuracy']:6.2f}% loss {loss:.4f} "
                      f"p {row['vs_uniform']['p_value']:.3f}  {bits}", flush=True)
    return {"model": setup["model"], "data": setup["data"], "epochs": setup["epochs"],
            "model_kwargs": setup["model_kwargs"], "reused_checkpoint": reused,
            "float_acc": float(float_correct.double().mean()), "float_test_loss": float(float_losses.mean()),
            "test_images": len(test[1]), "sensitivity": table.to_dict(), "rows": rows,
            "seconds": time.perf_counter() - start}


def mean_accuracy(result: dict, phase: str) -> dict[tuple[int, str], float]:
    """(uniform bits, method) -> test accuracy in ``phase``, averaged over the QAT seeds."""
    grouped: dict[tuple[int, str], list[float]] = {}
    for row in result["rows"]:
        if row["phase"] == phase:
            grouped.setdefault((row["uniform_bits"], row["method"]), []).append(row["accuracy"])
    return {key: sum(values) / len(values) for key, values in grouped.items()}


def verdicts(result: dict, phase: str, method: str) -> list[tuple[int, str, str]]:
    """Per size, ``method`` against uniform in ``phase``: the mean accuracy over seeds compared ("win",
    "tie", "loss"), and each seed's exact McNemar verdict ("win", "loss" at p < 0.05, else "tie" or
    "within noise")."""
    means = mean_accuracy(result, phase)
    out = []
    for b in dict.fromkeys(r["uniform_bits"] for r in result["rows"]):
        if (b, method) not in means:
            continue
        difference = means[(b, method)] - means[(b, "uniform")]
        tests = [PairedComparison(**{k: r["vs_uniform"][k] for k in ("examples", "only_a", "only_b", "p_value")})
                 .verdict() for r in result["rows"]
                 if r["phase"] == phase and r["method"] == method and r["uniform_bits"] == b]
        out.append((b, "win" if difference > 0 else "tie" if difference == 0 else "loss", ", ".join(tests)))
    return out


def markdown(results: dict, args: argparse.Namespace) -> str:
    seeds = ", ".join(map(str, args.qat_seeds))
    lines = []
    for name, result in results.items():
        lines += [f"**{name}** ({result['model']}, {result['epochs']} epochs float, float accuracy "
                  f"{100 * result['float_acc']:.2f}%, test loss {result['float_test_loss']:.4f})", "",
                  f"| size (uniform bits) | method | bytes | per-layer bits | post-training (loss; McNemar p vs "
                  f"uniform) | after short QAT, seeds {seeds} |",
                  "|---|---|---|---|---|---|"]
        qat: dict[tuple[int, str], list[dict]] = {}
        for r in result["rows"]:
            if r["phase"] == "qat":
                qat.setdefault((r["uniform_bits"], r["method"]), []).append(r)
        for row in (r for r in result["rows"] if r["phase"] == "ptq"):
            bits = ", ".join(f"{n} {b}" for n, b in row["bits"].items())
            after = qat.get((row["uniform_bits"], row["method"]), [])
            after_text = " / ".join(f"{100 * r['accuracy']:.2f}%" for r in after) or "-"
            if any("same_as" in r for r in after):
                after_text += f" (= {after[0]['same_as']})"
            p_text = "" if row["method"] == "uniform" else f"; p {row['vs_uniform']['p_value']:.2f}"
            lines.append(f"| {row['uniform_bits']}-bit ({row['budget']:,} B) | {row['method']} | {row['size']:,} | "
                         f"{bits} | {100 * row['accuracy']:.2f}% ({row['test_loss']:.4f}{p_text}) | {after_text} |")
        lines.append("")
    for phase in PHASES:
        objectives = args.objectives if phase == "ptq" else args.qat_objectives
        kinds = ("adaptive", "smallest adaptive")
        for method in (f"{kind} ({objective})" for objective in objectives for kind in kinds):
            found = [(name, b, v, tests) for name, r in results.items() for b, v, tests in verdicts(r, phase, method)]
            counts = {v: sum(1 for _, _, w, _ in found if w == v) for v in ("win", "tie", "loss")}
            significant = [f"{name} {b}-bit ({tests})" for name, b, _, tests in found
                           if "win" in tests.split(", ") or "loss" in tests.split(", ")]
            lines.append(f"{PHASES[phase]}, {method} vs uniform: {counts['win']} wins, {counts['tie']} ties, "
                         f"{counts['loss']} losses of {len(found)} sizes; not wins: "
                         + (", ".join(f"{name} {b}-bit ({v})" for name, b, v, _ in found if v != "win") or "none")
                         + "; significant at p < 0.05: " + (", ".join(significant) or "none"))
    return "\n".join(lines)


def plot(results: dict, phase: str, path: str) -> None:
    panels = {}
    for name, r in results.items():
        means = mean_accuracy(r, phase)
        sizes = {(row["uniform_bits"], row["method"]): row["size"] for row in r["rows"]}
        methods = dict.fromkeys(method for _, method in means)
        panels[f"{name}, {PHASES[phase]} (float {100 * r['float_acc']:.2f}%)"] = {
            method: [(sizes[key], acc) for key, acc in means.items() if key[1] == method] for method in methods}
    baselines = {title: r["float_acc"] for title, r in zip(panels, results.values())}
    plot_accuracy_vs_size(panels, path, baselines=baselines)


def draw(results: dict, args: argparse.Namespace) -> None:
    """The three PNGs and the Markdown tables of ``results``."""
    plot(results, "ptq", args.plot)
    plot(results, "qat", args.plot_qat)
    plot_bits(results, args.bits_size, args.plot_bits)
    print(markdown(results, args))
    print(f"wrote {args.plot}, {args.plot_qat}, {args.plot_bits}")


def plot_bits(results: dict, b: int, path: str) -> None:
    """Per network, the adaptive (loss) bits per layer at the ``b``-bit size and the costs they came from
    (re-allocated from the recorded table: the same exact, deterministic knapsack)."""
    chosen, titles = [], []
    for name, r in results.items():
        table = SensitivityTable.from_dict(r["sensitivity"])
        budget = next(row["budget"] for row in r["rows"] if row["uniform_bits"] == b)
        chosen.append((table, allocate_bits(table, budget, "loss")))
        titles.append(f"{name.split(' /')[0]}, {b}-bit size")
    plot_allocation(chosen, path, titles)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results", help="directory of the JSON results")
    parser.add_argument("--plot", default="docs/mixed_precision.png", help="PNG of accuracy vs size, post-training")
    parser.add_argument("--plot-qat", default="docs/mixed_precision_qat.png",
                        help="PNG of accuracy vs size after short QAT")
    parser.add_argument("--plot-bits", default="docs/mixed_precision_bits.png",
                        help="PNG of the adaptive bits per layer at the --bits-size size")
    parser.add_argument("--bits-size", type=int, default=2, help="uniform width whose size --plot-bits shows")
    parser.add_argument("--plot-only", action="store_true",
                        help="measure and train nothing: redraw the plots and the tables from --out")
    parser.add_argument("--uniform", type=int, nargs="+", default=[1, 2, 3, 4, 6])
    parser.add_argument("--objectives", nargs="+", default=["loss", "logit_mse"])
    parser.add_argument("--qat-objectives", nargs="+", default=["loss"],
                        help="adaptive objectives also fine-tuned (default: loss)")
    parser.add_argument("--qat-images", type=int, default=20_000, help="seeded training images of the QAT epoch")
    parser.add_argument("--qat-lr", type=float, default=0.01)
    parser.add_argument("--qat-seeds", type=int, nargs="+", default=[0, 1],
                        help="seeds of the QAT data order (one fine-tune per seed and model)")
    parser.add_argument("--calib-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="first N test images (smoke runs)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = parser.parse_args()
    unknown = set(args.qat_objectives) - set(args.objectives)
    if unknown:
        parser.error(f"--qat-objectives {sorted(unknown)} must be among --objectives")
    if args.plot_only:
        record = json.loads((Path(args.out) / "mixed_precision.json").read_text())
        args.qat_seeds, args.objectives = record["qat"]["seeds"], record["objectives"]
        args.qat_objectives = record["qat"]["objectives"]
        draw(record["results"], args)
        return
    torch.set_num_threads(args.threads)
    start, load_start = time.perf_counter(), os.getloadavg()
    results = {name: run_setup(name, setup, args) for name, setup in SETUPS.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"seed": args.seed, "calib_size": args.calib_size, "uniform": args.uniform,
              "objectives": args.objectives, "qat": {"objectives": args.qat_objectives, "images": args.qat_images,
                                                     "epochs": 1, "seeds": args.qat_seeds, "optimizer": "sgd",
                                                     "momentum": 0.9, "lr": args.qat_lr, "schedule": "cosine",
                                                     "batch_size": QAT_BATCH_SIZE},
              "torch_threads": torch.get_num_threads(), "load_average_start": load_start,
              "load_average_end": os.getloadavg(), "results": results, "seconds": time.perf_counter() - start}
    (out / "mixed_precision.json").write_text(json.dumps(record, indent=2) + "\n")
    draw(results, args)
    print(f"total {record['seconds']:.0f} s, load average {load_start[0]:.2f} at start, "
          f"{record['load_average_end'][0]:.2f} at end; wrote {out / 'mixed_precision.json'}")


if __name__ == "__main__":
    main()
