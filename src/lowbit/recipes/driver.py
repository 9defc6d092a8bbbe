"""The one driver that trains any :class:`~lowbit.recipes.table.Recipe`.

For each stage of the recipe: quantize a copy of the float network with the stage's config
(``lowbit.quantize``), apply the recipe's tricks, train it with :class:`~lowbit.train.Trainer`,
and carry the trained weights into the float network for the next stage. The tricks:

- latent weights of sign-quantized layers re-drawn from U(-c, c) (``latent_init``) and clipped
  to [-c, c] after every step (``latent_clip``, :class:`ClipLatentWeights`);
- BNN's per-layer learning rate ``lr / H``, H = sqrt(1.5 / (fan_in + fan_out)) (``glorot_lr``;
  Lasagne's fans: a convolution's include the kernel size);
- BNN's exponential decay: ``lr * gamma^epoch`` with ``gamma = (final_lr / lr)^(1 / epochs)``;
- BNN's square hinge loss mean(max(0, 1 - t y)^2), t = +1 for the label and -1 elsewhere;
- PACT's L2 penalty (lambda / 2) alpha^2 on every clipping level (:class:`AlphaDecay`);
- batch-norm running statistics re-estimated after every epoch, before the test accuracy is
  taken (``bn_refresh``, :class:`RefreshBatchNorm`).

``teacher=`` (a float checkpoint) trains every quantized stage (a float stage trains on its own)
on the distillation loss ``(1 - w) loss + w T^2 KL(teacher || student)`` instead of the recipe's
loss alone (:mod:`lowbit.train.distill`).

Weight decay applies to the weights of Linear/Conv2d layers only (not to biases, batch norm or
quantizer parameters). Under DDP (``ddp=N`` or torchrun) each process trains on its share of
every global batch; see :mod:`lowbit.train.ddp`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .. import api
from ..data import dataset_info, load_dataset, make_loader
from ..data.loaders import _check_positive as check_positive
from ..errors import ConfigError
from ..format.atomic import write_atomic
from ..models import binary_nets  # noqa: F401  (registers small-cnn)
from ..nn import QuantConv1d, QuantConv2d, QuantLinear
from ..quantizers.pact import PACTQuantizer
from ..train import Distillation, Trainer, ddp, seed_everything
from ..train.trainer import check_lr
from ..workflow import EVAL_BATCH_SIZE, RUN_FILE, build_model, load_distillation
from .table import SIGN_WEIGHTS, Recipe, Stage, get_recipe

#: training time of a DDP run before its processes are stopped
DDP_TIMEOUT_S = 24 * 3600.0


def square_hinge(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BNN's loss: mean over batch and classes of max(0, 1 - t y)^2, t = 2 onehot(label) - 1."""
    targets = 2 * F.one_hot(labels, outputs.shape[1]).to(outputs.dtype) - 1
    return torch.clamp(1 - targets * outputs, min=0).square().mean()


LOSS_FUNCTIONS = {"cross_entropy": F.cross_entropy, "square_hinge": square_hinge}


def sign_layers(model: nn.Module) -> list[nn.Module]:
    """The QuantLinear/QuantConv1d/QuantConv2d layers of ``model`` whose weight quantizer is a sign
    (:data:`SIGN_WEIGHTS`)."""
    return [m for m in model.modules() if isinstance(m, (QuantLinear, QuantConv1d, QuantConv2d))
            and m.weight_quantizer is not None and m.weight_quantizer.name in SIGN_WEIGHTS]


def glorot_lr_scale(layer: nn.Module) -> float:
    """1 / H with H = sqrt(1.5 / (fan_in + fan_out)) (BNN's ``W_LR_scale = "Glorot"``)."""
    receptive = math.prod(layer.weight.shape[2:])
    fan_in, fan_out = layer.weight.shape[1] * receptive, layer.weight.shape[0] * receptive
    return 1.0 / math.sqrt(1.5 / (fan_in + fan_out))


class ClipLatentWeights:
    """Trainer callback: clamp the latent weights of sign-quantized layers to [-limit, limit] after each step."""

    def __init__(self, limit: float):
        self.limit = limit
        self.layers: list[nn.Module] = []

    def on_fit_start(self, trainer: Trainer) -> None:
        self.layers = sign_layers(ddp.unwrap(trainer.model))

    @torch.no_grad()
    def on_step_end(self, trainer: Trainer) -> None:
        for layer in self.layers:
            layer.weight.clamp_(-self.limit, self.limit)


class AlphaDecay:
    """Trainer callback: PACT's L2 term sum (lambda / 2) alpha^2 over every PACT quantizer, added to the loss."""

    def __init__(self, lam: float):
        self.lam = lam

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        terms = [q.regularization(self.lam) for q in model.modules() if isinstance(q, PACTQuantizer)]
        return torch.stack(terms).sum() if terms else None


class RefreshBatchNorm:
    """Trainer callback: after each epoch, re-estimate every batch norm's running mean and variance
    (:func:`refresh_batch_norm`, ``max_batches`` training batches per norm), then evaluate the model again,
    replacing ``test_loss`` and ``test_acc``.

    The running statistics are a moving average (momentum 0.1) of batch statistics taken while the
    weights moved; in a sign-activation network a small offset flips many signs downstream, so the
    lagging averages can cost tens of points of test accuracy (Bi-Real on MNIST: 41% against 80% with
    fresh statistics).
    """

    def __init__(self, max_batches: int = 25):
        self.max_batches = max_batches

    def on_epoch_end(self, trainer: Trainer) -> None:
        refresh_batch_norm(ddp.unwrap(trainer.model), trainer.train_loader, self.max_batches)
        if trainer.test_loader is not None:
            test = trainer.evaluate()
            trainer.metrics.update(test_loss=test["loss"], test_acc=test["acc"])


class _Reached(Exception):
    """Ends a forward pass at the batch norm being re-estimated."""


@torch.no_grad()
def refresh_batch_norm(model: nn.Module, loader: Any, max_batches: int) -> None:
    """Re-estimate the running statistics of every batch norm of ``model``, one norm at a time in the order
    the forward pass reaches them, with the model in eval mode: a norm's mean and (unbiased) variance are
    the plain averages of the batch statistics of its input over the first ``max_batches`` batches of
    ``loader``, the norms before it already re-estimated, so they are the statistics the deployed (eval
    mode) network feeds it. Estimated all at once in train mode they would describe inputs shaped by the
    upstream norms' batch statistics, which a sign network amplifies: the last ReActNet checkpoint on MNIST
    read 96.72% that way and 98.29% this way (98.38% with batch statistics). Each pass stops at its norm."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order: list[nn.Module] = []

    def record(module: nn.Module, inputs: tuple) -> None:
        if module not in order:
            order.append(module)

    handles = [m.register_forward_pre_hook(record) for m in norms]
    try:
        for inputs, _ in loader:
            model(inputs.to(device))
            break
    finally:
        for handle in handles:
            handle.remove()
    for norm in order:
        sums: list[torch.Tensor] = []

        def measure(module: nn.Module, inputs: tuple, sums: list[torch.Tensor] = sums) -> None:
            x = inputs[0].transpose(0, 1).flatten(1)
            sums.append(torch.stack([x.mean(1), x.var(1)]))
            raise _Reached

        handle = norm.register_forward_pre_hook(measure)
        try:
            for index, (inputs, _) in enumerate(loader):
                if index == max_batches:
                    break
                try:
                    model(inputs.to(device))
                except _Reached:
                    pass
        finally:
            handle.remove()
        if sums:
            mean, var = torch.stack(sums).mean(0)
            norm.running_mean.copy_(mean)
            norm.running_var.copy_(var)
    model.train(was_training)


class TrainTime:
    """Trainer callback: ``train_time``, the seconds of each epoch's training steps (evaluation excluded)."""

    def on_epoch_start(self, trainer: Trainer) -> None:
        self.start = self.last = time.perf_counter()

    def on_step_end(self, trainer: Trainer) -> None:
        self.last = time.perf_counter()

    def on_epoch_end(self, trainer: Trainer) -> None:
        trainer.metrics["train_time"] = self.last - self.start


def parameter_groups(model: nn.Module, recipe: Recipe, lr: float) -> list[dict[str, Any]]:
    """Optimizer groups: Linear/Conv2d weights with weight decay (each sign layer at ``lr`` times its
    Glorot scale when ``recipe.glorot_lr``), everything else without."""
    scaled = {id(m.weight): glorot_lr_scale(m) for m in sign_layers(model)} if recipe.glorot_lr else {}
    weights = {id(m.weight): m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))}
    groups: list[dict[str, Any]] = [
        {"params": [weights[key]], "lr": lr * scale, "weight_decay": recipe.weight_decay}
        for key, scale in scaled.items()
    ]
    decayed = [w for key, w in weights.items() if key not in scaled]
    rest = [p for p in model.parameters() if id(p) not in weights]
    groups += [{"params": decayed, "weight_decay": recipe.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return [g for g in groups if g["params"] and any(p.requires_grad for p in g["params"])]


def make_optimizer(model: nn.Module, recipe: Recipe, lr: float) -> torch.optim.Optimizer:
    """The recipe's optimizer over :func:`parameter_groups` (Adam, or SGD with momentum 0.9)."""
    groups = parameter_groups(model, recipe, lr)
    if recipe.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    raise ConfigError(f"recipe {recipe.name!r}: optimizer {recipe.optimizer!r}; valid: adam, sgd")


def stage_epochs(recipe: Recipe, epochs: int) -> list[int]:
    """Split ``epochs`` over the stages by their fractions (each >= 1, the last takes the remainder)."""
    count = len(recipe.stages)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < count:
        raise ConfigError(f"recipe {recipe.name!r} has {count} stage(s) and needs epochs >= {count}, got {epochs!r}")
    split = [max(1, round(stage.fraction * epochs)) for stage in recipe.stages[:-1]]
    while sum(split) > epochs - 1:
        split[split.index(max(split))] -= 1
    return [*split, epochs - sum(split)]


def latent_init(model: nn.Module, limit: float) -> None:
    """Re-draw the latent weights of sign-quantized layers from U(-limit, limit) (BNN's init with H = limit)."""
    with torch.no_grad():
        for layer in sign_layers(model):
            layer.weight.uniform_(-limit, limit)


def stage_model(net: nn.Module, stage: Stage, recipe: Recipe) -> nn.Module:
    """The network a stage trains: ``net`` itself (float stage) or a quantized copy with the recipe's init."""
    if stage.config is None:
        return net
    model = api.quantize(net, stage.config, strict=True)
    if recipe.latent_init is not None:
        latent_init(model, recipe.latent_init)
    return model


def carry_weights(trained: nn.Module, net: nn.Module) -> None:
    """Copy the float network's tensors (weights, biases, batch norm) from a trained quantized copy."""
    state = trained.state_dict()
    net.load_state_dict({key: state[key] for key in net.state_dict()})


def trainer_for(model: nn.Module, recipe: Recipe, loaders: tuple[Any, Any], epochs: int, lr: float, seed: int,
                out_dir: Path | None, progress: bool, distill: Distillation | None = None) -> Trainer:
    """A Trainer with the recipe's optimizer, schedule, loss and callbacks (DDP-wrapped in a process group),
    distilling ``distill``'s teacher when given."""
    callbacks: list[object] = [TrainTime()]
    if recipe.latent_clip is not None:
        callbacks.append(ClipLatentWeights(recipe.latent_clip))
    if recipe.alpha_decay:
        callbacks.append(AlphaDecay(recipe.alpha_decay))
    if recipe.bn_refresh:
        callbacks.append(RefreshBatchNorm())
    if ddp.is_distributed():
        callbacks.append(ddp.StateSync())
        model = ddp.wrap(model)
    schedule = {"schedule": recipe.schedule}
    if recipe.schedule == "exponential":
        schedule = {"schedule": "step", "step_size": 1, "gamma": (recipe.final_lr / recipe.lr) ** (1 / epochs)}
    optimizer = make_optimizer(ddp.unwrap(model), recipe, lr)
    return Trainer(model, loaders[0], loaders[1], epochs=epochs, loss_fn=LOSS_FUNCTIONS[recipe.loss],
                   distill=distill, optimizer=optimizer, seed=seed, callbacks=callbacks, out_dir=out_dir,
                   progress=progress, **schedule)


def _loaders(splits: tuple[tuple[torch.Tensor, torch.Tensor], ...], batch_size: int, seed: int) -> tuple[Any, Any]:
    """Train loader (sharded under DDP: each process its share of every global batch) and test loader."""
    (train_x, train_y), (test_x, test_y) = splits
    distributed = ddp.is_distributed()
    if distributed and batch_size % ddp.world_size():
        raise ConfigError(f"batch size {batch_size} does not split over {ddp.world_size()} DDP processes")
    train = make_loader(train_x, train_y, batch_size, shuffle=True, seed=seed, drop_last=distributed)
    if distributed:
        train = ddp.ShardedLoader(train, ddp.rank(), ddp.world_size())
    return train, make_loader(test_x, test_y, EVAL_BATCH_SIZE)


def _run(recipe: Recipe, data: str, model: str | None, epochs: int | None, out: str | os.PathLike | None,
         seed: int, limit: int | None, progress: bool, batch_size: int | None, lr: float | None,
         data_dir: str | os.PathLike | None, teacher: str | os.PathLike | None = None,
         distill_temperature: float | None = None, distill_weight: float | None = None) -> dict[str, Any]:
    """Train every stage of ``recipe`` in this process (one rank under DDP); the result dict."""
    start = time.perf_counter()
    distill, teacher_run = load_distillation(teacher, distill_temperature, distill_weight)  # before the seed
    epochs = recipe.epochs if epochs is None else epochs
    batch_size = recipe.batch_size if batch_size is None else batch_size
    lr = recipe.lr if lr is None else lr
    epochs_per_stage = stage_epochs(recipe, epochs)
    model_name = model or recipe.model
    model_kwargs = dict(recipe.model_kwargs) if model is None or model == recipe.model else {}
    seed_everything(seed)
    net = build_model(model_name, data, model_kwargs)
    out_dir = Path(out) if out is not None else None
    splits = tuple((x[:limit], y[:limit]) for x, y in (load_dataset(data, part, data_dir) for part in ("train", "test")))
    if distill is not None:
        distill.check(splits[0][0][:2], dataset_info(data).num_classes)
    stages, trained = [], net
    for index, (stage, stage_length) in enumerate(zip(recipe.stages, epochs_per_stage)):
        last = index == len(recipe.stages) - 1
        stage_dir = None if out_dir is None else out_dir if last else out_dir / f"stage-{stage.name}"
        loaders = _loaders(splits, batch_size, seed + index)
        trained = stage_model(net, stage, recipe)
        if stage.config is not None:  # quantizer state made from the first batch_size images, on every rank
            ddp.prepare_quantizers(trained, splits[0][0][:batch_size])
        trainer = trainer_for(trained, recipe, loaders, stage_length, lr, seed + index, stage_dir, progress,
                              distill if stage.config is not None else None)
        fit = trainer.fit()
        if not last:
            carry_weights(trained, net)
        times = [row["train_time"] for row in fit.history]
        stages.append({"name": stage.name, "epochs": stage_length, "final_acc": fit.final_acc,
                       "best_acc": fit.best_acc, "train_time_per_epoch": sum(times) / len(times),
                       "distilled": distill is not None and stage.config is not None, "history": fit.history})
    result = {
        "recipe": recipe.name, "paper": recipe.paper, "data": data, "model": model_name,
        "model_kwargs": model_kwargs, "seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr,
        "limit": limit, "weight_bits": recipe.weight_bits, "act_bits": recipe.act_bits,
        "final_acc": stages[-1]["final_acc"], "best_acc": stages[-1]["best_acc"],
        "train_time_per_epoch": stages[-1]["train_time_per_epoch"], "stages": stages,
        "world_size": ddp.world_size(), "wall_time": time.perf_counter() - start,
        "checkpoint": None if out_dir is None else str(out_dir / "last.safetensors"), "teacher": teacher_run,
    }
    if out_dir is not None and ddp.is_main():
        run = {"model": model_name, "data": data, "quant": recipe.config, "seed": seed, "epochs": epochs, "lr": lr,
               "batch_size": batch_size, "limit": limit, "model_kwargs": model_kwargs, "recipe": recipe.name,
               "teacher": teacher_run}
        write_atomic(out_dir / RUN_FILE, (json.dumps(run, indent=2) + "\n").encode())
    return result


def _ddp_worker(rank: int, world_size: int, port: int, kwargs: dict[str, Any], result_path: str) -> None:
    ddp.init_process(rank, world_size, port)
    try:
        result = _run(**kwargs)
        if rank == 0:
            write_atomic(result_path, json.dumps(result).encode())
        ddp.barrier()
    finally:
        ddp.close()


def train_recipe(
    name: str | Recipe,
    data: str,
    model: str | None = None,
    epochs: int | None = None,
    out: str | os.PathLike | None = None,
    seed: int = 0,
    limit: int | None = None,
    progress: bool = True,
    *,
    batch_size: int | None = None,
    lr: float | None = None,
    data_dir: str | os.PathLike | None = None,
    ddp_processes: int | None = None,
    teacher: str | os.PathLike | None = None,
    distill_temperature: float | None = None,
    distill_weight: float | None = None,
) -> dict[str, Any]:
    """Train recipe ``name`` (or a Recipe) on dataset ``data``; returns a JSON-able result dict.

    ``model`` replaces the recipe's default network (the recipe's ``model_kwargs`` apply only to
    its own network);
    ``epochs``, ``batch_size`` and ``lr`` replace the recipe's. ``limit`` keeps the first
    ``limit`` images of each split. ``out``: checkpoints and logs of the last stage (earlier
    stages in ``out/stage-<name>``) and ``run.json`` (readable by ``lowbit quantize`` / ``eval``).
    ``ddp_processes`` > 1 trains in that many spawned processes (gloo on CPU); inside a process
    group (torchrun) every process trains its share and gets the same result. ``teacher`` (a float
    checkpoint: a ``lowbit train`` run directory or .safetensors file, or a .lowbit file; any
    architecture with the data's number of classes) distils into every quantized stage with
    ``distill_temperature`` T and ``distill_weight`` w (defaults T = 1, w = 1: ReActNet's loss);
    see :func:`lowbit.workflow.load_distillation`.

    Result keys: recipe, paper, data, model, model_kwargs, seed, epochs, batch_size, lr, limit,
    weight_bits, act_bits, final_acc, best_acc (fractions), train_time_per_epoch (seconds of
    training steps per epoch, last stage), stages (name, epochs, final_acc, best_acc,
    train_time_per_epoch, distilled, history), world_size, wall_time, checkpoint, teacher (None, or
    path, sha256, temperature, weight).
    """
    recipe = name if isinstance(name, Recipe) else get_recipe(name)
    # bad arguments fail here, before any data is read or directory made (and not in N workers)
    stage_epochs(recipe, recipe.epochs if epochs is None else epochs)
    check_positive(recipe.batch_size if batch_size is None else batch_size, "batch_size")
    check_positive(limit, "limit", allow_none=True)
    check_lr(recipe.lr if lr is None else lr)
    load_distillation(teacher, distill_temperature, distill_weight)  # options, file and network checked
    if teacher is not None and all(stage.config is None for stage in recipe.stages):
        raise ConfigError(f"recipe {recipe.name!r} has only float stages; the teacher distils into quantized stages")
    kwargs = {"recipe": recipe, "data": data, "model": model, "epochs": epochs, "out": out, "seed": seed,
              "limit": limit, "progress": progress, "batch_size": batch_size, "lr": lr, "data_dir": data_dir,
              "teacher": teacher, "distill_temperature": distill_temperature, "distill_weight": distill_weight}
    if ddp_processes is None or ddp_processes == 1:
        return _run(**kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        ddp.launch(_ddp_worker, ddp_processes, (kwargs, str(result_path)), timeout_s=DDP_TIMEOUT_S)
        return json.loads(result_path.read_text())

