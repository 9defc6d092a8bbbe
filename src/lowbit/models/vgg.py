"""A small VGG-style CNN (after Simonyan & Zisserman 2015) for 28x28 or 8x8 images.

``features``: for each int ``c`` in ``layers`` a 3x3 conv (padding 1, no bias)
to ``c`` channels, BatchNorm2d, ReLU; each ``"M"`` is a 2x2 max pool.
``classifier``: flatten, Linear -> ``hidden``, ReLU, Linear -> classes. The
default (32, 32, M, 64, 64, M, 128, M) has 436,906 parameters on 28x28 inputs
and also fits 8x8 digits (8 -> 4 -> 2 -> 1).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from torch import nn

from ..errors import ConfigError
from .common import check_int

DEFAULT_LAYERS: tuple[int | str, ...] = (32, 32, "M", 64, 64, "M", 128, "M")


class VGGSmall(nn.Sequential):
    """``features`` (conv-BN-ReLU blocks and max pools) then ``classifier`` (two Linear layers)."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        input_size: int = 28,
        layers: Sequence[int | str] = DEFAULT_LAYERS,
        hidden: int = 256,
    ):
        channels = check_int(in_channels, "vgg-small in_channels")
        side = check_int(input_size, "vgg-small input_size")
        features: list[nn.Module] = []
        for entry in layers:
            if entry == "M":
                if side < 2:
                    raise ConfigError(f"vgg-small layers {tuple(layers)} pool an input of size {input_size} below 1x1")
                features.append(nn.MaxPool2d(2))
                side //= 2
            else:
                out = check_int(entry, "each vgg-small layers entry (channels, or 'M' for a max pool)")
                features += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
                channels = out
        classifier = [
            nn.Flatten(),
            nn.Linear(channels * side * side, check_int(hidden, "vgg-small hidden")),
            nn.ReLU(),
            nn.Linear(hidden, check_int(num_classes, "vgg-small num_classes")),
        ]
        super().__init__(OrderedDict(features=nn.Sequential(*features), classifier=nn.Sequential(*classifier)))
