"""The training loop: ``Trainer(model, train_loader, test_loader, ...).fit()``.

One training step on a batch ``(x, y)``::

    loss = loss_fn(model(x), y) + sum(callback.extra_loss(model))   # TrainingError if not finite
    (with a teacher, distill.loss(model(x), x, y, loss_fn) replaces loss_fn(model(x), y))
    loss.backward(); clip_grad_norm_ (optional); optimizer.step()
    callback.on_step_end(trainer); scheduler.step()

After each epoch: evaluation on the test loader (mean loss, top-1 accuracy),
``on_epoch_end``, the metric logs ``metrics.jsonl`` / ``metrics.csv`` and the
checkpoints ``last.safetensors`` (every epoch) and ``best.safetensors`` (when
the test accuracy improves) in ``out_dir`` (see :mod:`lowbit.train.checkpoint`).

Reproducibility: a fresh ``fit`` seeds Python, NumPy and torch with ``seed``;
a checkpoint stores the RNG states (and the state of the train loader's own
``generator``, if it has one), so a resumed run draws the same shuffles and
dropout masks as an uninterrupted one and ends with the same weights bit for bit.

Under DistributedDataParallel (:mod:`lowbit.train.ddp`) the train loss and
accuracy are summed over the ranks, and only rank 0 shows progress and writes
logs and checkpoints.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError, TrainingError
from ..format.atomic import write_atomic
from . import checkpoint as ckpt
from .ddp import all_reduce_sums, is_main, unwrap
from .distill import Distillation

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "none")
HOOKS = ("on_fit_start", "on_epoch_start", "on_step_end", "on_epoch_end", "on_fit_end")
LAST, BEST = "last.safetensors", "best.safetensors"
JSONL_LOG, CSV_LOG = "metrics.jsonl", "metrics.csv"


def checkpoint_file(path: str | Path) -> Path:
    """``path`` itself, or for a run directory its last checkpoint (``last.safetensors``)."""
    path = Path(path)
    return path / LAST if path.is_dir() else path


class Callback:
    """The hooks the loop calls; override the ones you need (all default to doing nothing).

    Any object with some of these methods works as a callback; the loop looks
    each hook up by name. Hooks receive the :class:`Trainer`, whose useful
    attributes are ``model``, ``optimizer``, ``scheduler``, ``epoch`` (epochs
    completed), ``step`` (optimizer steps done), ``lr``, ``metrics`` (the
    current epoch's metrics, in ``on_epoch_end``), ``history`` and
    ``should_stop``.

    - ``on_fit_start(trainer)``: once per :meth:`Trainer.fit`, after a resume.
    - ``on_epoch_start(trainer)``: before the first batch of each epoch.
    - ``extra_loss(model) -> Tensor | None``: a scalar added to the training
      loss at every step, e.g. PACT's ``lambda * sum(alpha ** 2)``; None adds nothing.
    - ``on_step_end(trainer)``: right after each ``optimizer.step()``, before the
      learning-rate schedule steps: re-apply pruning masks, clip BNN latent
      weights to [-1, 1].
    - ``on_epoch_end(trainer)``: after evaluation, before the logs and the
      checkpoints are written; keys added to ``trainer.metrics`` are logged,
      changes to the model are saved, ``trainer.should_stop = True`` ends fit
      after this epoch.
    - ``on_fit_end(trainer)``: once, after the last epoch.
    """

    def on_fit_start(self, trainer: Trainer) -> None:
        pass

    def on_epoch_start(self, trainer: Trainer) -> None:
        pass

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def on_step_end(self, trainer: Trainer) -> None:
        pass

    def on_epoch_end(self, trainer: Trainer) -> None:
        pass

    def on_fit_end(self, trainer: Trainer) -> None:
        pass


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns; accuracies are fractions in [0, 1], None without a test loader."""

    final_acc: float | None
    best_acc: float | None
    best_epoch: int | None
    history: list[dict[str, Any]]
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    wall_time: float


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (CPU and CUDA) and ask cuDNN for deterministic kernels.

    Call it before building the model so that the initial weights are covered too.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def lr_factor(
    step: int,
    *,
    schedule: str,
    total_steps: int,
    warmup_steps: int = 0,
    steps_per_epoch: int = 1,
    step_size: int = 30,
    gamma: float = 0.1,
) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based).

    Warm-up: ``(step + 1) / warmup_steps`` for ``step < warmup_steps`` (Goyal et
    al. 2017, linear warm-up). After it:

    - ``cosine``: ``(1 + cos(pi * t)) / 2`` with ``t = (step - warmup_steps) /
      (total_steps - warmup_steps)`` (Loshchilov & Hutter 2017, SGDR without restarts);
    - ``step``: ``gamma ** (epoch // step_size)``, ``epoch = step // steps_per_epoch``;
    - ``none``: 1.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    if schedule == "step":
        return gamma ** ((step // steps_per_epoch) // step_size)
    return 1.0


def _model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def check_lr(lr: float) -> float:
    """``lr`` if it is a finite learning rate > 0, else ConfigError."""
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
        raise ConfigError(f"lr must be > 0 and finite, got {lr!r}")
    return lr


class Trainer:
    """Train ``model`` on ``train_loader`` (any iterable of ``(inputs, labels)`` batches).

    Arguments (keyword-only after the loaders):

    - ``epochs``: epochs in total (a resumed run continues up to it).
    - ``loss_fn``: ``loss_fn(outputs, labels) -> scalar``, mean over the batch;
      default ``nn.CrossEntropyLoss()``. Accuracy is top-1: ``outputs.argmax(1) == labels``.
    - ``distill``: a :class:`~lowbit.train.distill.Distillation` (teacher, temperature, weight): the
      training loss becomes ``(1 - w) loss_fn + w T^2 KL(teacher || student)`` on each batch, the
      teacher moved to the model's device and never updated; evaluation keeps ``loss_fn``.
    - ``optimizer``: ``"sgd"`` (``momentum``, ``nesterov``, ``weight_decay``),
      ``"adam"`` (L2 ``weight_decay``), ``"adamw"`` (decoupled ``weight_decay``)
      with ``betas``, or an Optimizer over the model's parameters. ``lr``
      defaults to 0.1 for SGD and 1e-3 for Adam/AdamW.
    - ``schedule``: ``"cosine"``, ``"step"`` (``step_size`` epochs, ``gamma``)
      or ``"none"``, stepped per optimizer step after ``warmup_epochs`` of
      linear warm-up (see :func:`lr_factor`); needs ``len(train_loader)`` unless
      ``"none"`` without warm-up.
    - ``clip_grad_norm``: clip the global gradient L2 norm to this value.
    - ``seed``: seeds every RNG at the start of a fresh fit.
    - ``callbacks``: see :class:`Callback`.
    - ``out_dir``: where logs and checkpoints go; None writes nothing.
    - ``resume``: True resumes from ``out_dir/last.safetensors`` when it exists
      (a fresh run otherwise), a path resumes from that checkpoint.
    - ``progress``: tqdm progress bars; None shows them when stderr is a terminal.
    - ``device``: moves the model there; None keeps the model's device.

    Each epoch's metrics (``trainer.metrics``, appended to ``history`` and the
    logs): ``epoch`` (1-based), ``step``, ``lr`` (for the next step),
    ``train_loss`` (data loss, distillation included, without extra_loss terms), ``train_acc``,
    ``test_loss``, ``test_acc`` (with a test loader), ``epoch_time`` (seconds).
    """

    def __init__(
        self,
        model: nn.Module,
        train_loader: Iterable[Any],
        test_loader: Iterable[Any] | None = None,
        *,
        epochs: int = 10,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        distill: Distillation | None = None,
        optimizer: str | torch.optim.Optimizer = "sgd",
        lr: float | None = None,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        schedule: str = "cosine",
        warmup_epochs: float = 0.0,
        step_size: int = 30,
        gamma: float = 0.1,
        clip_grad_norm: float | None = None,
        seed: int = 0,
        callbacks: Sequence[object] = (),
        out_dir: str | Path | None = None,
        resume: bool | str | Path = False,
        progress: bool | None = None,
        device: str | torch.device | None = None,
    ):
        if not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"epochs must be an integer >= 1, got {epochs!r}")
        if clip_grad_norm is not None and not clip_grad_norm > 0:
            raise ConfigError(f"clip_grad_norm must be > 0 or None, got {clip_grad_norm!r}")
        if schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {schedule!r}; valid schedules: {', '.join(SCHEDULES)}")
        if not warmup_epochs >= 0:
            raise ConfigError(f"warmup_epochs must be >= 0, got {warmup_epochs!r}")
        if schedule == "step" and (not isinstance(step_size, int) or step_size < 1):
            raise ConfigError(f"step_size must be an integer >= 1 (epochs), got {step_size!r}")
        if distill is not None and not isinstance(distill, Distillation):
            raise ConfigError(f"distill must be a lowbit.train.Distillation or None, got {type(distill).__name__}")
        if distill is not None and distill.teacher is unwrap(model):
            raise ConfigError("the teacher is the model being trained; pass a separate (float) network")

        self.model = model.to(device) if device is not None else model
        self.device = _model_device(self.model)
        self.train_loader = train_loader
        self.test_loader = test_loader
        self.epochs = epochs
        self.loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
        self.distill = distill.to(self.device) if distill is not None else None
        self.optimizer = self._build_optimizer(optimizer, lr, momentum, nesterov, weight_decay, betas)
        self.scheduler = self._build_scheduler(schedule, warmup_epochs, step_size, gamma)
        self.clip_grad_norm = clip_grad_norm
        self.seed = seed
        self.callbacks = list(callbacks)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.resume = resume
        self.progress = (sys.stderr.isatty() if progress is None else progress) and is_main()

        self.epoch = 0
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.metrics: dict[str, Any] = {}
        self.best_acc: float | None = None
        self.best_epoch: int | None = None
        self.should_stop = False

    # ----------------------------------------------------------------- setup

    def _build_optimizer(
        self,
        optimizer: str | torch.optim.Optimizer,
        lr: float | None,
        momentum: float,
        nesterov: bool,
        weight_decay: float,
        betas: tuple[float, float],
    ) -> torch.optim.Optimizer:
        if isinstance(optimizer, torch.optim.Optimizer):
            return optimizer
        if optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"unknown optimizer {optimizer!r}; valid names: {', '.join(OPTIMIZERS)} (or a torch.optim.Optimizer)"
            )
        lr = (0.1 if optimizer == "sgd" else 1e-3) if lr is None else lr
        check_lr(lr)
        if not weight_decay >= 0:
            raise ConfigError(f"weight_decay must be >= 0, got {weight_decay!r}")
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("the model has no trainable parameters (requires_grad=True)")
        if optimizer == "sgd":
            if nesterov and not momentum > 0:
                raise ConfigError(f"nesterov=True needs momentum > 0, got momentum={momentum!r}")
            return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
        adam = torch.optim.Adam if optimizer == "adam" else torch.optim.AdamW
        return adam(params, lr=lr, betas=betas, weight_decay=weight_decay)

    def _build_scheduler(
        self, schedule: str, warmup_epochs: float, step_size: int, gamma: float
    ) -> torch.optim.lr_scheduler.LambdaLR:
        if schedule == "none" and warmup_epochs == 0:
            return torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0)
        if not hasattr(self.train_loader, "__len__"):
            raise ConfigError(
                f"schedule {schedule!r} with warmup_epochs={warmup_epochs} needs len(train_loader); "
                "pass a DataLoader or a list of batches, or use schedule='none' without warm-up"
            )
        steps_per_epoch = len(self.train_loader)  # type: ignore[arg-type]
        total_steps = self.epochs * steps_per_epoch
        warmup_steps = round(warmup_epochs * steps_per_epoch)

        def factor(step: int) -> float:
            return lr_factor(
                step,
                schedule=schedule,
                total_steps=total_steps,
                warmup_steps=warmup_steps,
                steps_per_epoch=steps_per_epoch,
                step_size=step_size,
                gamma=gamma,
            )

        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

    # --------------------------------------------------------------- helpers

    @property
    def lr(self) -> float:
        """The learning rate of the optimizer's first parameter group."""
        return float(self.optimizer.param_groups[0]["lr"])

    def _call(self, hook: str) -> None:
        for callback in self.callbacks:
            method = getattr(callback, hook, None)
            if method is not None:
                method(self)

    def _batch(self, batch: Any) -> tuple[Any, torch.Tensor]:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ConfigError(f"each batch must be an (inputs, labels) pair, got {type(batch).__name__}")
        inputs, labels = batch
        return inputs.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def _generators(self) -> list[torch.Generator]:
        """RNGs that live outside the global ones: the train loader's own generator."""
        generator = getattr(self.train_loader, "generator", None)
        return [generator] if isinstance(generator, torch.Generator) else []

    # ------------------------------------------------------------- the loop

    def train_epoch(self) -> dict[str, float]:
        """One pass over the train loader; returns mean ``train_loss`` and ``train_acc``."""
        model, module = self.model, unwrap(self.model)
        model.train()
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # DistributedSampler shuffles by seed + epoch
            sampler.set_epoch(self.epoch)
        loss_sum, correct, count = 0.0, 0, 0
        bar = tqdm(self.train_loader, desc=f"epoch {self.epoch + 1}/{self.epochs}", disable=not self.progress, leave=False)
        for batch_index, batch in enumerate(bar, start=1):
            inputs, labels = self._batch(batch)
            outputs = model(inputs)
            if self.distill is None:
                data_loss = self.loss_fn(outputs, labels)
            else:
                data_loss = self.distill.loss(outputs, inputs, labels, self.loss_fn)
            loss = data_loss
            for callback in self.callbacks:
                extra = getattr(callback, "extra_loss", None)
                term = extra(module) if extra is not None else None
                if term is not None:
                    loss = loss + term
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise TrainingError(
                    f"loss is {loss_value} at epoch {self.epoch + 1}, step {batch_index} "
                    f"(global step {self.step + 1}); lower the learning rate, set clip_grad_norm "
                    "or check the data for NaN/Inf"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.clip_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), self.clip_grad_norm)
            self.optimizer.step()
            self.step += 1
            self._call("on_step_end")
            self.scheduler.step()

            size = len(labels)
            loss_sum += float(data_loss.detach()) * size
            correct += int((outputs.detach().argmax(1) == labels).sum())
            count += size
            bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
        loss_sum, correct, count = all_reduce_sums((loss_sum, correct, count))  # over DDP ranks
        if count == 0:
            raise ConfigError("train_loader yielded no batches")
        return {"train_loss": loss_sum / count, "train_acc": correct / count}

    @torch.no_grad()
    def evaluate(self, loader: Iterable[Any] | None = None) -> dict[str, float]:
        """Mean ``loss`` and top-1 ``acc`` of the model (in eval mode) on ``loader`` (default: the test loader)."""
        loader = self.test_loader if loader is None else loader
        if loader is None:
            raise ConfigError("evaluate() needs a loader: pass one or give the Trainer a test_loader")
        was_training = self.model.training
        self.model.eval()
        loss_sum, correct, count = 0.0, 0, 0
        for batch in tqdm(loader, desc="eval", disable=not self.progress, leave=False):
            inputs, labels = self._batch(batch)
            outputs = self.model(inputs)
            loss_sum += float(self.loss_fn(outputs, labels)) * len(labels)
            correct += int((outputs.argmax(1) == labels).sum())
            count += len(labels)
        self.model.train(was_training)
        if count == 0:
            raise ConfigError("the evaluation loader yielded no batches")
        return {"loss": loss_sum / count, "acc": correct / count}

    def fit(self, resume: bool | str | Path | None = None) -> FitResult:
        """Train up to ``epochs``; ``resume`` overrides the constructor's ``resume``."""
        start = time.perf_counter()
        path = self._resume_path(self.resume if resume is None else resume)
        if path is not None:
            self.load_checkpoint(path)
        elif self.step == 0:
            seed_everything(self.seed)
        self.should_stop = False
        self._call("on_fit_start")
        while self.epoch < self.epochs and not self.should_stop:
            epoch_start = time.perf_counter()
            self._call("on_epoch_start")
            train = self.train_epoch()
            self.epoch += 1
            self.metrics = {"epoch": self.epoch, "step": self.step, "lr": self.lr, **train}
            if self.test_loader is not None:
                test = self.evaluate()
                self.metrics.update(test_loss=test["loss"], test_acc=test["acc"])
            self.metrics["epoch_time"] = time.perf_counter() - epoch_start
            self._call("on_epoch_end")
            self.history.append(self.metrics)
            improved = "test_acc" in self.metrics and (self.best_acc is None or self.metrics["test_acc"] > self.best_acc)
            if improved:
                self.best_acc, self.best_epoch = self.metrics["test_acc"], self.epoch
            self._write_epoch(improved)
            if self.progress:
                line = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.metrics.items())
                tqdm.write(line, file=sys.stderr)  # stdout is kept for results (--json)
        self._call("on_fit_end")
        return FitResult(
            final_acc=self.history[-1].get("test_acc") if self.history else None,
            best_acc=self.best_acc,
            best_epoch=self.best_epoch,
            history=list(self.history),
            last_checkpoint=self._existing(LAST),
            best_checkpoint=self._existing(BEST),
            wall_time=time.perf_counter() - start,
        )

    # ------------------------------------------------- logs and checkpoints

    def _existing(self, name: str) -> Path | None:
        path = self.out_dir / name if self.out_dir is not None else None
        return path if path is not None and path.exists() else None

    def _resume_path(self, resume: bool | str | Path) -> Path | None:
        if resume is False:
            return None
        if resume is True:
            if self.out_dir is None:
                raise ConfigError("resume=True needs out_dir (the checkpoint is out_dir/last.safetensors)")
            return self._existing(LAST)
        path = Path(resume)
        if not path.is_file():
            raise ConfigError(f"resume checkpoint {str(path)!r} does not exist")
        return path

    def _write_epoch(self, improved: bool) -> None:
        """Rewrite the metric logs from ``history`` and save the checkpoints.

        Rewriting (atomically) rather than appending keeps the logs equal to the
        history after a resume, with no duplicated epochs.
        """
        if self.out_dir is None or not is_main():  # under DDP rank 0 writes
            return
        jsonl = "".join(json.dumps(row) + "\n" for row in self.history)
        write_atomic(self.out_dir / JSONL_LOG, jsonl.encode())
        columns = list(dict.fromkeys(key for row in self.history for key in row))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.history)
        write_atomic(self.out_dir / CSV_LOG, text.getvalue().encode())
        self.save_checkpoint(self.out_dir / LAST)
        if improved:
            self.save_checkpoint(self.out_dir / BEST)

    def save_checkpoint(self, path: str | Path) -> Path:
        """Write the full training state (weights, optimizer, schedule, counters, RNGs) to ``path``."""
        optimizer_meta, optimizer_tensors = ckpt.split_tensors(self.optimizer.state_dict(), "optimizer")
        scheduler_meta, scheduler_tensors = ckpt.split_tensors(self.scheduler.state_dict(), "scheduler")
        rng_tensors, rng_meta = ckpt.rng_state(self._generators())
        model = {f"model.{key}": value for key, value in ckpt.model_tensors(unwrap(self.model)).items()}
        meta = {
            "epoch": self.epoch,
            "step": self.step,
            "best_acc": self.best_acc,
            "best_epoch": self.best_epoch,
            "history": self.history,
            "optimizer": optimizer_meta,
            "scheduler": scheduler_meta,
            "rng": rng_meta,
        }
        return ckpt.save_checkpoint(path, {**model, **optimizer_tensors, **scheduler_tensors, **rng_tensors}, meta)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore the full training state saved by :meth:`save_checkpoint`.

        Raises ShapeMismatchError naming each tensor that does not fit the model.
        """
        tensors, meta = ckpt.load_checkpoint(path)
        ckpt.load_model_tensors(unwrap(self.model), ckpt.with_prefix(tensors, "model"), path)
        ckpt.load_optimizer_state(self.optimizer, meta["optimizer"], tensors)
        self.scheduler.load_state_dict(ckpt.join_tensors(meta["scheduler"], tensors))
        ckpt.set_rng_state(tensors, meta["rng"], self._generators())
        self.epoch, self.step = meta["epoch"], meta["step"]
        self.best_acc, self.best_epoch = meta["best_acc"], meta["best_epoch"]
        self.history = meta["history"]
