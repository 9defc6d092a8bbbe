"""Reference models by name: ``get_model(name, **kwargs)`` and ``model_names()``."""

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
