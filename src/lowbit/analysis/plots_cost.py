"""PNG plots of the cost report, of bit allocations and of mixed-precision sweeps (matplotlib Agg canvas, no pyplot
state)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .allocate import Allocation
from .cost import CostReport
from .sensitivity import SensitivityTable
from .plots import DPI, PANEL_SIZE, save_figure


def _figure(panels: int, rows: int = 1):  # -> (Figure, list of Axes, row by row)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(PANEL_SIZE[0] * panels, PANEL_SIZE[1] * rows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, [ax for row in figure.subplots(rows, panels, squeeze=False) for ax in row]


def plot_cost(report: CostReport, path: str | os.PathLike) -> Path:
    """Bar charts per layer: BOPs, memory (weights, activations) and energy (compute, weight reads,
    activation accesses, stacked), log scales. Returns the file written (``plots.plot_file``)."""
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
    return save_figure(figure, path)


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
    return save_figure(figure, path)


def allocation_figure(chosen: Sequence[tuple[SensitivityTable, Allocation]], titles: Sequence[str] = ()) -> Any:
    """The figure of :func:`plot_allocation`: per (table, allocation) a row of two panels, the chosen bits
    per layer (bars, labelled with the layer's share of the allocated bytes) and each layer's predicted cost
    against bits (the allocator's isotonic, clipped costs; symlog scale), the chosen widths circled.
    ``titles[i]``, when given, heads row i's panel titles."""
    if not chosen:
        raise ConfigError("plot_allocation needs at least one (table, allocation) pair")
    if titles and len(titles) != len(chosen):
        raise ConfigError(f"plot_allocation got {len(titles)} titles for {len(chosen)} allocations")
    figure, axes = _figure(2, len(chosen))
    heads = [f"{title}: " for title in titles] or [""] * len(chosen)
    for (table, allocation), head, bars, costs in zip(chosen, heads, axes[0::2], axes[1::2]):
        names = list(allocation.bits)
        sizes = [table.row(n, b).bytes for n, b in allocation.bits.items()]
        x = list(range(len(names)))
        drawn = bars.bar(x, [allocation.bits[n] for n in names], color="tab:blue")
        bars.bar_label(drawn, [f"{100 * size / max(1, sum(sizes)):.0f}%" for size in sizes], fontsize="small")
        what = "weight" if allocation.role == "weight" else "input"
        bars.set_title(f"{head}{what} bits per layer ({allocation.predicted_bytes:,} B)", fontsize="medium")
        bars.set_xticks(x, names, rotation=45, ha="right", fontsize="small")
        bars.set_ylabel("bits (label: share of the layers' bytes)")
        bars.set_ylim(0, max(table.bits) + 1)
        positive = [c for n in names for c in table.costs(n, allocation.objective).values() if c > 0]
        for name in names:
            curve = table.costs(name, allocation.objective)
            line, = costs.plot(list(curve), list(curve.values()), marker=".", label=name)
            b = allocation.bits[name]
            costs.plot([b], [curve[b]], marker="o", markersize=10, fillstyle="none", color=line.get_color())
        costs.set_yscale("symlog", linthresh=min(positive, default=1.0))
        costs.set_title(f"{head}predicted {allocation.objective} (circled: chosen)", fontsize="medium")
        costs.set_xlabel("bits")
        costs.legend(fontsize="small")
        costs.grid(alpha=0.3)
    return figure


def plot_allocation(chosen: Sequence[tuple[SensitivityTable, Allocation]], path: str | os.PathLike,
                    titles: Sequence[str] = ()) -> Path:
    """PNG of :func:`allocation_figure` (``lowbit allocate --plot``). Returns the file written."""
    return save_figure(allocation_figure(chosen, titles), path)
