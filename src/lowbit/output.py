"""What a subcommand gives back (:class:`Output`) and where it may write (:func:`output_path`): below the
command modules (``lowbit.cli``, ``analysis/allocate_command.py``, ``export/export_command.py``), which all
import them from here."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError


@dataclass
class Output:
    """What a subcommand prints: ``text`` for people, ``data`` (JSON-able) for ``--json``."""

    text: str
    data: dict[str, Any]


def output_path(path: str, option: str, *, directory: bool = False, plot_name: str | None = None) -> Path:
    """The path ``option`` names for writing, checked before any work starts (ConfigError naming it otherwise).

    It must not be empty, lie under a regular file or in a folder this process cannot write (missing
    folders are created when it is written). A file output must not be a directory, except a plot
    (``plot_name`` given): a plot into a directory is written there as ``plot_name``, and one without a
    suffix gets ``.png``. A ``directory`` output must not be a file.
    """
    if not path.strip():
        raise ConfigError(f"{option} is empty; give a {'directory' if directory else 'file'} path")
    target = Path(path)
    names_folder = target.is_dir() or path.endswith(("/", os.sep))
    if plot_name is not None and names_folder:
        target, names_folder = target / plot_name, False
    if directory and target.exists() and not target.is_dir():
        raise ConfigError(f"{option} {path!r} is a file; give a directory")
    if not directory and names_folder:
        raise ConfigError(f"{option} {path!r} is a directory; give a file path")
    folder = target.absolute() if directory and target.exists() else target.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"{option} {path!r} lies under {str(folder)!r}, which is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path!r}: folder {str(folder)!r} is not writable (permission denied)")
    if plot_name is not None:
        from .analysis.plots import plot_file

        target = plot_file(target)
    return target
