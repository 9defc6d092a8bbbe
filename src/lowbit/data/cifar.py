"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009) in their standard "python version" batch files.

The archives from https://www.cs.toronto.edu/~kriz/cifar.html unpack to

- ``cifar-10-batches-py/``: ``data_batch_1`` .. ``data_batch_5`` (train, 50,000
  images) and ``test_batch`` (10,000), labels 0..9 under ``b"labels"``;
- ``cifar-100-python/``: ``train`` (50,000) and ``test`` (10,000), labels 0..99
  under ``b"fine_labels"`` (the 20 coarse labels are not used).

Each file is a pickled dict (written by Python 2, so it is read with
``encoding="bytes"`` and its keys are bytes) whose ``b"data"`` is a numpy
uint8 array ``(N, 3072)``: per image 1024 red, then 1024 green, then 1024 blue
values, each a 32x32 plane in row-major order. Since the format is a pickle,
the files are read with :class:`_BatchUnpickler`, which builds dicts, lists,
bytes, strings, numbers and numpy arrays and refuses every other global.

Sources, in order: ``data_dir`` (``--data-dir``: the folder holding the batch
files, or the folder the archive was unpacked in; only it is searched), then
``$LOWBIT_DATA/cifar10`` / ``$LOWBIT_DATA/cifar100`` (the same two layouts).
Nothing is downloaded.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .sources import DATA_ENV, env_data_dir

try:  # numpy >= 2 (and 1.26) name the module numpy._core
    from numpy._core.multiarray import _reconstruct
    from numpy._core.numeric import _frombuffer
except ImportError:  # pragma: no cover - older numpy
    from numpy.core.multiarray import _reconstruct
    from numpy.core.numeric import _frombuffer

CIFAR_SIZE = 32
CIFAR_PIXELS = 3 * CIFAR_SIZE * CIFAR_SIZE  # 3072 values per image
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


@dataclass(frozen=True)
class _Layout:
    """Where one CIFAR variant's batches live and what their labels are called."""

    folder: str  # the folder the archive unpacks to
    files: dict[str, tuple[str, ...]]  # per split, its batch files
    label_key: bytes
    classes: int
    archive: str


LAYOUTS = {
    "cifar10": _Layout("cifar-10-batches-py",
                       {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
                       b"labels", 10, "cifar-10-python.tar.gz"),
    "cifar100": _Layout("cifar-100-python", {"train": ("train",), "test": ("test",)}, b"fine_labels", 100,
                        "cifar-100-python.tar.gz"),
}

#: the only globals a batch file may name: numpy's array reconstruction (the module is
#: numpy.core in files written by numpy 1, numpy._core since numpy 2; _frombuffer is what
#: pickle protocol 5 uses)
_ARRAY_GLOBALS = {
    (module, name): function
    for name, function, modules in (
        ("_reconstruct", _reconstruct, ("numpy.core.multiarray", "numpy._core.multiarray")),
        ("_frombuffer", _frombuffer, ("numpy.core.numeric", "numpy._core.numeric")),
    )
    for module in modules
} | {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler for CIFAR batch files: dicts, lists, tuples, bytes, str, numbers and numpy arrays only.

    Those containers and scalars need no global; the only globals it admits are
    numpy's array reconstruction functions (``_reconstruct``, ``ndarray``,
    ``dtype`` and protocol 5's ``_frombuffer``), listed in ``_ARRAY_GLOBALS``.
    Any other global (a function call, a class, ``_codecs.encode``, ...) is an
    ``UnpicklingError``, so a file cannot run code while it is read.
    """

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ARRAY_GLOBALS.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed (only numpy array reconstruction)")
        return allowed


def _entry(batch: dict, key: bytes) -> Any:
    """``batch[key]``, or its str twin in files re-pickled by Python 3; None when absent."""
    if key in batch:
        return batch[key]
    return batch.get(key.decode("ascii"))


def read_batch(
    path: str | os.PathLike, label_key: bytes = b"labels", classes: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR batch file as uint8 images ``(N, 3, 32, 32)`` and uint8 labels ``(N,)``.

    Raises DataError naming the file when it is missing, cannot be unpickled
    (corrupt, truncated, or naming a global other than numpy's array
    reconstruction), or does not hold ``b"data"`` uint8 ``(N, 3072)`` and N
    labels ``label_key`` in ``0..classes - 1``.
    """
    path = Path(path)
    try:
        with open(path, "rb") as stream:
            batch = _BatchUnpickler(stream, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"CIFAR batch file {path} does not exist") from None
    except (pickle.UnpicklingError, OSError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError,
            OverflowError, MemoryError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read CIFAR batch file {path}: {exc or type(exc).__name__}") from None
    if not isinstance(batch, dict):
        raise DataError(f"CIFAR batch file {path} holds a {type(batch).__name__}, not a dict")
    data, labels = _entry(batch, b"data"), _entry(batch, label_key)
    if data is None or labels is None:
        raise DataError(f"CIFAR batch file {path} lacks b'data' or {label_key!r}")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == CIFAR_PIXELS):
        described = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"CIFAR batch file {path}: b'data' is {described}; expected uint8 (N, {CIFAR_PIXELS})")
    try:
        labels = np.asarray(labels)
    except (ValueError, TypeError):
        labels = np.asarray([None])
    if labels.shape != (len(data),) or (labels.size and labels.dtype.kind not in "iu"):
        raise DataError(f"CIFAR batch file {path}: {label_key!r} must be {len(data)} integer labels, one per image")
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise DataError(f"CIFAR batch file {path}: labels outside 0..{classes - 1} "
                        f"(from {labels.min()} to {labels.max()})")
    images = np.ascontiguousarray(data).reshape(len(data), 3, CIFAR_SIZE, CIFAR_SIZE)
    return images, labels.astype(np.uint8)


def _batch_folder(directory: Path, layout: _Layout, split: str) -> Path | None:
    """``directory`` or its archive sub-folder, whichever holds the split's first file."""
    for candidate in (directory, directory / layout.folder):
        if (candidate / layout.files[split][0]).is_file():
            return candidate
    return None


def cifar_arrays(name: str, split: str, data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR ``name`` ("cifar10" or "cifar100") ``split`` as uint8 images ``(N, 3, 32, 32)`` and labels ``(N,)``."""
    layout = LAYOUTS[name]
    places = [Path(data_dir)] if data_dir is not None else [p for p in (env_data_dir(name),) if p is not None]
    for place in places:
        folder = _batch_folder(place, layout, split)
        if folder is not None:
            parts = [read_batch(folder / file, layout.label_key, layout.classes) for file in layout.files[split]]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    looked = ", ".join(str(p) for p in places) if places else f"${DATA_ENV}/{name} (not set)"
    if data_dir is not None and not Path(data_dir).is_dir():
        looked = f"{data_dir} (not a folder)"
    raise DataError(
        f"{name} {split} batches not found (looked in {looked}). Unpack {layout.archive} from {CIFAR_URL} and pass "
        f"--data-dir the {layout.folder} folder (or the folder holding it), or set {DATA_ENV} to a directory whose "
        f"{name}/ subdirectory holds it; the {split} split needs {', '.join(layout.files[split])}."
    )


def cifar10_arrays(split: str, data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 ``split``: see :func:`cifar_arrays`."""
    return cifar_arrays("cifar10", split, data_dir)


def cifar100_arrays(split: str, data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-100 ``split`` (fine labels): see :func:`cifar_arrays`."""
    return cifar_arrays("cifar100", split, data_dir)
