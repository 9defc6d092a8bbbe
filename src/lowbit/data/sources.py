"""Where dataset files are looked for: explicit directories, LOWBIT_DATA, the cache.

- ``data_dir`` passed by the caller (``--data-dir`` on the command line): a
  directory holding the dataset's IDX files; nothing else is searched then.
- ``$LOWBIT_DATA/<dataset>/`` (for example ``$LOWBIT_DATA/mnist``).
- system directories a package installs (``/usr/share/datasets/fashion-mnist``).
- ``$LOWBIT_CACHE`` (default ``$XDG_CACHE_HOME/lowbit``, else ``~/.cache/lowbit``)
  holds arrays lowbit converted once from a slower source.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .idx import IDX_FILES, has_idx_split, read_idx_split

DATA_ENV = "LOWBIT_DATA"
CACHE_ENV = "LOWBIT_CACHE"


def env_data_dir(dataset: str) -> Path | None:
    """``$LOWBIT_DATA/<dataset>`` when LOWBIT_DATA is set, else None."""
    root = os.environ.get(DATA_ENV)
    return Path(root) / dataset if root else None


def cache_dir() -> Path:
    """The directory for converted arrays: LOWBIT_CACHE, XDG_CACHE_HOME/lowbit or ~/.cache/lowbit."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lowbit"


def idx_file_list(split: str) -> str:
    """The file names of a split, for messages."""
    return ", ".join(f"{stem}[.gz]" for stem in IDX_FILES[split])


def read_idx_from_dirs(
    dataset: str, split: str, data_dir: str | os.PathLike | None, system_dirs: Sequence[Path] = ()
) -> tuple[tuple[np.ndarray, np.ndarray] | None, list[str]]:
    """Read a split from the first directory that holds its IDX files.

    With ``data_dir`` only that directory counts (DataError when it lacks a
    file); otherwise ``$LOWBIT_DATA/<dataset>`` then ``system_dirs``. Returns
    the arrays (or None) and the places looked in, for the caller's message.
    """
    if data_dir is not None:
        return read_idx_split(data_dir, split), [str(data_dir)]
    looked = []
    for directory in (env_data_dir(dataset), *system_dirs):
        if directory is None:
            continue
        looked.append(str(directory))
        if has_idx_split(directory, split):
            return read_idx_split(directory, split), looked
    if env_data_dir(dataset) is None:
        looked.append(f"${DATA_ENV}/{dataset} (not set)")
    return None, looked
