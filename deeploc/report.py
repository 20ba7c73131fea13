"""Sweep directory -> the study's tables and figures.

`collect_runs` finds every run directory under a sweep (one holding `.hydra/config.yaml` or `metrics.json`) and
reads its `metrics.json` (format: docs/architecture.md). `build_matrices` arranges the test scores into one
row-subset x test-subset matrix per (decoder, feature); `summary_table` gives ID (mean of the diagonal cells) and
OOD (mean of the off-diagonal cells) exactly as reference/protocol.md defines them; `write_report` writes CSV,
Markdown and PNG files. Incomplete matrices are reported with a marker and the missing cells, never dropped.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from statistics import fmean

from deeploc.features_spec import FEATURES

METRICS = ("iou", "f1_fixed", "f1_best", "ap")
METRIC_LABELS = {"iou": "IoU", "f1_fixed": "F1_fixed", "f1_best": "F1_best", "ap": "AP"}
DOLOS_SUBSETS = ("repaint-p2-9k", "ldm", "lama", "pluralistic")
SPLITS = ("cross", "in_domain", "leave_one_out")
LOO = "leave_one_out"
_CONFIG_KEYS = ("decoder", "feature", "split", "subset")
STUDY_NOTE = (
    "Study values are recomputed from the author's matrices (deeploc/resources/study_results.json), which are "
    "published rounded to two decimals, so they can differ from the poster by 0.01 (67.28 / 11.02 vs 67.27 / 11.01). "
    "The poster prints OOD 14.77 / 15.12 for conv4 / conv12, which those matrices give as 15.48 / 16.09."
)

ConfigKey = tuple[str, str]  # (decoder, feature)
Cell = tuple[str, str]  # (row subset, test subset)


@dataclass(frozen=True)
class RunResult:
    """One finished run: its configuration and its per-test-subset scores (percentages)."""

    path: Path
    decoder: str
    feature: str
    split: str
    subset: str  # training subset; the held-out subset for leave_one_out
    test: dict[str, dict[str, float]]

    @property
    def key(self) -> ConfigKey:
        return (self.decoder, self.feature)


@dataclass(frozen=True)
class MissingRun:
    """A run directory that gave no usable result, and why."""

    path: Path
    reason: str


@dataclass
class Matrix:
    """Scores of one (decoder, feature): cell (row, test) holds the score dict of every run that filled it.

    Rows are training subsets (split "cross", fed by cross and in_domain runs) or held-out subsets
    (split "leave_one_out", where the diagonal is the held-out score and `id_mean` the held-out mean).
    """

    decoder: str
    feature: str
    split: str
    subsets: list[str]
    runs: dict[Cell, list[dict[str, float]]] = field(default_factory=dict)
    paths: list[Path] = field(default_factory=list)
    cross: bool = False  # a cross run exists, so off-diagonal cells are expected

    @property
    def key(self) -> ConfigKey:
        return (self.decoder, self.feature)

    @property
    def label(self) -> str:
        return f"{self.decoder}/{self.feature}"

    def add(self, run: RunResult) -> None:
        """Record the scores of `run` (row = its subset)."""
        for test, scores in run.test.items():
            self.runs.setdefault((run.subset, test), []).append(scores)
        self.paths.append(run.path)
        self.cross = self.cross or run.split == "cross"

    def value(self, row: str, test: str, metric: str = "iou") -> float | None:
        """Mean `metric` of the runs in a cell, None when no run reported it."""
        values = [s[metric] for s in self.runs.get((row, test), []) if metric in s]
        return fmean(values) if values else None

    def expected(self) -> list[Cell]:
        """Cells a complete matrix has: the diagonal, plus the off-diagonal when cross runs were made."""
        return [(a, b) for a in self.subsets for b in self.subsets if a == b or self.cross]

    def missing(self, metric: str = "iou") -> list[Cell]:
        """Expected cells without a `metric` score."""
        return [cell for cell in self.expected() if self.value(*cell, metric) is None]

    def id_mean(self, metric: str = "iou") -> float | None:
        """Mean of the available diagonal cells (train subset == test subset)."""
        return _mean(self.value(s, s, metric) for s in self.subsets)

    def ood_mean(self, metric: str = "iou") -> float | None:
        """Mean of the available off-diagonal cells."""
        return _mean(self.value(a, b, metric) for a in self.subsets for b in self.subsets if a != b)


@dataclass(frozen=True)
class SummaryRow:
    """One line of the results table: ID and OOD means per metric, and the cells they lack."""

    decoder: str
    feature: str
    id: dict[str, float | None]
    ood: dict[str, float | None]
    missing: dict[str, list[Cell]]
    n_runs: int

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
    matrix_csvs: dict[ConfigKey, Path]
    loo_csvs: dict[ConfigKey, Path]
    comparison_csv: Path | None
    figures: list[Path]
    n_runs: int
    n_missing: int


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
        if "metrics.json" in filenames or (here / ".hydra" / "config.yaml").is_file():
            result = _read_run(here)
            (runs if isinstance(result, RunResult) else missing).append(result)  # type: ignore[arg-type]
    return runs, missing


def _read_run(run_dir: Path) -> RunResult | MissingRun:
    path = run_dir / "metrics.json"
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
        str(subset): {m: float(v) for m, v in cell.items() if m in METRICS and _is_number(v)}
        for subset, cell in (test.items() if isinstance(test, dict) else [])
        if isinstance(cell, dict)
    }
    if not any(scores.values()):
        return MissingRun(run_dir, "metrics.json has no test scores")
    return RunResult(run_dir, config["decoder"], config["feature"], config["split"], config["subset"], scores)


# ---------------------------------------------------------------------------------------------------- tables


def build_matrices(runs: Iterable[RunResult], split: str = "cross") -> dict[ConfigKey, Matrix]:
    """One Matrix per (decoder, feature), in the study's order.

    split="cross" uses cross and in_domain runs (rows = training subset); split="leave_one_out" uses the
    leave-one-out runs (rows = held-out subset). Every matrix spans all subsets seen in those runs.
    """
    family = [r for r in runs if (r.split == LOO) == (split == LOO)]
    subsets = _ordered_subsets({r.subset for r in family} | {t for r in family for t in r.test})
    matrices: dict[ConfigKey, Matrix] = {}
    for run in family:
        matrices.setdefault(run.key, Matrix(run.decoder, run.feature, split, subsets)).add(run)
    return dict(sorted(matrices.items(), key=lambda item: _config_order(item[0])))


def summary_table(matrices: dict[ConfigKey, Matrix]) -> list[SummaryRow]:
    """ID and OOD means of every metric per configuration, with the expected cells each mean lacks."""
    return [
        SummaryRow(
            m.decoder,
            m.feature,
            id={k: m.id_mean(k) for k in METRICS},
            ood={k: m.ood_mean(k) for k in METRICS},
            missing={k: m.missing(k) for k in METRICS},
            n_runs=len(m.paths),
        )
        for m in matrices.values()
    ]


@dataclass(frozen=True)
class StudyComparison:
    """Our ID / OOD IoU next to the study's, recomputed over the same subsets; `rows` empty when not applicable."""

    applies: bool
    note: str
    rows: list[tuple[str, str, float | None, float | None, float | None, float | None, bool]]  # ..., complete


def study_matrix(key: ConfigKey, split: str = "cross") -> Matrix | None:
    """The study's published IoU matrix of one configuration (None when the study did not run it)."""
    data = json.loads(resources.files("deeploc").joinpath("resources/study_results.json").read_text("utf-8"))
    table = data[split].get(f"{key[0]}/{key[1]}")
    if table is None:
        return None
    matrix = Matrix(key[0], key[1], split, _ordered_subsets(table), cross=split != LOO)
    matrix.runs = {(a, b): [{"iou": v}] for a, row in table.items() for b, v in row.items()}
    return matrix


def study_comparison(matrices: dict[ConfigKey, Matrix], split: str = "cross") -> StudyComparison:
    """Our ID / OOD IoU per configuration beside the study's, when the subsets are Dolos's."""
    subsets = sorted({s for m in matrices.values() for s in m.subsets})
    foreign = [s for s in subsets if s not in DOLOS_SUBSETS]
    if foreign or not subsets:
        note = (
            f"The comparison with the study does not apply: subsets {', '.join(foreign) or '(none)'} are not "
            f"Dolos's ({', '.join(DOLOS_SUBSETS)})."
        )
        return StudyComparison(False, note, [])
    rows = []
    for key, ours in matrices.items():
        theirs = study_matrix(key, split)
        if theirs is not None:
            theirs.subsets = ours.subsets
        rows.append(
            (
                *key,
                ours.id_mean(),
                theirs.id_mean() if theirs else None,
                ours.ood_mean(),
                theirs.ood_mean() if theirs else None,
                not ours.missing(),
            )
        )
    note = STUDY_NOTE
    if len(subsets) < len(DOLOS_SUBSETS):
        note += f" Study values use the same {len(subsets)} subsets as this sweep: {', '.join(subsets)}."
    return StudyComparison(True, note, rows)


# ---------------------------------------------------------------------------------------------------- writing


def write_report(sweep_dir: str | Path, out_dir: str | Path | None = None, compare_study: bool = False) -> ReportPaths:
    """Collect the sweep and write CSV tables, Markdown (summary.md, matrices.md, report.md) and PNG figures.

    `out_dir` defaults to `<sweep_dir>/report`. With `compare_study`, the study's ID / OOD go beside ours.
    """
    sweep = Path(sweep_dir)
    out = Path(out_dir) if out_dir is not None else sweep / "report"
    out.mkdir(parents=True, exist_ok=True)
    runs, missing = collect_runs(sweep)
    cross, loo = build_matrices(runs, "cross"), build_matrices(runs, LOO)
    rows = summary_table(cross)

    header = ["decoder", "feature"] + [f"{w}_{k}" for k in METRICS for w in ("id", "ood")]
    _write_csv(
        out / "summary.csv",
        [*header, "complete", "missing_cells", "n_runs"],
        [[r.decoder, r.feature, *_means(r), r.complete, _missing_text(r.missing), r.n_runs] for r in rows],
    )
    _write_csv(
        out / "cells.csv",
        ["decoder", "feature", "split", "row_subset", "test_subset", *METRICS, "n_runs"],
        [
            [*m.key, m.split, a, b, *(_num(m.value(a, b, k)) for k in METRICS), len(m.runs[(a, b)])]
            for m in [*cross.values(), *loo.values()]
            for a in m.subsets
            for b in m.subsets
            if (a, b) in m.runs
        ],
    )
    _write_csv(out / "missing_runs.csv", ["path", "reason"], [[_rel(r.path, sweep), r.reason] for r in missing])
    matrix_csvs = {k: _write_matrix_csv(m, out / f"matrix_{_slug(m)}.csv") for k, m in cross.items()}
    loo_csvs = {k: _write_matrix_csv(m, out / f"loo_matrix_{_slug(m)}.csv") for k, m in loo.items()}

    comparisons = [(s, study_comparison(ms, s)) for s, ms in (("cross", cross), (LOO, loo)) if ms]
    comparison_rows = [[s, *row] for s, c in comparisons for row in c.rows] if compare_study else []
    comparison_csv = out / "comparison.csv" if comparison_rows else None
    if comparison_csv:
        columns = ["split", "decoder", "feature", "id_iou", "id_iou_study", "ood_iou", "ood_iou_study", "complete"]
        _write_csv(comparison_csv, columns, _nums(comparison_rows))

    summary = "## Results (means over test images, %)\n\n" + (_summary_md(rows) if rows else "No results.")
    matrices_md = "\n\n".join(_matrix_md(m) for m in cross.values())
    sections = [f"# deeploc report: {sweep}\n\n{len(runs)} finished runs, {len(missing)} missing or failed.", summary]
    if compare_study:
        sections.append(_comparison_md(comparisons))
    if matrices_md:
        sections.append("## IoU matrices (rows: training subset, columns: test subset)\n\n" + matrices_md)
    if loo:
        sections.append(_loo_md(loo))
    if missing:
        listing = _md_table(["run", "reason"], [[_rel(r.path, sweep), r.reason] for r in missing])
        sections.append("## Missing or failed runs\n\n" + listing)
    averaged = [
        f"{m.label} {a}→{b} ({len(v)} runs)"
        for m in [*cross.values(), *loo.values()]
        for (a, b), v in m.runs.items()
        if len(v) > 1
    ]
    if averaged:
        sections.append("Cells averaged over several runs: " + ", ".join(averaged) + ".")
    (out / "summary.md").write_text(summary + "\n", encoding="utf-8")
    (out / "matrices.md").write_text((matrices_md or "No matrices.") + "\n", encoding="utf-8")
    (out / "report.md").write_text("\n\n".join(sections) + "\n", encoding="utf-8")

    figures = [_heatmap(m, out / f"heatmap_{_slug(m)}.png") for m in cross.values()]
    figures += [_heatmap(m, out / f"heatmap_loo_{_slug(m)}.png") for m in loo.values()]
    if rows:
        figures.append(_bar_chart(rows, out / "id_ood.png"))
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


# ---------------------------------------------------------------------------------------------------- helpers


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return fmean(present) if present else None


def _ordered_subsets(names: Iterable[str]) -> list[str]:
    """Dolos subsets in the protocol's order, then any others alphabetically."""
    return sorted(names, key=lambda s: (DOLOS_SUBSETS.index(s) if s in DOLOS_SUBSETS else len(DOLOS_SUBSETS), s))


def _config_order(key: ConfigKey) -> tuple[int, str, int, str]:
    decoder, feature = key
    digits = re.findall(r"\d+", decoder)
    rank = list(FEATURES).index(feature) if feature in FEATURES else len(FEATURES)
    return (rank, feature, int(digits[0]) if digits else 0, decoder)


def _slug(m: Matrix) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{m.decoder}_{m.feature}")


def _rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _num(v: float | None) -> float | str:
    return "" if v is None else round(v, 4)


def _nums(rows: list[list]) -> list[list]:
    return [[_num(v) if v is None or isinstance(v, float) else v for v in row] for row in rows]


def _means(r: SummaryRow) -> list[float | str]:
    """ID and OOD of each metric, in the summary's column order."""
    return [_num(d[k]) for k in METRICS for d in (r.id, r.ood)]


def _fmt(v: float | None, incomplete: bool = False) -> str:
    return "—" if v is None else f"{v:.2f}" + ("*" if incomplete else "")


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


def _write_matrix_csv(m: Matrix, path: Path) -> Path:
    corner = "held_out\\test" if m.split == LOO else "train\\test"
    rows = [[a, *(_num(m.value(a, b)) for b in m.subsets)] for a in m.subsets]
    return _write_csv(path, [corner, *m.subsets], rows)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(str(c).replace("|", "\\|") for c in line) + " |" for line in lines)


def _summary_md(rows: list[SummaryRow]) -> str:
    header = ["decoder", "feature"] + [f"{w} {METRIC_LABELS[k]}" for k in METRICS for w in ("ID", "OOD")]
    body = [
        [r.decoder, r.feature, *(_fmt(d[k], bool(r.missing[k])) for k in METRICS for d in (r.id, r.ood))] for r in rows
    ]
    notes = [f"- {r.decoder}/{r.feature}: missing {_missing_text(r.missing)}" for r in rows if not r.complete]
    if notes:
        notes.insert(0, "\n\\* incomplete matrix: mean of the available cells only. Missing cells (train→test):")
    return _md_table(header, body) + "\n".join(["", *notes])


def _matrix_md(m: Matrix) -> str:
    corner = "held-out \\ test" if m.split == LOO else "train \\ test"
    body = [
        [a, *(f"**{_fmt(m.value(a, b))}**" if a == b else _fmt(m.value(a, b)) for b in m.subsets)] for a in m.subsets
    ]
    return f"### {m.label}\n\n" + _md_table([corner, *m.subsets], body)


def _loo_md(loo: dict[ConfigKey, Matrix]) -> str:
    text = ["## Leave-one-out (rows: held-out subset, columns: test subset; IoU)"]
    for m in loo.values():
        gaps = m.missing()
        mean = _fmt(m.id_mean(), bool(gaps))
        text.append(f"{_matrix_md(m)}\n\nHeld-out mean IoU: {mean}")
        if gaps:
            text[-1] += f" (\\* missing held-out cells: {', '.join(a for a, _ in gaps)})"
    return "\n\n".join(text)


def _comparison_md(comparisons: list[tuple[str, StudyComparison]]) -> str:
    text = ["## Comparison with the study (IoU, %)"]
    for split, c in comparisons:
        if c.applies:
            first, second = ("held-out", "seen") if split == LOO else ("ID", "OOD")
            header = ["decoder", "feature", first, f"{first} (study)", f"Δ {first}"]
            header += [second, f"{second} (study)", f"Δ {second}"]
            body = [
                [dec, feat, _fmt(i, not ok), _fmt(i_s), _delta(i, i_s), _fmt(o, not ok), _fmt(o_s), _delta(o, o_s)]
                for dec, feat, i, i_s, o, o_s, ok in c.rows
            ]
            text.append(f"### {split}\n\n" + _md_table(header, body))
    text += list(dict.fromkeys(c.note for _, c in comparisons)) or ["No results to compare."]
    return "\n\n".join(text)


def _delta(ours: float | None, theirs: float | None) -> str:
    return "—" if ours is None or theirs is None else f"{ours - theirs:+.2f}"


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _heatmap(m: Matrix, path: Path) -> Path:
    """Annotated IoU heatmap of one matrix; missing cells grey with a dash."""
    import matplotlib
    import numpy as np

    n = len(m.subsets)
    values = np.array([[m.value(a, b) if m.value(a, b) is not None else np.nan for b in m.subsets] for a in m.subsets])
    fig = _figure(2.5 + 1.3 * n, 1.8 + 1.1 * n)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0, vmax=100)
    for i in range(n):
        for j in range(n):
            v = values[i, j]
            text, colour = ("—", "black") if np.isnan(v) else (f"{v:.1f}", "white" if v < 60 else "black")
            ax.text(j, i, text, ha="center", va="center", color=colour)
    ax.set_xticks(range(n), labels=m.subsets, rotation=30, ha="right")
    ax.set_yticks(range(n), labels=m.subsets)
    ax.set_xlabel("test subset")
    ax.set_ylabel("held-out subset" if m.split == LOO else "training subset")
    first, second = ("held-out", "seen") if m.split == LOO else ("ID", "OOD")
    incomplete = "*" if m.missing() else ""
    ax.set_title(f"{m.label}{incomplete}\n{first} {_fmt(m.id_mean())}  {second} {_fmt(m.ood_mean())}")
    fig.colorbar(image, ax=ax, label="IoU (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _bar_chart(rows: list[SummaryRow], path: Path) -> Path:
    """Grouped bars of ID and OOD IoU per configuration (* = incomplete matrix)."""
    import numpy as np

    x = np.arange(len(rows))
    fig = _figure(2.0 + 1.4 * len(rows), 4.5)
    ax = fig.add_subplot()
    for offset, name, values in ((-0.2, "ID", [r.id["iou"] for r in rows]), (0.2, "OOD", [r.ood["iou"] for r in rows])):
        heights = [np.nan if v is None else v for v in values]
        bars = ax.bar(x + offset, heights, 0.4, label=name)
        ax.bar_label(bars, labels=["—" if v is None else f"{v:.1f}" for v in values], fontsize=8)
    labels = [f"{r.decoder}\n{r.feature}{'' if r.complete else '*'}" for r in rows]
    ax.set_xticks(x, labels=labels, fontsize=8)
    ax.set_ylabel("mean IoU (%)")
    ax.set_ylim(0, 100)
    ax.set_title("In-domain vs out-of-domain IoU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


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
