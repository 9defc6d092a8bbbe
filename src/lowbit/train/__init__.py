"""Training: the :class:`Trainer` loop, its callbacks, knowledge distillation and safetensors checkpoints."""

from .checkpoint import load_checkpoint, load_weights, save_checkpoint
from .distill import Distillation, distillation_loss
from .trainer import Callback, FitResult, Trainer, checkpoint_file, lr_factor, seed_everything

__all__ = [
    "Callback",
    "Distillation",
    "FitResult",
    "Trainer",
    "checkpoint_file",
    "distillation_loss",
    "load_checkpoint",
    "load_weights",
    "lr_factor",
    "save_checkpoint",
    "seed_everything",
]
