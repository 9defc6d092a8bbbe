"""The Deep Compression driver (Han, Mao, Dally, ICLR 2016): prune, retrain, share, fine-tune, code.

Stages, each followed by a test-set evaluation:

1. ``prune``: ``rounds`` rounds of magnitude pruning towards the per-layer sparsity targets
   (:func:`~lowbit.compress.prune.sparsity_schedule`) or the quality thresholds, each followed
   by ``retrain_epochs`` of retraining with the masks held (:class:`~lowbit.compress.prune.Pruner`);
2. ``share``: per-layer k-means on the survivors, ``bits`` per index, zeros on code 0;
3. ``finetune``: ``finetune_epochs`` training the centroids (summed gradients; indices fixed);
4. storage: relative-index entries (``index_bits`` per gap, by default per layer the width with the
   fewest coded bytes) with Huffman- and ANS-coded streams; :func:`save_compressed` writes the .lowbit
   file with the model's graph IR (captured on a zero batch shaped as the test inputs), so that
   ``lowbit.load(path)``, the Engine and ONNX export run it from the file alone.

``deep_compress(model, train_loader, test_loader, config)`` returns a :class:`CompressionResult`.
"""

from __future__ import annotations

import copy
import json
import math
import struct
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import serialize
from ..errors import ConfigError
from ..format.sparse import MAX_INDEX_BITS
from ..output import output_path
from ..quantizers.base import check_bits
from ..quantizers.kmeans import INITS, MAX_ITERS
from ..train import Trainer, checkpoint_file
from .prune import Pruner, check_number, layer_table, prunable_layers, sparsity_schedule
from .rule import rule_bits, rule_rounds, rule_sparsity
from .report import (
    FLOAT_BYTES,
    LayerStats,
    ans_available,
    best_index_bits,
    layer_stats,
    plot_tradeoff,
    plot_weight_distribution,
)
from .share import MAX_BITS as MAX_SHARE_BITS, fold_batch_norms, share_weights, shared_layers

#: the paper's kept fractions (Tables 1 and 2), by the layer names of lowbit's LeNets
PAPER_KEPT: dict[str, dict[str, float]] = {
    "lenet300": {"ip1": 0.08, "ip2": 0.09, "ip3": 0.26},
    "lenet5": {"conv1": 0.66, "conv2": 0.12, "ip1": 0.08, "ip2": 0.19},
}
#: the paper's relative-index widths: conv layers, fully connected layers
CONV_INDEX_BITS, FC_INDEX_BITS = 8, 5
#: retraining epochs per prune round and codebook fine-tuning epochs of the default recipe
DEFAULT_RETRAIN_EPOCHS, DEFAULT_FINETUNE_EPOCHS = 3, 1
#: prune rounds with ``quality`` thresholds when none are given
QUALITY_ROUNDS = 3
ENTROPY = ("huffman", "ans")


def paper_sparsity(model: nn.Module) -> dict[str, float]:
    """The paper's per-layer sparsity (1 - kept) for a model whose layers are named as lowbit's LeNets."""
    names = set(prunable_layers(model))
    for kept in PAPER_KEPT.values():
        if names == set(kept):
            return {name: 1 - fraction for name, fraction in kept.items()}
    raise ConfigError(
        f"no paper sparsity for layers {sorted(names)} (known: LeNet-300-100 {sorted(PAPER_KEPT['lenet300'])}, "
        f"LeNet-5 {sorted(PAPER_KEPT['lenet5'])}); give sparsity targets or a quality"
    )


def paper_index_bits(model: nn.Module) -> dict[str, int]:
    """Relative-index bits per layer as in the paper: 8 for Conv2d, 5 for Linear."""
    return {
        name: CONV_INDEX_BITS if isinstance(m, nn.Conv2d) else FC_INDEX_BITS
        for name, m in prunable_layers(model).items()
    }


@dataclass
class DeepCompressionConfig:
    """Options of :func:`deep_compress`; None picks the general rule of :mod:`lowbit.compress.rule`.

    ``sparsity``: final fraction of zeros, one number or per layer (None: :func:`~lowbit.compress.rule.rule_sparsity`,
    unless ``quality`` is given; the paper's LeNet choices: :func:`paper_sparsity`); ``quality``: prune at
    ``quality * std`` every round instead; ``rounds``: prune rounds (None: :func:`~lowbit.compress.rule.rule_rounds`,
    3 with ``quality``); ``bits``: k-means index bits, one or per layer (None: :func:`~lowbit.compress.rule.rule_bits`;
    the paper's: :func:`~lowbit.compress.share.paper_bits`); ``index_bits``: relative-index bits, one or per layer
    (None or ``"auto"``: per layer the width with the smallest Huffman-coded streams,
    :func:`~lowbit.compress.report.best_index_bits`; the paper's: :func:`paper_index_bits`).
    Training uses SGD with momentum 0.9, cosine schedule, ``lr`` and ``weight_decay`` for retraining and
    ``finetune_lr`` (Adam) for the centroids.
    """

    sparsity: float | dict[str, float] | None = None
    quality: float | dict[str, float] | None = None
    rounds: int | None = None
    retrain_epochs: int = DEFAULT_RETRAIN_EPOCHS
    bits: int | dict[str, int] | None = None
    init: str = "linear"
    kmeans_iters: int = 30
    finetune_epochs: int = DEFAULT_FINETUNE_EPOCHS
    index_bits: int | dict[str, int] | str | None = None
    lr: float = 0.05
    weight_decay: float = 5e-4
    finetune_lr: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        """Every option is checked here, so that a bad one fails before any pruning or training."""
        if self.sparsity is not None and self.quality is not None:
            raise ConfigError("give either sparsity targets or a quality, not both")
        if self.rounds is not None and (isinstance(self.rounds, bool) or not isinstance(self.rounds, int)
                                        or self.rounds < 1):
            raise ConfigError(f"rounds must be an integer >= 1, got {self.rounds!r}")
        if isinstance(self.index_bits, str) and self.index_bits != "auto":
            raise ConfigError("index_bits must be an int, a dict of layer -> int, 'auto' or None; "
                              f"got {self.index_bits!r}")
        for name in ("retrain_epochs", "finetune_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
        if self.init not in INITS:
            raise ConfigError(f"unknown k-means init {self.init!r}; valid: {', '.join(INITS)}")
        check_bits(self.kmeans_iters, 0, MAX_ITERS, "kmeans_iters")
        for name in ("lr", "finetune_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
        check_number(self.weight_decay, "weight_decay", 0)
        _each(self.sparsity, "sparsity", lambda value, what: check_number(value, what, 0, 1))
        _each(self.quality, "quality", lambda value, what: check_number(value, what, 0))
        _each(self.bits, "bits", lambda value, what: check_bits(value, 1, MAX_SHARE_BITS, what))
        if self.index_bits != "auto":
            _each(self.index_bits, "index_bits", lambda value, what: check_bits(value, 1, MAX_INDEX_BITS, what))


def _each(value: Any, what: str, check: Callable[[Any, str], Any]) -> None:
    """``check(number, label)`` on one number, or on each number of a per-layer dict (None: nothing to check)."""
    items = value.items() if isinstance(value, Mapping) else [] if value is None else [(None, value)]
    for name, number in items:
        check(number, what if name is None else f"{what} of layer {name!r}")


@dataclass
class CompressionResult:
    """What :func:`deep_compress` returns: the shared model, accuracies by stage, per-layer storage."""

    model: nn.Module
    accuracy: dict[str, float]
    layers: list[LayerStats]
    kept: dict[str, float]
    rounds: list[dict[str, float]]  # kept fraction per layer after each prune round
    before: dict[str, torch.Tensor] = field(repr=False)  # float weights before pruning (batch norms folded), by layer
    example_input: torch.Tensor = field(repr=False)  # zeros shaped as one test input, batch 1: the graph's example

    def float_bytes(self) -> int:
        return sum(s.float_bytes for s in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "kept": self.kept,
            "rounds": self.rounds,
            "layers": [s.to_dict() for s in self.layers],
            "float_bytes": self.float_bytes(),
            "bytes_huffman": sum(s.bytes_huffman for s in self.layers),
            "bytes_ans": None if not ans_available() else sum(s.bytes_ans for s in self.layers),
        }


@torch.no_grad()
def accuracy(model: nn.Module, loader: Iterable[Any]) -> float:
    """Top-1 accuracy of ``model`` in eval mode on ``(inputs, labels)`` batches."""
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    correct = count = 0
    for inputs, labels in loader:
        correct += int((model(inputs.to(device)).argmax(1) == labels.to(device)).sum())
        count += len(labels)
    model.train(was_training)
    if count == 0:
        raise ConfigError("the test loader yielded no batches")
    return correct / count


def _per_layer_int(value: int | Mapping[str, int] | None, default: dict[str, int], what: str) -> dict[str, int]:
    if value is None:
        return default
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(default))
        if unknown:
            raise ConfigError(f"{what} names unknown layer(s) {unknown}; layers: {', '.join(default)}")
        return {**default, **value}
    return {name: value for name in default}


def _train(model: nn.Module, train_loader, test_loader, epochs: int, progress: bool, seed: int, **options) -> None:
    Trainer(model, train_loader, test_loader, epochs=epochs, progress=progress, seed=seed, **options).fit()


def deep_compress(
    model: nn.Module,
    train_loader: Iterable[Any],
    test_loader: Iterable[Any],
    config: DeepCompressionConfig | None = None,
    progress: bool = False,
    log=None,
) -> CompressionResult:
    """Run the Deep Compression stages on a copy of the trained float ``model``.

    ``log(message)`` (optional) is called after each stage. The result's ``accuracy`` holds
    ``float``, ``prune<r>`` (right after round r's pruning), ``retrain<r>``, ``share`` and ``finetune``.
    """
    config = config or DeepCompressionConfig()
    log = log or (lambda message: None)
    model = copy.deepcopy(model)
    layers = prunable_layers(model)
    for what in ("sparsity", "quality", "bits", "index_bits"):  # unknown layer names fail before any work
        layer_table(getattr(config, what), list(layers), what)
    before = {name: layer.weight.detach().clone() for name, layer in prunable_layers(fold_batch_norms(model)).items()}
    acc = {"float": accuracy(model, test_loader)}
    log(f"float: test accuracy {acc['float']:.4f}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    example = torch.zeros_like(next(iter(test_loader))[0][:1], device=device)

    if config.quality is None:
        final = rule_sparsity(model) if config.sparsity is None else config.sparsity
        finals = final if isinstance(final, Mapping) else {name: final for name in layers}
        count = rule_rounds(finals) if config.rounds is None else config.rounds
        steps = {name: sparsity_schedule(s, count) for name, s in finals.items()}
        rounds = [{name: s[r] for name, s in steps.items()} for r in range(count)]
    else:
        rounds = [None] * (QUALITY_ROUNDS if config.rounds is None else config.rounds)
    pruner = Pruner(model, list(layers))
    history = []
    retrain = dict(optimizer="sgd", lr=config.lr, momentum=0.9, weight_decay=config.weight_decay, schedule="cosine")
    for r, targets in enumerate(rounds, start=1):
        kept = pruner.prune(sparsity=targets) if targets is not None else pruner.prune(quality=config.quality)
        history.append(kept)
        acc[f"prune{r}"] = accuracy(model, test_loader)
        if config.retrain_epochs:
            _train(model, train_loader, None, config.retrain_epochs, progress, config.seed + r,
                   callbacks=[pruner], **retrain)
            acc[f"retrain{r}"] = accuracy(model, test_loader)
        kept_text = ", ".join(f"{name} {100 * k:.1f}%" for name, k in kept.items())
        log(f"prune round {r}/{len(rounds)}: kept {kept_text}; test accuracy {acc[f'prune{r}']:.4f} "
            f"-> {acc.get(f'retrain{r}', acc[f'prune{r}']):.4f} after retraining")
    kept = pruner.kept()
    pruner.remove()

    bits = rule_bits(model) if config.bits is None else config.bits
    shared = share_weights(model, bits, config.init, config.kmeans_iters, config.seed)
    acc["share"] = accuracy(shared, test_loader)
    log(f"weight sharing: test accuracy {acc['share']:.4f}")
    if config.finetune_epochs:
        _train(shared, train_loader, None, config.finetune_epochs, progress, config.seed,
               optimizer="adam", lr=config.finetune_lr, schedule="cosine")
        acc["finetune"] = accuracy(shared, test_loader)
        log(f"codebook fine-tuning: test accuracy {acc['finetune']:.4f}")

    layers = shared_layers(shared)
    if config.index_bits in ("auto", None):
        index_bits = {name: best_index_bits(m.weight_quantizer.indices.cpu().numpy()) for name, m in layers.items()}
    else:
        index_bits = _per_layer_int(config.index_bits, paper_index_bits(model), "index_bits")
    stats = [layer_stats(name, layer, index_bits[name]) for name, layer in layers.items()]
    return CompressionResult(shared, acc, stats, kept, history, before, example)


def save_compressed(result: CompressionResult, path: str | Path, entropy: str = "huffman") -> Path:
    """Write the shared model as a .lowbit file with sparse relative-index storage and ``entropy`` coding,
    and its graph IR captured on ``result.example_input`` (the graph goes into the header only; a model
    whose graph cannot be captured raises UnsupportedLayerError), so that ``lowbit.load(path)`` rebuilds it."""
    if entropy not in ENTROPY:
        raise ConfigError(f"entropy must be one of {', '.join(ENTROPY)}, got {entropy!r}")
    sparse = {f"{s.name}.weight": s.index_bits for s in result.layers}
    serialize.save(result.model, path, result.example_input, entropy=entropy, sparse=sparse)
    return Path(path)


def tradeoff_points(result: CompressionResult) -> list[dict[str, Any]]:
    """(stage, compression ratio, test error) after each stage, for :func:`plot_tradeoff`.

    Pruned (after each round's retraining): float32 survivors with their relative indices, fillers
    not counted; shared: fixed-width codes (P+Q);
    then the Huffman- and ANS-coded streams (P+Q+H), all with the codebooks and biases.
    """
    floats, acc = result.float_bytes(), result.accuracy
    final = acc.get("finetune", acc["share"])
    points = [{"stage": "float", "ratio": 1.0, "error": 1 - acc["float"]}]
    for r, kept in enumerate(result.rounds, start=1):
        pruned = sum(kept[s.name] * s.weights * (8 * FLOAT_BYTES + s.index_bits) / 8 + FLOAT_BYTES * s.biases
                     for s in result.layers)
        points.append({"stage": f"pruned, round {r}", "ratio": floats / pruned,
                       "error": 1 - acc.get(f"retrain{r}", acc[f"prune{r}"])})
    points += [
        {"stage": "shared (P+Q)", "ratio": floats / sum(s.bytes_pq for s in result.layers), "error": 1 - final},
        {"stage": "+Huffman", "ratio": floats / sum(s.bytes_huffman for s in result.layers), "error": 1 - final},
    ]
    if ans_available():
        points.append({"stage": "+ANS", "ratio": floats / sum(s.bytes_ans for s in result.layers), "error": 1 - final})
    return points


def write_plots(result: CompressionResult, out_dir: str | Path, prefix: str = "") -> list[Path]:
    """The two PNGs: weight distribution of the largest layer (before/after pruning, centroids marked)
    and the compression-vs-accuracy trade-off."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = shared_layers(result.model)
    name = max(layers, key=lambda n: layers[n].weight.numel())
    layer = layers[name]
    centroids = layer.weight_quantizer.shared_values()[1:]
    return [
        plot_weight_distribution(result.before[name], layer.weight, centroids, name,
                                 out_dir / f"{prefix}weight_distribution.png"),
        plot_tradeoff(tradeoff_points(result), out_dir / f"{prefix}tradeoff.png"),
    ]


def file_layer_bytes(path: str | Path, layers: Iterable[str]) -> tuple[dict[str, int], int]:
    """Bytes of the arrays a .lowbit (safetensors) file holds for each layer (arrays named
    ``<layer>.<...>``), and the bytes of its header (length word plus JSON header and document)."""
    with open(path, "rb") as f:
        (header_length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_length))
    sizes = {name: 0 for name in layers}
    for array, info in header.items():
        if array == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        owner = next((name for name in sizes if array.startswith(name + ".")), None)
        if owner is not None:
            sizes[owner] += end - begin
    return sizes, 8 + header_length


def store_and_verify(
    result: CompressionResult, float_model: nn.Module, out_dir: str | Path, test_loader: Iterable[Any]
) -> dict[str, Any]:
    """Save ``result`` as ``model-huffman.lowbit`` and ``model-ans.lowbit`` in ``out_dir``, load each
    back into ``float_model`` with ``serialize.load_state_dict`` and evaluate it; write the plots.

    Returns per entropy coder: file bytes, header bytes, bytes of the compressed layers' arrays, the
    compression ratios (float32 bytes / layer array bytes, and / whole file) and the loaded accuracy.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [s.name for s in result.layers]
    floats = result.float_bytes()
    stored: dict[str, Any] = {"plots": [str(p) for p in write_plots(result, out_dir)]}
    for entropy in ENTROPY if ans_available() else ENTROPY[:1]:
        path = save_compressed(result, out_dir / f"model-{entropy}.lowbit", entropy)
        per_layer, header = file_layer_bytes(path, names)
        float_model.load_state_dict(serialize.load_state_dict(path))
        layer_bytes = sum(per_layer.values())
        stored[entropy] = {
            "file_bytes": path.stat().st_size,
            "header_bytes": header,
            "layer_bytes": layer_bytes,
            "ratio_layers": floats / layer_bytes,
            "ratio_file": floats / path.stat().st_size,
            "loaded_accuracy": accuracy(float_model, test_loader),
        }
        if entropy == "huffman":
            stored["file_layer_bytes"] = per_layer
    return stored


# ------------------------------------------------------------------------------------ command line

#: ``deep-compression``: per-layer settings from :mod:`lowbit.compress.rule`; ``deep-compression-paper``: the
#: paper's kept fractions (lowbit's LeNets only), 8-bit conv / 5-bit fc weights (6 bits for LeNet-300-100) and
#: 8 / 5 relative-index bits; both with the same retraining schedule
RECIPES = ("deep-compression", "deep-compression-paper")


def paper_settings(model: nn.Module) -> dict[str, Any]:
    """The ``deep-compression-paper`` recipe's per-layer options: :func:`paper_sparsity`, the paper's bits and
    relative-index widths."""
    from .share import paper_bits

    return {"sparsity": paper_sparsity(model), "bits": paper_bits(model), "index_bits": paper_index_bits(model)}


def _add_arguments(parser: Any) -> None:
    parser.add_argument("checkpoint", help="trained float model: a Trainer checkpoint (.safetensors) or a .lowbit file")
    parser.add_argument("--data", required=True,
                        help="dataset to retrain and evaluate on (mnist, fashion-mnist, digits)")
    parser.add_argument("--recipe", default="deep-compression", choices=RECIPES,
                        help="deep-compression (default): per-layer kept fraction and k-means bits from each layer's "
                             "share of the weights and its fan-in (big fc layers pruned hardest, with the fewest "
                             "bits), relative-index widths chosen per layer; deep-compression-paper: the paper's "
                             "kept fractions and bits (LeNet-300-100 and LeNet-5 only)")
    parser.add_argument("--model", default=None, help="architecture name (default: the one whose tensors match)")
    parser.add_argument("--out", required=True, help="the .lowbit file to write")
    parser.add_argument("--sparsity", default=None,
                        help="final fraction of zeros: one number or NAME=S,... (default: the recipe's per layer)")
    parser.add_argument("--quality", type=float, default=None, help="prune at quality * std instead of --sparsity")
    parser.add_argument("--bits", default=None, help="k-means index bits: one number or NAME=B,... "
                        "(default: the recipe's per layer)")
    parser.add_argument("--index-bits", default=None,
                        help="relative-index bits: one, NAME=B,... or auto (default: auto, the smallest coded size "
                             "per layer; the paper recipe: 8 conv, 5 fc)")
    parser.add_argument("--init", default="linear", choices=["linear", "density", "random"], help="k-means init")
    parser.add_argument("--rounds", type=int, default=None,
                        help="prune-retrain rounds (default: enough that no round removes more than half of a "
                             "layer's survivors, 5 for the LeNets; 3 with --quality)")
    parser.add_argument("--retrain-epochs", type=int, default=None,
                        help=f"epochs of retraining per round (default {DEFAULT_RETRAIN_EPOCHS})")
    parser.add_argument("--finetune-epochs", type=int, default=None,
                        help=f"epochs of codebook fine-tuning (default {DEFAULT_FINETUNE_EPOCHS})")
    parser.add_argument("--lr", type=float, default=None, help="SGD learning rate of the retraining (default 0.05)")
    parser.add_argument("--weight-decay", type=float, default=None,
                        help="weight decay of the retraining (default 5e-4)")
    parser.add_argument("--entropy", default="huffman", choices=list(ENTROPY), help="entropy coder of the file")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--limit", type=int, default=None, help="use the first N images of each split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plots", default=None, help="directory for the two PNG plots (default: beside --out)")
    parser.add_argument("--max-error-increase", type=float, default=None, metavar="POINTS",
                        help="search for the smallest file whose error on a validation slice of the training "
                             "images exceeds a reference run's (nothing pruned, retrained without the slice) by at "
                             "most POINTS: the default recipe's kept fractions scaled by one factor (0.5-3, bits "
                             "shifted by log2 of it), bisected from the default")
    parser.add_argument("--search-epochs", type=int, default=60,
                        help="training epochs the search may spend on its probes, the reference's included "
                             "(default 60)")
    parser.add_argument("--val-size", type=int, default=None,
                        help="training images held out for the search (default: those `lowbit train --val-size` "
                             "held out, else 10%%, at most 5000)")
    parser.add_argument("--settings", default=None,
                        help="a settings JSON written by a search (OUT.settings.json): use its per-layer choices")


def _int_values(text: str | None, what: str) -> int | dict[str, int] | None:
    from .prune import parse_layer_values

    if text is None:
        return None
    parsed = parse_layer_values(text, what)
    numbers = parsed.values() if isinstance(parsed, dict) else [parsed]
    if not all(float(n).is_integer() for n in numbers):
        raise ConfigError(f"{what} must be whole numbers, got {text!r}")
    return {k: int(v) for k, v in parsed.items()} if isinstance(parsed, dict) else int(parsed)


def _float_model(checkpoint: str, data: str, model_name: str | None) -> nn.Module:
    """The float architecture (named, or found by its tensor names and shapes) with the checkpoint's weights."""
    from ..data import dataset_info
    from ..models import get_model, model_names
    from ..train import checkpoint as ckpt

    checkpoint = str(checkpoint_file(checkpoint))
    if not Path(checkpoint).is_file():
        raise ConfigError(f"checkpoint {checkpoint!r} does not exist")
    if checkpoint.endswith(".lowbit"):
        state = serialize.load_state_dict(checkpoint)
    else:
        state = ckpt.with_prefix(ckpt.load_checkpoint(checkpoint)[0], "model")
    info = dataset_info(data)
    shape = dict(in_channels=info.in_channels, num_classes=info.num_classes, input_size=info.input_size)
    for name in [model_name] if model_name else model_names():
        try:
            model = get_model(name, **shape)
        except ConfigError:
            if model_name:
                raise
            continue
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if expected == {k: tuple(v.shape) for k, v in state.items()}:
            model.load_state_dict(state)
            return model
    raise ConfigError(f"no model {'named ' + model_name if model_name else 'of ' + ', '.join(model_names())} "
                      f"matches the tensors of {checkpoint!r}; pass --model")


def _run(args: Any) -> tuple[str, dict[str, Any]]:
    from ..data import loaders
    from ..workflow import EVAL_BATCH_SIZE, eval_set, outcomes
    from .prune import parse_layer_values
    from .report import format_table

    out = output_path(args.out, "--out")
    plots_dir = output_path(args.plots, "--plots", directory=True) if args.plots is not None else out.parent
    schedule = {name: getattr(args, name) for name in ("rounds", "retrain_epochs", "finetune_epochs", "lr",
                                                        "weight_decay") if getattr(args, name) is not None}
    config = DeepCompressionConfig(
        sparsity=parse_layer_values(args.sparsity, "--sparsity") if args.sparsity else None,
        quality=args.quality, bits=_int_values(args.bits, "--bits"), init=args.init,
        index_bits="auto" if args.index_bits == "auto" else _int_values(args.index_bits, "--index-bits"),
        seed=args.seed, **schedule,
    )
    chosen = [f"--{n.replace('_', '-')}" for n in ("sparsity", "quality", "bits", "index_bits")
               if getattr(args, n) is not None]
    searched = [o for o, v in (("--max-error-increase", args.max_error_increase), ("--settings", args.settings))
                if v is not None]
    if searched and (chosen or len(searched) > 1):
        raise ConfigError(f"{searched[0]} chooses the per-layer settings; it cannot be combined with "
                          f"{', '.join(chosen + searched[1:])}")
    model = _float_model(args.checkpoint, args.data, args.model)
    if args.recipe == "deep-compression-paper":
        if searched:
            raise ConfigError(f"--recipe deep-compression-paper fixes the per-layer settings; drop {searched[0]}")
        paper = {k: v for k, v in paper_settings(model).items() if getattr(config, k) is None}
        config = replace(config, **{k: v for k, v in paper.items() if k != "sparsity" or config.quality is None})
    if args.settings is not None:
        config = replace(config, **_read_settings(args.settings, model).config())
    log: list[str] = []

    def say(message: str) -> None:
        log.append(message)
        print(message, file=sys.stderr)

    search_data: dict[str, Any] = {}
    if args.max_error_increase is not None:
        result, search_data = _search(args, model, config, say, out)
    else:  # the search reads its own split of the training images, and never the test images
        train_loader, test_loader = loaders(args.data, args.batch_size, seed=args.seed, limit=args.limit,
                                            test_batch_size=EVAL_BATCH_SIZE)
        result = deep_compress(model, train_loader, test_loader, config, progress=True, log=say)
    out = save_compressed(result, out, args.entropy)
    correct, _ = outcomes(serialize.load(out), *eval_set(args.data, args.limit))  # as `lowbit eval` computes it
    result.accuracy["loaded"] = float(correct.double().mean())
    per_layer, header = file_layer_bytes(out, [s.name for s in result.layers])
    plots = write_plots(result, plots_dir, prefix=out.stem + "-")
    floats, layer_bytes, file_bytes = result.float_bytes(), sum(per_layer.values()), out.stat().st_size
    stages = ", ".join(f"{stage} {100 * (1 - a):.2f}%" for stage, a in result.accuracy.items())
    text = "\n".join([
        *log, "", format_table(result.layers, per_layer), "",
        f"{'validation' if search_data else 'test'} error by stage (loaded: the file on the test images): {stages}",
        f"{out}: {file_bytes} bytes ({header} header, {layer_bytes} in the compressed layers); float32 {floats} bytes",
        f"compression: {floats / layer_bytes:.1f}x (layer arrays), {floats / file_bytes:.1f}x (whole file)",
        f"plots: {', '.join(map(str, plots))}",
    ])
    data = {**result.to_dict(), "out": str(out), "entropy": args.entropy, "file_bytes": file_bytes,
            "header_bytes": header, "file_layer_bytes": per_layer, "ratio_layers": floats / layer_bytes,
            "ratio_file": floats / file_bytes, "plots": [str(p) for p in plots], **search_data}
    return text, data


def _read_settings(path: str, model: nn.Module):
    from .search import Settings

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--settings {path!r} is not a readable JSON file: {exc}") from None
    return Settings.from_dict(data, prunable_layers(model))


def _search(args: Any, model: nn.Module, config: DeepCompressionConfig, say, out: Path):
    """Run the settings search on the training images minus a validation slice; write OUT.settings.json."""
    from ..data import load_dataset
    from ..data.loaders import make_loader
    from ..format.atomic import write_atomic
    from .search import search, split_validation

    images, labels = load_dataset(args.data, "train")
    images, labels = images[:args.limit], labels[:args.limit]
    size = _validation_size(args, len(images), say)
    (train_x, train_y), (val_x, val_y) = split_validation(images, labels, size)
    options = {k: getattr(config, k) for k in ("rounds", "retrain_epochs", "finetune_epochs", "init", "lr",
                                               "weight_decay", "finetune_lr", "seed")}
    found = search(model, make_loader(train_x, train_y, args.batch_size, shuffle=True, seed=args.seed),
                   make_loader(val_x, val_y, 1000), args.max_error_increase, options, args.search_epochs, say)
    if found.best is None:
        raise ConfigError(f"no candidate kept the validation error within +{args.max_error_increase:g} points in "
                          f"{found.epochs} epochs; raise --search-epochs or --max-error-increase")
    settings_path = out.with_name(out.stem + ".settings.json")
    write_atomic(settings_path, (json.dumps(found.best.settings.to_dict(), indent=2) + "\n").encode())
    per_layer = ", ".join(f"{n} {100 * (1 - s):.1f}% kept {found.best.settings.bits[n]}-bit"
                          for n, s in found.best.settings.sparsity.items())
    say(f"settings ({settings_path}, reusable with --settings): {per_layer}; search cost {found.epochs} epochs")
    return found.best.result, {"search": {**found.to_dict(), "settings_file": str(settings_path)}}


def _validation_size(args: Any, count: int, say) -> int:
    """``--val-size``, else the slice the float training held out (its run.json's ``val_size``, same data and
    ``--limit``), else 10% of the training images (at most 5000), which the float model has seen (said)."""
    from ..workflow import read_run

    if args.val_size is not None:
        return args.val_size
    run = read_run(checkpoint_file(args.checkpoint).parent) or {}
    held = run.get("val_size") if run.get("data") == args.data and run.get("limit") == args.limit else None
    if held is not None:
        say(f"validation slice: the last {held} training images, held out of the float model's training")
        return held
    size = max(1, min(5000, count // 10))
    say(f"validation slice: the last {size} training images, which the float model trained on; the budget is "
        "measured from a reference run retrained without them (train with --val-size to hold them out)")
    return size


@dataclass(frozen=True)
class CliCommand:
    """A ``lowbit`` subcommand: ``add_arguments(parser)``, ``run(args) -> (text, json_dict)``."""

    help: str
    add_arguments: Any
    run: Any


#: ``lowbit compress CHECKPOINT --data mnist --recipe deep-compression --out model.lowbit``
cli_command = CliCommand("prune, share and entropy-code a trained float model (Deep Compression)", _add_arguments, _run)
