"""Reference models by name: ``get_model(name, **kwargs)``, ``model_names()`` and ``training_defaults(name)``."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from ..errors import ConfigError
from .binary_nets import SmallCNN
from .bnn_mlp import BNNMLP
from .lenet import LeNet5, LeNet300
from .reactnet import ReActNetSmall
from .resnet import ResNetSmall
from .vgg import VGGSmall

MODELS: dict[str, type[nn.Module]] = {
    "lenet300": LeNet300,
    "lenet5": LeNet5,
    "bnn-mlp": BNNMLP,
    "vgg-small": VGGSmall,
    "resnet-small": ResNetSmall,
    "reactnet": ReActNetSmall,
    "small-cnn": SmallCNN,
}

#: ``lowbit train --model NAME`` without --epochs / --lr: (epochs, SGD learning rate). The LeNets' are the float
#: references of the Deep Compression benchmarks (LeNet-5 diverges at lr 0.05 over 8 epochs, seed 0).
TRAINING_DEFAULTS: dict[str, tuple[int, float]] = {"lenet300": (15, 0.05), "lenet5": (8, 0.02)}
DEFAULT_LR = 0.05  # SGD, momentum 0.9, cosine schedule, for models without their own


def training_defaults(name: str, epochs: int | None = None, lr: float | None = None) -> tuple[int, float]:
    """(epochs, learning rate) of training model ``name``: those given, else the model's defaults.

    A model without default epochs (not in :data:`TRAINING_DEFAULTS`) needs ``epochs``: ConfigError.
    """
    default_epochs, default_lr = TRAINING_DEFAULTS.get(name, (None, DEFAULT_LR))
    epochs = default_epochs if epochs is None else epochs
    if epochs is None:
        raise ConfigError(f"model {name!r} has no default epochs: name them (--epochs N); models with defaults: "
                          f"{', '.join(TRAINING_DEFAULTS)}")
    return epochs, default_lr if lr is None else lr


def model_names() -> list[str]:
    """Names accepted by :func:`get_model`."""
    return sorted(MODELS)


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the float model ``name``; every model takes in_channels, num_classes and input_size.

    Unknown names and arguments raise ConfigError listing the valid ones.
    """
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(model_names())}")
    cls = MODELS[name]
    signature = inspect.signature(cls)
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad arguments for model {name!r} ({exc}); valid: {', '.join(signature.parameters)}") from None
    return cls(**kwargs)
