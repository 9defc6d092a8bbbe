"""A small ReActNet (Liu, Shen, Savvides, Cheng, ECCV 2020) for 28x28 or 32x32 images.

ReActNet-A's block (the MobileNet-based net of the paper, its 3x3 convs full rather than depthwise), RSign before
every binary conv and RPReLU after every shortcut (:mod:`lowbit.nn.react`)::

    y   = rprelu1(bn1(conv3x3(rsign1(x))) + pool(x))              pool: 2x2 average where the stride is 2
    out = rprelu2(bn2(conv1x1(rsign2(y))) + y)                    same width
    out = rprelu2(cat(bn2(conv1x1(rsign2(y))) + y,
                      bn2b(conv1x1b(rsign2b(y))) + y))          width doubled: the paper's duplicated 1x1 block

The network is float: RSign's module holds only the thresholds (``x - alpha``), and a recipe's ``binary`` input
quantizer on the convs takes the sign (and its weight quantizer binarizes them). Each 1x1 conv of a doubling block
reads its own RSign (the authors' code shares one), so each binary conv has its own sign input, which the Engine's
XNOR kernels take. Stem: a real 3x3 conv and BatchNorm (first layer), then with ``stem_pool`` k > 1 a k x k max
pool of stride k, as Bi-Real Net's stem in :mod:`lowbit.models.resnet`; head: global average pooling and ``fc``
(last layer). ``widths[i]`` is stage i's width (each the same as or twice the one before; ``widths[0]`` is the
stem's), ``blocks[i]`` its block count; every stage after the first halves the image in its first block (its
shortcut a 2x2 average pool; pools in ceil mode, so odd sizes halve too: 28 -> 14 -> 7 -> 4).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..nn.react import RPReLU, RSignThreshold
from .common import check_int


class ReActBlock(nn.Module):
    """RSign -> binary 3x3 conv -> BN -> + shortcut -> RPReLU, then the same with a 1x1 conv (module doc)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if out_channels not in (in_channels, 2 * in_channels):
            raise ConfigError(f"a ReActNet block keeps or doubles its width; got {in_channels} -> {out_channels}")
        self.rsign1 = RSignThreshold(in_channels)
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.pool = nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity()
        self.rprelu1 = RPReLU(in_channels)
        self.rsign2 = RSignThreshold(in_channels)
        self.conv2 = nn.Conv2d(in_channels, in_channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(in_channels)
        self.doubled = out_channels == 2 * in_channels
        if self.doubled:
            self.rsign2b = RSignThreshold(in_channels)
            self.conv2b = nn.Conv2d(in_channels, in_channels, 1, bias=False)
            self.bn2b = nn.BatchNorm2d(in_channels)
        self.rprelu2 = RPReLU(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.rprelu1(self.bn1(self.conv1(self.rsign1(x))) + self.pool(x))
        out = self.bn2(self.conv2(self.rsign2(y))) + y
        if self.doubled:
            out = torch.cat([out, self.bn2b(self.conv2b(self.rsign2b(y))) + y], dim=1)
        return self.rprelu2(out)


class ReActNetSmall(nn.Module):
    """stem (real conv + BN), ReActNet blocks, global average pool, fc; see the module doc."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        input_size: int = 28,
        widths: Sequence[int] = (16, 32, 64),
        blocks: Sequence[int] = (2, 2, 2),
        stem_pool: int = 1,
    ):
        super().__init__()
        check_int(input_size, "reactnet input_size")  # any size works: convs are padded, pools ceil
        if len(widths) == 0 or len(widths) != len(blocks):
            raise ConfigError(f"reactnet widths {tuple(widths)} and blocks {tuple(blocks)} need one entry per stage")
        channels = check_int(widths[0], "reactnet widths[0]")
        stem = [nn.Conv2d(check_int(in_channels, "reactnet in_channels"), channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(channels)]
        if check_int(stem_pool, "reactnet stem_pool") > 1:
            stem.append(nn.MaxPool2d(stem_pool, ceil_mode=True))
        self.stem = nn.Sequential(*stem)
        layers = []
        for stage, (width, count) in enumerate(zip(widths, blocks)):
            width = check_int(width, f"reactnet widths[{stage}]")
            for index in range(check_int(count, f"reactnet blocks[{stage}]")):
                layers.append(ReActBlock(channels, width, 2 if stage > 0 and index == 0 else 1))
                channels = width
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, check_int(num_classes, "reactnet num_classes"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))
