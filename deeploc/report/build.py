"""Sweep directory -> the study's tables and figures.

`collect_runs` finds every run directory under a sweep (one holding `.hydra/config.yaml` or `metrics.json`) and
reads its `metrics.json` (format: docs/architecture.md) and the settings that produced it (`deeploc.report.provenance`).
`build_matrices` arranges the test scores into one row-subset x test-subset matrix per configuration, a
configuration being every setting that changes results (decoder, feature, encoder, weights, input size, epochs,
schedule, lr, batch size, split sizes, data, metric convention...): runs that differ in any of them are never
averaged, they become separate rows named by the settings that differ. Repeats of one configuration with several
seeds give mean +- sample std over seeds and n. `summary_table` gives ID (mean of the diagonal cells) and OOD (mean of
the off-diagonal cells) exactly as reference/protocol.md defines them; `write_report` writes CSV, Markdown (with a
provenance header) and PNG files. Incomplete matrices are reported with a marker and the missing cells, never dropped.
Subsets are ordered as the runs' `data.subsets`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from statistics import fmean, stdev
from typing import Any

from deeploc import __version__
from deeploc.errors import DeeplocError
from deeploc.metrics import metric_label, metric_names
from deeploc.report.provenance import (
    LABELS,
    OTHER_KEYS,
    Settings,
    caption,
    common_value,
    read_settings,
    sort_key,
    study_gaps,
    varying_keys,
    version_text,
)
from deeploc.runs.rundir import HEADS_FILE, METRICS_FILE, RunDir

# The study's maps first, in the protocol's order; other maps (other decoders, encoders) after, by name.
STUDY_FEATURES = ("image_embed", "high_res_feats_0", "high_res_feats_1")
DOLOS_SUBSETS = ("repaint-p2-9k", "ldm", "lama", "pluralistic")
SPLITS = ("cross", "in_domain", "leave_one_out")
LOO = "leave_one_out"
_CONFIG_KEYS = ("decoder", "feature", "split", "subset")
STUDY_NOTE = (
    "Study values are recomputed from the author's matrices (deeploc/resources/study_results.json), which are "
    "published rounded to two decimals, so they can differ from the poster by 0.01 (67.28 / 11.02 vs 67.27 / 11.01). "
    "The poster prints OOD 14.77 / 15.12 for conv4 / conv12, which those matrices give as 15.48 / 16.09."
)
SEED_NOTE = (
    "Values are means over seeds; ± is the sample standard deviation over seeds (n - 1), shown when every cell "
    "behind a value has the same n >= 2 seeds; `seeds` is the number of seeds per cell (a range when cells differ)."
)

Cell = tuple[str, str]  # (row subset, test subset)


@dataclass(frozen=True)
class RunResult:
    """One finished run: what produced it and its per-test-subset scores (percentages)."""

    path: Path
    settings: Settings
    split: str
    subset: str  # training subset; the held-out subset for leave_one_out
    test: dict[str, dict[str, float]]
    seed: Any = None  # int, or None when metrics.json records none
    subsets: tuple[str, ...] = ()  # the run's data.subsets, in order
    version: str | None = None  # deeploc version that wrote metrics.json
    epochs: int | None = None  # epochs actually trained
    parameters: int | None = None  # the decoder's trainable parameters

    @property
    def decoder(self) -> str:
        return self.settings.decoder

    @property
    def feature(self) -> str:
        return self.settings.feature


@dataclass(frozen=True)
class MissingRun:
    """A run directory that gave no usable result, and why."""

    path: Path
    reason: str


@dataclass(frozen=True)
class Stat:
    """A mean over seeds, its sample std (None: fewer than 2 seeds, or unequal seed sets) and the seeds per cell."""

    mean: float | None
    std: float | None = None
    n_min: int = 0
    n_max: int = 0

    @property
    def seeds(self) -> str:
        return "" if not self.n_max else f"{self.n_min}" + (f"–{self.n_max}" if self.n_max != self.n_min else "")


@dataclass
class Matrix:
    """Scores of one configuration: cell (row, test) -> seed -> the score dicts of the runs with that seed.

    Rows are training subsets (split "cross", fed by cross and in_domain runs, which train identically) or held-out
    subsets (split "leave_one_out", where the diagonal is the held-out score and `id_mean` the held-out mean).
    Runs repeating a seed in a cell are duplicates of one measurement: averaged, and counted as one seed.
    """

    decoder: str
    feature: str
    split: str
    subsets: list[str]
    settings: Settings | None = None  # None for the study's published matrices
    label_keys: tuple[str, ...] = ()  # the settings that tell this matrix apart from the others of its split
    runs: dict[Cell, dict[Any, list[dict[str, float]]]] = field(default_factory=dict)
    paths: list[Path] = field(default_factory=list)
    parameters: int | None = None  # the decoder's, equal in every run of one configuration
    versions: list[str | None] = field(default_factory=list)
    cross: bool = False  # a cross run exists, so off-diagonal cells are expected

    @property
    def label(self) -> str:
        """decoder/feature, plus the settings that differ between matrices of this split."""
        if not self.label_keys or self.settings is None:
            return f"{self.decoder}/{self.feature}"
        return f"{self.decoder}/{self.feature} ({self.variant})"

    @property
    def variant(self) -> str:
        assert self.settings is not None
        return ", ".join(f"{LABELS[k]} {self.settings.show(k)}" for k in self.label_keys)

    def add(self, run: RunResult) -> None:
        """Record the scores of `run` (row = its subset)."""
        for test, scores in run.test.items():
            self.runs.setdefault((run.subset, test), {}).setdefault(run.seed, []).append(scores)
        self.paths.append(run.path)
        self.versions.append(run.version)
        self.parameters = self.parameters or run.parameters
        self.cross = self.cross or run.split == "cross"

    def per_seed(self, cell: Cell, metric: str = "iou") -> dict[Any, float]:
        """`metric` of a cell per seed (duplicates of a seed averaged)."""
        by_seed = {seed: [s[metric] for s in runs if metric in s] for seed, runs in self.runs.get(cell, {}).items()}
        return {seed: fmean(values) for seed, values in by_seed.items() if values}

    def stat(self, cells: Iterable[Cell], metric: str = "iou") -> Stat:
        """Mean of the cell means of `cells`, with the std over seeds of the per-seed mean when seeds allow one."""
        present = [p for p in (self.per_seed(c, metric) for c in cells) if p]
        if not present:
            return Stat(None)
        sizes = [len(p) for p in present]
        mean = fmean(fmean(p.values()) for p in present)
        seed_sets = {frozenset(p) for p in present}
        std = None
        if len(seed_sets) == 1 and sizes[0] >= 2:
            std = stdev([fmean(p[seed] for p in present) for seed in next(iter(seed_sets))])
        return Stat(mean, std, min(sizes), max(sizes))

    def cell(self, row: str, test: str, metric: str = "iou") -> Stat:
        return self.stat([(row, test)], metric)

    def value(self, row: str, test: str, metric: str = "iou") -> float | None:
        """Mean `metric` of a cell over seeds, None when no run reported it."""
        return self.cell(row, test, metric).mean

    def expected(self) -> list[Cell]:
        """Cells a complete matrix has: the diagonal, plus the off-diagonal when cross runs were made."""
        return [(a, b) for a in self.subsets for b in self.subsets if a == b or self.cross]

    def missing(self, metric: str = "iou") -> list[Cell]:
        """Expected cells without a `metric` score."""
        return [cell for cell in self.expected() if self.value(*cell, metric) is None]

    def id_stat(self, metric: str = "iou") -> Stat:
        """Over the available diagonal cells (train subset == test subset)."""
        return self.stat([(s, s) for s in self.subsets], metric)

    def ood_stat(self, metric: str = "iou") -> Stat:
        """Over the available off-diagonal cells."""
        return self.stat([(a, b) for a in self.subsets for b in self.subsets if a != b], metric)

    def id_mean(self, metric: str = "iou") -> float | None:
        return self.id_stat(metric).mean

    def ood_mean(self, metric: str = "iou") -> float | None:
        return self.ood_stat(metric).mean

    def seeds(self) -> Stat:
        """Seeds per cell over every cell with a result (n_min, n_max)."""
        return self.stat(list(self.runs))

    def duplicates(self) -> list[str]:
        """Cells where one seed has several runs, e.g. "lama→ldm seed 42 (2 runs)"."""
        return [
            f"{a}→{b} seed {seed} ({len(runs)} runs)"
            for (a, b), seeds in self.runs.items()
            for seed, runs in seeds.items()
            if len(runs) > 1
        ]


@dataclass(frozen=True)
class SummaryRow:
    """One line of the results table: ID and OOD per metric over seeds, and the cells they lack."""

    matrix: Matrix
    id: dict[str, Stat]
    ood: dict[str, Stat]
    missing: dict[str, list[Cell]]
    n_runs: int

    @property
    def decoder(self) -> str:
        return self.matrix.decoder

    @property
    def feature(self) -> str:
        return self.matrix.feature

    @property
    def complete(self) -> bool:
        return not any(self.missing.values())


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


# ---------------------------------------------------------------------------------------------------- collection


def collect_runs(sweep_dir: str | Path) -> tuple[list[RunResult], list[MissingRun]]:
    """Read every run directory under `sweep_dir`; absent, unfinished or unreadable results become MissingRun."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep directory not found: {root}")
    runs: list[RunResult] = []
    missing: list[MissingRun] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        run = RunDir(here)
        if HEADS_FILE in filenames and METRICS_FILE not in filenames:
            continue  # a multi-head job's own folder: its heads' run directories are the runs
        if METRICS_FILE in filenames or run.hydra_config.is_file():
            result = _read_run(here)
            (runs if isinstance(result, RunResult) else missing).append(result)  # type: ignore[arg-type]
    return runs, missing


def _read_run(run_dir: Path) -> RunResult | MissingRun:
    path = RunDir(run_dir).metrics_file
    if not path.is_file():
        return MissingRun(run_dir, "no metrics.json (run failed, was killed or is still running)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return MissingRun(run_dir, f"invalid metrics.json: {err}")
    if not isinstance(data, dict):
        return MissingRun(run_dir, "invalid metrics.json: not a JSON object")
    if data.get("status") != "finished":
        return MissingRun(run_dir, f"status is {data.get('status')!r}, not 'finished'")
    config = data.get("config")
    if not isinstance(config, dict):
        return MissingRun(run_dir, "metrics.json has no config object")
    bad = [k for k in _CONFIG_KEYS if not isinstance(config.get(k), str)]
    if bad:
        return MissingRun(run_dir, f"metrics.json config: {', '.join(bad)} missing or not a name (string)")
    if config["split"] not in SPLITS:
        return MissingRun(run_dir, f"unknown split {config['split']!r} (expected one of {', '.join(SPLITS)})")
    test = data.get("test")
    scores = {
        str(subset): {m: float(v) for m, v in cell.items() if m in metric_names() and _is_number(v)}
        for subset, cell in (test.items() if isinstance(test, dict) else [])
        if isinstance(cell, dict)
    }
    if not any(scores.values()):
        return MissingRun(run_dir, "metrics.json has no test scores")
    subsets = config.get("subsets")
    try:
        settings = read_settings(run_dir, data)
    except DeeplocError as err:  # a metrics.json of deeploc 0.1
        return MissingRun(run_dir, str(err))
    return RunResult(
        run_dir,
        settings,
        config["split"],
        config["subset"],
        scores,
        seed=config.get("seed"),
        subsets=tuple(str(s) for s in subsets) if isinstance(subsets, list) else (),
        version=config.get("deeploc_version"),
        epochs=data.get("epochs") if isinstance(data.get("epochs"), int) else None,
        parameters=config.get("parameters") if isinstance(config.get("parameters"), int) else None,
    )


# ---------------------------------------------------------------------------------------------------- tables


def in_family(run: RunResult, split: str) -> bool:
    """Whether `run` feeds the matrices of `split` ("cross": cross and in_domain runs; "leave_one_out")."""
    return (run.split == LOO) == (split == LOO)


def build_matrices(runs: Iterable[RunResult], split: str = "cross") -> dict[Settings, Matrix]:
    """One Matrix per configuration (Settings), in the study's order.

    split="cross" uses cross and in_domain runs (rows = training subset); split="leave_one_out" uses the
    leave-one-out runs (rows = held-out subset). Every matrix spans all subsets seen in those runs, in the runs'
    data.subsets order. Matrices are labelled by the settings that differ between them.
    """
    family = [r for r in runs if in_family(r, split)]
    subsets = subset_order(family)
    label_keys = tuple(varying_keys([r.settings for r in family]))
    matrices: dict[Settings, Matrix] = {}
    for run in family:
        if run.settings not in matrices:
            matrices[run.settings] = Matrix(run.decoder, run.feature, split, subsets, run.settings, label_keys)
        matrices[run.settings].add(run)
    return dict(sorted(matrices.items(), key=lambda item: (_config_order(item[1]), sort_key(item[0]))))


def subset_order(runs: Sequence[RunResult]) -> list[str]:
    """The subsets the runs used, ordered as their data.subsets (first run first); unlisted ones after them."""
    used = {r.subset for r in runs} | {t for r in runs for t in r.test}
    listed = [s for s in dict.fromkeys(s for r in runs for s in r.subsets) if s in used]
    return listed + _ordered_subsets(used - set(listed))


def summary_table(matrices: dict[Settings, Matrix]) -> list[SummaryRow]:
    """ID and OOD of every metric per configuration, with the expected cells each lacks."""
    return [
        SummaryRow(
            m,
            id={k: m.id_stat(k) for k in metric_names()},
            ood={k: m.ood_stat(k) for k in metric_names()},
            missing={k: m.missing(k) for k in metric_names()},
            n_runs=len(m.paths),
        )
        for m in matrices.values()
    ]


@dataclass(frozen=True)
class ComparisonRow:
    """Our ID / OOD IoU of one configuration beside the study's, and how its setup differs from the study's."""

    matrix: Matrix
    id: float | None
    id_study: float | None
    ood: float | None
    ood_study: float | None
    complete: bool
    gaps: list[str]  # empty = comparable

    @property
    def comparable(self) -> bool:
        return not self.gaps


@dataclass(frozen=True)
class StudyComparison:
    """Our ID / OOD IoU next to the study's, recomputed over the same subsets; `rows` empty when not applicable."""

    applies: bool
    note: str
    rows: list[ComparisonRow]


def study_matrix(decoder: str, feature: str, split: str = "cross") -> Matrix | None:
    """The study's published IoU matrix of one configuration (None when the study did not run it)."""
    data = json.loads(resources.files("deeploc").joinpath("resources/study_results.json").read_text("utf-8"))
    table = data[split].get(f"{decoder}/{feature}")
    if table is None:
        return None
    matrix = Matrix(decoder, feature, split, _ordered_subsets(table), cross=split != LOO)
    matrix.runs = {(a, b): {None: [{"iou": v}]} for a, row in table.items() for b, v in row.items()}
    return matrix


def study_comparison(matrices: dict[Settings, Matrix], split: str = "cross") -> StudyComparison:
    """Our ID / OOD IoU per configuration beside the study's when the subsets are Dolos's, with the differences
    between each configuration's setup and the study's (random weights, another encoder, input size, ...)."""
    subsets = list(dict.fromkeys(s for m in matrices.values() for s in m.subsets))
    foreign = [s for s in subsets if s not in DOLOS_SUBSETS]
    if foreign or not subsets:
        note = (
            f"The comparison with the study does not apply: subsets {', '.join(foreign) or '(none)'} are not "
            f"Dolos's ({', '.join(DOLOS_SUBSETS)})."
        )
        return StudyComparison(False, note, [])
    rows = []
    for ours in matrices.values():
        theirs = study_matrix(ours.decoder, ours.feature, split)
        if theirs is not None:
            theirs.subsets = ours.subsets
        gaps = study_gaps(ours.settings, split) if ours.settings is not None else []
        if theirs is None:
            gaps = [*gaps, "the study did not run this configuration"]
        rows.append(
            ComparisonRow(
                ours,
                ours.id_mean(),
                theirs.id_mean() if theirs else None,
                ours.ood_mean(),
                theirs.ood_mean() if theirs else None,
                not ours.missing(),
                gaps,
            )
        )
    note = STUDY_NOTE
    if len(subsets) < len(DOLOS_SUBSETS):
        note += f" Study values use the same {len(subsets)} subsets as this sweep: {', '.join(subsets)}."
    return StudyComparison(True, note, rows)


# ---------------------------------------------------------------------------------------------------- writing


def write_report(
    sweep_dir: str | Path, out_dir: str | Path | None = None, compare_study: bool = False, robustness: bool = False
) -> ReportPaths:
    """Collect the sweep and write CSV tables, Markdown (summary.md, matrices.md, report.md) and PNG figures.

    `out_dir` defaults to `<sweep_dir>/report`. With `compare_study`, the study's ID / OOD go beside ours in the
    tables, each row saying whether its setup is comparable with the study's. The ID-vs-OOD chart always draws the
    study's values beside the comparable rows, and says why for the others. Runs evaluated on their real images
    (`deeploc-eval --real`) add a detection table and an AUC matrix beside each IoU matrix; with `robustness`, the
    runs' `deeploc-eval --perturb` results are compared in a table and one figure per metric
    (`deeploc.report.sections`).
    """
    from deeploc.report import figures as report_figures
    from deeploc.report import sections as reporting
    from deeploc.visualize import save

    sweep = Path(sweep_dir)
    out = Path(out_dir) if out_dir is not None else sweep / "report"
    out.mkdir(parents=True, exist_ok=True)
    runs, missing = collect_runs(sweep)
    cross, loo = build_matrices(runs, "cross"), build_matrices(runs, LOO)
    rows = summary_table(cross)

    _write_csv(out / "summary.csv", *_summary_csv(rows))
    _write_csv(out / "cells.csv", *_cells_csv([*cross.values(), *loo.values()]))
    _write_csv(out / "missing_runs.csv", ["path", "reason"], [[_rel(r.path, sweep), r.reason] for r in missing])
    matrix_csvs = {k: _write_matrix_csv(m, out / f"matrix_{_slug(m)}.csv") for k, m in cross.items()}
    loo_csvs = {k: _write_matrix_csv(m, out / f"loo_matrix_{_slug(m)}.csv") for k, m in loo.items()}

    comparisons = [(s, study_comparison(ms, s)) for s, ms in (("cross", cross), (LOO, loo)) if ms]
    comparison_rows = [(s, row) for s, c in comparisons for row in c.rows] if compare_study else []
    comparison_csv = _write_csv(out / "comparison.csv", *_comparison_csv(comparison_rows)) if comparison_rows else None

    summary = "## Results (means over test images, %)\n\n" + (
        _summary_md(rows, _label_keys(cross)) if rows else "No results."
    )
    detection = reporting.detection_matrices(runs)
    detection_csv = _write_csv(out / "detection.csv", *reporting.detection_csv(detection)) if detection else None
    matrices_md = "\n\n".join(
        _matrix_md(m) + (f"\n\n{reporting.detection_matrix_md(detection[k])}" if k in detection else "")
        for k, m in cross.items()
    )
    sections = [
        f"# deeploc report: {sweep}\n\n{len(runs)} finished runs, {len(missing)} missing or failed.",
        _provenance_md(runs),
        summary,
    ]
    if compare_study:
        sections.append(_comparison_md(comparisons))
    if matrices_md:
        sections.append("## IoU matrices (rows: training subset, columns: test subset)\n\n" + matrices_md)
    if detection:
        sections.append(reporting.detection_md(detection, _label_keys(detection)))
    robustness_md, robustness_figures, robustness_csv = (
        reporting.robustness_report(runs, out) if robustness else ("", [], None)
    )
    if robustness_md:
        sections.append(robustness_md)
    elif robustness:
        sections.append("## Robustness\n\nNo run has a `deeploc-eval --perturb` result on its own test data.")
    if loo:
        sections.append(_loo_md(loo))
    if missing:
        listing = _md_table(["run", "reason"], [[_rel(r.path, sweep), r.reason] for r in missing])
        sections.append("## Missing or failed runs\n\n" + listing)
    duplicates = [f"{m.label} {d}" for m in [*cross.values(), *loo.values()] for d in m.duplicates()]
    if duplicates:
        sections.append(
            "Cells with several runs of the same seed (averaged, counted as one seed): " + ", ".join(duplicates) + "."
        )
    (out / "summary.md").write_text(summary + "\n", encoding="utf-8")
    (out / "matrices.md").write_text((matrices_md or "No matrices.") + "\n", encoding="utf-8")
    (out / "report.md").write_text("\n\n".join(sections) + "\n", encoding="utf-8")

    figures = [
        save(report_figures.heatmap_figure(m, heatmap_caption(m)), out / f"{prefix}{_slug(m)}.png")
        for prefix, ms in (("heatmap_", cross), ("heatmap_loo_", loo))
        for m in ms.values()
    ]
    if rows:
        study, note = study_bars(dict(comparisons)["cross"])
        figure = report_figures.id_ood_figure(rows, study, note, bar_caption(rows, runs))
        figures.append(save(figure, out / "id_ood.png"))
    figures += robustness_figures
    return ReportPaths(
        out_dir=out,
        report_md=out / "report.md",
        summary_csv=out / "summary.csv",
        cells_csv=out / "cells.csv",
        missing_csv=out / "missing_runs.csv",
        matrix_csvs=matrix_csvs,
        loo_csvs=loo_csvs,
        comparison_csv=comparison_csv,
        figures=figures,
        n_runs=len(runs),
        n_missing=len(missing),
        detection_csv=detection_csv,
        robustness_csv=robustness_csv,
    )


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


# ---------------------------------------------------------------------------------------------------- provenance

FAMILY_TITLES = {"cross": "matrix runs (cross, in_domain)", LOO: "leave-one-out runs"}


def _provenance_md(runs: list[RunResult]) -> str:
    """A table of what produced the numbers, one column per split family: each setting's value, or how it varies."""
    families = [(s, [r for r in runs if in_family(r, s)]) for s in ("cross", LOO)]
    families = [(s, f) for s, f in families if f]
    if not families:
        return "## Provenance\n\nNo finished run."
    body = [[LABELS[k], *(common_value([r.settings for r in f], k) for _, f in families)] for k in OTHER_KEYS]
    body += [
        ["subsets (data.subsets order)", *(", ".join(subset_order(f)) for _, f in families)],
        ["seeds", *(_values([r.seed for r in f]) for _, f in families)],
        ["epochs trained", *(_values([r.epochs for r in f]) for _, f in families)],
        ["deeploc (runs)", *(version_text([r.version for r in f]) for _, f in families)],
    ]
    table = _md_table(["setting", *(FAMILY_TITLES[s] for s, _ in families)], body)
    return (
        f"## Provenance\n\n{table}\n\nReport written by deeploc {__version__}. Runs that differ in any setting "
        "other than the seed are never averaged: a setting that varies is a column of the tables below, naming "
        "each configuration. Generated data are identified by their parameters, real data by their root folder."
    )


def _values(values: Iterable[Any]) -> str:
    shown = sorted({"not recorded" if v is None else str(v) for v in values}, key=_natural)
    return ", ".join(shown)


def _natural(text: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text))


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


def bar_caption(rows: list[SummaryRow], runs: list[RunResult]) -> str:
    """The legend of the ID-vs-OOD chart's marks, then what produced its numbers."""
    legend = "* = incomplete matrix: means over the available cells only."
    if any(r.matrix.seeds().n_max > 1 for r in rows):
        legend += " Error bars: std over seeds, where every cell has the same seeds."
    family = [r for r in runs if in_family(r, "cross")]
    return f"{legend}\n{caption([r.settings for r in family], [r.version for r in family])}"


def study_bars(comparison: StudyComparison) -> tuple[list[tuple[float | None, float | None] | None], str]:
    """The study's (ID, OOD) per row where comparable, else None; and a note saying which values are drawn and why
    the others are not."""
    if not comparison.applies:
        return [], f"Study values not drawn: {comparison.note}"
    bars = [(r.id_study, r.ood_study) if r.comparable else None for r in comparison.rows]
    why: dict[str, list[str]] = {}
    for r in comparison.rows:
        if not r.comparable:
            why.setdefault("; ".join(r.gaps), []).append(r.matrix.label)
    parts = ["Hatched bars: the study's values over the same subsets."] if any(bars) else []
    if why:
        everywhere = len(why) == 1 and len(next(iter(why.values()))) == len(comparison.rows)
        reasons = list(why) if everywhere else [f"{', '.join(labels)}: {reason}" for reason, labels in why.items()]
        parts.append("Study values not drawn (not comparable): " + " | ".join(reasons))
    return bars, " ".join(parts)


# ---------------------------------------------------------------------------------------------------- helpers


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _ordered_subsets(names: Iterable[str]) -> list[str]:
    """Dolos subsets in the protocol's order, then any others alphabetically."""
    return sorted(names, key=lambda s: (DOLOS_SUBSETS.index(s) if s in DOLOS_SUBSETS else len(DOLOS_SUBSETS), s))


def _config_order(m: Matrix) -> tuple[int, str, int, str]:
    digits = re.findall(r"\d+", m.decoder)
    rank = STUDY_FEATURES.index(m.feature) if m.feature in STUDY_FEATURES else len(STUDY_FEATURES)
    return (rank, m.feature, int(digits[0]) if digits else 0, m.decoder)


def _label_keys(matrices: dict[Settings, Matrix]) -> tuple[str, ...]:
    return next(iter(matrices.values())).label_keys if matrices else ()


def _slug(m: Matrix) -> str:
    """A file-name part: decoder_feature, then the distinguishing settings (shortened with a digest when long)."""
    text = f"{m.decoder}_{m.feature}" + (f"_{m.variant}" if m.label_keys else "")
    slug = re.sub(r"[^A-Za-z0-9_.=-]+", "-", text).strip("-")
    if len(slug) > 80:
        slug = f"{slug[:70]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return slug


def _rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _num(v: float | None) -> float | str:
    return "" if v is None else round(v, 4)


def _settings_cells(m: Matrix) -> list[str]:
    """decoder, feature and every other setting of a matrix, as printed."""
    assert m.settings is not None
    return [m.decoder, m.feature, *(m.settings.show(k) for k in OTHER_KEYS)]


def _stats(r: SummaryRow) -> list[float | str]:
    """Mean and std of ID and OOD of each metric, in the summary's column order."""
    return [_num(getattr(d[k], a)) for k in metric_names() for d in (r.id, r.ood) for a in ("mean", "std")]


def _fmt(v: float | None, incomplete: bool = False) -> str:
    return "—" if v is None else f"{v:.2f}" + ("*" if incomplete else "")


def _fmt_stat(s: Stat, incomplete: bool = False, with_n: bool = False) -> str:
    """A value as `62.50` or `62.50 ± 1.00`, `(n=3)` added when asked and several seeds; `*` = incomplete matrix."""
    if s.mean is None:
        return "—"
    text = f"{s.mean:.2f}" + ("" if s.std is None else f" ± {s.std:.2f}")
    if with_n and s.n_max > 1:
        text += f" (n={s.seeds})"
    return text + ("*" if incomplete else "")


def _cells(cells: list[Cell]) -> str:
    return ", ".join(f"{a}→{b}" for a, b in cells)


def _missing_text(missing: dict[str, list[Cell]]) -> str:
    """Expected cells without an IoU, then any cells lacking only some other metric."""
    parts = [_cells(missing["iou"])] if missing["iou"] else []
    parts += [f"{k}: {_cells(c)}" for k, c in missing.items() if k != "iou" and c and c != missing["iou"]]
    return "; ".join(parts)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _summary_csv(rows: list[SummaryRow]) -> tuple[list[str], list[list]]:
    """summary.csv: every setting, then mean and std of ID and OOD per metric, seeds per cell, completeness."""
    stats = [f"{w}_{k}{s}" for k in metric_names() for w in ("id", "ood") for s in ("", "_std")]
    header = ["decoder", "feature", *OTHER_KEYS, *stats, "seeds", "complete", "missing_cells", "n_runs"]
    body = [
        [*_settings_cells(r.matrix), *_stats(r), r.matrix.seeds().seeds, r.complete, _missing_text(r.missing), r.n_runs]
        for r in rows
    ]
    return header, body


def _cells_csv(matrices: list[Matrix]) -> tuple[list[str], list[list]]:
    """cells.csv: one line per filled cell of every matrix, mean and std over seeds per metric."""
    header = ["decoder", "feature", *OTHER_KEYS, "split", "row_subset", "test_subset", *metric_names()]
    header += [*(f"{k}_std" for k in metric_names()), "seeds", "n_runs"]
    body = [_cell_line(m, a, b) for m in matrices for a in m.subsets for b in m.subsets if (a, b) in m.runs]
    return header, body


def _cell_line(m: Matrix, row: str, test: str) -> list:
    stats = [m.cell(row, test, k) for k in metric_names()]
    n_runs = sum(map(len, m.runs[row, test].values()))
    means, stds = [_num(s.mean) for s in stats], [_num(s.std) for s in stats]
    return [*_settings_cells(m), m.split, row, test, *means, *stds, stats[0].seeds, n_runs]


def _comparison_csv(rows: list[tuple[str, ComparisonRow]]) -> tuple[list[str], list[list]]:
    """comparison.csv: our ID / OOD IoU beside the study's, and whether the setups are comparable."""
    header = ["split", "decoder", "feature", *OTHER_KEYS, "id_iou", "id_iou_study", "ood_iou", "ood_iou_study"]
    header += ["complete", "comparable", "differences_from_study"]
    values = [[_num(v) for v in (r.id, r.id_study, r.ood, r.ood_study)] for _, r in rows]
    flags = [[r.complete, r.comparable, "; ".join(r.gaps)] for _, r in rows]
    body = [[split, *_settings_cells(r.matrix), *v, *f] for (split, r), v, f in zip(rows, values, flags)]
    return header, body


def _write_matrix_csv(m: Matrix, path: Path) -> Path:
    corner = "held_out\\test" if m.split == LOO else "train\\test"
    rows = [[a, *(_num(m.value(a, b)) for b in m.subsets)] for a in m.subsets]
    return _write_csv(path, [corner, *m.subsets], rows)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(str(c).replace("|", "\\|") for c in line) + " |" for line in lines)


def _summary_md(rows: list[SummaryRow], keys: tuple[str, ...]) -> str:
    header = ["decoder", "feature", "params", *(LABELS[k] for k in keys)]
    header += [f"{w} {metric_label(k)}" for k in metric_names() for w in ("ID", "OOD")] + ["seeds"]
    body = [
        [r.decoder, r.feature, _params(r.matrix.parameters), *(r.matrix.settings.show(k) for k in keys)]  # type: ignore[union-attr]
        + [_fmt_stat(d[k], bool(r.missing[k])) for k in metric_names() for d in (r.id, r.ood)]
        + [r.matrix.seeds().seeds]
        for r in rows
    ]
    notes = [f"- {r.matrix.label}: missing {_missing_text(r.missing)}" for r in rows if not r.complete]
    if notes:
        notes.insert(0, "\n\\* incomplete matrix: mean of the available cells only. Missing cells (train→test):")
    if any(r.matrix.seeds().n_max > 1 for r in rows):
        notes.append("\n" + SEED_NOTE)
    return _md_table(header, body) + "\n".join(["", *notes])


def _params(count: int | None) -> str:
    """A decoder's parameter count as the tables print it (``3.08 M``, ``0.13 M``); ``?`` when not recorded."""
    return "?" if count is None else f"{count / 1e6:.2f} M"


def _matrix_md(m: Matrix) -> str:
    corner = "held-out \\ test" if m.split == LOO else "train \\ test"
    text = {(a, b): _fmt_stat(m.cell(a, b), with_n=True) for a in m.subsets for b in m.subsets}
    body = [[a, *(f"**{text[a, b]}**" if a == b else text[a, b] for b in m.subsets)] for a in m.subsets]
    return f"### {m.label}\n\n" + _md_table([corner, *m.subsets], body)


def _loo_md(loo: dict[Settings, Matrix]) -> str:
    text = ["## Leave-one-out (rows: held-out subset, columns: test subset; IoU)"]
    for m in loo.values():
        gaps = m.missing()
        mean = _fmt_stat(m.id_stat(), bool(gaps), with_n=True)
        text.append(f"{_matrix_md(m)}\n\nHeld-out mean IoU: {mean}")
        if gaps:
            text[-1] += f" (\\* missing held-out cells: {', '.join(a for a, _ in gaps)})"
    return "\n\n".join(text)


def _comparison_md(comparisons: list[tuple[str, StudyComparison]]) -> str:
    text = ["## Comparison with the study (IoU, %)"]
    for split, c in comparisons:
        if not c.applies:
            continue
        keys = _label_keys({r.matrix.settings: r.matrix for r in c.rows})  # type: ignore[misc]
        first, second = ("held-out", "seen") if split == LOO else ("ID", "OOD")
        header = ["decoder", "feature", *(LABELS[k] for k in keys), first, f"{first} (study)", f"Δ {first}"]
        header += [second, f"{second} (study)", f"Δ {second}", "comparable with the study"]
        body = [_comparison_line(r, keys) for r in c.rows]
        section = f"### {split}\n\n"
        if not all(r.comparable for r in c.rows):
            section += (
                "**⚠ Rows marked NO are NOT comparable with the study: their setup differs from it (last column); "
                "the Δ columns then measure that difference, not a reproduction gap.**\n\n"
            )
        text.append(section + _md_table(header, body))
    text += list(dict.fromkeys(c.note for _, c in comparisons)) or ["No results to compare."]
    return "\n\n".join(text)


def _comparison_line(r: ComparisonRow, keys: tuple[str, ...]) -> list[str]:
    """A comparison table row; its last column says loudly when the setup is not the study's."""
    m = r.matrix
    settings = [m.settings.show(k) for k in keys] if m.settings is not None else []
    ours_id, ours_ood = _fmt_stat(m.id_stat(), not r.complete), _fmt_stat(m.ood_stat(), not r.complete)
    comparable = "yes" if r.comparable else f"**NO**: {'; '.join(r.gaps)}"
    ours = [
        ours_id,
        _fmt(r.id_study),
        _delta(r.id, r.id_study),
        ours_ood,
        _fmt(r.ood_study),
        _delta(r.ood, r.ood_study),
    ]
    return [m.decoder, m.feature, *settings, *ours, comparable]


def _delta(ours: float | None, theirs: float | None) -> str:
    return "—" if ours is None or theirs is None else f"{ours - theirs:+.2f}"


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
