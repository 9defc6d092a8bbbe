"""Datasets (MNIST, Fashion-MNIST, digits) as tensors and deterministic loaders.

``load_dataset(name, split)`` returns normalised float32 images ``(N, 1, H, W)``
and int64 labels; ``loaders(name, batch_size, seed)`` wraps both splits in
DataLoaders. ``read_idx`` reads the IDX files MNIST ships in.
"""

from .datasets import DatasetInfo, dataset_info, dataset_names, load_dataset
from .idx import read_idx
from .loaders import loaders, make_loader

__all__ = ["DatasetInfo", "dataset_info", "dataset_names", "load_dataset", "loaders", "make_loader", "read_idx"]
