"""Datasets (MNIST, Fashion-MNIST, digits, CIFAR-10/100, image folders) as tensors and deterministic loaders.

``load_dataset(name, split)`` returns normalised float32 images ``(N, C, H, W)``
and int64 labels; ``loaders(name, batch_size, seed)`` wraps both splits in
DataLoaders. ``read_idx`` reads the IDX files MNIST ships in, ``read_batch``
a CIFAR batch file; ``ImageFolder`` is a folder of images, one sub-folder per
class (``imagefolder:DIR``).
"""

from .cifar import read_batch
from .datasets import DatasetInfo, dataset_info, dataset_names, load_dataset
from .idx import read_idx
from .imagefolder import ImageFolder
from .loaders import loaders, make_loader, split_validation

__all__ = ["DatasetInfo", "ImageFolder", "dataset_info", "dataset_names", "load_dataset", "loaders", "make_loader",
           "read_batch", "read_idx", "split_validation"]
