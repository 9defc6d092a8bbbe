"""Fashion-MNIST (Xiao, Rasul, Vollgraf 2017): 60,000 / 10,000 clothing images, 28x28 uint8.

Sources, in order: ``data_dir`` (a directory of the standard IDX files, only
it is searched), ``$LOWBIT_DATA/fashion-mnist``, and
``/usr/share/datasets/fashion-mnist`` where Debian's package installs them
(``apt-get install dataset-fashion-mnist``). Nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import DataError
from .sources import idx_file_list, read_idx_from_dirs

FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_INSTALL = "apt-get install dataset-fashion-mnist"


def fashion_mnist_arrays(split: str, data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` ("train" or "test") as uint8 images ``(N, 28, 28)`` and uint8 labels ``(N,)``."""
    arrays, looked = read_idx_from_dirs("fashion-mnist", split, data_dir, (FASHION_SYSTEM_DIR,))
    if arrays is not None:
        return arrays
    raise DataError(
        f"Fashion-MNIST not found (looked in {', '.join(looked)}). Install it with `{FASHION_INSTALL}` "
        f"(files in {FASHION_SYSTEM_DIR}), or pass data_dir (--data-dir) a directory holding "
        f"{idx_file_list(split)}, or set LOWBIT_DATA to a directory whose fashion-mnist/ subdirectory holds them."
    )
