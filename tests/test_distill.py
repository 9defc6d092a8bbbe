"""Tests for lowbit.train.distill: the loss, the Trainer's teacher, recipes and ``lowbit train --teacher``."""

from __future__ import annotations

import hashlib
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit import workflow
from lowbit.cli import main
from lowbit.errors import ConfigError
from lowbit.recipes import Recipe, Stage, train_recipe
from lowbit.train import Distillation, Trainer, distillation_loss
from lowbit.train.distill import soft_loss

TINY = ["--limit", "120", "--no-progress"]


def logits(rows: int, classes: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return scale * torch.randn(rows, classes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------ the loss


def test_loss_matches_the_formula_written_out():
    z_s, z_t, y = logits(5, 4, 0), logits(5, 4, 1), torch.tensor([0, 3, 1, 2, 2])
    for temperature, weight in ((1.0, 1.0), (3.0, 0.7), (0.5, 0.25)):
        p_t = torch.softmax(z_t / temperature, dim=1)
        log_p_s = torch.log(torch.softmax(z_s / temperature, dim=1))
        kl = (p_t * (torch.log(p_t) - log_p_s)).sum(1).mean()  # kl_div(log q, p, batchmean) written out
        ce = -torch.log(torch.softmax(z_s, dim=1))[torch.arange(5), y].mean()
        expected = (1 - weight) * ce + weight * temperature**2 * kl
        got = distillation_loss(z_s, z_t, y, temperature=temperature, weight=weight)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_two_class_example_by_hand():
    # z_s = (0, 0): p_s = (1/2, 1/2); z_t = (ln 3, 0): p_t = (3/4, 1/4) at T = 1
    z_s, z_t, y = torch.zeros(1, 2, dtype=torch.float64), torch.tensor([[math.log(3), 0.0]], dtype=torch.float64), \
        torch.tensor([0])
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert distillation_loss(z_s, z_t, y, weight=1.0).item() == pytest.approx(kl, rel=1e-12)
    assert distillation_loss(z_s, z_t, y, weight=0.5).item() == pytest.approx(0.5 * math.log(2) + 0.5 * kl, rel=1e-12)
    # T = 2: p_t = (sqrt 3, 1) / (sqrt 3 + 1), and the KL is scaled by T^2 = 4
    a = math.sqrt(3) / (math.sqrt(3) + 1)
    kl2 = a * math.log(a / 0.5) + (1 - a) * math.log((1 - a) / 0.5)
    assert distillation_loss(z_s, z_t, y, temperature=2.0).item() == pytest.approx(4 * kl2, rel=1e-12)


def test_weight_zero_is_plain_cross_entropy_exactly():
    z_s, z_t, y = logits(8, 10, 2).float(), logits(8, 10, 3).float(), torch.arange(8)
    assert torch.equal(distillation_loss(z_s, z_t, y, temperature=4.0, weight=0.0), F.cross_entropy(z_s, y))


def test_temperature_squared_keeps_the_gradient_size():
    z_s, z_t = logits(3, 5, 4), logits(3, 5, 5)
    grads = {}
    for temperature in (1.0, 2.0, 100.0, 200.0):
        z = z_s.clone().requires_grad_(True)
        soft_loss(z, z_t, temperature).backward()
        # d/dz_s of T^2 KL (mean over the batch) = T (softmax(z_s / T) - softmax(z_t / T)) / batch
        expected = temperature * (torch.softmax(z_s / temperature, 1) - torch.softmax(z_t / temperature, 1)) / 3
        torch.testing.assert_close(z.grad, expected, rtol=1e-10, atol=1e-12)
        grads[temperature] = z.grad
    # large T: -> (centred z_s - centred z_t) / (C batch), the same for every T
    centred = (z_s - z_s.mean(1, keepdim=True)) - (z_t - z_t.mean(1, keepdim=True))
    limit = centred / 15
    for temperature in (100.0, 200.0):  # the error is O(1 / T)
        assert (grads[temperature] - limit).norm() / limit.norm() < 2.0 / temperature
    ratio = grads[1.0].norm() / grads[2.0].norm()
    assert abs(ratio - 1) > 0.05, ratio  # small T: the size still depends on T (first order only at large T)


def test_logits_of_other_classes_are_refused_naming_both_shapes():
    with pytest.raises(ConfigError, match=r"\(4, 3\).*\(4, 10\)"):
        distillation_loss(torch.zeros(4, 10), torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))


def test_teacher_check_before_training_names_both_shapes():
    with pytest.raises(ConfigError, match=r"teacher's logits have shape \(2, 5\) and the student's \(2, 10\)"):
        Distillation(nn.Linear(3, 5)).check(torch.zeros(2, 3), 10)
    with pytest.raises(ConfigError, match=r"does not take the student's inputs of shape \(2, 4\)"):
        Distillation(nn.Linear(3, 10)).check(torch.zeros(2, 4), 10)
    Distillation(nn.Linear(3, 10)).check(torch.zeros(2, 3), 10)


@pytest.mark.parametrize("temperature, weight, match", [
    (0.0, 0.5, "temperature"), (-1.0, 0.5, "temperature"), (math.inf, 0.5, "temperature"), (True, 0.5, "temperature"),
    (1.0, -0.1, "weight"), (1.0, 1.5, "weight"), (1.0, math.nan, "weight"),
])
def test_bad_options_are_refused(temperature, weight, match):
    with pytest.raises(ConfigError, match=match):
        Distillation(nn.Linear(2, 2), temperature, weight)


# --------------------------------------------------------------- the Trainer


def toy_problem():
    """Random inputs, labels from one random linear map, a teacher from another (so they disagree)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 6, generator=g)
    y = (x @ torch.randn(6, 4, generator=g)).argmax(1)
    teacher = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 4))
    return x, y, teacher


def kl_to_teacher(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(soft_loss(student(x), teacher.eval()(x), 1.0))


def fit(x, y, distill, epochs=15):
    torch.manual_seed(1)
    student = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, len(x), 32)]
    Trainer(student, batches, epochs=epochs, optimizer="adam", lr=1e-2, schedule="none", distill=distill,
            progress=False).fit()
    return student


def test_trainer_with_a_teacher_learns_its_outputs_and_leaves_it_alone():
    x, y, teacher = toy_problem()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    plain = fit(x, y, None)
    distilled = fit(x, y, Distillation(teacher, temperature=2.0, weight=1.0))
    kl_plain, kl_distilled = kl_to_teacher(plain, teacher, x), kl_to_teacher(distilled, teacher, x)
    assert kl_distilled < 0.5 * kl_plain, (kl_distilled, kl_plain)
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())  # never updated
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training  # eval mode: its dropout is off


def test_teacher_runs_in_eval_mode_without_grad_on_the_students_batch():
    seen = []

    class Spy(nn.Module):
        def forward(self, x):
            seen.append((self.training, torch.is_grad_enabled(), x.clone()))
            return torch.zeros(len(x), 2)

    spy = Spy().train()
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    student = nn.Linear(3, 2)
    Trainer(student, [(x, y)], epochs=1, schedule="none", distill=Distillation(spy), progress=False).fit()
    assert len(seen) == 1 and seen[0][0] is False and seen[0][1] is False and torch.equal(seen[0][2], x)


def test_the_student_cannot_be_its_own_teacher():
    model = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="teacher is the model"):
        Trainer(model, [], distill=Distillation(model))


# ---------------------------------------------------------- workflow and CLI


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    workflow.train("lenet300", "digits", epochs=1, out_dir=out, limit=120, progress=False)
    return out


def run_error(capsys, argv):
    status = main(argv)
    captured = capsys.readouterr()
    assert status == 2, captured
    assert captured.out == "" and "Traceback" not in captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_cli_trains_with_a_teacher_of_another_architecture_and_records_it(tmp_path, capsys, teacher_run):
    out = tmp_path / "student"
    status = main(["train", "--model", "vgg-small", "--data", "digits", "--epochs", "1", "--out", str(out),
                   "--quant", "w4a4", "--teacher", str(teacher_run), "--distill-temperature", "3",
                   "--distill-weight", "0.5", *TINY, "--json"])
    done = json.loads(capsys.readouterr().out)
    assert status == 0
    checkpoint = teacher_run / "last.safetensors"
    record = {"path": str(checkpoint.resolve()), "sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest(),
              "temperature": 3.0, "weight": 0.5}
    assert done["run"]["teacher"] == record
    assert json.loads((out / "run.json").read_text())["teacher"] == record
    plain = tmp_path / "plain"
    assert main(["train", "--model", "lenet300", "--data", "digits", "--epochs", "1", "--out", str(plain), *TINY]) == 0
    assert json.loads((plain / "run.json").read_text())["teacher"] is None


def test_cli_takes_a_lowbit_file_as_teacher(tmp_path, capsys, teacher_run):
    model, _ = workflow.load_trained(teacher_run)
    quantized = workflow.post_training_quantize(model, "w8a8", workflow.calibration_batches("digits", 1))
    path = workflow.save_quantized(quantized, tmp_path / "teacher.lowbit", "digits")
    status = main(["train", "--model", "lenet300", "--data", "digits", "--epochs", "1", "--out",
                   str(tmp_path / "s"), "--teacher", str(path), *TINY, "--json"])
    run = json.loads(capsys.readouterr().out)["run"]
    assert status == 0 and run["teacher"]["path"] == str(path.resolve())
    assert (run["teacher"]["temperature"], run["teacher"]["weight"]) == (1.0, 1.0)  # ReActNet's defaults


@pytest.mark.parametrize("options, match", [
    (["--distill-temperature", "0"], "temperature must be finite and > 0"),
    (["--distill-weight", "1.5"], r"weight must be in \[0, 1\]"),
    (["--teacher", "/nonexistent/run"], "teacher checkpoint .* does not exist"),
    (["--distill-weight", "0.5", "--no-teacher"], "go with a teacher"),
])
def test_cli_bad_distillation_options_are_one_line(tmp_path, capsys, teacher_run, options, match):
    if "--no-teacher" in options:
        options = options[:-1]
    elif "--teacher" not in options:
        options = ["--teacher", str(teacher_run), *options]
    out = tmp_path / "r"
    common = ["--data", "digits", "--epochs", "2", "--out", str(out), *options, *TINY]
    for head in (["--model", "lenet300"], ["--recipe", "bwn", "--model", "lenet300"]):
        assert re.search(match, run_error(capsys, ["train", *head, *common]))
    assert not out.exists()  # refused before any training


def test_cli_teacher_with_other_inputs_is_refused_before_training(tmp_path, capsys, teacher_run):
    line = run_error(capsys, ["train", "--model", "lenet300", "--data", "mnist", "--epochs", "1", "--out",
                              str(tmp_path / "r"), "--teacher", str(teacher_run), *TINY])
    assert "teacher does not take the student's inputs of shape (2, 1, 28, 28)" in line


def test_teacher_without_run_json_is_refused(tmp_path, teacher_run):
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes((teacher_run / "last.safetensors").read_bytes())
    with pytest.raises(ConfigError, match="no run.json"):
        workflow.load_distillation(lone)


def test_recipe_distils_into_every_quantized_stage(tmp_path, teacher_run):
    binary = {"weight": {"name": "binary", "ste": "clipped"}, "input": None, "first": "float", "last": "float"}
    recipe = Recipe(name="toy", paper="-", notes="-", model="lenet300", weight_bits=1, act_bits=32,
                    stages=(Stage("float", None, 0.5), Stage("binary", binary, 0.5)), batch_size=40)
    result = train_recipe(recipe, "digits", epochs=2, limit=120, out=tmp_path, progress=False, teacher=teacher_run,
                          distill_weight=0.9)
    assert [(s["name"], s["distilled"]) for s in result["stages"]] == [("float", False), ("binary", True)]
    assert result["teacher"]["weight"] == 0.9 and result["teacher"]["temperature"] == 1.0
    assert json.loads((tmp_path / "run.json").read_text())["teacher"] == result["teacher"]
    float_only = Recipe(name="f", paper="-", notes="-", model="lenet300", weight_bits=32, act_bits=32,
                        stages=(Stage("float", None),))
    with pytest.raises(ConfigError, match="only float stages"):
        train_recipe(float_only, "digits", epochs=1, limit=120, teacher=teacher_run)
