"""Deep Compression with settings found from an error budget, against the default command and the paper.

For each net: ``lowbit train`` (cached in OUT/<net>/run), then through the command line exactly as a user runs
it: ``lowbit compress CKPT --data D --out F`` (the defaults) and ``lowbit compress ... --max-error-increase B``
for each budget B. Each row: whole-file and layer-array ratios (float32 parameter bytes over bytes stored), test
error of the float model and of the file (``lowbit eval``'s count), the per-layer settings and wall time.

    .venv/bin/python bench/compress_search.py --out bench-out/compress-search            # LeNet-300-100, LeNet-5
    .venv/bin/python bench/compress_search.py --nets lenet300 --budgets 0.1 0.3 --train-epochs 15

Results: OUT/results.json and bench/results/compress_search.json; a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

NETS = {"lenet300": ("mnist", 15), "lenet5": ("mnist", 8), "vgg-small": ("fashion-mnist", 8)}
LOWBIT = [sys.executable, "-m", "lowbit"]


def lowbit(*argv: str) -> tuple[dict, float]:
    start = time.perf_counter()
    done = subprocess.run([*LOWBIT, *argv, "--json"], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"lowbit {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-out/compress-search")
    parser.add_argument("--nets", nargs="+", default=["lenet300", "lenet5"], choices=sorted(NETS))
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.1, 0.3])
    parser.add_argument("--train-epochs", type=int, default=None, help="float training epochs (default per net)")
    parser.add_argument("--search-epochs", type=int, default=40)
    args = parser.parse_args()
    out = Path(args.out)
    rows = []
    for net in args.nets:
        data, epochs = NETS[net]
        run = out / net / "run"
        if not (run / "best.safetensors").exists():
            lowbit("train", "--model", net, "--data", data, "--epochs", str(args.train_epochs or epochs),
                   "--out", str(run), "--no-progress")
        ckpt = str(run / "best.safetensors")
        for budget in [None, *args.budgets]:
            name = "default" if budget is None else f"budget {budget:g}"
            path = out / net / f"{name.replace(' ', '-')}.lowbit"
            extra = [] if budget is None else ["--max-error-increase", str(budget),
                                               "--search-epochs", str(args.search_epochs)]
            result, seconds = lowbit("compress", ckpt, "--data", data, "--out", str(path), *extra)
            evaluated, _ = lowbit("eval", str(path), "--data", data)
            if budget is None:  # the default run evaluates the float model on the test images; a search does not
                float_error = 100 * (1 - result["accuracy"]["float"])
            layers = {s["name"]: (s["kept"], s["weight_bits"], s["index_bits"]) for s in result["layers"]}
            rows.append({"net": net, "run": name, "ratio_file": result["ratio_file"],
                         "ratio_layers": result["ratio_layers"], "float_error": float_error,
                         "test_error": 100 * (1 - evaluated["accuracy"]), "layers": layers, "seconds": seconds,
                         "search_epochs": result.get("search", {}).get("epochs")})
            print(json.dumps(rows[-1]), flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    Path("bench/results/compress_search.json").write_text(json.dumps(rows, indent=2))
    print("| net | run | kept (per layer) | weight bits | index bits | error float -> file | ratio layers | "
          "ratio file | search epochs | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        kept = " / ".join(f"{100 * k:.1f}" for k, _, _ in r["layers"].values())
        bits = " / ".join(str(b) for _, b, _ in r["layers"].values())
        index = " / ".join(str(i) for _, _, i in r["layers"].values())
        print(f"| {r['net']} | {r['run']} | {kept} % | {bits} | {index} | {r['float_error']:.2f}% -> "
              f"{r['test_error']:.2f}% | {r['ratio_layers']:.1f}x | {r['ratio_file']:.1f}x | "
              f"{r['search_epochs'] or '-'} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
