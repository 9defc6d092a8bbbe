"""Tests for lowbit.train: the Trainer loop, callbacks and safetensors checkpoints."""

from __future__ import annotations

import csv
import json
import math
import os

import pytest
import torch
from safetensors import safe_open
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowbit.errors import ConfigError, FormatError, ShapeMismatchError, TrainingError
from lowbit.train import Callback, Trainer, checkpoint, load_checkpoint, load_weights, lr_factor, seed_everything


def separable(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes split by the plane x0 + x1 = 0 in 4-D, with a margin."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    x = x[(x[:, 0] + x[:, 1]).abs() > 0.2]
    return x, (x[:, 0] + x[:, 1] > 0).long()


def loaders(batch_size: int = 32, generator: torch.Generator | None = None) -> tuple[DataLoader, DataLoader]:
    train = DataLoader(TensorDataset(*separable(256, 0)), batch_size=batch_size, shuffle=True, generator=generator)
    test = DataLoader(TensorDataset(*separable(128, 1)), batch_size=64)
    return train, test


def mlp(seed: int = 0) -> nn.Module:
    """A small MLP with dropout, so that training draws random numbers besides the shuffle."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), f"{key} differs"


class Crash(Exception):
    pass


class CrashAt(Callback):
    """Simulates an interruption: raises in the middle of a given epoch."""

    def __init__(self, epoch: int, batch: int):
        self.epoch, self.batch, self.seen = epoch, batch, 0

    def on_epoch_start(self, trainer: Trainer) -> None:
        self.seen = 0

    def on_step_end(self, trainer: Trainer) -> None:
        self.seen += 1
        if trainer.epoch + 1 == self.epoch and self.seen == self.batch:
            raise Crash


def test_learns_a_linearly_separable_problem(tmp_path):
    train, test = loaders()
    result = Trainer(mlp(), train, test, epochs=6, lr=0.2, out_dir=tmp_path, progress=False).fit()
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < 0.5 * losses[0]
    assert result.final_acc > 0.9  # chance is about 0.5
    assert result.best_acc >= result.final_acc
    assert len(result.history) == 6 and result.wall_time > 0
    assert result.last_checkpoint == tmp_path / "last.safetensors"
    assert result.best_checkpoint == tmp_path / "best.safetensors"


def test_same_seed_gives_the_same_weights_bit_for_bit():
    runs = []
    for seed in (3, 3, 4):
        seed_everything(seed)
        model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
        Trainer(model, loaders()[0], epochs=2, seed=seed, progress=False).fit()
        runs.append(model)
    assert_same_state(runs[0], runs[1])
    assert not torch.equal(runs[0][0].weight, runs[2][0].weight)


@pytest.mark.parametrize(
    "options, own_generator",
    [
        (dict(optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=1e-3, schedule="cosine", warmup_epochs=0.5), False),
        (dict(optimizer="adamw", weight_decay=1e-2, schedule="step", step_size=1, gamma=0.5, clip_grad_norm=1.0), True),
        (dict(optimizer="adam", schedule="none"), False),
    ],
)
def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tmp_path, options, own_generator):
    def loader_pair():
        return loaders(generator=torch.Generator().manual_seed(7) if own_generator else None)

    straight = mlp(0)
    Trainer(straight, *loader_pair(), epochs=3, seed=5, out_dir=tmp_path / "a", progress=False, **options).fit()

    interrupted = mlp(0)
    with pytest.raises(Crash):
        Trainer(interrupted, *loader_pair(), epochs=3, seed=5, out_dir=tmp_path / "b", progress=False,
                callbacks=[CrashAt(epoch=2, batch=3)], **options).fit()
    assert json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 1

    resumed = mlp(1)  # different initial weights: everything must come from the checkpoint
    trainer = Trainer(resumed, *loader_pair(), epochs=3, seed=5, out_dir=tmp_path / "b", resume=True,
                      progress=False, **options)
    result = trainer.fit()
    assert_same_state(straight, resumed)

    reference = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    untimed = [[{k: v for k, v in row.items() if k != "epoch_time"} for row in log]
               for log in (reference, rows, result.history)]
    assert untimed[0] == untimed[1] == untimed[2]


def test_fit_resume_argument_and_finished_run(tmp_path):
    train, test = loaders()
    Trainer(mlp(0), train, test, epochs=2, out_dir=tmp_path, progress=False).fit()
    model = mlp(1)
    result = Trainer(model, train, test, epochs=2, out_dir=tmp_path, progress=False).fit(resume=True)
    assert [row["epoch"] for row in result.history] == [1, 2]  # nothing left to train
    _, meta = load_checkpoint(tmp_path / "last.safetensors")
    assert meta["epoch"] == 2
    reference = mlp(2)
    load_weights(reference, tmp_path / "last.safetensors")
    assert_same_state(model, reference)


def test_nan_loss_stops_with_epoch_and_step():
    x = torch.randn(12, 4)
    batches = [(x[i : i + 4], torch.zeros(4, dtype=torch.long)) for i in range(0, 12, 4)]  # a plain list
    calls = []

    def loss_fn(outputs, labels):
        calls.append(1)
        loss = nn.functional.cross_entropy(outputs, labels)
        return loss * math.nan if len(calls) == 5 else loss

    trainer = Trainer(nn.Linear(4, 2), batches, epochs=3, loss_fn=loss_fn, progress=False)
    with pytest.raises(TrainingError, match=r"loss is nan at epoch 2, step 2 \(global step 5\)"):
        trainer.fit()
    assert trainer.step == 4


def test_inf_extra_loss_is_caught_too():
    class Explode(Callback):
        def extra_loss(self, model):
            return torch.tensor(math.inf)

    batches = [(torch.randn(4, 4), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(TrainingError, match="loss is inf at epoch 1, step 1"):
        Trainer(nn.Linear(4, 2), batches, epochs=1, callbacks=[Explode()], progress=False).fit()


def test_checkpoint_is_plain_safetensors_with_nothing_else(tmp_path):
    train, test = loaders()
    Trainer(mlp(), train, test, epochs=1, optimizer="adam", out_dir=tmp_path, progress=False).fit()
    assert sorted(os.listdir(tmp_path)) == ["best.safetensors", "last.safetensors", "metrics.csv", "metrics.jsonl"]
    path = tmp_path / "last.safetensors"
    data = path.read_bytes()
    header_size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_size])
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    assert len(data) == 8 + header_size + max(ends)  # the header and raw tensor bytes, nothing more
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        meta = {key: json.loads(value) for key, value in f.metadata().items()}
    assert {"model.0.weight", "model.0.bias", "model.3.weight", "model.3.bias", "rng.torch", "rng.numpy"} <= keys
    assert meta["format"] == checkpoint.FORMAT and meta["epoch"] == 1 and meta["step"] == len(train)
    state = meta["optimizer"]["state"]["0"]
    assert set(state) == {"step", "exp_avg", "exp_avg_sq"} and all("$tensor" in ref for ref in state.values())
    assert meta["optimizer"]["param_groups"][0]["betas"] == [0.9, 0.999]


def test_failed_write_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    target = tmp_path / "last.safetensors"
    old = {"w": torch.arange(6.0).reshape(2, 3)}
    checkpoint.save_checkpoint(target, old, {"epoch": 1})
    before = target.read_bytes()

    def broken_fsync(descriptor):  # the new bytes are in the temporary file when the disk fails
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(target, {"w": torch.zeros(2, 3)}, {"epoch": 2})
    assert os.listdir(tmp_path) == ["last.safetensors"]  # no temporary file left behind
    assert target.read_bytes() == before
    tensors, meta = load_checkpoint(target)
    assert torch.equal(tensors["w"], old["w"]) and meta["epoch"] == 1


def test_a_file_that_is_not_a_checkpoint_is_a_format_error(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(FormatError, match="not-a-checkpoint"):
        load_checkpoint(tmp_path / "junk.safetensors")


def test_callbacks_are_called_the_expected_number_of_times():
    class Count(Callback):
        def __init__(self):
            self.calls = {}

        def _count(self, name):
            self.calls[name] = self.calls.get(name, 0) + 1

        def on_fit_start(self, trainer):
            self._count("on_fit_start")

        def on_epoch_start(self, trainer):
            self._count("on_epoch_start")

        def extra_loss(self, model):
            self._count("extra_loss")

        def on_step_end(self, trainer):
            self._count("on_step_end")

        def on_epoch_end(self, trainer):
            self._count("on_epoch_end")
            trainer.metrics["sparsity"] = 0.5  # callbacks may add metrics

        def on_fit_end(self, trainer):
            self._count("on_fit_end")

    class OnlySteps:  # any object with some of the hooks is a callback
        steps = 0

        def on_step_end(self, trainer):
            self.steps += 1

    train, test = loaders(batch_size=64)  # 4 batches
    count, steps = Count(), OnlySteps()
    result = Trainer(mlp(), train, test, epochs=3, callbacks=[count, steps], progress=False).fit()
    n = 3 * len(train)
    assert count.calls == {"on_fit_start": 1, "on_epoch_start": 3, "extra_loss": n, "on_step_end": n,
                           "on_epoch_end": 3, "on_fit_end": 1}
    assert steps.steps == n
    assert all(row["sparsity"] == 0.5 for row in result.history)


def test_extra_loss_adds_its_gradient_hand_worked():
    """Zero data loss + 0.5 * ||w||^2: plain SGD gives w <- (1 - lr) w at each step."""

    class L2(Callback):
        def extra_loss(self, model):
            return 0.5 * (model.weight**2).sum()

    model = nn.Linear(3, 2, bias=False)
    w0 = model.weight.detach().clone()
    batches = [(torch.randn(5, 3), torch.zeros(5, dtype=torch.long))] * 3
    Trainer(model, batches, epochs=1, loss_fn=lambda out, y: 0.0 * out.sum(), optimizer="sgd", lr=0.1,
            momentum=0.0, schedule="none", callbacks=[L2()], progress=False).fit()
    torch.testing.assert_close(model.weight.detach(), w0 * 0.9**3)


def test_on_step_end_can_clip_latent_weights():
    class ClipWeights(Callback):
        def on_step_end(self, trainer):
            with torch.no_grad():
                for p in trainer.model.parameters():
                    p.clamp_(-1.0, 1.0)

    maxima = []
    for callbacks in ([], [ClipWeights()]):
        model = mlp()
        Trainer(model, loaders()[0], epochs=2, lr=5.0, clip_grad_norm=50.0, callbacks=callbacks, progress=False).fit()
        maxima.append(max(p.abs().max().item() for p in model.parameters()))
    assert maxima[0] > 1.0  # without the callback the weights leave [-1, 1]
    assert maxima[1] <= 1.0


def test_architecture_mismatch_names_every_tensor(tmp_path):
    train, _ = loaders()
    trainer = Trainer(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), train, epochs=1, progress=False)
    trainer.save_checkpoint(tmp_path / "small.safetensors")
    with pytest.raises(ShapeMismatchError) as info:
        load_weights(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2), nn.Linear(2, 2)),
                     tmp_path / "small.safetensors")
    message = str(info.value)
    assert "'0.weight' is [8, 4] in the checkpoint" in message and "but [16, 4] in the model" in message
    assert "'0.bias'" in message and "'2.weight'" in message  # 2.weight is [2, 8] vs [2, 16]
    assert "missing from the checkpoint: '3.weight', '3.bias'" in message
    with pytest.raises(ShapeMismatchError, match="in the checkpoint but not in the model: ") as info:
        load_weights(nn.Sequential(nn.Linear(4, 8)), tmp_path / "small.safetensors")
    assert "'2.weight'" in str(info.value) and "'2.bias'" in str(info.value) and "'0.weight'" not in str(info.value)
    with pytest.raises(ShapeMismatchError, match="'0.weight'"):
        Trainer(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), train, out_dir=tmp_path,
                resume=tmp_path / "small.safetensors", progress=False).fit()


def test_lr_schedules_hand_worked():
    batches = [(torch.randn(2, 4), torch.zeros(2, dtype=torch.long))] * 4  # 4 steps per epoch

    class RecordLr(Callback):
        def __init__(self):
            self.lrs = []

        def on_step_end(self, trainer):
            self.lrs.append(trainer.lr)

    def lrs(**options):
        record = RecordLr()
        Trainer(nn.Linear(4, 2), batches, lr=1.0, momentum=0.0, callbacks=[record], progress=False, **options).fit()
        return record.lrs

    c = math.cos
    pi = math.pi
    # warm-up 1 epoch = 4 steps: (i + 1) / 4; then cosine over the 4 remaining steps: (1 + cos(pi t)) / 2, t = k/4
    expected = [0.25, 0.5, 0.75, 1.0] + [(1 + c(pi * k / 4)) / 2 for k in range(4)]
    assert lrs(epochs=2, schedule="cosine", warmup_epochs=1) == pytest.approx(expected)
    # step: gamma ** (epoch // step_size) with step_size 2 epochs
    assert lrs(epochs=5, schedule="step", step_size=2, gamma=0.5) == pytest.approx([1.0] * 8 + [0.5] * 8 + [0.25] * 4)
    assert lrs(epochs=2, schedule="none") == [1.0] * 8
    assert lr_factor(0, schedule="none", total_steps=10, warmup_steps=2) == 0.5


def test_gradient_clipping_bounds_the_update_hand_worked():
    """Plain SGD with max norm c: the update is -lr * g * c / ||g|| when ||g|| > c, so its norm is lr * c."""
    model = nn.Linear(4, 2)
    before = [p.detach().clone() for p in model.parameters()]
    batches = [(100.0 * torch.randn(8, 4), torch.randint(0, 2, (8,)))]
    Trainer(model, batches, epochs=1, lr=0.5, momentum=0.0, schedule="none", clip_grad_norm=0.01, progress=False).fit()
    update = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert update.norm().item() == pytest.approx(0.5 * 0.01, rel=1e-4)


def test_logs_hold_one_row_per_epoch_and_best_checkpoint_matches(tmp_path):
    train, test = loaders()
    result = Trainer(mlp(), train, test, epochs=3, lr=0.05, out_dir=tmp_path, progress=False).fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == result.history
    with open(tmp_path / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in table] == [1, 2, 3]
    assert [float(r["test_acc"]) for r in table] == [r["test_acc"] for r in rows]

    accuracies = [r["test_acc"] for r in rows]
    assert result.best_acc == max(accuracies) and result.best_epoch == accuracies.index(max(accuracies)) + 1
    best = mlp(9)
    meta = load_weights(best, tmp_path / "best.safetensors")
    assert meta["epoch"] == result.best_epoch
    assert Trainer(best, train, test, progress=False).evaluate()["acc"] == result.best_acc


def test_should_stop_ends_fit_after_the_epoch():
    class StopAfterOne(Callback):
        def on_epoch_end(self, trainer):
            trainer.should_stop = True

    result = Trainer(mlp(), loaders()[0], epochs=5, callbacks=[StopAfterOne()], progress=False).fit()
    assert len(result.history) == 1 and result.final_acc is None and result.best_checkpoint is None


def test_optimizers_by_name_and_instance():
    train, _ = loaders()
    sgd = Trainer(mlp(), train, optimizer="sgd", lr=0.3, momentum=0.8, nesterov=True, weight_decay=1e-4).optimizer
    assert isinstance(sgd, torch.optim.SGD)
    group = sgd.param_groups[0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.8, True, 1e-4)
    adam = Trainer(mlp(), train, optimizer="adam", schedule="none").optimizer
    assert type(adam) is torch.optim.Adam and adam.param_groups[0]["lr"] == 1e-3
    assert isinstance(Trainer(mlp(), train, optimizer="adamw", weight_decay=0.05).optimizer, torch.optim.AdamW)
    model = mlp()
    mine = torch.optim.SGD(model.parameters(), lr=0.01)
    assert Trainer(model, train, optimizer=mine).optimizer is mine


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(optimizer="lamb"), "unknown optimizer 'lamb'; valid names: sgd, adam, adamw"),
        (dict(schedule="linear"), "unknown schedule 'linear'; valid schedules: cosine, step, none"),
        (dict(epochs=0), "epochs must be an integer >= 1"),
        (dict(lr=0.0), "lr must be > 0"),
        (dict(lr=math.nan), "lr must be > 0"),
        (dict(nesterov=True, momentum=0.0), "nesterov=True needs momentum > 0"),
        (dict(clip_grad_norm=0.0), "clip_grad_norm must be > 0"),
        (dict(warmup_epochs=-1), "warmup_epochs must be >= 0"),
        (dict(schedule="step", step_size=0), "step_size must be an integer >= 1"),
    ],
)
def test_bad_options_raise_config_error(options, message):
    with pytest.raises(ConfigError, match=message):
        Trainer(mlp(), loaders()[0], **options)


def test_bad_inputs_raise_config_error(tmp_path):
    batch = (torch.randn(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ConfigError, match="needs len\\(train_loader\\)"):
        Trainer(mlp(), iter([batch]), schedule="cosine")
    with pytest.raises(ConfigError, match="resume=True needs out_dir"):
        Trainer(mlp(), [batch], resume=True, progress=False).fit()
    with pytest.raises(ConfigError, match="does not exist"):
        Trainer(mlp(), [batch], resume=tmp_path / "nope.safetensors", progress=False).fit()
    with pytest.raises(ConfigError, match="train_loader yielded no batches"):
        Trainer(mlp(), [], schedule="none", progress=False).fit()
    with pytest.raises(ConfigError, match="an \\(inputs, labels\\) pair"):
        Trainer(mlp(), [torch.randn(2, 4)], schedule="none", progress=False).fit()
    with pytest.raises(ConfigError, match="evaluate\\(\\) needs a loader"):
        Trainer(mlp(), [batch]).evaluate()
