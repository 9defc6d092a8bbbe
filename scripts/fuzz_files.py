"""The long mutation-fuzz run over every kind of .lowbit file (the suite runs a slice: tests/test_fuzz_files.py).

    python scripts/fuzz_files.py --cases 5000 --workers 2 --out bench/results/fuzz_files.json

Each case mutates one of the files of tests/fuzzing.py (w8a8, log, ternary, Deep Compression with Huffman and
with ANS, sparse, bnn, xnor, float without a graph) and sends it through ``load`` + forward,
``load_state_dict``, the Engine, ``inspect`` and ``lowbit inspect``. A case fails when any of them raises
anything but a LowbitError, when ``load`` and the Engine disagree on the file or on its outputs, when it runs
past ``--case-seconds`` or when it needs more than ``--memory-gb`` of address space (workers run under
RLIMIT_AS, so an unbounded allocation is a MemoryError). Prints and writes the outcome counts, the slowest
case and every failure with the seed that reproduces it (``--seed S --first N --cases 1``).
"""

from __future__ import annotations

import argparse
import json
import queue
import random
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class CaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CaseTimeout()


def worker(seed: int, first: int, count: int, case_seconds: int, memory_gb: float) -> None:
    """Run cases ``first .. first + count - 1``, one JSON line each, then one line with the peak memory."""
    sys.path.insert(0, str(ROOT / "tests"))
    import fuzzing

    warnings.simplefilter("ignore")
    limit = int(memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    signal.signal(signal.SIGALRM, _alarm)
    with tempfile.TemporaryDirectory() as tmp:
        files = fuzzing.model_files(Path(tmp))
        originals = {kind: path.read_bytes() for kind, path in files.items()}
        scratch = Path(tmp) / "case.lowbit"
        for case in range(first, first + count):
            rng = random.Random(seed * 1_000_003 + case)
            kind = rng.choice(sorted(originals))
            what, blob = fuzzing.mutate(originals[kind], rng)
            scratch.write_bytes(blob)
            record = {"case": case, "kind": kind, "what": what}
            start = time.perf_counter()
            signal.alarm(case_seconds)
            try:
                record["outcome"] = fuzzing.check(scratch)
            except CaseTimeout:
                record["failure"] = f"ran past {case_seconds} s"
            except BaseException as exc:  # noqa: BLE001 - every escape is a finding
                record["failure"] = f"{type(exc).__name__}: {str(exc)[:500]}"
            finally:
                signal.alarm(0)
            record["seconds"] = round(time.perf_counter() - start, 4)
            print(json.dumps(record), flush=True)
    print(json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--first", type=int, default=0, help="first case number (to rerun one case)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--case-seconds", type=int, default=30)
    parser.add_argument("--memory-gb", type=float, default=4.0)
    parser.add_argument("--out", type=Path, default=None, help="write the summary as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.seed, args.first, args.cases, args.case_seconds, args.memory_gb)
        return
    from tqdm import tqdm

    share = -(-args.cases // args.workers)
    procs = []
    for index in range(args.workers):
        first = args.first + index * share
        count = min(share, args.first + args.cases - first)
        if count > 0:
            command = [sys.executable, __file__, "--worker", "--seed", str(args.seed), "--first", str(first),
                       "--cases", str(count), "--case-seconds", str(args.case_seconds),
                       "--memory-gb", str(args.memory_gb)]
            procs.append(subprocess.Popen(command, stdout=subprocess.PIPE, text=True))
    lines: queue.Queue = queue.Queue()
    for proc in procs:  # one reader per worker, so no worker blocks on a full pipe
        threading.Thread(target=lambda p=proc: ([lines.put(line) for line in p.stdout], lines.put(None)),
                         daemon=True).start()
    records, peaks = [], []
    start = time.perf_counter()
    with tqdm(total=args.cases, desc="fuzz cases") as progress:
        finished = 0
        while finished < len(procs):
            line = lines.get()
            if line is None:
                finished += 1
                continue
            item = json.loads(line)
            if "maxrss_mb" in item:
                peaks.append(item["maxrss_mb"])
                continue
            records.append(item)
            progress.update(1)
    for proc in procs:
        proc.wait()
    failures = [r for r in records if "failure" in r]
    outcomes = Counter(" ".join(sorted(set(r["outcome"].values()))) for r in records if "outcome" in r)
    slowest = max(records, key=lambda r: r["seconds"]) if records else None
    summary = {
        "command": " ".join(["python", "scripts/fuzz_files.py", *sys.argv[1:]]),
        "cases": len(records), "failures": failures, "worker_exit_codes": [p.returncode for p in procs],
        "missing_cases": args.cases - len(records), "wall_seconds": round(time.perf_counter() - start, 1),
        "slowest_case": slowest, "peak_worker_rss_mb": max(peaks, default=None),
        "by_mutation": dict(Counter(r["what"] for r in records)), "outcomes": dict(outcomes.most_common()),
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "failures"}, indent=1))
    for failure in failures:
        print("FAILED", json.dumps(failure))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
    sys.exit(1 if failures or summary["missing_cases"] else 0)


if __name__ == "__main__":
    main()
