"""Training: the :class:`Trainer` loop, its callbacks and safetensors checkpoints."""

from .checkpoint import load_checkpoint, load_weights, save_checkpoint
from .trainer import Callback, FitResult, Trainer, checkpoint_file, lr_factor, seed_everything

__all__ = [
    "Callback",
    "FitResult",
    "Trainer",
    "checkpoint_file",
    "load_checkpoint",
    "load_weights",
    "lr_factor",
    "save_checkpoint",
    "seed_everything",
]
