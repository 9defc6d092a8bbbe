"""Reference networks, by name, as plain float torch modules.

``lowbit.quantize`` converts their Linear and Conv2d layers; nothing here
quantizes. See :func:`get_model` and :func:`model_names`.
"""

from .binary_nets import SmallCNN
from .bnn_mlp import BNNMLP
from .lenet import LeNet5, LeNet300
from .reactnet import ReActBlock, ReActNetSmall
from .registry import get_model, model_names, training_defaults
from .resnet import BasicBlock, ResNetSmall
from .vgg import VGGSmall

__all__ = ["BNNMLP", "BasicBlock", "LeNet300", "LeNet5", "ReActBlock", "ReActNetSmall", "ResNetSmall", "SmallCNN",
           "VGGSmall", "get_model", "model_names", "training_defaults"]
