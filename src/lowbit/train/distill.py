"""Knowledge distillation: train a student on a teacher's softened outputs as well as on the labels.

Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network"::

    L = (1 - w) CE(z_s, y) + w T^2 KL(softmax(z_t / T) || softmax(z_s / T))

with ``z_s``, ``z_t`` the student's and the teacher's logits on the same batch, ``y`` the labels,
``T`` the temperature and ``w`` the weight; CE and KL are means over the batch. The gradient of the
soft term with respect to ``z_s`` is ``T (softmax(z_s / T) - softmax(z_t / T))``, which tends to
``(z_s - z_t) / C`` (C classes, zero-mean logits) as T grows: the ``T^2`` keeps its size independent
of T. ``w = 1`` is ReActNet's distributional loss (Liu et al., ECCV 2020: a binary student trained
on the KL divergence to a float teacher's softmax only, T = 1), the default here.

The teacher runs in eval mode under ``no_grad`` and is never updated; any network that gives logits
with the student's number of classes works, whatever its architecture.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

DEFAULT_TEMPERATURE = 1.0
DEFAULT_WEIGHT = 1.0

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_distill_options(temperature: float, weight: float) -> None:
    """ConfigError unless ``temperature`` is finite and > 0 and ``weight`` is in [0, 1]."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise ConfigError(f"distillation temperature must be finite and > 0, got {temperature!r}")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1:
        raise ConfigError(f"distillation weight must be in [0, 1] (0: labels only, 1: teacher only), got {weight!r}")


def soft_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 KL(softmax(z_t / T) || softmax(z_s / T))``, mean over the batch."""
    student = F.log_softmax(student_logits / temperature, dim=1)
    teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(student, teacher, reduction="batchmean", log_target=True)
    return temperature**2 * kl


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    weight: float = DEFAULT_WEIGHT,
    hard_loss: Loss = F.cross_entropy,
) -> torch.Tensor:
    """``(1 - w) hard_loss(z_s, y) + w T^2 KL(softmax(z_t / T) || softmax(z_s / T))`` (module docstring);
    ``hard_loss`` is cross-entropy in Hinton's loss (a recipe's own loss, such as BNN's square hinge,
    takes its place). ConfigError when the two logits differ in shape."""
    if student_logits.shape != teacher_logits.shape:
        raise ConfigError(f"the teacher's logits have shape {tuple(teacher_logits.shape)} and the student's "
                          f"{tuple(student_logits.shape)}; the teacher must give one logit per class of the student")
    hard = hard_loss(student_logits, labels)
    return (1 - weight) * hard + weight * soft_loss(student_logits, teacher_logits.detach(), temperature)


class Distillation:
    """A teacher and the loss's settings: ``Trainer(..., distill=Distillation(teacher, temperature, weight))``.

    The teacher is put in eval mode with ``requires_grad`` off (kept in eval mode at every step) and
    is run on each training batch of the student; ``loss`` is :func:`distillation_loss`.
    """

    def __init__(self, teacher: nn.Module, temperature: float = DEFAULT_TEMPERATURE,
                 weight: float = DEFAULT_WEIGHT):
        check_distill_options(temperature, weight)
        if not isinstance(teacher, nn.Module):
            raise ConfigError(f"the teacher must be a torch.nn.Module, got {type(teacher).__name__}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature = temperature
        self.weight = weight

    def to(self, device: torch.device) -> Distillation:
        """Move the teacher to ``device`` (the student's)."""
        self.teacher.to(device)
        return self

    @torch.no_grad()
    def teacher_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """The teacher's logits on ``inputs``, in eval mode, without gradients."""
        if self.teacher.training:
            self.teacher.eval()
        return self.teacher(inputs)

    def loss(self, student_logits: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor,
             hard_loss: Loss = F.cross_entropy) -> torch.Tensor:
        """:func:`distillation_loss` of the student's logits on ``inputs`` against the teacher's on the same batch."""
        return distillation_loss(student_logits, self.teacher_logits(inputs), labels, temperature=self.temperature,
                                 weight=self.weight, hard_loss=hard_loss)

    def check(self, inputs: torch.Tensor, num_classes: int) -> None:
        """ConfigError unless the teacher takes ``inputs`` (a few training images) and gives ``num_classes``
        logits per image: the check before any training."""
        try:
            logits = self.teacher_logits(inputs)
        except RuntimeError as exc:
            raise ConfigError(f"the teacher does not take the student's inputs of shape {tuple(inputs.shape)}: "
                              f"{str(exc).splitlines()[0]}") from None
        expected = (len(inputs), num_classes)
        if tuple(logits.shape) != expected:
            raise ConfigError(f"the teacher's logits have shape {tuple(logits.shape)} and the student's {expected}; "
                              "the teacher must give one logit per class of the student")

    def record(self) -> dict[str, float]:
        """The loss's settings, for run.json."""
        return {"temperature": self.temperature, "weight": self.weight}
