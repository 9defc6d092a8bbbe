"""End-to-end workflows: train a reference model, quantize it post-training, save, reload, evaluate.

The ``lowbit`` command (:mod:`lowbit.cli`) and ``bench/`` call these functions;
they hold the logic so the command stays thin.

- :func:`train` trains a reference model (float, or quantization-aware after
  ``lowbit.quantize(model, preset)``) with :class:`~lowbit.train.Trainer` and
  writes ``run.json`` beside the checkpoints so that later steps know the
  architecture, the dataset and the training preset. ``teacher=`` distils a
  teacher checkpoint into it (:func:`load_distillation`).
- :func:`cached_train` does the same in the lowbit cache directory, keyed by
  model, dataset, epochs, seed (and limit / model arguments), and resumes or
  reuses what is there.
- :func:`post_training_quantize` converts a trained float model with a config
  and calibrates its static quantizers on real training images
  (:func:`calibration_batches`: a seeded, hence deterministic, sample).
- :func:`ptq_sweep` quantizes one model with several configs; each result is
  saved with ``lowbit.save``, loaded back with ``lowbit.load`` and the reloaded
  model is evaluated, so every accuracy is that of the file.
- :func:`demo` is ``lowbit demo``: MNIST (or scikit-learn digits when MNIST
  cannot be had), LeNet-5 briefly trained, min/max 8-bit, linear and log k-bit.

Sizes: ``file_bytes`` is the size of the ``.lowbit`` file on disk,
``float_bytes`` is 4 bytes per parameter of the float model (float32
weights, biases and norm parameters; buffers such as running statistics are
not counted). ``ratio = file_bytes / float_bytes``, ``compression = 1 / ratio``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import api
from .config import QuantConfig, as_config
from .analysis.plots import plot_accuracy_vs_bits
from .data import dataset_info, load_dataset, make_loader, split_validation
from .data.datasets import Data
from .data.loaders import _check_positive as check_positive
from .data.sources import cache_dir
from .errors import CalibrationError, ConfigError, DataError, TrainingError
from .format.atomic import write_atomic
from .format.container import ENTROPY_CODERS
from .models import get_model, training_defaults
from .quantizers import Quantizer
from .serialize import INPUT_SHAPE_ATTR
from .train import Distillation, Trainer, checkpoint_file, load_checkpoint, load_weights, seed_everything
from .train.checkpoint import with_prefix
from .train.distill import DEFAULT_TEMPERATURE, DEFAULT_WEIGHT, check_distill_options
from .train.trainer import JSONL_LOG, LAST

RUN_FILE = "run.json"
DEFAULT_BATCH_SIZE = 64
EVAL_BATCH_SIZE = 1000
CALIB_BATCH_SIZE = 64
DEMO_BITS = (8, 6, 4, 3, 2)
#: the model and default epochs of ``lowbit demo`` per dataset (digits are 8x8: LeNet-5 needs >= 16x16)
DEMO_SETUPS = {"mnist": ("lenet5", 1), "digits": ("vgg-small", 15)}

Config = str | dict[str, Any] | QuantConfig


# ------------------------------------------------------------------ models


def build_model(model: str, data: Data, model_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The float reference model ``model`` shaped for dataset ``data`` (channels, input size, classes)."""
    info = dataset_info(data)
    if info.input_width not in (None, info.input_size):
        raise ConfigError(f"lowbit's reference models take square images; {info.name} gives "
                          f"{info.input_size}x{info.input_width}")
    shape = {"in_channels": info.in_channels, "input_size": info.input_size, "num_classes": info.num_classes}
    return get_model(model, **shape, **(model_kwargs or {}))


def example_input(data: Data | None, input_shape: Sequence[int] | None = None) -> torch.Tensor:
    """A zero batch of one image of dataset ``data``, ``(1, C, H, W)`` (for graph capture); ``input_shape``
    ``(C, H, W)``, when given, instead of the dataset's."""
    if input_shape is not None:
        return torch.zeros(1, *input_shape)
    if data is None:
        raise ConfigError("the example input needs a dataset or an input shape (C, H, W)")
    return torch.zeros(1, *dataset_info(data).input_shape)


def float_bytes(model: nn.Module) -> int:
    """float32 bytes of the model's parameters, quantizer state excluded (see the module docstring)."""
    return api.summary(model).float_bytes


# -------------------------------------------------------------------- data


def eval_set(
    data: Data, limit: int | None = None, data_dir: str | os.PathLike | None = None, progress: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The test split of ``data`` (its first ``limit`` examples when given; only those are decoded)."""
    check_positive(limit, "limit", allow_none=True)
    return load_dataset(data, "test", data_dir, select=lambda n: slice(None, limit), progress=progress)


def calibration_batches(
    data: Data,
    count: int,
    batch_size: int = CALIB_BATCH_SIZE,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> list[torch.Tensor]:
    """``count`` batches of ``batch_size`` training images drawn without replacement by a generator
    seeded with ``seed`` (the same seed gives the same images; only those are decoded)."""
    check_positive(count, "calibration batches")
    check_positive(batch_size, "calibration batch size")
    images, _ = load_dataset(data, "train", data_dir, select=lambda n: random_sample(n, count * batch_size, seed),
                             progress=progress)
    return [images[i : i + batch_size] for i in range(0, len(images), batch_size)]


def holdout_set(data: Data, count: int, calibration_batches: int, batch_size: int = CALIB_BATCH_SIZE,
                seed: int = 0, data_dir: str | os.PathLike | None = None,
                progress: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` training images and labels apart from the :func:`calibration_batches` sample of the same seed
    (the next ones of the same permutation), never the test split: where an accuracy budget is measured."""
    check_positive(count, "held-out images")
    skip = calibration_batches * batch_size
    return load_dataset(data, "train", data_dir, select=lambda n: random_sample(n, skip + count, seed)[skip:],
                        progress=progress)


def random_sample(size: int, count: int, seed: int) -> torch.Tensor:
    """``count`` (at most ``size``) indices of ``range(size)`` drawn without replacement, seeded by ``seed``."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:count]


@torch.no_grad()
def outcomes(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = EVAL_BATCH_SIZE,
    progress: bool | None = None,
    desc: str = "eval",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example, whether ``model`` (in eval mode) gets it right (bool) and its cross-entropy (float64);
    the mode is restored. A model that records its input shape (``lowbit_input_shape``: set by calibration
    and by loading a file) refuses images of another shape with a ConfigError."""
    if len(labels) == 0:
        raise ConfigError("evaluation needs at least one labelled example")
    expected = getattr(model, INPUT_SHAPE_ATTR, None)
    if expected is not None and tuple(images.shape[1:]) != tuple(expected[1:]):
        raise ConfigError(f"the model takes examples of shape {list(expected[1:])}, these images are "
                          f"{list(images.shape[1:])}: evaluate it on the dataset it was trained on (--data)")
    was_training = model.training
    model.eval()
    correct, losses = [], []
    show = _show_progress(progress)
    with torch.no_grad():
        for inputs, targets in tqdm(make_loader(images, labels, batch_size), desc=desc, disable=not show,
                                    leave=False):
            logits = model(inputs)
            check_logits(logits, targets)
            correct.append(logits.argmax(1) == targets)
            losses.append(F.cross_entropy(logits.double(), targets, reduction="none"))
    model.train(was_training)
    return torch.cat(correct), torch.cat(losses)


def check_logits(logits: Any, labels: torch.Tensor) -> None:
    """ConfigError unless ``logits`` is a ``[batch, classes]`` tensor with a class for every label."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        got = f"a tensor of shape {list(logits.shape)}" if isinstance(logits, torch.Tensor) else \
            f"a {type(logits).__name__}"
        raise ConfigError(f"the model returns {got}; evaluation needs [batch, classes] logits")
    if len(labels) and int(labels.max()) >= logits.shape[1]:
        raise ConfigError(f"the model has {logits.shape[1]} outputs but the labels reach {int(labels.max())}: "
                          "use the dataset (and class folders) it was trained for")


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, **options: Any) -> float:
    """Top-1 accuracy (a fraction) of ``model`` in eval mode on ``images`` (``options``: the batch size,
    progress and description of :func:`outcomes`); the mode is restored."""
    correct, _ = outcomes(model, images, labels, **options)
    return float(correct.double().mean())


def _show_progress(progress: bool | None) -> bool:
    """Progress bars: as asked, or (None) when stderr is a terminal, like the Trainer."""
    return sys.stderr.isatty() if progress is None else progress


# ---------------------------------------------------------------- training


@dataclass
class TrainResult:
    """A trained model, its last checkpoint, the final test accuracy (fraction) and the run settings."""

    model: nn.Module
    checkpoint: Path
    final_acc: float | None
    history: list[dict[str, Any]]
    run: dict[str, Any]
    wall_time: float


def read_run(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The settings :func:`train` recorded in ``directory/run.json``, or None when there is none."""
    path = Path(directory) / RUN_FILE
    if not path.is_file():
        return None
    try:
        run = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}; delete it or name --model and --data") from None
    if not isinstance(run, dict):
        raise ConfigError(f"{path} does not hold a JSON object; delete it or name --model and --data")
    return run


def train(
    model: str,
    data: str,
    *,
    epochs: int | None = None,
    out_dir: str | os.PathLike,
    quant: Config | None = None,
    seed: int = 0,
    lr: float | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    limit: int | None = None,
    resume: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    data_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
    teacher: str | os.PathLike | None = None,
    distill_temperature: float | None = None,
    distill_weight: float | None = None,
    val_size: int | None = None,
) -> TrainResult:
    """Train reference model ``model`` on dataset ``data`` with SGD (momentum 0.9, cosine schedule).

    ``epochs`` and ``lr`` default to the model's :func:`~lowbit.models.training_defaults` (a model without
    default epochs needs them).

    ``quant`` (a preset name or config) makes it quantization-aware:
    ``lowbit.quantize(model, quant)`` before training. ``teacher`` (a checkpoint, see
    :func:`load_distillation`) trains it on the distillation loss with ``distill_temperature`` and
    ``distill_weight`` (:mod:`lowbit.train.distill`); run.json records them. ``limit`` keeps the
    first ``limit`` images of each split; ``val_size`` holds the last ``val_size`` of those training images
    out (the slice ``lowbit compress --max-error-increase`` then measures on). Checkpoints and logs go to
    ``out_dir`` (see :class:`~lowbit.train.Trainer`) with ``run.json``. An
    ``out_dir`` that already holds ``last.safetensors`` needs ``resume=True``
    (training then continues up to ``epochs``). The test accuracy is measured
    with batches of :data:`EVAL_BATCH_SIZE`.
    """
    epochs, lr = training_defaults(model, epochs, lr)
    check_positive(epochs, "epochs")
    check_positive(batch_size, "batch_size")
    check_positive(limit, "limit", allow_none=True)
    check_positive(val_size, "val_size", allow_none=True)
    out = Path(out_dir)
    last = out / LAST
    if last.exists() and not resume:
        raise ConfigError(f"{out} already holds {LAST}; pass resume (--resume) to continue it, or another out dir")
    quant_name = _config_label(quant)
    distill, teacher_run = load_distillation(teacher, distill_temperature, distill_weight)  # before the seed
    run = {"model": model, "data": data, "quant": quant_name, "seed": seed, "epochs": epochs, "lr": lr,
           "batch_size": batch_size, "limit": limit, "model_kwargs": model_kwargs or {}, "teacher": teacher_run}
    if val_size is not None:
        run["val_size"] = val_size
    seed_everything(seed)
    net = build_model(model, data, model_kwargs)
    if quant is not None:
        net = api.quantize(net, quant)
    train_x, train_y = load_dataset(data, "train", data_dir)
    test_x, test_y = eval_set(data, limit, data_dir)
    if distill is not None:
        distill.check(train_x[:2], dataset_info(data).num_classes)
    train_x, train_y = train_x[:limit], train_y[:limit]
    if val_size is not None:  # the slice `lowbit compress --max-error-increase` measures on
        (train_x, train_y), _ = split_validation(train_x, train_y, val_size)
    train_loader = make_loader(train_x, train_y, batch_size, shuffle=True, seed=seed)
    test_loader = make_loader(test_x, test_y, EVAL_BATCH_SIZE)
    if resume and last.exists():
        size_quantizer_state(net, last)
    trainer = Trainer(net, train_loader, test_loader, epochs=epochs, optimizer="sgd", lr=lr, momentum=0.9,
                      distill=distill, seed=seed, out_dir=out, resume=resume,
                      progress=progress)  # checks its options first
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / RUN_FILE, (json.dumps(run, indent=2) + "\n").encode())
    try:
        fit = trainer.fit()
    except CalibrationError as exc:  # a quantizer met NaN/Inf: the quantization-aware run diverged
        steps = len(train_loader)
        raise TrainingError(
            f"training diverged at epoch {trainer.epoch + 1}, step {trainer.step - trainer.epoch * steps + 1} "
            f"(global step {trainer.step + 1}): {exc}; lower the learning rate"
        ) from None
    if fit.last_checkpoint is None:
        raise ConfigError(f"training wrote no checkpoint to {out}")
    return TrainResult(net, fit.last_checkpoint, fit.final_acc, fit.history, run, fit.wall_time)


def load_distillation(
    teacher: str | os.PathLike | None, temperature: float | None = None, weight: float | None = None
) -> tuple[Distillation | None, dict[str, Any] | None]:
    """The :class:`~lowbit.train.Distillation` of a teacher checkpoint and its run.json record (``path``,
    ``sha256`` of the file, ``temperature``, ``weight``); (None, None) without a teacher.

    ``teacher``: a training checkpoint with its run.json (a ``.safetensors`` file or its run directory,
    :func:`load_trained`) or a ``.lowbit`` file (:func:`load_quantized`). ``temperature`` and ``weight``
    default to :mod:`lowbit.train.distill`'s and are refused without a teacher. Loading a teacher
    builds a network, which draws from the RNGs: call this before seeding the student's initialisation.
    """
    if teacher is None:
        if temperature is not None or weight is not None:
            raise ConfigError("the distillation temperature and weight go with a teacher (--teacher CKPT)")
        return None, None
    temperature = DEFAULT_TEMPERATURE if temperature is None else temperature
    weight = DEFAULT_WEIGHT if weight is None else weight
    check_distill_options(temperature, weight)
    path = checkpoint_file(teacher)
    if not path.is_file():
        raise ConfigError(f"teacher checkpoint {str(path)!r} does not exist")
    if path.suffix == ".lowbit":
        network = load_quantized(path)
    else:
        if read_run(path.parent) is None:
            raise ConfigError(f"teacher checkpoint {str(path)!r} has no {RUN_FILE} beside it to say its model; pass "
                              "a run directory of `lowbit train` (or its .safetensors file) or a .lowbit file")
        network, _ = load_trained(path)
    record = {"path": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
              "temperature": temperature, "weight": weight}
    return Distillation(network, temperature, weight), record


def _config_label(config: Config | None) -> str | dict[str, Any] | None:
    """A JSON-able record of a training config: the preset name, or the config dict."""
    if config is None or isinstance(config, str):
        if isinstance(config, str):
            as_config(config)  # unknown presets fail before any data is read
        return config
    return as_config(config).to_dict()


def cache_key(model: str, data: str, epochs: int, seed: int, limit: int | None = None,
              model_kwargs: dict[str, Any] | None = None) -> str:
    """The cache directory name of a training run: ``<model>-<data>-e<epochs>-s<seed>[-n<limit>][-<hash>]``."""
    key = f"{model}-{data}-e{epochs}-s{seed}"
    if limit is not None:
        key += f"-n{limit}"
    if model_kwargs:
        key += "-" + hashlib.sha256(json.dumps(model_kwargs, sort_keys=True).encode()).hexdigest()[:10]
    return key


def cached_train(
    model: str,
    data: str,
    *,
    epochs: int,
    seed: int = 0,
    limit: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    cache: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> tuple[TrainResult, bool]:
    """:func:`train` (float, default lr and batch size) in ``<cache>/runs/<cache_key>``; returns
    (result, reused). ``cache`` defaults to the lowbit cache directory (``LOWBIT_CACHE``,
    ``~/.cache/lowbit``). A finished run is loaded, an interrupted one resumed."""
    directory = Path(cache if cache is not None else cache_dir()) / "runs"
    directory /= cache_key(model, data, epochs, seed, limit, model_kwargs)
    reused = (directory / LAST).exists() and _finished(directory, epochs)
    result = train(model, data, epochs=epochs, out_dir=directory, seed=seed, limit=limit, resume=True,
                   model_kwargs=model_kwargs, data_dir=data_dir, progress=progress)
    return result, reused


def _finished(directory: Path, epochs: int) -> bool:
    """True when the metric log of ``directory`` holds ``epochs`` epochs (training is complete)."""
    log = directory / JSONL_LOG
    if not log.is_file():
        return False
    return sum(1 for line in log.read_text().splitlines() if line.strip()) >= epochs


def size_quantizer_state(model: nn.Module, checkpoint: str | os.PathLike) -> None:
    """Give every quantizer of ``model`` the state of ``checkpoint`` (tensor shapes included).

    Some quantizer buffers take their shape from the data (observed ranges are
    empty until the first batch, LSQ steps and k-means indices follow the
    first tensor), so a freshly quantized model differs in shape from a
    trained one; the checkpoint's exact shape check then compares like with
    like. Quantizer state that does not load is left to that check, which
    names the tensors.
    """
    tensors, _ = load_checkpoint(checkpoint)
    for name, module in model.named_modules():
        state = with_prefix(tensors, f"model.{name}")
        if isinstance(module, Quantizer) and state:
            try:
                module.load_state_dict(state, strict=False)
            except RuntimeError:  # reported by load_weights with the tensor names
                pass


def load_trained(
    checkpoint: str | os.PathLike, model: str | None = None, data: Data | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a training checkpoint (a file, or a run directory: its last checkpoint), with its run
    settings (``model``, ``data``, ``quant``, ...).

    ``model`` / ``data`` default to those recorded in ``run.json`` beside the
    checkpoint. A checkpoint trained with a preset is rebuilt with it. A
    checkpoint of another architecture raises ShapeMismatchError naming the
    tensors that do not fit.
    """
    path = checkpoint_file(checkpoint)
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".lowbit":
        raise ConfigError(f"{str(path)!r} is a .lowbit file (a quantized model), not a training checkpoint; pass "
                          "the checkpoint it came from (a .safetensors file or its run directory)")
    run = dict(read_run(path.parent) or {})
    if model is not None and model != run.get("model"):
        run = {"data": run.get("data")}  # the other recorded settings describe another model
    run["model"] = model or run.get("model")
    run["data"] = data or run.get("data")
    missing = [name for name in ("model", "data") if not run.get(name)]
    if missing:
        raise ConfigError(f"{path.parent / RUN_FILE} does not say, so name the {' and the '.join(missing)} "
                          f"(--{' and --'.join(missing)}) the checkpoint was trained with")
    net = build_model(run["model"], run["data"], run.get("model_kwargs"))
    if run.get("quant") is not None:
        net = api.quantize(net, run["quant"])
        size_quantizer_state(net, path)
    load_weights(net, path)
    return net.eval(), run


# -------------------------------------------------------------- quantizing


def post_training_quantize(model: nn.Module, config: Config, batches: Iterable[torch.Tensor] | None) -> nn.Module:
    """A quantized copy of ``model`` (``lowbit.quantize``), calibrated on ``batches`` (None: not calibrated,
    which a config with static quantizers that have observed nothing refuses with a CalibrationError)."""
    return post_training_report(model, config, batches).model


def post_training_report(model: nn.Module, config: Config, batches: Iterable[torch.Tensor] | None,
                         example: torch.Tensor | None = None, observer: str | None = None,
                         progress: bool = False) -> api.QuantReport:
    """:func:`post_training_quantize` with its :class:`~lowbit.QuantReport` (MAC fraction measured on
    ``example`` when given); ``observer`` replaces the static ranges' observer; the config's post-training
    methods run (``progress`` shows them)."""
    report = api.quantize_report(model, config, example_input=example)
    quantized = report.model
    if batches is not None:
        api.calibrate(quantized, batches, observer, progress=progress)
    else:
        unobserved = [q.label or q.where() for q in quantized.modules()
                      if isinstance(q, Quantizer) and not getattr(q, "observed", True)]
        if unobserved:
            name = f"preset {config!r}" if isinstance(config, str) else "this config"
            raise CalibrationError(f"{name} quantizes {', '.join(unobserved)} with static ranges, which need "
                                   "calibration batches: --calib-batches must be >= 1")
    quantized.eval()
    return report


def save_quantized(model: nn.Module, path: str | os.PathLike, data: Data | None, entropy: str | None = None,
                   input_shape: Sequence[int] | None = None) -> Path:
    """``lowbit.save(model, path)`` with an example input of ``data`` (or of ``input_shape``, (C, H, W)) so
    the graph is captured; ``entropy`` ("huffman" or "ans") entropy-codes the weight codes (lossless)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    api.save(model, path, example_input=example_input(data, input_shape), entropy=entropy)
    return path


def load_quantized(path: str | os.PathLike) -> nn.Module:
    """``lowbit.load(path)``: the model stored in a ``.lowbit`` file, in eval mode."""
    return api.load(path).eval()


@dataclass
class Method:
    """One quantization of a sweep: a ``method`` label (``minmax``, ``linear``, ``log``), its ``bits``
    (the bits per weight code; a log code adds a sign bit) and the config (None: the float model)."""

    method: str
    bits: int
    config: Config | None


@dataclass
class SweepRow:
    """One line of a sweep table (accuracy a fraction, sizes in bytes; see the module docstring)."""

    method: str
    bits: int
    accuracy: float
    file_bytes: int
    float_bytes: int
    ratio: float
    compression: float
    path: str


def demo_methods(bits: Sequence[int] = DEMO_BITS) -> list[Method]:
    """float, min/max 8-bit (preset ``w8a8``), then ``linear{b}`` and ``log{b}`` for each b in ``bits``."""
    methods = [Method("float", 32, None), Method("minmax", 8, "w8a8")]
    for family in ("linear", "log"):
        methods += [Method(family, b, f"{family}{b}") for b in bits]
    return methods


def ptq_sweep(
    model: nn.Module,
    data: str,
    methods: Sequence[Method],
    batches: Sequence[torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    out_dir: str | os.PathLike,
    entropy: str | None = None,
    progress: bool | None = None,
) -> list[SweepRow]:
    """For each method: quantize ``model`` and calibrate it on ``batches``, ``lowbit.save`` it to
    ``out_dir/<method><bits>.lowbit`` (``entropy`` as in :func:`save_quantized`), ``lowbit.load`` it
    back and evaluate the reloaded model on ``test``."""
    reference = float_bytes(model)
    rows = []
    for method in tqdm(methods, desc="quantize", disable=not _show_progress(progress), leave=False):
        quantized = model if method.config is None else post_training_quantize(model, method.config, batches)
        path = save_quantized(quantized, Path(out_dir) / f"{method.method}{method.bits}.lowbit", data, entropy)
        reloaded = load_quantized(path)
        acc = accuracy(reloaded, *test, progress=progress, desc=f"eval {method.method}{method.bits}")
        size = path.stat().st_size
        rows.append(SweepRow(method.method, method.bits, acc, size, reference, size / reference,
                             reference / size, str(path)))
    return rows


def format_table(rows: Sequence[SweepRow]) -> str:
    """The sweep as an aligned text table: method, bits, accuracy (%), file size, % of float, compression."""
    header = ("method", "bits", "accuracy", "file size", "of float", "compression")
    lines = [
        (r.method, str(r.bits), f"{100 * r.accuracy:.2f}%", f"{r.file_bytes / 1024:,.1f} KiB",
         f"{100 * r.ratio:.1f}%", f"{r.compression:.2f}x")
        for r in rows
    ]
    widths = [max(len(line[i]) for line in (header, *lines)) for i in range(len(header))]

    def fmt(line: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))

    return "\n".join([fmt(header), "-" * len(fmt(header)), *map(fmt, lines)])


# -------------------------------------------------------------------- demo


@dataclass
class DemoResult:
    """What :func:`demo` did: the table rows, the files it wrote and the notes it printed."""

    data: str
    model: str
    epochs: int
    entropy: str | None
    rows: list[SweepRow]
    table_path: Path
    plot_path: Path
    notes: list[str] = field(default_factory=list)
    train_acc: float | None = None
    reused_checkpoint: bool = False
    checkpoint: Path | None = None
    wall_time: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "data": self.data,
            "model": self.model,
            "epochs": self.epochs,
            "entropy": self.entropy,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "reused_checkpoint": self.reused_checkpoint,
            "sizes": "file_bytes: the .lowbit file; float_bytes: 4 bytes per float32 parameter",
            "rows": [asdict(r) for r in self.rows],
            "table": str(self.table_path),
            "plot": str(self.plot_path),
            "notes": self.notes,
            "wall_time": self.wall_time,
        }


def demo_data(data: str | None, data_dir: str | os.PathLike | None = None) -> tuple[str, list[str]]:
    """The dataset of the demo: ``data`` when named, else MNIST when it loads, else digits (with a note why)."""
    if data is not None:
        if data not in DEMO_SETUPS:
            raise ConfigError(f"lowbit demo runs on {' or '.join(DEMO_SETUPS)}, not {data!r}")
        return data, []
    try:
        load_dataset("mnist", "test", data_dir)
    except DataError as exc:
        return "digits", [f"MNIST is not available, so the demo uses scikit-learn's 8x8 digits: {exc}"]
    return "mnist", []


def demo(
    out_dir: str | os.PathLike = "lowbit-demo",
    *,
    data: str | None = None,
    epochs: int | None = None,
    bits: Sequence[int] = DEMO_BITS,
    seed: int = 0,
    limit: int | None = None,
    calib_batches: int = 8,
    entropy: str | None = None,
    cache: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> DemoResult:
    """Train (or reuse from the cache) the demo model, quantize it post-training with every
    :func:`demo_methods` entry, save / reload / evaluate each file, and write ``table.json`` and
    ``accuracy_vs_bits.png`` into ``out_dir``. ``entropy`` entropy-codes the files. ``limit`` keeps
    the first images of each split (quick runs); ``log`` receives progress notes."""
    start = time.perf_counter()
    if entropy not in (None, *ENTROPY_CODERS):
        raise ConfigError(f"entropy must be None or one of {', '.join(ENTROPY_CODERS)}, got {entropy!r}")
    methods = demo_methods(bits)
    for method in methods:  # every option fails before training
        if method.config is not None:
            as_config(method.config)
    check_positive(calib_batches, "calibration batches")
    check_positive(limit, "limit", allow_none=True)
    say = log or (lambda message: None)
    data, notes = demo_data(data, data_dir)
    for note in notes:
        say(note)
    model_name, default_epochs = DEMO_SETUPS[data]
    epochs = default_epochs if epochs is None else epochs
    say(f"training {model_name} on {data} for {epochs} epoch(s) (or reusing the cached checkpoint)")
    trained, reused = cached_train(model_name, data, epochs=epochs, seed=seed, limit=limit, cache=cache,
                                   data_dir=data_dir, progress=progress)
    if reused:
        say(f"reused {trained.checkpoint}")
    batches = calibration_batches(data, calib_batches, seed=seed, data_dir=data_dir)
    test = eval_set(data, limit, data_dir)
    out = Path(out_dir)
    rows = ptq_sweep(trained.model, data, methods, batches, test, out / "files", entropy, progress)
    table_path = out / "table.json"
    result = DemoResult(data, model_name, epochs, entropy, rows, table_path, out / "accuracy_vs_bits.png", notes,
                        trained.final_acc, reused, trained.checkpoint)
    title = f"{model_name} on {data} ({len(test[1]):,} test images): post-training quantization"
    plot_rows = [asdict(r) for r in rows if r.method in ("linear", "log", "minmax")]
    baseline = next((r.accuracy for r in rows if r.method == "float"), None)
    plot_accuracy_vs_bits({title: plot_rows}, result.plot_path, baselines={title: baseline})
    result.wall_time = time.perf_counter() - start
    write_atomic(table_path, (json.dumps(result.to_dict(), indent=2) + "\n").encode())
    return result
