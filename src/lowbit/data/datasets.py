"""Datasets by name, as normalised float32 image tensors and int64 labels.

Every image is scaled to [0, 1] (MNIST, Fashion-MNIST, CIFAR: ``pixel / 255``;
digits: ``pixel / 16``) and then normalised, ``x = (x01 - mean) / std``, with
the mean and standard deviation of the training split (per channel for
CIFAR, in R, G, B order):

============== ======================== ======================== ==============
name           mean                     std                      images
============== ======================== ======================== ==============
mnist          0.1307                   0.3081                   (N, 1, 28, 28)
fashion-mnist  0.2860                   0.3530                   (N, 1, 28, 28)
digits         0.3054                   0.3761                   (N, 1, 8, 8)
cifar10        0.4914, 0.4822, 0.4465   0.2470, 0.2435, 0.2616   (N, 3, 32, 32)
cifar100       0.5071, 0.4865, 0.4409   0.2673, 0.2564, 0.2762   (N, 3, 32, 32)
============== ======================== ======================== ==============

A folder of images, ``imagefolder:DIR`` or an
:class:`~lowbit.data.imagefolder.ImageFolder` (its own transforms and
normalisation), is accepted wherever a name is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Union

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .cifar import cifar10_arrays, cifar100_arrays
from .digits import digits_arrays
from .fashion import fashion_mnist_arrays
from .imagefolder import IMAGEFOLDER_PREFIX, ImageFolder, image_folder
from .mnist import mnist_arrays

SPLITS = ("train", "test")

#: a dataset: a registered name, ``imagefolder:DIR`` or an ImageFolder
Data = Union[str, ImageFolder]
#: which examples to load: called with the split's size, it returns their indices (or a slice)
Select = Callable[[int], "torch.Tensor | np.ndarray | slice | list[int]"]


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset, and how its pixels are scaled."""

    name: str
    in_channels: int
    input_size: int  # the height, and the width unless input_width says otherwise
    num_classes: int
    pixel_max: float  # raw pixel value that maps to 1.0
    mean: float | tuple[float, ...]  # one value, or one per channel
    std: float | tuple[float, ...]
    input_width: int | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One example's shape, ``(channels, height, width)``."""
        width = self.input_size if self.input_width is None else self.input_width
        return (self.in_channels, self.input_size, width)


_DATASETS: dict[str, tuple[DatasetInfo, Callable[..., tuple[np.ndarray, np.ndarray]]]] = {
    "mnist": (DatasetInfo("mnist", 1, 28, 10, 255.0, 0.1307, 0.3081), mnist_arrays),
    "fashion-mnist": (DatasetInfo("fashion-mnist", 1, 28, 10, 255.0, 0.2860, 0.3530), fashion_mnist_arrays),
    "digits": (DatasetInfo("digits", 1, 8, 10, 16.0, 0.3054, 0.3761), digits_arrays),
    "cifar10": (DatasetInfo("cifar10", 3, 32, 10, 255.0, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
                cifar10_arrays),
    "cifar100": (DatasetInfo("cifar100", 3, 32, 100, 255.0, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
                 cifar100_arrays),
}


def dataset_names() -> list[str]:
    """Names accepted by :func:`load_dataset` (besides ``imagefolder:DIR``)."""
    return sorted(_DATASETS)


def dataset_info(name: Data) -> DatasetInfo:
    """Shape, classes and normalisation of dataset ``name`` (an image folder's classes are listed)."""
    folder = image_folder(name)
    if folder is not None:
        mean, std = folder.normalization
        return DatasetInfo(folder.name, folder.channels, folder.size[0], folder.num_classes(), 255.0, mean, std,
                           input_width=folder.size[1])
    if name not in _DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; known datasets: {', '.join(dataset_names())}, "
                          f"or {IMAGEFOLDER_PREFIX}DIR (a folder of images, one sub-folder per class)")
    return _DATASETS[name][0]


def selected(select: Select | None, count: int) -> np.ndarray | slice:
    """The indices ``select`` picks among ``count`` examples (all when None), checked to lie in range."""
    if select is None:
        return slice(None)
    chosen = select(count)
    if isinstance(chosen, slice):
        return chosen
    chosen = np.asarray(chosen.numpy() if isinstance(chosen, torch.Tensor) else chosen, dtype=np.int64).reshape(-1)
    if chosen.size and (chosen.min() < 0 or chosen.max() >= count):
        raise ConfigError(f"the selected examples must lie in 0..{count - 1}")
    return chosen


def load_dataset(
    name: Data,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    normalize: bool = True,
    *,
    select: Select | None = None,
    progress: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load ``split`` ("train" or "test") of dataset ``name``.

    Returns ``(images, labels)``: float32 ``(N, C, H, W)``, normalised as in
    the table above (``normalize=False``: scaled to [0, 1] only), and int64
    ``(N,)``. ``data_dir`` is a directory of IDX files for mnist and
    fashion-mnist (see :mod:`lowbit.data.mnist`) or of batch files for
    cifar10 / cifar100 (:mod:`lowbit.data.cifar`); digits and image folders
    take none. ``select`` (called with the split's size) picks the examples
    to return, in its order, before any conversion, so an image folder
    decodes only those; ``progress`` shows a bar while images are decoded
    (None: when stderr is a terminal).
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r} of dataset {str(name)!r}; valid splits: {', '.join(SPLITS)}")
    folder = image_folder(name)
    if folder is not None:
        if data_dir is not None:
            raise ConfigError(f"{folder.name} names its own folder and takes no data_dir (--data-dir)")
        info = dataset_info(folder)
        samples = folder.samples(split)
        picked = np.arange(len(samples))[selected(select, len(samples))]
        pixels = folder.read([samples[i][0] for i in picked], progress, desc=f"{split} images")
        labels = np.array([samples[i][1] for i in picked], dtype=np.int64)
    else:
        info = dataset_info(name)
        read = _DATASETS[name][1]
        if name == "digits":
            if data_dir is not None:
                raise ConfigError("dataset 'digits' ships with scikit-learn and takes no data_dir")
            pixels, labels = read(split)
        else:
            pixels, labels = read(split, data_dir)
        if labels.size and labels.max() >= info.num_classes:
            raise DataError(f"{name} {split} labels reach {labels.max()}; expected 0..{info.num_classes - 1}")
        chosen = selected(select, len(labels))
        pixels, labels = pixels[chosen], labels[chosen]
    images = torch.from_numpy(np.ascontiguousarray(pixels)).to(torch.float32).div_(info.pixel_max)
    if images.dim() == 3:  # (N, H, W): one channel
        images = images.unsqueeze(1)
    if normalize:
        mean, std = (torch.tensor(v, dtype=torch.float32).reshape(1, -1, 1, 1) if isinstance(v, tuple) else v
                     for v in (info.mean, info.std))
        images.sub_(mean).div_(std)
    return images, torch.from_numpy(np.asarray(labels)).to(torch.int64)
