"""Datasets by name, as normalised float32 image tensors and int64 labels.

Every image is scaled to [0, 1] (MNIST and Fashion-MNIST: ``pixel / 255``;
digits: ``pixel / 16``) and then normalised, ``x = (x01 - mean) / std``, with
the mean and standard deviation of the training split:

============== ====== ====== =============
name           mean   std    images
============== ====== ====== =============
mnist          0.1307 0.3081 (N, 1, 28, 28)
fashion-mnist  0.2860 0.3530 (N, 1, 28, 28)
digits         0.3054 0.3761 (N, 1, 8, 8)
============== ====== ====== =============
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .digits import digits_arrays
from .fashion import fashion_mnist_arrays
from .mnist import mnist_arrays

SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset, and how its pixels are scaled."""

    name: str
    in_channels: int
    input_size: int
    num_classes: int
    pixel_max: float  # raw pixel value that maps to 1.0
    mean: float
    std: float


_DATASETS: dict[str, tuple[DatasetInfo, Callable[..., tuple[np.ndarray, np.ndarray]]]] = {
    "mnist": (DatasetInfo("mnist", 1, 28, 10, 255.0, 0.1307, 0.3081), mnist_arrays),
    "fashion-mnist": (DatasetInfo("fashion-mnist", 1, 28, 10, 255.0, 0.2860, 0.3530), fashion_mnist_arrays),
    "digits": (DatasetInfo("digits", 1, 8, 10, 16.0, 0.3054, 0.3761), digits_arrays),
}


def dataset_names() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return sorted(_DATASETS)


def dataset_info(name: str) -> DatasetInfo:
    """Shape, classes and normalisation of dataset ``name``."""
    if name not in _DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; known datasets: {', '.join(dataset_names())}")
    return _DATASETS[name][0]


def load_dataset(
    name: str, split: str = "train", data_dir: str | os.PathLike | None = None, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load ``split`` ("train" or "test") of dataset ``name``.

    Returns ``(images, labels)``: float32 ``(N, 1, H, W)``, normalised as in
    the table above (``normalize=False``: scaled to [0, 1] only), and int64
    ``(N,)``. ``data_dir`` is a directory of IDX files for mnist and
    fashion-mnist (see :mod:`lowbit.data.mnist`); digits takes none.
    """
    info = dataset_info(name)
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r} of dataset {name!r}; valid splits: {', '.join(SPLITS)}")
    read = _DATASETS[name][1]
    if name == "digits":
        if data_dir is not None:
            raise ConfigError("dataset 'digits' ships with scikit-learn and takes no data_dir")
        pixels, labels = read(split)
    else:
        pixels, labels = read(split, data_dir)
    if labels.size and labels.max() >= info.num_classes:
        raise DataError(f"{name} {split} labels reach {labels.max()}; expected 0..{info.num_classes - 1}")
    images = torch.from_numpy(pixels).to(torch.float32).div_(info.pixel_max).unsqueeze(1)
    if normalize:
        images.sub_(info.mean).div_(info.std)
    return images, torch.from_numpy(labels).to(torch.int64)
