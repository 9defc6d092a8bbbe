"""PNG plots of the cost report and of mixed-precision sweeps (matplotlib Agg canvas, no pyplot state)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .cost import CostReport
from .plots import DPI, PANEL_SIZE


def _figure(panels: int):  # -> (Figure, list of Axes)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(PANEL_SIZE[0] * panels, PANEL_SIZE[1]), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, list(figure.subplots(1, panels, squeeze=False)[0])


def _save(figure: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def plot_cost(report: CostReport, path: str | os.PathLike) -> Path:
    """Bar charts per layer: BOPs, memory (weights, activations) and energy (compute, weight reads,
    activation accesses, stacked), log scales. Returns ``path``."""
    if not report.layers:
        raise ConfigError("plot_cost needs a cost report with at least one layer")
    names = [r.name or "(model)" for r in report.layers]
    x = list(range(len(names)))
    figure, (bops, memory, energy) = _figure(3)
    bops.bar(x, [r.bops for r in report.layers], color="tab:blue")
    bops.set_title("bit-operations (MACs x w bits x a bits)")
    width = 0.4
    memory.bar([i - width / 2 for i in x], [r.weight_bytes for r in report.layers], width, label="weights")
    memory.bar([i + width / 2 for i in x], [r.activation_bytes for r in report.layers], width, label="activations")
    memory.set_title("memory at batch 1 (bytes)")
    memory.legend(fontsize="small")
    bottom = [0.0] * len(x)
    for key, label in (("compute_pj", "compute"), ("weight_pj", "weights (DRAM)"), ("activation_pj", "acts (SRAM)")):
        values = [getattr(r, key) / 1000 for r in report.layers]
        energy.bar(x, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values)]
    energy.set_title(f"energy (nJ), total {report.total()['energy_pj'] / 1000:,.1f} nJ")
    energy.legend(fontsize="small")
    for ax in (bops, memory, energy):
        ax.set_xticks(x, names, rotation=45, ha="right", fontsize="small")
        ax.set_yscale("log")
    return _save(figure, path)


def plot_accuracy_vs_size(
    panels: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]],
    path: str | os.PathLike,
    baselines: Mapping[str, float] | None = None,
) -> Path:
    """Accuracy (%) against size (kB), one panel per title; each panel maps a line label to
    (bytes, accuracy fraction) points. ``baselines[title]`` is drawn dashed (the float accuracy)."""
    if not panels:
        raise ConfigError("plot_accuracy_vs_size needs at least one panel")
    baselines = baselines or {}
    figure, axes = _figure(len(panels))
    for ax, (title, lines) in zip(axes, panels.items()):
        for label, points in lines.items():
            ordered = sorted(points)
            ax.plot([b / 1000 for b, _ in ordered], [100 * a for _, a in ordered], marker="o", label=label)
        if title in baselines:
            ax.axhline(100 * baselines[title], color="gray", linestyle="--", linewidth=1, label="float")
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("size (kB, summary byte rule)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(figure, path)
