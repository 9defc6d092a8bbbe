"""Quantization-aware training recipes against float on the same network (``lowbit.recipes``).

For each dataset and recipe: train the recipe (``lowbit.recipes.train_recipe``) and, once per
network (model + model arguments), the float reference of the first recipe that uses it
(``float_recipe``: same network, optimizer, batch size and epochs, no quantizers; an exponential
schedule becomes cosine). Reported per row: test accuracy on the full test split (or the first
``--limit`` images), the gap to float on the same network, the training time per epoch (training
steps only, the recipe's last stage) and its ratio to the float network's, measured in the same
run, and the wall time of the whole row.

    python bench/qat.py --data mnist --epochs 2 --out bench/results/qat-mnist.json --plot docs/qat_mnist.png

``--smoke`` is a tiny run (500 images, the fewest epochs each recipe allows) to check the
script. Writes the JSON and the PNG (accuracy against weight bits per method) and prints a
Markdown table. ``--plot-only`` redraws the PNG from the rows already in ``--out``:

    python bench/qat.py --plot-only --out bench/results/qat.json --plot docs/qat_accuracy_vs_bits.png
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from lowbit.analysis.plots import plot_accuracy_vs_bits
from lowbit.recipes import Recipe, float_recipe, get_recipe, train_recipe

KEY_RECIPES = ("bnn", "bnn-cnn", "xnor", "bwn", "dorefa-w1a2g6", "abc-3-3", "bireal", "lsq-w2a2")
#: published reference points quoted beside the MNIST table (accuracy, %)
ANCHORS = {"Brevitas LFC 1W1A (MNIST)": 98.88, "Brevitas SFC 1W1A (MNIST)": 97.81,
           "larq binary MNIST CNN": 97.51, "BNN MLP paper (Theano / Torch7)": "99.04 / 98.60"}


def method(name: str) -> str:
    """The recipe family for a plot line: the name without its bit widths (dorefa-w1a2g6 -> dorefa)."""
    return re.sub(r"-(w\d+a\d+(g\d+)?|\d+-\d+)$", "", name)


def network_key(result: dict) -> str:
    return json.dumps([result["model"], result["model_kwargs"]], sort_keys=True)


def run(recipe: Recipe, args: argparse.Namespace, data: str, epochs: int | None = None) -> dict:
    if epochs is None:
        epochs = len(recipe.stages) if args.smoke else max(args.epochs or recipe.epochs, len(recipe.stages))
    start = time.perf_counter()
    result = train_recipe(recipe, data, epochs=epochs, seed=args.seed, limit=500 if args.smoke else args.limit,
                          progress=args.progress)
    result["row_wall_time"] = time.perf_counter() - start
    print(f"  {data} {result['recipe']:>15} ({result['model']}): {100 * result['final_acc']:.2f}% "
          f"{result['train_time_per_epoch']:.1f} s/epoch, {result['row_wall_time']:.0f} s", flush=True)
    return result


def table(rows: list[dict]) -> str:
    lines = ["| data | recipe | net | W/A bits | train images | epochs | seed | accuracy % | float, same net % | gap pp "
             "| s/epoch | time vs float | wall s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ref = row.get("float")
        acc = 100 * row["final_acc"]
        float_acc = f"{100 * ref['final_acc']:.2f}" if ref else "-"
        gap = f"{acc - 100 * ref['final_acc']:+.2f}" if ref else "-"
        ratio = f"{row['train_time_per_epoch'] / ref['train_time_per_epoch']:.2f}x" if ref else "-"
        bits = f"{row['weight_bits']}/{row['act_bits']}"
        images = row["limit"] or "all"
        lines.append(f"| {row['data']} | {row['recipe']} | {row['model']} | {bits} | {images} | {row['epochs']} "
                     f"| {row['seed']} "
                     f"| {acc:.2f} | {float_acc} | {gap} | {row['train_time_per_epoch']:.1f} | {ratio} | "
                     f"{row['row_wall_time']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["mnist"], help="datasets (mnist, fashion-mnist)")
    parser.add_argument("--recipes", nargs="+", default=list(KEY_RECIPES), help="recipe names")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default: each recipe's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="first N images of each split")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--smoke", action="store_true", help="tiny run: 500 images, fewest epochs")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--out", default=None, help="JSON results (default bench/results/qat.json, "
                        "qat-smoke.json with --smoke)")
    parser.add_argument("--plot", default=None, help="PNG of accuracy against weight bits")
    parser.add_argument("--append", action="store_true", help="add to the rows already in --out")
    parser.add_argument("--plot-only", action="store_true", help="train nothing: plot the rows already in --out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    out = Path(args.out or f"bench/results/qat{'-smoke' if args.smoke else ''}.json")
    if args.plot_only:
        if not args.plot:
            parser.error("--plot-only needs --plot")
        record = json.loads(out.read_text())
        print("wrote", plot(record["rows"], record["floats"], args.plot))
        return
    rows: list[dict] = []
    floats: dict[tuple[str, str], dict] = {}
    commands = []
    if args.append and out.is_file():
        previous = json.loads(out.read_text())
        rows, commands = previous["rows"], previous["commands"]
        floats = {(f["data"], network_key(f) + f"-{i}", f["epochs"]): f for i, f in enumerate(previous["floats"])}
    commands.append("python bench/qat.py " + " ".join(sys.argv[1:]))
    for data in args.data:
        for name in args.recipes:
            recipe = get_recipe(name)
            row = run(recipe, args, data)
            key = (data, network_key(row), row["epochs"])
            if key not in floats:  # trained as long as the first recipe on this network
                floats[key] = run(float_recipe(recipe), args, data, row["epochs"])
            row["float"] = {k: floats[key][k] for k in ("final_acc", "train_time_per_epoch", "epochs", "row_wall_time")}
            rows.append(row)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"commands": commands, "rows": rows, "floats": list(floats.values()), "anchors": ANCHORS}
    out.write_text(json.dumps(record, indent=1))
    print(table(rows))
    for data in dict.fromkeys(r["data"] for r in rows):
        for ref in (f for (d, *_), f in floats.items() if d == data):
            print(f"float {data} {ref['model']} {json.dumps(ref['model_kwargs'])}: {100 * ref['final_acc']:.2f}% "
                  f"{ref['train_time_per_epoch']:.1f} s/epoch")
    if args.plot:
        print("wrote", plot(rows, list(floats.values()), args.plot))


def plot(rows: list[dict], floats: list[dict], path: str) -> Path:
    """Accuracy against weight bits per method, a panel per dataset, small-cnn's float accuracy dashed."""
    datasets = list(dict.fromkeys(r["data"] for r in rows))
    panels = {data: [{"method": method(r["recipe"]), "bits": r["weight_bits"], "accuracy": r["final_acc"]}
                     for r in rows if r["data"] == data] for data in datasets}
    baselines = {data: next((f["final_acc"] for f in floats if f["data"] == data and f["model"] == "small-cnn"
                             and not f["model_kwargs"]), None) for data in datasets}
    return plot_accuracy_vs_bits(panels, path, baselines)


if __name__ == "__main__":
    main()
