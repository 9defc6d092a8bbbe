"""Deep Compression on MNIST LeNets against the paper (Han, Mao, Dally, ICLR 2016, Tables 1-3).

Trains the float LeNet-300-100 and LeNet-5 briefly, then runs lowbit.compress (prune in rounds with
retraining, k-means weight sharing, codebook fine-tuning) twice per net: with the paper's kept
fractions and bit widths ("paper") and with a tighter setting ("goal", aiming at >= 50x). Each
compressed model is written as a .lowbit file (Huffman and ANS streams), loaded back into the float
model with lowbit.load_state_dict and evaluated again. Results go to OUT/results.json and the
tables to stdout; plots to OUT/*.png.

    python bench/deep_compression.py --out bench-out/deep-compression [--quick]

``--quick`` uses 2000 training and 1000 test images and one epoch per stage (a smoke run).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lowbit.compress.pipeline import DeepCompressionConfig, deep_compress, paper_settings, store_and_verify
from lowbit.compress.report import best_index_bits, format_table, layer_stats
from lowbit.compress.share import shared_layers
from lowbit.data import loaders
from lowbit.models import LeNet5, LeNet300
from lowbit.train import Trainer, load_weights, seed_everything

#: per net: float training, then the runs (name -> DeepCompressionConfig options)
SETUPS = {
    "lenet300": {
        "model": LeNet300,
        "float": {"epochs": 20, "lr": 0.05},
        "runs": {
            "paper": {"rounds": 4, "retrain_epochs": 3, "finetune_epochs": 1, "lr": 0.05, "weight_decay": 5e-4},
            "goal": {"sparsity": {"ip1": 0.945, "ip2": 0.88, "ip3": 0.6}, "bits": {"ip1": 4, "ip2": 5, "ip3": 6},
                     "index_bits": "auto", "rounds": 5, "retrain_epochs": 4, "finetune_epochs": 2, "lr": 0.05,
                     "weight_decay": 5e-4},
        },
    },
    "lenet5": {
        "model": LeNet5,
        "float": {"epochs": 8, "lr": 0.05},
        "runs": {
            "paper": {"rounds": 3, "retrain_epochs": 2, "finetune_epochs": 1, "lr": 0.05, "weight_decay": 1e-4},
            "goal": {"sparsity": {"conv1": 0.4, "conv2": 0.92, "ip1": 0.96, "ip2": 0.85},
                     "bits": {"conv1": 6, "conv2": 5, "ip1": 4, "ip2": 5}, "index_bits": "auto",
                     "rounds": 3, "retrain_epochs": 2, "finetune_epochs": 1, "lr": 0.05, "weight_decay": 1e-4},
        },
    },
}


class EpochLog:
    """Prints each float training epoch (the Trainer's progress bars are off)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def on_epoch_end(self, trainer: Trainer) -> None:
        m = trainer.metrics
        print(f"  [{self.name}/float] epoch {m['epoch']}: loss {m['train_loss']:.4f} ({m['epoch_time']:.0f} s)", flush=True)


def run_net(name: str, setup: dict, out: Path, seed: int, quick: bool, reuse: bool, runs: list[str] | None) -> dict:
    limit = 2000 if quick else None
    train_loader, test_loader = loaders("mnist", 128, seed=seed, limit=limit, test_batch_size=1000)
    seed_everything(seed)
    model = setup["model"]()
    float_opts = dict(setup["float"], epochs=1) if quick else setup["float"]
    float_path = out / f"{name}-float.safetensors"
    start = time.perf_counter()
    if reuse and float_path.is_file():
        load_weights(model, float_path)
    else:
        trainer = Trainer(model, train_loader, None, optimizer="sgd", momentum=0.9, weight_decay=5e-4,
                          schedule="cosine", seed=seed, progress=False, callbacks=[EpochLog(name)], **float_opts)
        trainer.fit()
        trainer.save_checkpoint(float_path)
    results = {"float_train_s": time.perf_counter() - start, "float_options": float_opts, "runs": {}}
    for run, options in setup["runs"].items():
        if runs and run not in runs:
            continue
        if run == "paper":  # the paper's kept fractions, bits and relative-index widths
            options = {**paper_settings(model), **options}
        if quick:
            options = {**options, "rounds": 1, "retrain_epochs": 1, "finetune_epochs": 1}
        print(f"  [{name}/{run}] options {options}", flush=True)
        start = time.perf_counter()
        config = DeepCompressionConfig(seed=seed, **options)
        # fresh loaders: each run sees the same data order whatever ran before it
        train_loader, test_loader = loaders("mnist", 128, seed=seed, limit=limit, test_batch_size=1000)
        result = deep_compress(model, train_loader, test_loader, config, log=lambda m: print(f"  [{name}/{run}] {m}", flush=True))
        run_dir = out / f"{name}-{run}"
        stored = store_and_verify(result, type(model)(), run_dir, test_loader)
        results["runs"][run] = {
            "options": options,
            "seconds": time.perf_counter() - start,
            **result.to_dict(),
            **stored,
        }
        if run == "paper":  # the same model with the widths chosen per layer
            auto = [layer_stats(n, m, best_index_bits(m.weight_quantizer.indices.numpy()))
                    for n, m in shared_layers(result.model).items()]
            results["runs"][run]["auto_index"] = {
                "index_bits": {s.name: s.index_bits for s in auto},
                "bytes_huffman": sum(s.bytes_huffman for s in auto),
                "ratio_huffman": result.float_bytes() / sum(s.bytes_huffman for s in auto),
            }
        print(f"\n{name} / {run}\n{format_table(result.layers, stored.get('file_layer_bytes'))}")
        print(json.dumps({k: v for k, v in results["runs"][run].items() if k not in ("layers", "file_layer_bytes")}))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-out/deep-compression"))
    parser.add_argument("--nets", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reuse-float", action="store_true", help="load OUT/<net>-float.safetensors if present")
    parser.add_argument("--runs", nargs="+", default=None, help="only these runs (paper, goal)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = {name: run_net(name, SETUPS[name], args.out, args.seed, args.quick, args.reuse_float, args.runs) for name in args.nets}
    results["total_s"] = time.perf_counter() - start
    results["seed"], results["threads"] = args.seed, args.threads
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"total {results['total_s']:.0f} s")


if __name__ == "__main__":
    main()
