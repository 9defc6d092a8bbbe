"""Deep Compression with settings found from an error budget, against the default command and the paper.

For each net: ``lowbit train --val-size 5000`` (cached in OUT/<net>/run; the searches measure their budget on
those held-out training images), then through the command line exactly as a user runs
it: ``lowbit compress CKPT --data D --out F`` (the defaults) and ``lowbit compress ... --max-error-increase B``
for each budget B. Each row: whole-file and layer-array ratios (float32 parameter bytes over bytes stored), the
per-layer ratios (float32 bytes of a layer over its arrays in the file), test error of the float model and of
the file (``lowbit eval``'s count), the per-layer settings and wall time. Every command runs on one thread
(``OMP_NUM_THREADS``, ``--threads``).

    .venv/bin/python bench/compress_search.py --out bench-out/compress-search            # LeNet-300-100, LeNet-5
    .venv/bin/python bench/compress_search.py --nets lenet5 --budgets                    # LeNet-5, default only
    .venv/bin/python bench/compress_search.py --nets lenet5 --no-default --search-epochs 30  # searches only

Results: OUT/results.json and bench/results/compress_search.json (rows of the same net and run replaced, the
others kept); a markdown table of this run's rows on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

#: net -> data and float training epochs (None: the model's default, ``lowbit.models.training_defaults``)
NETS = {"lenet300": ("mnist", None), "lenet5": ("mnist", None), "vgg-small": ("fashion-mnist", 8)}
#: training images held out of float training (``lowbit train --val-size``): the searches' validation slice
VAL_SIZE = 5000
LOWBIT = [sys.executable, "-m", "lowbit"]
RESULTS = Path("bench/results/compress_search.json")


def lowbit(*argv: str, threads: int = 1) -> tuple[dict, float]:
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([*LOWBIT, *argv, "--json"], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"lowbit {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout), time.perf_counter() - start


def _probes(search: dict) -> dict:
    """The search's reference and probes: factor, validation error and layer bytes (Huffman)."""
    return {"float_validation_error": search["float_error"], "reference_error": search["reference"]["error"],
            "probes": [{k: p[k] for k in ("factor", "error", "layer_bytes", "epochs")} for p in search["probes"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-out/compress-search")
    parser.add_argument("--nets", nargs="+", default=["lenet300", "lenet5"], choices=sorted(NETS))
    parser.add_argument("--budgets", nargs="*", type=float, default=[0.1, 0.3])
    parser.add_argument("--train-epochs", type=int, default=None, help="float training epochs (default per net)")
    parser.add_argument("--search-epochs", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-default", action="store_true",
                        help="searches only (the float model's test error from its training, OUT/<net>/run/train.json)")
    args = parser.parse_args()
    out = Path(args.out)
    rows = []
    for net in args.nets:
        data, epochs = NETS[net]
        run = out / net / "run"
        if not (run / "last.safetensors").exists():
            epochs = args.train_epochs or epochs
            trained, seconds = lowbit("train", "--model", net, "--data", data, *(["--epochs", str(epochs)] if epochs else []),
                                "--val-size", str(VAL_SIZE), "--out", str(run), "--no-progress", threads=args.threads)
            (run / "train.json").write_text(json.dumps(trained))
            print(f"{net}: float training {seconds:.0f} s", flush=True)
        if args.no_default:
            float_error = 100 * (1 - json.loads((run / "train.json").read_text())["final_acc"])
        ckpt = str(run)  # the last epoch, as `lowbit compress RUN_DIR` reads it (no epoch picked on the test set)
        for budget in [*([] if args.no_default else [None]), *args.budgets]:
            name = "default" if budget is None else f"budget {budget:g}"
            path = out / net / f"{name.replace(' ', '-')}.lowbit"
            extra = [] if budget is None else ["--max-error-increase", str(budget),
                                               "--search-epochs", str(args.search_epochs)]
            result, seconds = lowbit("compress", ckpt, "--data", data, "--out", str(path), *extra, threads=args.threads)
            evaluated, _ = lowbit("eval", str(path), "--data", data, threads=args.threads)
            if budget is None:  # the default run evaluates the float model on the test images; a search does not
                float_error = 100 * (1 - result["accuracy"]["float"])
            layers = {s["name"]: (s["kept"], s["weight_bits"], s["index_bits"],
                                  s["float_bytes"] / result["file_layer_bytes"][s["name"]]) for s in result["layers"]}
            rows.append({"net": net, "run": name, "ratio_file": result["ratio_file"],
                         "file_bytes": result["file_bytes"],
                         "ratio_layers": result["ratio_layers"], "float_error": float_error,
                         "test_error": 100 * (1 - evaluated["accuracy"]), "layers": layers, "seconds": seconds,
                         "search_epochs": result.get("search", {}).get("epochs"),
                         "search": _probes(result["search"]) if "search" in result else None})
            print(json.dumps(rows[-1]), flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    new = {(r["net"], r["run"]) for r in rows}
    kept_rows = [r for r in json.loads(RESULTS.read_text()) if (r["net"], r["run"]) not in new] \
        if RESULTS.exists() else []
    RESULTS.write_text(json.dumps(kept_rows + rows, indent=2) + "\n")
    print("| net | run | kept (per layer) | weight bits | index bits | error float -> file | ratio per layer | "
          "ratio layers | ratio file | search epochs | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        columns = list(zip(*r["layers"].values()))
        kept = " / ".join(f"{100 * k:.1f}" for k in columns[0])
        ratios = " / ".join(f"{x:.1f}x" for x in columns[3])
        print(f"| {r['net']} | {r['run']} | {kept} % | {' / '.join(map(str, columns[1]))} | "
              f"{' / '.join(map(str, columns[2]))} | {r['float_error']:.2f}% -> {r['test_error']:.2f}% | {ratios} | "
              f"{r['ratio_layers']:.1f}x | {r['ratio_file']:.1f}x | {r['search_epochs'] or '-'} | "
              f"{r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
