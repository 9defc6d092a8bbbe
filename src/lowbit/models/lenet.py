"""The LeNets of Deep Compression (Han, Mao, Dally, ICLR 2016), as in Caffe's examples.

Layer names follow Caffe (``ip1`` ... for inner-product layers) so results
can be compared with the paper's per-layer tables.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from ..errors import ConfigError
from .common import check_int


class LeNet300(nn.Sequential):
    """LeNet-300-100: flatten, ip1 (-> 300), ReLU, ip2 (-> 100), ReLU, ip3 (-> classes).

    784-300-100-10 on MNIST: 266,610 parameters. Any input size works (the
    image is flattened to ``in_channels * input_size**2`` features).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 28):
        in_features = check_int(in_channels, "lenet300 in_channels") * check_int(input_size, "lenet300 input_size") ** 2
        super().__init__(
            OrderedDict(
                flatten=nn.Flatten(),
                ip1=nn.Linear(in_features, 300),
                relu1=nn.ReLU(),
                ip2=nn.Linear(300, 100),
                relu2=nn.ReLU(),
                ip3=nn.Linear(100, check_int(num_classes, "lenet300 num_classes")),
            )
        )


class LeNet5(nn.Sequential):
    """Caffe's LeNet-5: conv1 (20 5x5), maxpool 2, conv2 (50 5x5), maxpool 2, ip1 (-> 500), ReLU, ip2.

    As in Caffe there is no activation after the convolutions. 431,080
    parameters on 28x28 MNIST. Needs ``input_size >= 16`` (two valid 5x5
    convolutions and two 2x2 pools), so 8x8 digits do not fit.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 28):
        size = check_int(input_size, "lenet5 input_size")
        if size < 16:
            raise ConfigError(f"lenet5 needs input_size >= 16 (two 5x5 convs and two 2x2 pools), got {size}")
        side = ((size - 4) // 2 - 4) // 2
        super().__init__(
            OrderedDict(
                conv1=nn.Conv2d(check_int(in_channels, "lenet5 in_channels"), 20, kernel_size=5),
                pool1=nn.MaxPool2d(2),
                conv2=nn.Conv2d(20, 50, kernel_size=5),
                pool2=nn.MaxPool2d(2),
                flatten=nn.Flatten(),
                ip1=nn.Linear(50 * side * side, 500),
                relu1=nn.ReLU(),
                ip2=nn.Linear(500, check_int(num_classes, "lenet5 num_classes")),
            )
        )
