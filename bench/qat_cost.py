"""Training cost of each QAT recipe against float: time per training step, measured interleaved.

For each recipe: the recipe's network quantized with its last stage's config (as
``lowbit.recipes.train_recipe`` builds it) and the float network of the same architecture, each
with the optimizer its recipe would use (``float_recipe`` for the float one). One training step is
zero_grad, forward, the recipe's loss, backward, optimizer step and, where the recipe clips latent
weights, the clip. Both models train on the same random batch of the recipe's batch size; their
steps run interleaved in ``--rounds`` rounds of ``--steps`` steps, and each figure is the median
over rounds of the time per step, so load changes on a shared machine hit both alike. Training
time per epoch is steps per epoch times this (data loading is the same for both).

    python bench/qat_cost.py --threads 1 --out bench/results/qat_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from lowbit.recipes import float_recipe, get_recipe
from lowbit.recipes.driver import LOSS_FUNCTIONS, make_optimizer, sign_layers, stage_model
from lowbit.workflow import build_model

RECIPES = ("bnn", "bnn-cnn", "xnor", "bwn", "dorefa-w1a2g6", "abc-3-3", "bireal", "lsq-w2a2", "lsq-w4a4",
           "pact-w2a2", "ternary", "log")


def step_function(recipe_name: str, quantized: bool, data: str) -> Callable[[], None]:
    """One training step of the recipe's quantized network (or of its float reference)."""
    recipe = get_recipe(recipe_name)
    torch.manual_seed(0)
    net = build_model(recipe.model, data, recipe.model_kwargs)
    model = stage_model(net, recipe.stages[-1], recipe) if quantized else net
    used = recipe if quantized else float_recipe(recipe)
    optimizer = make_optimizer(model, used, used.lr)
    loss_fn = LOSS_FUNCTIONS[used.loss]
    clipped = sign_layers(model) if quantized and recipe.latent_clip is not None else []
    inputs = torch.randn(recipe.batch_size, 1, 28, 28)
    labels = torch.randint(0, 10, (recipe.batch_size,))
    model.train()

    def step() -> None:
        optimizer.zero_grad()
        loss_fn(model(inputs), labels).backward()
        optimizer.step()
        with torch.no_grad():
            for layer in clipped:
                layer.weight.clamp_(-recipe.latent_clip, recipe.latent_clip)

    for _ in range(3):  # warm-up; also runs data-dependent initialisation (observers, LSQ steps)
        step()
    return step


def per_step(step: Callable[[], None], steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--data", default="mnist")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("bench/results/qat_cost.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.recipes:
        steps = {"float": step_function(name, False, args.data), "recipe": step_function(name, True, args.data)}
        times: dict[str, list[float]] = {key: [] for key in steps}
        for _ in range(args.rounds):
            for key, step in steps.items():
                times[key].append(per_step(step, args.steps))
        recipe = get_recipe(name)
        row = {"recipe": name, "model": recipe.model, "model_kwargs": recipe.model_kwargs,
               "batch_size": recipe.batch_size, "threads": args.threads,
               **{f"{key}_ms": 1e3 * statistics.median(value) for key, value in times.items()}}
        row["ratio"] = row["recipe_ms"] / row["float_ms"]
        rows.append(row)
        print(f"{name:>15} ({recipe.model}): float {row['float_ms']:.2f} ms/step, recipe {row['recipe_ms']:.2f} ms/step, "
              f"{row['ratio']:.2f}x", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": "python bench/qat_cost.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k in ("threads", "rounds", "steps")),
        "rows": rows}, indent=1))
    print("| recipe | net | batch | float ms/step | recipe ms/step | time vs float |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['model']} | {r['batch_size']} | {r['float_ms']:.2f} | {r['recipe_ms']:.2f} "
              f"| {r['ratio']:.2f}x |")


if __name__ == "__main__":
    main()
