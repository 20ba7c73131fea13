"""Sweep directory -> the report's files (CSV, Markdown with a provenance header, PNG), and their W&B run.

`write_report` collects the runs (:mod:`deeploc.report.collect`), arranges them in one matrix per configuration
(:mod:`deeploc.report.tables`) and writes the results tables (:mod:`deeploc.report.results`), the comparison with
the study (:mod:`deeploc.report.study`), the detection and robustness sections (:mod:`deeploc.report.sections`) and
the figures (:mod:`deeploc.report.figures`). Decisions: docs/decisions.md "Reports".
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from deeploc.metrics import metric_label
from deeploc.report import figures as report_figures
from deeploc.report import latex, sections
from deeploc.report.collect import RunResult, collect_runs, find_searches, in_family
from deeploc.report.provenance import LOO, Settings, caption
from deeploc.report.render import md_table, rel, slug, write_csv
from deeploc.report.results import (
    cells_csv,
    loo_md,
    matrix_csv,
    matrix_md,
    matrix_rows,
    provenance_md,
    runs_md,
    summary_csv,
    summary_md,
    summary_rows,
)
from deeploc.report.study import comparison_csv, comparison_md, study_bars, study_comparison
from deeploc.report.tables import Matrix, SummaryRow, build_matrices, label_keys, summary_table
from deeploc.report.uncertainty import (
    CI_HEADER,
    NO_SCORES,
    Bootstrap,
    ImageData,
    ci_section,
    ci_text,
    compare,
    compare_md,
)
from deeploc.visualize import save


@dataclass(frozen=True)
class ReportPaths:
    """Everything `write_report` wrote, plus how many runs it used and how many it listed as missing."""

    out_dir: Path
    report_md: Path
    summary_csv: Path
    cells_csv: Path
    missing_csv: Path
    matrix_csvs: dict[Settings, Path]
    loo_csvs: dict[Settings, Path]
    comparison_csv: Path | None
    figures: list[Path]
    n_runs: int
    n_missing: int
    detection_csv: Path | None = None  # when runs have deeploc-eval --real results
    robustness_csv: Path | None = None  # with robustness=True, when runs have deeploc-eval --perturb results
    ci_csv: Path | None = None  # every interval (value, low, high, n) or why there is none
    latex: Path | None = None  # with latex=True: tables.tex


def write_report(
    sweep_dir: str | Path,
    out_dir: str | Path | None = None,
    compare_study: bool = False,
    robustness: bool = False,
    bootstrap: Bootstrap | None = None,
    compare: Sequence[tuple[str, str]] = (),
    latex: bool = False,
) -> ReportPaths:
    """Collect the sweep and write CSV tables, Markdown (summary.md, matrices.md, report.md) and PNG figures.

    `out_dir` defaults to `<sweep_dir>/report`. With `compare_study`, the study's ID / OOD go beside ours in the
    tables, each row saying whether its setup is comparable with the study's. The ID-vs-OOD chart always draws the
    study's values beside the comparable rows, and says why for the others. Runs evaluated on their real images
    (`deeploc-eval --real`) add a detection table and an AUC matrix beside each IoU matrix; with `robustness`, the
    runs' `deeploc-eval --perturb` results are compared in a table and one figure per metric. Confidence intervals
    (`bootstrap`, default 1000 draws, seed 0) come from the runs' per-image scores; `compare` lists pairs of
    configuration labels for paired tests; `latex` also writes tables.tex.
    """
    how = bootstrap or Bootstrap()
    sweep = Path(sweep_dir)
    out = Path(out_dir) if out_dir is not None else sweep / "report"
    out.mkdir(parents=True, exist_ok=True)
    runs, missing = collect_runs(sweep)
    cross, loo = build_matrices(runs, "cross"), build_matrices(runs, LOO)
    rows = summary_table(cross)
    data = ImageData()
    comparisons_md = compare_md(compare_configurations({**loo, **cross}, compare, data, how), how) if compare else ""

    write_csv(out / "summary.csv", *summary_csv(rows))
    write_csv(out / "cells.csv", *cells_csv([*cross.values(), *loo.values()]))
    write_csv(out / "missing_runs.csv", ["path", "reason"], [[rel(r.path, sweep), r.reason] for r in missing])
    matrix_csvs = {k: write_csv(out / f"matrix_{slug(m)}.csv", *matrix_csv(m)) for k, m in cross.items()}
    loo_csvs = {k: write_csv(out / f"loo_matrix_{slug(m)}.csv", *matrix_csv(m)) for k, m in loo.items()}
    ci_md, ci_rows, intervals = ci_section({**cross, **loo}, data, how)
    write_csv(out / "ci.csv", CI_HEADER, ci_rows)

    comparisons = [(s, study_comparison(ms, s)) for s, ms in (("cross", cross), (LOO, loo)) if ms]
    comparison_rows = [(s, row) for s, c in comparisons for row in c.rows] if compare_study else []
    comparison_path = write_csv(out / "comparison.csv", *comparison_csv(comparison_rows)) if comparison_rows else None

    searches = find_searches(sweep)
    if rows:
        table = summary_md(rows, label_keys(cross), searches)
        summary = f"## Results (means over test images, %)\n\n{table}\n\n{runs_md(cross.values(), sweep)}"
    else:  # leave-one-out runs only: their matrices are the results
        summary = loo_md(loo, sweep) if loo else "## Results (means over test images, %)\n\nNo results."
    detection = sections.detection_matrices(runs, cross)
    detection_path = write_csv(out / "detection.csv", *sections.detection_csv(detection)) if detection else None
    matrices_md = "\n\n".join(
        matrix_md(m)
        + (f"\n\n{sections.detection_matrix_md(detection[k])}" if k in detection and detection[k].paths else "")
        for k, m in cross.items()
    )
    parts = [
        f"# deeploc report: {sweep}\n\n{len(runs)} finished runs, {len(missing)} missing or failed.",
        provenance_md(runs),
        summary,
    ]
    if cross or loo:
        parts.append(_ci_md(ci_md, intervals, how))
    if comparisons_md:
        parts.append(comparisons_md)
    if compare_study:
        parts.append(comparison_md(comparisons))
    if matrices_md:
        parts.append("## IoU matrices (rows: training subset, columns: test subset)\n\n" + matrices_md)
    if detection:
        parts.append(sections.detection_md(detection, cross, sweep))
    robust = sections.robustness_report(runs, cross, out, sweep) if robustness else sections.Robustness()
    if robust.section:
        parts.append(robust.section)
    elif robustness:
        parts.append("## Robustness\n\nNo run has a `deeploc-eval --perturb` result on its own test data.")
    if loo and rows:
        parts.append(loo_md(loo, sweep))
    if missing:
        listing = md_table(["run", "reason"], [[rel(r.path, sweep), r.reason] for r in missing])
        parts.append("## Missing or failed runs\n\n" + listing)
    duplicates = [f"{m.label} {d}" for m in [*cross.values(), *loo.values()] for d in m.duplicates()]
    if duplicates:
        parts.append(
            "Cells with several runs of the same seed (averaged, counted as one seed): " + ", ".join(duplicates) + "."
        )
    (out / "summary.md").write_text(summary + "\n", encoding="utf-8")
    (out / "matrices.md").write_text((matrices_md or "No matrices.") + "\n", encoding="utf-8")
    (out / "report.md").write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    if latex:
        tex = latex_tables(rows, cross, intervals, robust.tables, runs, how)
        (out / "tables.tex").write_text(tex + "\n", encoding="utf-8")

    figures = [
        save(report_figures.heatmap_figure(m, report_figures.heatmap_caption(m)), out / f"{prefix}{slug(m)}.png")
        for prefix, ms in (("heatmap_", cross), ("heatmap_loo_", loo))
        for m in ms.values()
    ]
    if rows:
        study, note = study_bars(dict(comparisons)["cross"])
        bars = {w: [intervals[k]["iou"][w] for k in cross] for w in ("ID", "OOD")}
        drawn = {w: [(c.low, c.high) if c.ok else None for c in cis] for w, cis in bars.items()}
        with_ci = any(c.ok for cis in bars.values() for c in cis)
        caption = report_figures.bar_caption(rows, runs, how.describe() if with_ci else "")
        figure = report_figures.id_ood_figure(rows, study, note, caption, drawn if with_ci else None)
        figures.append(save(figure, out / "id_ood.png"))
    figures += robust.figures
    return ReportPaths(
        out_dir=out,
        report_md=out / "report.md",
        summary_csv=out / "summary.csv",
        cells_csv=out / "cells.csv",
        missing_csv=out / "missing_runs.csv",
        matrix_csvs=matrix_csvs,
        loo_csvs=loo_csvs,
        comparison_csv=comparison_path,
        figures=figures,
        n_runs=len(runs),
        n_missing=len(missing),
        detection_csv=detection_path,
        robustness_csv=robust.csv,
        ci_csv=out / "ci.csv",
        latex=out / "tables.tex" if latex else None,
    )


def _ci_md(tables: str, intervals: dict, how: Bootstrap) -> str:
    """The confidence-interval section; one line when no run saved per-image scores."""
    title = f"## Confidence intervals ({how.level:.0%}, %)"
    if not any(ci.ok for by_metric in intervals.values() for cis in by_metric.values() for ci in cis.values()):
        return (
            f"{title}\n\nNo run saved per-image scores (`scores/<subset>.csv`): no confidence intervals ({NO_SCORES})."
        )
    return (
        f"{title}\n\n{how.describe()[0].upper()}{how.describe()[1:]}; all intervals in ci.csv. Leave-one-out rows: "
        f"ID = held-out, OOD = seen.\n\n{tables}"
    )


def compare_configurations(
    matrices: dict[Settings, Matrix], pairs: Sequence[tuple[str, str]], data: ImageData, how: Bootstrap
) -> list:
    """`pairs` of configuration labels, or every pair when `pairs` is ``[("all", "all")]``, compared."""
    if list(pairs) == [("all", "all")]:
        labels = [m.label for m in matrices.values()]
        pairs = [(a, b) for i, a in enumerate(labels) for b in labels[i + 1 :]]
    return compare(matrices, pairs, data, how)


def latex_tables(
    rows: list[SummaryRow],
    cross: dict[Settings, Matrix],
    intervals: dict,
    robustness: dict[str, tuple[list[str], list[list[str]]]],
    runs: list[RunResult],
    how: Bootstrap,
) -> str:
    """tables.tex: the results summary (with IoU intervals), each IoU matrix and the robustness tables."""
    family = [r for r in runs if in_family(r, "cross")]
    provenance = caption([r.settings for r in family], [r.version for r in family])
    header, body = summary_rows(rows, label_keys(cross))
    header = [*header, "ID IoU 95% CI", "OOD IoU 95% CI"]
    body = [[*line, *(ci_text(intervals[k]["iou"][w]) for w in ("ID", "OOD"))] for line, k in zip(body, cross)]
    parts = [
        latex.table(
            header,
            body,
            "In-domain (ID: mean of the diagonal cells) and out-of-domain (OOD: off-diagonal) scores, mean over test "
            f"images (%), mean ± sample std over seeds; * = incomplete matrix. CI: {how.describe()}. {provenance}.",
            "tab:deeploc-summary",
        )
    ]
    for i, (key, m) in enumerate(cross.items()):
        cis = intervals[key]["iou"]
        parts.append(
            latex.table(
                *matrix_rows(m),
                f"IoU (%) of {m.label}: rows training subset, columns test subset, in-domain cells in bold; mean ± "
                f"std over seeds (n). ID {ci_text(cis['ID'])}, OOD {ci_text(cis['OOD'])} ({how.describe()}; every "
                f"cell's in ci.csv). {caption([m.settings] if m.settings else [], m.versions)}.",
                f"tab:deeploc-matrix-{i}",
            )
        )
    for metric, (head, lines) in robustness.items():
        parts.append(
            latex.table(
                head,
                lines,
                f"{metric_label(metric)} (%) under perturbation, ID / OOD per configuration, mean ± std over seeds; "
                f"* = fewer runs evaluated than in the results table. {provenance}.",
                f"tab:deeploc-robustness-{metric}",
            )
        )
    return "\n\n".join(parts)


def log_wandb(paths: ReportPaths, project: str | None = None) -> Path:
    """Log the summary and cell tables and every figure to one W&B run; returns the run's local folder.

    The mode comes from WANDB_MODE (offline by default), the folder from WANDB_DIR (default: the report folder).
    """
    import wandb

    run = wandb.init(
        # Passed explicitly: wandb caches its settings per process, so a changed WANDB_DIR would be ignored.
        dir=os.environ.get("WANDB_DIR") or str(paths.out_dir),
        project=project or os.environ.get("WANDB_PROJECT", "deeploc"),
        job_type="report",
        mode=os.environ.get("WANDB_MODE", "offline"),  # type: ignore[arg-type]
        config={"report_dir": str(paths.out_dir)},
    )
    payload: dict[str, object] = {
        "summary": _wandb_table(wandb, paths.summary_csv),
        "cells": _wandb_table(wandb, paths.cells_csv),
    }
    payload.update({f"figures/{p.stem}": wandb.Image(str(p)) for p in paths.figures})
    run.log(payload)
    run_dir = Path(run.dir).parent
    run.finish()
    return run_dir


def _wandb_table(wandb_module, path: Path):
    with path.open(newline="", encoding="utf-8") as fh:
        header, *rows = list(csv.reader(fh))
    return wandb_module.Table(columns=header, data=[[_parse(c) for c in row] for row in rows])


def _parse(text: str) -> float | str | None:
    if text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return text
