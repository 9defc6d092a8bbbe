"""PNG plots of quantization sweeps (matplotlib, Agg canvas: no display, no pyplot global state)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError

PANEL_SIZE = (4.8, 3.6)  # inches per panel
DPI = 90  # keeps a two-panel figure well under 100 KB


def plot_file(path: str | os.PathLike) -> Path:
    """The file a plot of ``path`` goes to: ``path`` itself, with ``.png`` added when it has no suffix.
    ConfigError for a suffix that matplotlib cannot write (the valid ones are listed)."""
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(path)
    if not path.suffix:
        return path.with_name(path.name + ".png")
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise ConfigError(f"plot file {str(path)!r} has an unknown image type {path.suffix!r}; "
                          f"use .png (or {', '.join('.' + name for name in sorted(formats) if name != 'png')})")
    return path


def save_figure(figure: Any, path: str | os.PathLike) -> Path:
    """Write ``figure`` to :func:`plot_file` of ``path`` (missing folders are created); returns that file."""
    path = plot_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def plot_accuracy_vs_bits(
    panels: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | os.PathLike,
    baselines: Mapping[str, float | None] | None = None,
) -> Path:
    """Write a PNG of accuracy (%) against weight bits, one panel per entry of ``panels``.

    Each panel is a title and rows with ``method`` (the line label), ``bits``
    and ``accuracy`` (a fraction). Rows of one method form a line sorted by
    bits; a method with one row is a single marker. ``baselines[title]`` (the
    float accuracy) is drawn as a dashed horizontal line. Returns the file written (:func:`plot_file`).
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not panels:
        raise ConfigError("plot_accuracy_vs_bits needs at least one panel of rows")
    baselines = baselines or {}
    figure = Figure(figsize=(PANEL_SIZE[0] * len(panels), PANEL_SIZE[1]), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, rows) in zip(axes, panels.items()):
        lines: dict[str, list[tuple[int, float]]] = {}
        for row in rows:
            missing = [key for key in ("method", "bits", "accuracy") if key not in row]
            if missing:
                raise ConfigError(f"plot row {dict(row)!r} of panel {title!r} lacks {', '.join(missing)}")
            lines.setdefault(str(row["method"]), []).append((int(row["bits"]), 100.0 * float(row["accuracy"])))
        colors = matplotlib.colormaps["tab10" if len(lines) <= 10 else "tab20"].colors
        for (label, points), color in zip(lines.items(), itertools.cycle(colors)):
            points.sort()
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", color=color, linestyle="-" if len(points) > 1 else "none", label=label)
        if baselines.get(title) is not None:
            ax.axhline(100.0 * float(baselines[title]), color="grey", linestyle="--", label="float")
        ax.set_title(title, fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("weight bits")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(figure, path)
