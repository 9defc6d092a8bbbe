"""Binary networks trained here, saved, and run by the native Engine: accuracy against the float network of the
same shape, and the Engine's speed over torch float32.

    .venv/bin/python bench/binary_nets.py --data mnist fashion-mnist --out bench-out/binary \\
        --results bench/results/binary_nets.json

For each dataset: the float reference of every network used (``float_recipe``: same model, optimizer, schedule and
epochs, no quantizers), then each binary recipe (``bnn-cnn``, ``xnor``, ``bireal``, ``reactnet``) and, with
``reactnet+kd``, ReActNet distilled from its float reference (KL to the teacher's softmax, T = 1, weight 1, as
the paper's distributional loss). Each trained model is saved to ``.lowbit`` and its test accuracy is measured
from the file by the Engine, with the agreement of the Engine's predictions with the torch model's. Speed: the
trained float network in torch float32 (eval, no grad) against the Engine on the binary file, batch 1 and 64,
``--threads`` threads, best of ``--repeats`` after a warm-up, measured in the same run. A run directory that
already holds ``result.json`` is reused (delete it to train again); ``--epochs`` / ``--limit`` cut runs down;
``--model-kwargs`` changes the networks' options (give such runs their own ``--out``); ``--teacher RUN_DIR``
distils the ``+kd`` recipes from another float network (any architecture with the same classes) instead of
their own float reference, whose accuracy and speed the row still reports; ``--refresh-bn``
re-estimates the batch norms of a reused run by the current :func:`~lowbit.recipes.driver.refresh_batch_norm`
before saving it (``torch_file_acc``: the torch model's accuracy as saved; ``torch_acc``: as trained).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from lowbit.data import loaders
from lowbit.recipes import RefreshBatchNorm, float_recipe, get_recipe, train_recipe
from lowbit.recipes.driver import refresh_batch_norm
from lowbit.runtime import Engine
from lowbit.workflow import eval_set, load_trained, save_quantized
from timing import best  # bench/timing.py

RECIPES = ("bnn-cnn", "xnor", "bireal", "reactnet", "reactnet+kd")
DISTILLED = "+kd"


def train(name: str, data: str, directory: Path, args: argparse.Namespace, teacher: Path | None = None) -> dict:
    """Train (or reuse) one run; ``name`` "float:<recipe>" is that recipe's float reference."""
    done = directory / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    recipe = get_recipe(name.removeprefix("float:"))
    recipe = replace(recipe, model_kwargs={**recipe.model_kwargs, **args.model_kwargs})
    recipe = float_recipe(recipe) if name.startswith("float:") else recipe
    start = time.perf_counter()
    result = train_recipe(recipe, data, epochs=args.epochs, seed=args.seed, limit=args.limit, out=directory,
                          progress=args.progress, teacher=teacher)
    result["row_wall_time"] = time.perf_counter() - start
    done.write_text(json.dumps(result, indent=1))
    return result


def engine_row(directory: Path, float_directory: Path, data: str, args: argparse.Namespace) -> dict:
    """Accuracy and agreement of the saved file in the Engine; Engine vs torch float32 speed."""
    model, run = load_trained(directory)
    row = {}
    if args.refresh_bn and get_recipe(run["recipe"]).bn_refresh:
        train_loader = loaders(data, run["batch_size"], seed=args.seed, limit=args.limit)[0]
        refresh_batch_norm(model, train_loader, RefreshBatchNorm().max_batches)
        row["bn_refreshed"] = True
    path = save_quantized(model, directory / "model.lowbit", run["data"])
    images, labels = eval_set(data, args.limit)
    engine = Engine(path, threads=args.threads)
    torch.set_num_threads(args.threads)
    model.eval()
    with torch.no_grad():
        torch_pred = torch.cat([model(images[i:i + 500]) for i in range(0, len(images), 500)]).argmax(1).numpy()
    engine_pred = np.concatenate([engine.run(images[i:i + 500].numpy()) for i in range(0, len(images), 500)]).argmax(1)
    row.update({"file_bytes": path.stat().st_size, "torch_file_acc": float((torch_pred == labels.numpy()).mean()),
                "engine_acc": float((engine_pred == labels.numpy()).mean()),
                "engine_torch_agreement": float((engine_pred == torch_pred).mean())})
    float_model = load_trained(float_directory)[0]
    for batch in (1, 64):
        x = images[:batch].contiguous()
        with torch.no_grad():
            t_float = best(lambda: float_model(x), args.repeats)
        t_engine = best(lambda: engine.run(x.numpy()), args.repeats)
        row[f"batch{batch}"] = {"torch_float32_ms": 1e3 * t_float, "engine_ms": 1e3 * t_engine,
                                "speedup": t_float / t_engine}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["mnist", "fashion-mnist"])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--epochs", type=int, default=None, help="epochs of every run (default: each recipe's)")
    parser.add_argument("--limit", type=int, default=None, help="first N images of each split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-kwargs", type=json.loads, default={},
                        help='JSON object over each recipe\'s network options, e.g. \'{"blocks": [2, 2, 2]}\'')
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True, help="run directories")
    parser.add_argument("--results", type=Path, default=None, help="JSON file of the rows")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--teacher", type=Path, default=None,
                        help="float run directory the +kd recipes distil from (default: their own float network)")
    parser.add_argument("--refresh-bn", action="store_true",
                        help="re-estimate the batch norms of recipes with bn_refresh by the current "
                             "refresh_batch_norm before saving (runs trained before it changed)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for data in args.data:
        for name in args.recipes:
            base = name.removesuffix(DISTILLED)
            float_directory = args.out / data / f"float-{base}"
            reference = train("float:" + base, data, float_directory, args)
            teacher = (args.teacher or float_directory) if name.endswith(DISTILLED) else None
            result = train(base, data, args.out / data / name, args, teacher)
            row = {"data": data, "recipe": name, "model": result["model"], "model_kwargs": result["model_kwargs"],
                   "epochs": result["epochs"], "limit": args.limit, "seed": args.seed,
                   "float_acc": reference["final_acc"], "float_wall_s": reference["row_wall_time"],
                   "teacher": None if teacher is None else str(teacher),
                   "torch_acc": result["final_acc"], "stages": [(s["name"], s["epochs"], s["final_acc"])
                                                                for s in result["stages"]],
                   "wall_s": result["row_wall_time"], "threads": args.threads,
                   **engine_row(args.out / data / name, float_directory, data, args)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.results:
                args.results.parent.mkdir(parents=True, exist_ok=True)
                args.results.write_text(json.dumps(rows, indent=1))
    print("| data | recipe | model | epochs | float % | binary % (torch / Engine file) | agreement | wall s | "
          "speed-up b1 / b64 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['data']} | {r['recipe']} | {r['model']} | {r['epochs']} | {100 * r['float_acc']:.2f} | "
              f"{100 * r['torch_acc']:.2f} / {100 * r['engine_acc']:.2f} | {100 * r['engine_torch_agreement']:.2f}% | "
              f"{r['wall_s']:.0f} | {r['batch1']['speedup']:.1f}x / {r['batch64']['speedup']:.1f}x |")


if __name__ == "__main__":
    main()
