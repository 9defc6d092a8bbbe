"""A LeNet-5-sized CNN in XNOR-Net's block order, for binary and low-bit training.

XNOR-Net (Rastegari et al., ECCV 2016, section 3.3) puts batch norm and the
binary activation *before* each binary convolution: BN -> BinActiv -> BinConv
-> pool. ``SmallCNN`` follows that order for every layer after the first, with
a ReLU after the convolution as in the authors' LeNet-5 for MNIST::

    conv1 -> bn1 -> act1 -> pool1                    (first layer: real input)
    bn2 -> conv2 -> act2 -> pool2 -> flatten
    bn3 -> ip1 -> act3
    bn4 -> ip2                                        (logits)

The network is float; a recipe's quantizers supply BinActiv as the input
quantizer of conv2 / ip1 / ip2. Because a batch norm precedes each of those
layers, a sign on its input is never constant (a sign straight after a ReLU
would always be +1). Default sizes are Caffe's LeNet-5 (20 and 50 5x5 filters,
500 hidden units); ``channels`` and ``hidden`` widen it. Needs ``input_size >=
16`` (two valid 5x5 convolutions and two 2x2 pools).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from torch import nn

from ..errors import ConfigError
from .common import check_int


class SmallCNN(nn.Sequential):
    """LeNet-5 sizes, XNOR-Net block order (BN -> [BinActiv] -> conv -> ReLU -> pool); see the module doc."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        input_size: int = 28,
        channels: Sequence[int] = (20, 50),
        hidden: int = 500,
    ):
        size = check_int(input_size, "small-cnn input_size")
        if size < 16:
            raise ConfigError(f"small-cnn needs input_size >= 16 (two 5x5 convs and two 2x2 pools), got {size}")
        if len(channels) != 2:
            raise ConfigError(f"small-cnn channels must hold two widths (conv1, conv2), got {tuple(channels)}")
        c1, c2 = (check_int(c, "small-cnn channels entry") for c in channels)
        hidden = check_int(hidden, "small-cnn hidden")
        side = ((size - 4) // 2 - 4) // 2
        super().__init__(
            OrderedDict(
                conv1=nn.Conv2d(check_int(in_channels, "small-cnn in_channels"), c1, kernel_size=5),
                bn1=nn.BatchNorm2d(c1),
                act1=nn.ReLU(),
                pool1=nn.MaxPool2d(2),
                bn2=nn.BatchNorm2d(c1),
                conv2=nn.Conv2d(c1, c2, kernel_size=5),
                act2=nn.ReLU(),
                pool2=nn.MaxPool2d(2),
                flatten=nn.Flatten(),
                bn3=nn.BatchNorm1d(c2 * side * side),
                ip1=nn.Linear(c2 * side * side, hidden),
                act3=nn.ReLU(),
                bn4=nn.BatchNorm1d(hidden),
                ip2=nn.Linear(hidden, check_int(num_classes, "small-cnn num_classes")),
            )
        )
