"""The evaluation figures: a metric against perturbation strength, one panel per perturbation."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import TYPE_CHECKING

from deeploc.evaluation.perturbations import Perturbation
from deeploc.metrics import metric_label

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LEGEND_WIDTH = 40  # characters per legend line


def root_name(root: str) -> str:
    """How a caption names a data root: its folder name, never the machine path (``/home/me/wacv_data/data`` ->
    ``wacv_data/data``: Dolos' ``data`` folder keeps its parent's name, which says which dataset it is)."""
    path = PurePath(root)
    return f"{path.parent.name}/{path.name}" if path.name == "data" and path.parent.name else path.name or root


@dataclass(frozen=True)
class Line:
    """One line of a strength plot: its legend label, the key that picks its colour, its style, and per
    perturbation name its values (clean first, then mildest to harshest; None = not measured)."""

    label: str
    colour: str
    style: str
    values: dict[str, list[float | None]]
    width: float = 1.5  # wider marks the line to notice (a run's in-domain subset)


def strength_panels(
    groups: Mapping[str, list[Perturbation]], lines: Sequence[Line], metric: str, caption: str
) -> Figure:
    """One panel per perturbation: strength on x (``clean`` first, then mildest to harshest), ``metric`` on y."""
    import matplotlib

    from deeploc.visualize import add_caption, new_figure

    colours = {
        key: matplotlib.colormaps["tab10"](i % 10) for i, key in enumerate(dict.fromkeys(line.colour for line in lines))
    }
    fig = new_figure(3.0 + 3.2 * len(groups), 3.8)
    # One panel per perturbation sharing the y axis, and a last, empty one holding the legend.
    *axes, legend_ax = fig.subplots(1, len(groups) + 1, sharey=True, width_ratios=[*[1.0] * len(groups), 0.8])
    top = 0.0
    for ax, (name, group) in zip(axes, groups.items()):
        ticks = ["clean", *(f"{p.strength:g}" for p in group)]
        for line in lines:
            values = [float("nan") if v is None else v for v in line.values[name]]
            ax.plot(
                range(len(ticks)),
                values,
                line.style,
                marker="o",
                color=colours[line.colour],
                label=line.label,
                linewidth=line.width,
            )
            top = max([top, *(v for v in values if v == v)])
        ax.set_xticks(range(len(ticks)), labels=ticks)
        ax.set_xlabel(group[0].spec.label)
        ax.grid(alpha=0.3)
        ax.set_title(name)
    axes[0].set_ylim(0, min(100.0, 1.15 * top + 1.0))
    axes[0].set_ylabel(f"{metric_label(metric)} (%)")
    legend_ax.axis("off")
    handles, labels = axes[0].get_legend_handles_labels()
    # Long configuration labels (the report names each by its differing settings) wrap instead of squeezing the panels.
    labels = [textwrap.fill(label, LEGEND_WIDTH) for label in labels]
    legend_ax.legend(handles, labels, fontsize=7, loc="center left", frameon=False)
    fig.suptitle(f"{metric_label(metric)} under perturbation (clean, then milder to harsher)", fontsize=10)
    add_caption(fig, caption)
    return fig
