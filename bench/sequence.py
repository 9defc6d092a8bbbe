"""Sequence models: a character-level GPT-style language model quantized post-training by lowbit (task ``lm``), and
keyword spotting (task ``kws``, bench/sequence_kws.py, its ``run`` called with ``--threads`` and its own defaults
otherwise), in one results file.

    .venv/bin/python bench/sequence.py                              # both tasks (bench/results/sequence.json,
                                                                    # docs/sequence.png)
    .venv/bin/python bench/sequence.py --tasks lm --steps 600       # the language model alone
    .venv/bin/python bench/sequence.py --tasks lm --settings w3-kmeans-g64+gptq w3-log-g64+gptq  # rerun rows, merged
    .venv/bin/python bench/sequence.py --plot-only                  # redraw the plot and print the tables

Data (task ``lm``): the Python language reference that ships with Python itself, ``pydoc_data.topics.topics``
(79 topics, about 465,000 characters of English prose and code examples in Python 3.11), the topics joined in
sorted key order with a blank line between them. Character-level vocabulary: every distinct character of the whole
text (103). Split: the first 90% of the characters train, the last 10% test; nothing is shuffled across it.

Model: token embedding + learned positional table (128 positions) + 4 pre-norm causal Transformer blocks
(``nn.TransformerEncoder`` with ``is_causal=True``, d_model ``--d-model`` 128, 4 heads, MLP 4 d, GELU, no dropout)
+ a final LayerNorm + a linear LM head. Trained here with Adam (lr 3e-3, 100 warm-up steps then cosine to 0,
batch 16 windows of 128 characters drawn at random from the training text, seed 0) for ``--steps`` steps, cached in
``$LOWBIT_CACHE/bench-sequence/`` (default ``~/.cache/lowbit``) keyed by size, steps and seed.

Metric: test perplexity per character, exp of the mean cross-entropy over all next-character predictions of the
test text cut into non-overlapping windows of 128 inputs (window i reads characters 128 i .. 128 i + 127 and
predicts 128 i + 1 .. 128 i + 128; the tail that fills no window is dropped). Each window starts without context,
so its first predictions are harder than in a sliding-window evaluation: the figure is an upper bound of the
model's perplexity, the same for every row.

Settings (``--settings``), each through ``lowbit.quantize`` with a preset or a config dict, ``lowbit.calibrate`` on
``--calib`` training windows (seed 1), then evaluated; ``+gptq`` adds ``ptq: ["gptq"]`` (GPTQ's own defaults).
Every quantized model is saved to a .lowbit file and its bits per weight are counted from the file with
``lowbit.format.container.inspect_file`` (the function behind ``lowbit inspect``): the stored bytes of the quantized
layers' weight tensors (codes, scales, zero points, codebooks) over their weight count; biases, norms and the
positional table stay float32 and are in the file bytes only. Presets with "dynamic" in their name are added when
``lowbit.config.PRESETS`` has them.

ONNX Runtime: float, w8a8 and w4g128 exported with ``lowbit.export_onnx``, timed on one batch of 1 x 128 and
16 x 128 tokens, the three sessions interleaved for ``--rounds`` rounds (median seconds per call).
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this file's directory comes first on sys.path and bench/onnx.py would shadow the onnx package
BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]

import argparse  # noqa: E402
import copy  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

import lowbit  # noqa: E402
from lowbit.config import PRESETS  # noqa: E402
from lowbit.data.sources import cache_dir  # noqa: E402
from lowbit.errors import UnsupportedLayerError  # noqa: E402
from lowbit.format.container import inspect_file  # noqa: E402
from lowbit.nn import QuantEmbedding  # noqa: E402

CTX = 128
SEEDS = {"training": 0, "calibration": 1}
TRAIN_BATCH, EVAL_BATCH, CALIB_BATCH = 16, 32, 16


def _bench_module(name: str):
    """A sibling file of this script, imported by path (bench/ is no package); None when it does not exist."""
    if name not in sys.modules:
        path = BENCH / f"{name}.py"
        if not path.is_file():
            return None
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _group(quantizer: str, bits: int, group: int) -> dict:
    """A weight-only group-wise config, every layer (first / last "same"), as the w4g128 / w3g64 presets."""
    return {"weight": {"name": quantizer, "bits": bits, "group_size": group}, "first": "same", "last": "same"}


#: setting -> (config: preset name or dict, codec family for the plot)
BASE_SETTINGS: dict[str, tuple[str | dict, str]] = {
    "w8a8": ("w8a8", "uniform w8a8"),
    "w4g128": ("w4g128", "group uniform"),
    "w3g128": (_group("group_uniform", 3, 128), "group uniform"),
    "w3g64": ("w3g64", "group uniform"),
    "w2g32": (_group("group_uniform", 2, 32), "group uniform"),
    "w2g64": (_group("group_uniform", 2, 64), "group uniform"),
    "w3-kmeans-g64": ("w3-kmeans-g64", "group k-means"),
    "w2-kmeans-g128": (_group("group_kmeans", 2, 128), "group k-means"),
    "w3-log-g64": (_group("group_log2", 3, 64), "group log2"),
    "w2-log-g64": ("w2-log-g64", "group log2"),
    # one k-means codebook per weight tensor: 3-bit codes at about 3 bits per weight, where 3-bit groups of at
    # most d_model = 128 inputs pay 2 bits per weight for their 8 float32 levels
    "w3-kmeans-tensor": ({"weight": {"name": "kmeans", "bits": 3}, "first": "same", "last": "same"},
                         "k-means per tensor"),
}
GPTQ_OF = ("w4g128", "w3g128", "w3g64", "w2g32", "w3-kmeans-g64", "w2-kmeans-g128", "w3-log-g64", "w2-log-g64",
           "w3-kmeans-tensor")


def settings_table() -> dict[str, tuple[str | dict, str, bool]]:
    """Every setting: (config, codec family, GPTQ?); presets named "...dynamic..." when this checkout has them."""
    out = {"float": (None, "float", False)}
    out.update({name: (cfg, family, False) for name, (cfg, family) in BASE_SETTINGS.items()})
    out.update({name: (name, "dynamic", False) for name in PRESETS if "dynamic" in name})
    out.update({f"{name}+gptq": (BASE_SETTINGS[name][0], BASE_SETTINGS[name][1], True) for name in GPTQ_OF})
    return out


def config_of(config: str | dict, gptq: bool) -> dict:
    data = copy.deepcopy(PRESETS[config] if isinstance(config, str) else config)
    if gptq:
        data["ptq"] = ["gptq"]
    return data


# ------------------------------------------------------------------------------------------------ data, model


def text_data() -> tuple[torch.Tensor, torch.Tensor, list[str], int]:
    """(train ids, test ids, vocabulary, characters) of the Python language reference, split 90 / 10 in order."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:], vocab, len(text)


def windows(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows: inputs ids[128 i : 128 i + 128], targets shifted by one; the tail is dropped."""
    n = (len(ids) - 1) // CTX
    x = ids[:n * CTX].reshape(n, CTX)
    y = ids[1:n * CTX + 1].reshape(n, CTX)
    return x, y


def random_windows(ids: torch.Tensor, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.randint(0, len(ids) - CTX - 1, (count,), generator=generator)
    offsets = start[:, None] + torch.arange(CTX + 1)
    chunk = ids[offsets]
    return chunk[:, :-1], chunk[:, 1:]


class GPT(nn.Module):
    """Token and learned positional embedding, pre-norm causal Transformer blocks, a final norm and an LM head."""

    def __init__(self, vocab: int, d: int = 128, heads: int = 4, layers: int = 4, ctx: int = CTX):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(1, ctx, d) * 0.02)
        block = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True,
                                           activation="gelu")
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(ctx))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        h = self.tok(x) + self.pos[:, :length]
        return self.head(self.ln(self.blocks(h, mask=self.mask[:length, :length], is_causal=True)))


def trained_model(train: torch.Tensor, vocab: int, args: argparse.Namespace) -> tuple[GPT, dict]:
    """The GPT trained on ``train`` for ``args.steps`` Adam steps, from the cache when an earlier run trained it."""
    torch.manual_seed(SEEDS["training"])
    model = GPT(vocab, args.d_model)
    name = f"gpt-v{vocab}-d{args.d_model}-l4-c{CTX}-b{TRAIN_BATCH}-s{args.steps}-seed{SEEDS['training']}.pt"
    path = cache_dir() / "bench-sequence" / name
    info = {"optimizer": "adam", "lr": 3e-3, "warmup": 100, "schedule": "cosine", "batch": TRAIN_BATCH,
            "steps": args.steps, "seed": SEEDS["training"], "checkpoint": str(path), "from_cache": path.is_file(),
            "parameters": sum(p.numel() for p in model.parameters())}
    if path.is_file():
        stored = torch.load(path, weights_only=True)
        model.load_state_dict(stored["state"])
        info.update(seconds=stored["seconds"], final_loss=stored["final_loss"])
        return model.eval(), info
    generator = torch.Generator().manual_seed(SEEDS["training"])
    optimizer = torch.optim.Adam(model.parameters(), lr=info["lr"])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / info["warmup"]) * 0.5 * (
        1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    model.train()
    start, losses = time.perf_counter(), []
    for _ in (bar := tqdm(range(args.steps), desc="training", unit="step")):
        x, y = random_windows(train, TRAIN_BATCH, generator)
        loss = F.cross_entropy(model(x).reshape(-1, vocab), y.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{statistics.fmean(losses[-50:]):.3f}")
    info.update(seconds=time.perf_counter() - start, final_loss=statistics.fmean(losses[-50:]), from_cache=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": model.state_dict(), "seconds": info["seconds"], "final_loss": info["final_loss"]}, path)
    return model.eval(), info


@torch.no_grad()
def perplexity(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """exp of the mean next-character cross-entropy over every position of every window."""
    total = 0.0
    for xb, yb in zip(x.split(EVAL_BATCH), y.split(EVAL_BATCH)):
        logits = model(xb)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), yb.reshape(-1), reduction="sum").item()
    return math.exp(total / y.numel())


# ------------------------------------------------------------------------------------------------------- rows


class Missing(Exception):
    """This checkout's GPTQ does not round the setting's quantizer yet."""


def quantized_model(model: GPT, config: dict, calib: list[torch.Tensor]) -> tuple[nn.Module, object]:
    """quantize_report + calibrate. GPTQ is told the linear layers (``ptq_options.gptq.layers``): by default it
    also picks the quantized embedding, whose gather has no input columns to round, and fails there (see
    docs/benchmarks.md); named layers make an unsupported quantizer an UnsupportedLayerError ("missing")."""
    if config.get("ptq"):
        plain = {k: v for k, v in config.items() if k != "ptq"}
        probe = lowbit.quantize_report(copy.deepcopy(model).eval(), plain)
        linears = [n for n in probe.converted if not isinstance(probe.model.get_submodule(n), QuantEmbedding)]
        config = {**config, "ptq_options": {"gptq": {"layers": linears}}}
    report = lowbit.quantize_report(copy.deepcopy(model).eval(), config, example_input=calib[0][:1])
    try:
        q = lowbit.calibrate(report.model, calib)
    except UnsupportedLayerError as e:
        if config.get("ptq") and "grid" in str(e):
            raise Missing(str(e)) from None
        raise
    return q, report


def file_bits(q: nn.Module, converted: list[str], path: Path) -> dict:
    """Save ``q`` and count from the file: bits per weight of the quantized layers' weights, file bytes."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lowbit.save(q, path)
    info = inspect_file(path)
    names = {f"{layer}.weight" for layer in converted}
    rows = [t for t in info["tensors"] if t["name"] in names]
    found = {t["name"] for t in rows}
    if found != names:
        raise RuntimeError(f"weights missing from the file: {sorted(names - found)[:5]}")
    weights, stored = sum(t["numel"] for t in rows), sum(t["bytes"] for t in rows)
    codecs = sorted({t["chain"] for t in rows})
    return {"bits_per_weight": 8 * stored / weights, "quantized_weight_bytes": stored, "quantized_weights": weights,
            "file_bytes": info["file_bytes"], "codecs": codecs,
            "save_warnings": [str(w.message)[:300] for w in caught]}


def run_row(name: str, model: GPT, data: dict, args: argparse.Namespace) -> dict:
    config, family, gptq = settings_table()[name]
    row = {"setting": name, "family": family, "gptq": gptq}
    if config is None:
        start = time.perf_counter()
        row.update(status="ok", perplexity=perplexity(model, *data["test"]), eval_seconds=time.perf_counter() - start,
                   bits_per_weight=32.0, weight_fraction=0.0)
        with tempfile.TemporaryDirectory() as tmp:
            lowbit.save(model, Path(tmp) / "float.lowbit")
            row["file_bytes"] = inspect_file(Path(tmp) / "float.lowbit")["file_bytes"]
        return row
    cfg = config_of(config, gptq)
    row["config"] = cfg if isinstance(config, dict) or gptq else config
    torch.manual_seed(SEEDS["calibration"])
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"lowbit\.quantize left")  # the positional table, reported
            q, report = quantized_model(model, cfg, data["calib"])
    except Missing as e:
        return {**row, "status": "missing", "why": str(e)}
    except Exception as e:  # noqa: BLE001 -- recorded as a row; the run goes on
        if args.verbose:
            traceback.print_exc()
        return {**row, "status": "error", "why": f"{type(e).__name__}: {str(e).strip()[:400]}"}
    row.update(seconds=time.perf_counter() - start, converted=len(report.converted),
               quantized_layers=report.converted, kept_float=report.kept_float,
               unsupported=[f"{n} ({why})" for n, why in report.unsupported],
               weight_fraction=report.weight_fraction, mac_fraction=report.mac_fraction)
    start = time.perf_counter()
    row["perplexity"] = perplexity(q, *data["test"])
    row["eval_seconds"] = time.perf_counter() - start
    row["ratio_to_float"] = row["perplexity"] / data["float_perplexity"]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            row.update(file_bits(q, report.converted, Path(tmp) / f"{name}.lowbit"))
    except Exception as e:  # noqa: BLE001
        if args.verbose:
            traceback.print_exc()
        row["file_error"] = f"{type(e).__name__}: {str(e).strip()[:400]}"
    row["status"] = "ok"
    if name in args.onnx_settings:
        data["onnx_models"][name] = q
    return row


# ------------------------------------------------------------------------------------------------------- ONNX


def onnx_latency(models: dict[str, nn.Module], args: argparse.Namespace, vocab: int) -> dict:
    """Median seconds per onnxruntime call of each model at 1 x 128 and 16 x 128, sessions interleaved."""
    import onnxruntime as ort

    out: dict = {"threads": args.ort_threads, "rounds": args.rounds, "onnxruntime": ort.__version__, "models": {}}
    sessions = {}
    example = torch.randint(0, vocab, (1, CTX), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            try:
                path = lowbit.export_onnx(model, Path(tmp) / f"{name}.onnx", example)
                options = ort.SessionOptions()
                options.intra_op_num_threads = args.ort_threads
                options.inter_op_num_threads = 1
                sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                out["models"][name] = {"onnx_bytes": path.stat().st_size,
                                       "ops": sorted({n.op_type for n in _onnx_nodes(path)})}
            except Exception as e:  # noqa: BLE001
                if args.verbose:
                    traceback.print_exc()
                out["models"][name] = {"error": f"{type(e).__name__}: {str(e).strip()[:400]}"}
    for batch in (1, 16):
        x = torch.randint(0, vocab, (batch, CTX), generator=torch.Generator().manual_seed(batch)).numpy()
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for name, s in sessions.items():  # warm-up, and agreement with torch
            logits = s.run(None, {s.get_inputs()[0].name: x})[0]
            with torch.no_grad():
                ref = models[name](torch.from_numpy(x)).numpy()
            out["models"][name][f"argmax_agreement_b{batch}"] = float((logits.argmax(-1) == ref.argmax(-1)).mean())
        for _ in range(args.rounds):
            for name, s in sessions.items():
                feed = {s.get_inputs()[0].name: x}
                n, start = 0, time.perf_counter()
                while time.perf_counter() - start < 0.2 or n < 3:
                    s.run(None, feed)
                    n += 1
                times[name].append((time.perf_counter() - start) / n)
        for name in sessions:
            out["models"][name][f"seconds_b{batch}"] = statistics.median(times[name])
        if "float" in sessions:
            for name in sessions:
                out["models"][name][f"ratio_to_float_b{batch}"] = (out["models"][name][f"seconds_b{batch}"]
                                                                   / out["models"]["float"][f"seconds_b{batch}"])
    return out


def _onnx_nodes(path: Path):
    import onnx

    return onnx.load(str(path)).graph.node


# ------------------------------------------------------------------------------------------------ task lm


def task_lm(args: argparse.Namespace, previous: dict | None, save) -> dict:
    train, test, vocab, chars = text_data()
    model, training = trained_model(train, len(vocab), args)
    generator = torch.Generator().manual_seed(SEEDS["calibration"])
    calib_x, _ = random_windows(train, args.calib, generator)
    data = {"test": windows(test), "calib": list(calib_x.split(CALIB_BATCH)), "onnx_models": {}}
    out = {"data": "pydoc_data.topics.topics (the Python language reference shipped with Python "
                   f"{platform.python_version()}), topics joined in sorted key order",
           "characters": chars, "vocabulary": len(vocab), "train_characters": len(train),
           "test_characters": len(test), "test_windows": len(data["test"][0]), "context": CTX,
           "predictions": data["test"][1].numel(), "calibration_windows": args.calib,
           "model": {"d_model": args.d_model, "heads": 4, "layers": 4, "mlp": 4 * args.d_model, "context": CTX},
           "training": training}
    float_ppl = perplexity(model, *data["test"])
    data["float_perplexity"] = float_ppl
    out["float_perplexity"] = float_ppl
    wanted = args.settings or list(settings_table())
    kept = [r for r in (previous or {}).get("rows", []) if r["setting"] not in wanted] if args.settings else []
    rows: list[dict] = []
    need_onnx = [s for s in args.onnx_settings if s not in wanted and s != "float"] if args.onnx else []
    out["rows"] = kept
    for name in (bar := tqdm([*wanted, *need_onnx], desc="lm settings", unit="row")):
        bar.set_postfix_str(name)
        row = run_row(name, model, data, args)
        if name in need_onnx:
            continue
        rows.append(row)
        if row["status"] != "ok":
            tqdm.write(f"{name}: {row['status']}: {row['why']}")
        out["rows"] = _ordered([*kept, *rows])
        save(out)
    if args.onnx:
        bar_models = {"float": model, **{k: v for k, v in data["onnx_models"].items()}}
        out["onnx"] = onnx_latency(bar_models, args, len(vocab))
    elif previous and "onnx" in previous:
        out["onnx"] = previous["onnx"]
    out["goals"] = goals(out)
    return out


def _ordered(rows: list[dict]) -> list[dict]:
    order = list(settings_table())
    return sorted(rows, key=lambda r: order.index(r["setting"]) if r["setting"] in order else len(order))


def _versus(k: dict, u: dict) -> dict:
    """k-means row ``k`` against uniform row ``u``: met when k's perplexity is lower."""
    met = k["perplexity"] < u["perplexity"]
    return {"met": met, "kmeans": k["setting"], "uniform": u["setting"],
            "margin": u["perplexity"] / k["perplexity"] - 1,
            "text": f"{k['setting']} {k['perplexity']:.3f} at {k['bits_per_weight']:.3f} b/w vs {u['setting']} "
                    f"{u['perplexity']:.3f} at {u['bits_per_weight']:.3f} b/w: {'MET' if met else 'MISSED'} "
                    f"(uniform / k-means {u['perplexity'] / k['perplexity']:.3f})"}


def goals(lm: dict) -> dict:
    """The two goals: k-means groups beat uniform groups at about 3 bits per weight (2.9-3.35 counted from the file,
    scales and codebooks included; the best row of each, round-to-nearest and GPTQ apart), and the same for one
    codebook per tensor and for the same 3-bit codes (w3-kmeans-g64 vs w3g64, unequal bits); a 4-bit model within
    5% of float perplexity."""
    ok = [r for r in lm["rows"] if r["status"] == "ok" and "bits_per_weight" in r]

    def best(family: str, gptq: bool, lo: float = 2.9, hi: float = 3.35) -> dict | None:
        rows = [r for r in ok if r["family"] == family and r["gptq"] == gptq and lo <= r["bits_per_weight"] <= hi]
        return min(rows, key=lambda r: r["perplexity"]) if rows else None

    out: dict = {"kmeans_vs_uniform_at_3_bits": {}}
    for gptq in (False, True):
        u = best("group uniform", gptq)
        for family in ("group k-means", "k-means per tensor"):
            k = best(family, gptq)
            if k and u:
                out["kmeans_vs_uniform_at_3_bits"][f"{family}{' + GPTQ' if gptq else ''}"] = _versus(k, u)
        k, u = best("group k-means", gptq, 6.9, 7.1), best("group uniform", gptq, 3.5, 3.6)
        if k and u:
            out["kmeans_vs_uniform_at_3_bits"][f"same 3-bit codes{' + GPTQ' if gptq else ''}"] = _versus(k, u)
    group = [v for key, v in out["kmeans_vs_uniform_at_3_bits"].items() if key.startswith("group k-means")]
    out["kmeans_groups_beat_uniform_at_3_bits"] = bool(group) and all(v["met"] for v in group)
    four = [r for r in ok if r["setting"].startswith("w4")]
    if four:
        top = min(four, key=lambda r: r["perplexity"])
        out["four_bits_within_5_percent"] = {"met": top["ratio_to_float"] <= 1.05, "setting": top["setting"],
                                             "bits": top["bits_per_weight"], "ratio_to_float": top["ratio_to_float"],
                                             "all": {r["setting"]: r["ratio_to_float"] for r in four}}
    return out


# ---------------------------------------------------------------------------------------------- tables, plot


def lm_table(lm: dict) -> str:
    lines = [f"Float test perplexity {lm['float_perplexity']:.3f} per character ({lm['predictions']} predictions, "
             f"{lm['test_windows']} windows of {lm['context']}); model {lm['training']['parameters']} parameters, "
             f"{lm['training']['steps']} Adam steps.", "",
             "| setting | GPTQ | perplexity | / float | bits/weight (file) | file bytes | weights quantized | "
             "layers | quantize s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in lm["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['setting']} | {'yes' if r['gptq'] else ''} | {r['status']}: {r['why'][:80]} |"
                         " | | | | | |")
            continue
        bits = f"{r['bits_per_weight']:.3f}" if "bits_per_weight" in r else r.get("file_error", "-")
        lines.append(f"| {r['setting']} | {'yes' if r['gptq'] else ''} | {r['perplexity']:.3f} | "
                     f"{r['perplexity'] / lm['float_perplexity']:.3f} | {bits} | {r.get('file_bytes', '-')} | "
                     f"{100 * r['weight_fraction']:.1f}% | {r.get('converted', 0)} | "
                     f"{r.get('seconds', 0):.1f} |")
    onnx = lm.get("onnx")
    if onnx:
        lines += ["", f"onnxruntime {onnx['onnxruntime']}, {onnx['threads']} thread(s), median of {onnx['rounds']} "
                  "rounds:", "",
                  "| model | 1 x 128 ms | / float | 16 x 128 ms | / float | argmax = torch | ONNX bytes |",
                  "|---|---|---|---|---|---|---|"]
        for name, m in onnx["models"].items():
            if "error" in m:
                lines.append(f"| {name} | error: {m['error'][:120]} | | | | | |")
                continue
            lines.append(f"| {name} | {1e3 * m['seconds_b1']:.2f} | {m.get('ratio_to_float_b1', 1):.2f} | "
                         f"{1e3 * m['seconds_b16']:.2f} | {m.get('ratio_to_float_b16', 1):.2f} | "
                         f"{100 * m['argmax_agreement_b16']:.1f}% | {m['onnx_bytes']} |")
    g = goals(lm)
    lines += ["", "Goal, k-means groups beat uniform groups at ~3 bits/weight (file bits, scales and codebooks "
              f"included): {'MET' if g['kmeans_groups_beat_uniform_at_3_bits'] else 'MISSED'}"]
    lines += [f"- {key}: {v['text']}" for key, v in g["kmeans_vs_uniform_at_3_bits"].items()]
    if "four_bits_within_5_percent" in g:
        f = g["four_bits_within_5_percent"]
        lines.append(f"\nGoal, 4 bits within 5% of float perplexity: {'MET' if f['met'] else 'MISSED'} — best "
                     f"{f['setting']} at {f['ratio_to_float']:.3f}x float ({f['bits']:.3f} b/w); "
                     + ", ".join(f"{k} {v:.3f}x" for k, v in f["all"].items()) + ".")
    return "\n".join(lines)


MARKERS = {"uniform w8a8": "D", "group uniform": "o", "group k-means": "s", "group log2": "^", "dynamic": "v",
           "k-means per tensor": "P"}
COLOURS = {"uniform w8a8": "tab:gray", "group uniform": "tab:blue", "group k-means": "tab:green",
           "group log2": "tab:red", "dynamic": "tab:purple", "k-means per tensor": "tab:olive"}


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lm = doc.get("lm")
    if not lm or "rows" not in lm:
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    ax.axhline(lm["float_perplexity"], color="black", linestyle="--", linewidth=0.8, label="float (32 b/w)")
    ax.axhline(1.05 * lm["float_perplexity"], color="black", linestyle=":", linewidth=0.7, label="float + 5%")
    seen = set()
    top = 1.6 * lm["float_perplexity"]  # rows above are drawn on the top edge with their value
    for r in lm["rows"]:
        if r["status"] != "ok" or r["family"] == "float" or "bits_per_weight" not in r:
            continue
        family = r["family"]
        label = f"{family}{' + GPTQ' if r['gptq'] else ''}"
        y = min(r["perplexity"], top)
        ax.scatter(r["bits_per_weight"], y, marker=MARKERS.get(family, "x"), s=46,
                   facecolors=COLOURS.get(family, "k") if r["gptq"] else "none", edgecolors=COLOURS.get(family, "k"),
                   label=None if label in seen else label, zorder=3, clip_on=False)
        seen.add(label)
        text = r["setting"] + (f" ({r['perplexity']:.1f})" if r["perplexity"] > top else "")
        if not r["gptq"] or r["perplexity"] > top:
            ax.annotate(text, (r["bits_per_weight"], y), fontsize=6.5, xytext=(4, -9 if r["gptq"] else 3),
                        textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0.97 * lm["float_perplexity"], top)
    ax.set_xlabel("bits per weight of the quantized layers, from the .lowbit file (scales, codebooks included)")
    ax.set_ylabel("test perplexity per character")
    ax.set_title(f"Character-level GPT ({lm['training']['parameters'] // 1000}k parameters) on the Python "
                 "language reference\nopen: round to nearest (labelled), filled: GPTQ", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7.5, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_tables(doc: dict) -> None:
    if "lm" in doc:
        print("## lm\n\n" + (lm_table(doc["lm"]) if "rows" in doc["lm"] else f"error: {doc['lm'].get('error')}"))
    if "kws" in doc:
        kws = doc["kws"]
        print("\n## kws\n\n" + str(kws.get("table") or kws.get("error") or json.dumps(kws, indent=1)[:3000]))


# ------------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--tasks", nargs="+", default=["lm", "kws"], choices=["lm", "kws"])
    parser.add_argument("--settings", nargs="+", choices=list(settings_table()), metavar="SETTING",
                        help=f"lm rows to (re)run, merged into --out (default: all: {' '.join(settings_table())})")
    parser.add_argument("--steps", type=int, default=600, help="Adam steps of the language model (default 600)")
    parser.add_argument("--d-model", type=int, default=128, help="model width (default 128)")
    parser.add_argument("--calib", type=int, default=64, help="calibration windows of 128 characters (default 64)")
    parser.add_argument("--onnx-settings", nargs="+", default=["w8a8", "w4g128"],
                        help="quantized models timed in onnxruntime beside float (default w8a8 w4g128)")
    parser.add_argument("--no-onnx", dest="onnx", action="store_false", help="skip the onnxruntime timing")
    parser.add_argument("--rounds", type=int, default=7, help="onnxruntime timing rounds (default 7)")
    parser.add_argument("--ort-threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--out", default=str(BENCH / "results" / "sequence.json"))
    parser.add_argument("--plot", default=str(BENCH.parent / "docs" / "sequence.png"), help="PNG; empty for none")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot and print the tables from --out")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failed rows")
    args = parser.parse_args()
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    if args.plot_only:
        if args.plot:
            plot(previous, Path(args.plot))
        print_tables(previous)
        return
    torch.set_num_threads(args.threads)
    started, load_start = time.perf_counter(), list(os.getloadavg())
    real_models = _bench_module("real_models")
    doc = {k: v for k, v in previous.items() if k in ("lm", "kws")}
    doc.update(command=" ".join(["bench/sequence.py", *sys.argv[1:]]),
               arguments={k: v for k, v in vars(args).items() if k not in ("plot_only", "verbose")}, seeds=SEEDS,
               machine={"cpu": real_models.cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                        "torch": torch.__version__, "lowbit": lowbit.__version__,
                        "lowbit_source": real_models.lowbit_source()})
    partial = Path(f"{out}.partial")
    partial.parent.mkdir(parents=True, exist_ok=True)

    def save(task_doc: dict, task: str = "lm") -> None:
        partial.write_text(json.dumps({**doc, task: task_doc}, indent=2) + "\n")

    for task in args.tasks:
        task_start = time.perf_counter()
        try:
            if task == "lm":
                doc["lm"] = task_lm(args, previous.get("lm"), save)
            else:
                kws = _bench_module("sequence_kws")
                if kws is None:
                    print("kws: bench/sequence_kws.py is missing in this checkout; task kws not run")
                    doc["kws"] = previous.get("kws") or {"status": "missing", "why": "bench/sequence_kws.py absent"}
                    continue
                # only the options that mean the same there: --settings / --calib / --rounds are this task's
                doc["kws"] = kws.run(argparse.Namespace(threads=args.threads, verbose=args.verbose))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            doc[task] = {**previous.get(task, {}), "error": f"{type(e).__name__}: {str(e).strip()[:400]}"}
        # a rerun of some lm rows keeps the full run's seconds
        rerun = task == "lm" and args.settings and "seconds" in previous.get("lm", {})
        if rerun:
            doc[task]["seconds"] = previous["lm"]["seconds"]
        doc[task]["rerun_seconds" if rerun else "seconds"] = time.perf_counter() - task_start
    if "rows" in doc.get("lm", {}):
        doc["lm"]["goals"] = goals(doc["lm"])
    doc.update(seconds=time.perf_counter() - started, load_average={"start": load_start, "end": list(os.getloadavg())})
    doc["runs"] = [*previous.get("runs", []), {k: doc[k] for k in ("command", "seconds", "load_average")}]
    out.write_text(json.dumps(doc, indent=2) + "\n")
    partial.unlink(missing_ok=True)
    if args.plot:
        plot(doc, Path(args.plot))
    print_tables(doc)
    print(f"\n{doc['seconds']:.0f} s; results in {out}")


if __name__ == "__main__":
    main()
