"""A small ResNet (He et al., CVPR 2016) for 28x28 or 8x8 images, in two block layouts.

``block="basic"``: the standard BasicBlock, one shortcut around two convs::

    out = act2(bn2(conv2(act1(bn1(conv1(x))))) + shortcut(x))

``block="bireal"``: Bi-Real Net's layout (Liu et al., ECCV 2018), a
real-valued shortcut around every 3x3 conv, the activation before the conv
(a binary recipe replaces it with sign and binarizes the conv)::

    y   = bn1(conv1(act1(x))) + shortcut(x)
    out = bn2(conv2(act2(y))) + y

Both layouts have the same modules and state_dict keys. ``shortcut`` is the
identity, or where the shape changes 2x2 average pooling (ceil mode) then a
1x1 conv and BatchNorm, as in Bi-Real Net. The stem is a 3x3 conv and
BatchNorm (plus the activation in the basic layout), then with ``stem_pool``
k > 1 a k x k max pool of stride k (ceil mode; ResNet's and Bi-Real Net's
ImageNet stems pool too; here it lets twice the widths cost about the same,
a conv's work being H W C^2); the head is global average pooling and
``fc``. Stage ``i`` has ``widths[i]`` channels and ``blocks[i]`` blocks;
every stage after the first halves the image. ``activation`` is "relu" or
"hardtanh" (Bi-Real Net starts from a real network trained with clip(-1, 1)
instead of ReLU).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .common import check_choice, check_int

BLOCKS = ("basic", "bireal")
ACTIVATIONS = {"relu": nn.ReLU, "hardtanh": nn.Hardtanh}


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias (BatchNorm follows)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Identity, or avgpool(stride) -> 1x1 conv -> BN when the shape changes."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    layers: list[nn.Module] = [nn.AvgPool2d(stride, ceil_mode=True, count_include_pad=False)] if stride > 1 else []
    layers += [nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)]
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN pairs with shortcuts, in the "basic" or "bireal" layout (see the module doc)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, block: str, activation: str):
        super().__init__()
        self.bireal = check_choice(block, "resnet-small block", BLOCKS) == "bireal"
        act = ACTIVATIONS[check_choice(activation, "resnet-small activation", tuple(ACTIVATIONS))]
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.act1 = act()
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act2 = act()
        self.shortcut = shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bireal:
            y = self.bn1(self.conv1(self.act1(x))) + self.shortcut(x)
            return self.bn2(self.conv2(self.act2(y))) + y
        y = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNetSmall(nn.Module):
    """stem, layer1..layerN (BasicBlocks), global average pool, fc."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        input_size: int = 28,
        widths: Sequence[int] = (16, 32, 64),
        blocks: Sequence[int] = (2, 2, 2),
        block: str = "basic",
        activation: str = "relu",
        stem_pool: int = 1,
    ):
        super().__init__()
        check_int(input_size, "resnet-small input_size")  # any size works: convs are padded, pools ceil
        check_choice(block, "resnet-small block", BLOCKS)
        if len(widths) == 0 or len(widths) != len(blocks):
            raise ConfigError(f"resnet-small widths {tuple(widths)} and blocks {tuple(blocks)} need one entry "
                              "per stage")
        channels = check_int(widths[0], "resnet-small widths[0]")
        stem: OrderedDict[str, nn.Module] = OrderedDict(
            conv=conv3x3(check_int(in_channels, "resnet-small in_channels"), channels), bn=nn.BatchNorm2d(channels)
        )
        if block == "basic":
            stem["act"] = ACTIVATIONS[check_choice(activation, "resnet-small activation", tuple(ACTIVATIONS))]()
        if check_int(stem_pool, "resnet-small stem_pool") > 1:
            stem["pool"] = nn.MaxPool2d(stem_pool, ceil_mode=True)
        self.stem = nn.Sequential(stem)
        for stage, (width, count) in enumerate(zip(widths, blocks)):
            width = check_int(width, f"resnet-small widths[{stage}]")
            stage_blocks = []
            for index in range(check_int(count, f"resnet-small blocks[{stage}]")):
                stride = 2 if stage > 0 and index == 0 else 1
                stage_blocks.append(BasicBlock(channels, width, stride, block, activation))
                channels = width
            self.add_module(f"layer{stage + 1}", nn.Sequential(*stage_blocks))
        self.num_stages = len(widths)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, check_int(num_classes, "resnet-small num_classes"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{stage}")(x)
        return self.fc(torch.flatten(self.pool(x), 1))
