"""The MNIST MLP of Binarized Neural Networks (Hubara, Courbariaux et al. 2016, arXiv:1602.02830).

Each of ``depth`` hidden layers is Linear -> BatchNorm1d -> hardtanh, and the
output layer is Linear -> BatchNorm1d (the paper keeps BN after the last
layer). The paper uses 3 hidden layers of 4096 units; the default width here
is 1024 so that it trains on a CPU in minutes. Dropout as in the paper's
Theano code: 0.2 on the input, 0.5 after each hidden activation (0 drops the
layer). BN epsilon 1e-4 as in that code. The network is float: a binary
recipe replaces the Linear layers' weights and the hardtanh activations with
binary quantizers; the first layer's input stays real (pixels).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .common import check_int, check_probability

BN_EPS = 1e-4


class BNNMLP(nn.Sequential):
    """flatten, [drop0], then for i in 1..depth: fc{i}, bn{i}, act{i}, [drop{i}]; then fc{depth+1}, bn{depth+1}."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        input_size: int = 28,
        width: int = 1024,
        depth: int = 3,
        input_dropout: float = 0.2,
        hidden_dropout: float = 0.5,
    ):
        features = check_int(in_channels, "bnn-mlp in_channels") * check_int(input_size, "bnn-mlp input_size") ** 2
        width, depth = check_int(width, "bnn-mlp width"), check_int(depth, "bnn-mlp depth")
        num_classes = check_int(num_classes, "bnn-mlp num_classes")
        input_dropout = check_probability(input_dropout, "bnn-mlp input_dropout")
        hidden_dropout = check_probability(hidden_dropout, "bnn-mlp hidden_dropout")
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        if input_dropout:
            layers["drop0"] = nn.Dropout(input_dropout)
        for i in range(1, depth + 1):
            layers[f"fc{i}"] = nn.Linear(features, width)
            layers[f"bn{i}"] = nn.BatchNorm1d(width, eps=BN_EPS)
            layers[f"act{i}"] = nn.Hardtanh()
            if hidden_dropout:
                layers[f"drop{i}"] = nn.Dropout(hidden_dropout)
            features = width
        layers[f"fc{depth + 1}"] = nn.Linear(features, num_classes)
        layers[f"bn{depth + 1}"] = nn.BatchNorm1d(num_classes, eps=BN_EPS)
        super().__init__(layers)
