"""The results tables of a report: the summary (ID / OOD per metric), every cell, each matrix, the leave-one-out
matrices and the provenance header, as Markdown and CSV rows."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from deeploc import __version__
from deeploc.metrics import metric_label, metric_names
from deeploc.report.collect import RunResult, Search, in_family, subset_order
from deeploc.report.provenance import LABELS, LOO, OTHER_KEYS, common_value, version_text
from deeploc.report.render import fmt_stat, md_table, missing_text, num, params, rel, settings_cells, values_text
from deeploc.report.tables import Matrix, SummaryRow

SEED_NOTE = (
    "Values are means over seeds; ± is the sample standard deviation over seeds (n - 1), shown when every cell "
    "behind a value has the same n >= 2 seeds; `seeds` is the number of seeds per cell (a range when cells differ)."
)
FAMILY_TITLES = {"cross": "matrix runs (cross, in_domain)", LOO: "leave-one-out runs"}


def summary_csv(rows: list[SummaryRow]) -> tuple[list[str], list[list]]:
    """summary.csv: every setting, then mean and std of ID and OOD per metric, seeds per cell, completeness."""
    stats = [f"{w}_{k}{s}" for k in metric_names() for w in ("id", "ood") for s in ("", "_std")]
    header = ["decoder", "feature", *OTHER_KEYS, *stats, "seeds", "complete", "missing_cells", "n_runs"]
    body = [
        [
            *settings_cells(r.matrix),
            *(num(getattr(d[k], a)) for k in metric_names() for d in (r.id, r.ood) for a in ("mean", "std")),
            r.matrix.seeds().seeds,
            r.complete,
            missing_text(r.missing),
            r.n_runs,
        ]
        for r in rows
    ]
    return header, body


def cells_csv(matrices: list[Matrix]) -> tuple[list[str], list[list]]:
    """cells.csv: one line per filled cell of every matrix, mean and std over seeds per metric."""
    header = ["decoder", "feature", *OTHER_KEYS, "split", "row_subset", "test_subset", *metric_names()]
    header += [*(f"{k}_std" for k in metric_names()), "seeds", "n_runs"]
    body = []
    for m in matrices:
        for row, test in ((a, b) for a in m.subsets for b in m.subsets if (a, b) in m.runs):
            stats = [m.cell(row, test, k) for k in metric_names()]
            n_runs = sum(map(len, m.runs[row, test].values()))
            means, stds = [num(s.mean) for s in stats], [num(s.std) for s in stats]
            body.append([*settings_cells(m), m.split, row, test, *means, *stds, stats[0].seeds, n_runs])
    return header, body


def matrix_csv(m: Matrix) -> tuple[list[str], list[list]]:
    """matrix_*.csv: the IoU matrix, one line per row subset."""
    corner = "held_out\\test" if m.split == LOO else "train\\test"
    return [corner, *m.subsets], [[a, *(num(m.value(a, b)) for b in m.subsets)] for a in m.subsets]


def summary_rows(
    rows: list[SummaryRow], keys: tuple[str, ...], searches: Sequence[Search] = ()
) -> tuple[list[str], list[list[str]]]:
    """The results table as printed (header, cells): settings, then (for a hyper-parameter search) the optimized
    validation value and the chosen trial, then ID / OOD per metric (``*`` = incomplete) and the seeds."""
    searched = [_search_of(r, searches) for r in rows]
    header = ["decoder", "feature", "params", *(LABELS[k] for k in keys)]
    if any(searched):
        header += ["best validation (optimized)", "chosen trial"]
    header += [f"{w} {metric_label(k)}" for k in metric_names() for w in ("ID", "OOD")] + ["seeds"]
    body = []
    for r, search in zip(rows, searched):
        line = [r.decoder, r.feature, params(r.matrix.parameters), *(r.matrix.settings.show(k) for k in keys)]  # type: ignore[union-attr]
        if any(searched):
            line += search_cells(r, search)
        line += [fmt_stat(d[k], bool(r.missing[k])) for k in metric_names() for d in (r.id, r.ood)]
        body.append([*line, r.matrix.seeds().seeds])
    return header, body


def summary_md(rows: list[SummaryRow], keys: tuple[str, ...], searches: Sequence[Search] = ()) -> str:
    """The results table (:func:`summary_rows`), then the missing cells of incomplete rows, the seed note and what
    a hyper-parameter search chose by."""
    notes = [f"- {r.matrix.label}: missing {missing_text(r.missing)}" for r in rows if not r.complete]
    if notes:
        notes.insert(0, "\n\\* incomplete matrix: mean of the available cells only. Missing cells (train→test):")
    if any(r.matrix.seeds().n_max > 1 for r in rows):
        notes.append("\n" + SEED_NOTE)
    for s in dict.fromkeys(s for s in (_search_of(r, searches) for r in rows) if s is not None):
        notes.append(
            f"\nHyper-parameter search ({s.folder.name}/best_trial.yaml): each trial's best validation {s.metric} "
            f"over its epochs ({s.direction.removesuffix('imize')}imized) chose the trial marked **chosen**; the test "
            "columns played no part in the choice and must not be used to rank trials."
        )
    return md_table(*summary_rows(rows, keys, searches)) + "\n".join(["", *notes])


def _search_of(r: SummaryRow, searches: Sequence[Search]) -> Search | None:
    return next((s for s in searches if any(s.holds(p) for p in r.matrix.paths)), None)


def search_cells(r: SummaryRow, search: Search | None) -> list[str]:
    """The optimized validation value of a row (``val/iou 41.20``) and whether it holds the search's chosen trial."""
    if search is None:
        return ["", ""]
    chosen = any(p.resolve() == search.best_run.resolve() for p in r.matrix.paths)
    return [f"{search.metric} {fmt_stat(r.matrix.validation_stat(search.metric))}", "**chosen**" if chosen else ""]


def runs_md(matrices: Iterable[Matrix], root: Path) -> str:
    """Per row of a table: the seeds it averages and its run directories (relative to the sweep `root`), so runs of
    an earlier seed averaged in are visible."""
    lines = [
        f"- {m.label}: seeds {values_text(m.seed_values())}; runs: {', '.join(rel(p, root) for p in m.paths)}"
        for m in matrices
    ]
    return "Runs behind each row (seeds; run directories under the sweep):\n\n" + "\n".join(lines)


def matrix_rows(m: Matrix, metric: str = "iou") -> tuple[list[str], list[list[str]]]:
    """One matrix of `metric` as printed (header, cells): mean ± std (n) per cell, the diagonal in bold."""
    corner = "held-out \\ test" if m.split == LOO else "train \\ test"
    text = {(a, b): fmt_stat(m.cell(a, b, metric), with_n=True) for a in m.subsets for b in m.subsets}
    body = [[a, *(f"**{text[a, b]}**" if a == b else text[a, b] for b in m.subsets)] for a in m.subsets]
    return [corner, *m.subsets], body


def matrix_table(m: Matrix, metric: str = "iou") -> str:
    """:func:`matrix_rows` as a Markdown table."""
    return md_table(*matrix_rows(m, metric))


def matrix_md(m: Matrix) -> str:
    """The IoU matrix of one configuration under its label."""
    return f"### {m.label}\n\n" + matrix_table(m)


def loo_md(loo: dict, root: Path) -> str:
    """The leave-one-out section: each matrix, its held-out mean, and the seeds and runs it averages."""
    text = ["## Leave-one-out (rows: held-out subset, columns: test subset; IoU)"]
    for m in loo.values():
        gaps = m.missing()
        mean = fmt_stat(m.id_stat(), bool(gaps), with_n=True)
        text.append(f"{matrix_md(m)}\n\nHeld-out mean IoU: {mean}")
        if gaps:
            text[-1] += f" (\\* missing held-out cells: {', '.join(a for a, _ in gaps)})"
    return "\n\n".join([*text, runs_md(loo.values(), root)])


def provenance_md(runs: list[RunResult]) -> str:
    """A table of what produced the numbers, one column per split family: each setting's value, or how it varies."""
    families = [(s, [r for r in runs if in_family(r, s)]) for s in ("cross", LOO)]
    families = [(s, f) for s, f in families if f]
    if not families:
        return "## Provenance\n\nNo finished run."
    body = [[LABELS[k], *(common_value([r.settings for r in f], k) for _, f in families)] for k in OTHER_KEYS]
    body += [
        ["subsets (data.subsets order)", *(", ".join(subset_order(f)) for _, f in families)],
        ["seeds", *(values_text([r.seed for r in f]) for _, f in families)],
        ["epochs trained", *(values_text([r.epochs for r in f]) for _, f in families)],
        ["deeploc (runs)", *(version_text([r.version for r in f]) for _, f in families)],
    ]
    table = md_table(["setting", *(FAMILY_TITLES[s] for s, _ in families)], body)
    return (
        f"## Provenance\n\n{table}\n\nReport written by deeploc {__version__}. Runs that differ in any setting "
        "other than the seed are never averaged: a setting that varies is a column of the tables below, naming "
        "each configuration. Generated data are identified by their parameters, real data by their root folder."
    )
