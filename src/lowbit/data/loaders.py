"""Batched DataLoaders over in-memory tensors, shuffled deterministically by seed."""

from __future__ import annotations

import os

import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

from ..errors import ConfigError
from .datasets import load_dataset


def _check_positive(value: int | None, what: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")


def split_validation(images: torch.Tensor, labels: torch.Tensor, size: int) -> tuple[tuple, tuple]:
    """((train images, labels), (validation images, labels)): the last ``size`` examples held out."""
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size < len(images):
        raise ConfigError(f"the validation slice must hold from 1 to {len(images) - 1} training examples, "
                          f"got {size!r}")
    return (images[:-size], labels[:-size]), (images[-size:], labels[-size:])


def make_loader(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader yielding ``[images, labels]`` batches sliced from the tensors.

    Whole batches are taken by one tensor index (no per-sample collation). With
    ``shuffle`` each epoch draws a new permutation from a generator seeded with
    ``seed``, so the same seed gives the same batches in the same order.
    """
    _check_positive(batch_size, "batch_size")
    if len(images) != len(labels):
        raise ConfigError(f"images ({len(images)}) and labels ({len(labels)}) differ in length")
    dataset = TensorDataset(images, labels)
    if shuffle:
        order = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    else:
        order = SequentialSampler(dataset)
    return DataLoader(dataset, batch_size=None, sampler=BatchSampler(order, batch_size, drop_last))


def loaders(
    name: str,
    batch_size: int,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    test_batch_size: int | None = None,
) -> tuple[DataLoader, DataLoader]:
    """Train and test loaders of dataset ``name`` (see :func:`load_dataset`).

    The train loader is shuffled by ``seed``; the test loader keeps the file
    order. ``limit`` keeps the first ``limit`` examples of each split (for quick
    runs). ``test_batch_size`` defaults to ``batch_size``.
    """
    _check_positive(limit, "limit", allow_none=True)
    _check_positive(test_batch_size, "test_batch_size", allow_none=True)
    splits = []
    for split in ("train", "test"):
        images, labels = load_dataset(name, split, data_dir)
        splits.append((images[:limit], labels[:limit]))
    (train_x, train_y), (test_x, test_y) = splits
    return (
        make_loader(train_x, train_y, batch_size, shuffle=True, seed=seed),
        make_loader(test_x, test_y, test_batch_size or batch_size),
    )
