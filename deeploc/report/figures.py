"""The report's figures: IoU heatmaps with the diagonal outlined, and the ID-vs-OOD bar chart with the study's values
beside ours when comparable. Every figure carries a caption: its legend and what produced the numbers."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from deeploc.report.collect import RunResult, in_family
from deeploc.report.provenance import LOO, caption
from deeploc.report.render import fmt_stat
from deeploc.report.tables import Matrix, SummaryRow
from deeploc.visualize import add_caption, new_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

OUTLINE = "red"


def heatmap_figure(m: Matrix, caption: str) -> Figure:
    """Annotated IoU heatmap of one matrix (mean ± std over seeds); missing cells grey with a dash."""
    import matplotlib
    import numpy as np
    from matplotlib.patches import Rectangle

    n = len(m.subsets)
    cells = [[m.cell(a, b) for b in m.subsets] for a in m.subsets]
    values = np.array([[np.nan if c.mean is None else c.mean for c in row] for row in cells])
    fig = new_figure(3.2 + 1.3 * n, 1.8 + 1.1 * n)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0, vmax=100)
    for i, row in enumerate(cells):
        for j, cell in enumerate(row):
            if cell.mean is None:
                ax.text(j, i, "—", ha="center", va="center", color="black")
                continue
            text = f"{cell.mean:.1f}" + ("" if cell.std is None else f"\n±{cell.std:.1f}")
            ax.text(j, i, text, ha="center", va="center", color="white" if cell.mean < 60 else "black")
    for i in range(n):
        ax.add_patch(Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, edgecolor=OUTLINE, linewidth=2.5))
    ax.set_xticks(range(n), labels=m.subsets, rotation=30, ha="right")
    ax.set_yticks(range(n), labels=m.subsets)
    ax.set_xlabel("test subset")
    ax.set_ylabel("held-out subset" if m.split == LOO else "training subset")
    first, second = ("held-out", "seen") if m.split == LOO else ("ID", "OOD")
    incomplete = "*" if m.missing() else ""
    title = textwrap.fill(f"{m.label}{incomplete}", int(fig.get_size_inches()[0] * 11))
    ax.set_title(f"{title}\n{first} {fmt_stat(m.id_stat())}  {second} {fmt_stat(m.ood_stat())}", fontsize=10)
    fig.colorbar(image, ax=ax, label="IoU (%)")
    add_caption(fig, caption)
    return fig


Interval = tuple[float, float]  # (low, high) of an error bar


def id_ood_figure(
    rows: Sequence[SummaryRow],
    study: Sequence[tuple[float | None, float | None] | None],
    note: str,
    caption: str,
    intervals: Mapping[str, Sequence[Interval | None]] | None = None,
) -> Figure:
    """Grouped bars of ID and OOD IoU per configuration, with the study's values (hatched) beside each row whose
    `study` entry is not None; `note` (drawn in red) says why values are absent.

    Error bars: `intervals` ({"ID": [(low, high) or None per row], "OOD": [...]}, e.g. confidence intervals), else
    mean ± std over seeds. A row without an interval (one seed: no std) gets no error bar at all, never a
    zero-length one that would read as "no spread"; every row's label says its number of seeds (n)."""
    import numpy as np

    x = np.arange(len(rows))
    with_study = any(s is not None for s in study)
    width = 0.2 if with_study else 0.4
    spread = dict(intervals) if intervals is not None else {}
    for which, stats in (("ID", [r.id["iou"] for r in rows]), ("OOD", [r.ood["iou"] for r in rows])):
        if which not in spread:
            spread[which] = [
                None if s.mean is None or s.std is None else (s.mean - s.std, s.mean + s.std) for s in stats
            ]
    series = [
        ("ID", "tab:blue", "", [r.id["iou"].mean for r in rows], spread["ID"]),
        ("OOD", "tab:orange", "", [r.ood["iou"].mean for r in rows], spread["OOD"]),
    ]
    if with_study:
        series.insert(1, ("ID (study)", "tab:blue", "//", [s[0] if s else None for s in study], [None] * len(rows)))
        series.append(("OOD (study)", "tab:orange", "//", [s[1] if s else None for s in study], [None] * len(rows)))
    fig = new_figure(3.0 + (2.0 if with_study else 1.4) * len(rows), 4.8)
    ax = fig.add_subplot()
    for k, (name, colour, hatch, values, bounds) in enumerate(series):
        offset = (k - (len(series) - 1) / 2) * width
        heights = [np.nan if v is None else v for v in values]
        ax.bar(
            x + offset,
            heights,
            width,
            label=name,
            color=colour,
            alpha=0.45 if hatch else 1.0,
            hatch=hatch,
            edgecolor=colour if hatch else None,
        )
        for i, v in enumerate(values):  # the value above its bar, and above its error bar when it has one
            if v is not None:
                top = v if bounds[i] is None else max(v, bounds[i][1])  # type: ignore[index]
                ax.text(x[i] + offset, top + 1.0, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
        drawn = [i for i, (v, b) in enumerate(zip(values, bounds)) if v is not None and b is not None]
        if drawn:
            low = [values[i] - bounds[i][0] for i in drawn]  # type: ignore[index,operator]
            high = [bounds[i][1] - values[i] for i in drawn]  # type: ignore[index,operator]
            ax.errorbar(x[drawn] + offset, [values[i] for i in drawn], yerr=[low, high], fmt="none", ecolor="black",
                        capsize=3, linewidth=1)  # fmt: skip
    labels = []
    for r in rows:
        text = f"{r.decoder}\n{r.feature}{'' if r.complete else '*'}"
        if r.matrix.label_keys:
            text += "\n" + textwrap.fill(r.matrix.variant, 24)
        labels.append(f"{text}\nn={r.matrix.seeds().seeds}")
    ax.set_xticks(x, labels=labels, fontsize=8)
    ax.set_ylabel("mean IoU (%)")
    ax.set_ylim(0, 100)
    ax.set_title("In-domain (ID) vs out-of-domain (OOD) IoU")
    ax.legend(fontsize=8)
    add_caption(fig, caption, note)
    return fig


def heatmap_caption(m: Matrix) -> str:
    """The legend of a heatmap's marks, then what produced its numbers."""
    if m.split == LOO:
        legend = "Outlined: the held-out subset's own test split (never trained on). Rows: held-out subset."
    else:
        legend = "Outlined: in-domain cells (tested on the training subset). Rows: training subset."
    legend += " * = incomplete matrix: means over the available cells only; — = no run."
    seeds = m.seeds()
    if seeds.n_max > 1:
        legend += f" Values: mean ± std over seeds ({seeds.seeds} seeds per cell)."
    settings = [m.settings] if m.settings is not None else []
    return f"{legend}\n{caption(settings, m.versions)}"


def bar_caption(rows: Sequence[SummaryRow], runs: Sequence[RunResult], intervals: str = "") -> str:
    """The legend of the ID-vs-OOD chart's marks, then what produced its numbers; `intervals` describes the
    confidence intervals drawn as error bars (none: std over seeds)."""
    legend = "* = incomplete matrix: means over the available cells only. n = seeds per cell."
    if intervals:
        legend += f" Error bars: {intervals}; none where a row has no per-image scores."
    elif any(r.matrix.seeds().n_max > 1 for r in rows):
        legend += " Error bars: std over seeds, where every cell has the same seeds (none for n=1)."
    family = [r for r in runs if in_family(r, "cross")]
    return f"{legend}\n{caption([r.settings for r in family], [r.version for r in family])}"
