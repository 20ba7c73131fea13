"""The sweep report's evaluation sections: detection on real images beside the IoU matrices, and the robustness of
several runs on one figure (``deeploc-report --robustness``).

A run contributes the ``detection.json`` / ``robustness.json`` that ``deeploc-eval --real / --perturb`` wrote in
its ``eval/`` folder for its OWN test data (the data root it was trained on, split ``test``); a robustness file
must also be in the run's metric convention, so its clean scores are the run's. When a run has several (another
perturbation list, a re-run), the newest is used. Their numbers are arranged exactly as the IoU's
(:func:`deeploc.report.tables.build_matrices`): one matrix per configuration, rows the training subsets, ID the diagonal
mean and OOD the off-diagonal mean, mean ± std over seeds.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from deeploc.evaluation.detection import SCORES
from deeploc.evaluation.figures import Line, strength_panels
from deeploc.evaluation.perturbations import Perturbation
from deeploc.evaluation.robustness import CLEAN, ordered
from deeploc.evaluation.scoring import THRESHOLD
from deeploc.metrics import metric_label, metric_names
from deeploc.report.collect import RunResult, read_metrics
from deeploc.report.provenance import LABELS, OTHER_KEYS, Settings, caption
from deeploc.report.render import fmt_stat, md_table, num, rel, settings_cells, write_csv
from deeploc.report.results import matrix_table
from deeploc.report.tables import Matrix, Stat, label_keys, matrices_like, unevaluated
from deeploc.runs.rundir import RunDir
from deeploc.visualize import save

DETECTION_METRICS = ("auc", "ap", "balanced_accuracy")
DETECTION_LABELS = {"auc": "AUC", "ap": "AP", "balanced_accuracy": "bal. acc."}


# ------------------------------------------------------------------------------------------------ reading runs


def run_evaluation(run: RunResult, filename: str, convention: str | None = None) -> dict[str, Any] | None:
    """The newest ``eval/*/<filename>`` of ``run`` on its own test data (and in ``convention`` when given)."""
    config = (read_metrics(run.path) or {}).get("config")
    trained = config.get("data") if isinstance(config, dict) else None
    found = []
    for path in RunDir(run.path).eval_root.glob(f"*/{filename}"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if data.get("split") != "test" or not _same_folder(data.get("data"), trained):
            continue
        if convention is None or data.get("convention") == convention:
            found.append((path.stat().st_mtime_ns, data))
    return max(found, key=lambda item: item[0])[1] if found else None


def _same_folder(a: Any, b: Any) -> bool:
    return (
        a is not None and b is not None and Path(str(a)).expanduser().resolve() == Path(str(b)).expanduser().resolve()
    )


# --------------------------------------------------------------------------------------------------- detection


def detection_runs(runs: Sequence[RunResult]) -> list[RunResult]:
    """The runs with a detection evaluation, their ``test`` replaced by per-subset detection values: ``auc``, ``ap``,
    ``balanced_accuracy`` (top-1% image score), the same with ``_max`` (max score), and the run's false alarms."""
    out = []
    for run in runs:
        data = run_evaluation(run, "detection.json")
        if data is None:
            continue
        real = {k: float(data["real"][k]) for k in ("false_alarm_pixels", "false_alarm_images")}
        test = {}
        for subset, kinds in data["test"].items():
            cell = dict(real)
            for kind in SCORES:
                suffix = "" if kind == "top" else f"_{kind}"
                cell.update({f"{k}{suffix}": kinds[kind][k] for k in DETECTION_METRICS if kinds[kind][k] is not None})
            test[subset] = cell
        out.append(replace(run, test=test))
    return out


def detection_matrices(runs: Sequence[RunResult], template: Mapping[Settings, Matrix]) -> dict[Settings, Matrix]:
    """The detection values of `runs` in the configurations of the results table `template` (cross and in-domain
    runs; :func:`deeploc.report.tables.matrices_like`); empty when no run has a detection evaluation."""
    found = detection_runs(runs)
    return matrices_like(found, template) if found else {}


def detection_md(matrices: Mapping[Settings, Matrix], template: Mapping[Settings, Matrix], root: Path) -> str:
    """The detection summary: ID / OOD AUC, AP and balanced accuracy per configuration of the results table, the
    false alarms and the seeds; `*` marks a configuration some of whose runs have no detection evaluation."""
    keys = label_keys(template)
    header = ["decoder", "feature", *(LABELS[k] for k in keys)]
    header += [f"{w} {DETECTION_LABELS[k]}" for k in DETECTION_METRICS for w in ("ID", "OOD")]
    header += ["pixels flagged (real)", "images flagged (real)", "seeds"]
    body, gaps = [], {}
    for key, m in matrices.items():
        gaps[m.label] = unevaluated(m, template[key])
        mark = bool(gaps[m.label]) and bool(m.paths)
        row = [m.decoder, m.feature, *(m.settings.show(k) for k in keys)]  # type: ignore[union-attr]
        row += [fmt_stat(s(k), mark) for k in DETECTION_METRICS for s in (m.id_stat, m.ood_stat)]
        row += [fmt_stat(m.id_stat(k), mark) for k in ("false_alarm_pixels", "false_alarm_images")]
        body.append([*row, m.seeds("auc").seeds or "0"])
    return (
        "## Detection on real images (%, test split)\n\n"
        + md_table(header, body)
        + gaps_note(gaps, root, "a `deeploc-eval --real` result")
        + f"\n\nConfigurations and seeds as in the results table. Fake = positive class; image score = {SCORES['top']}; "
        "AUC and AP over all real and fake test images (no subsampling, unlike Dolos' protocol: docs/evaluation.md); "
        "balanced accuracy at a threshold chosen on the valid split; ID = the training subset's fakes, OOD = the other "
        f"subsets'. False alarms: share of real-image pixels with probability > {THRESHOLD} and share of real images "
        "with such a pixel (mean over runs). The max-score values are in detection.csv."
    )


def gaps_note(gaps: Mapping[str, list[Path]], root: Path, what: str) -> str:
    """The footnote of a section's `*` marks: per configuration, the runs of the results table without `what`."""
    lines = [f"- {label}: {', '.join(rel(p, root) for p in paths)}" for label, paths in gaps.items() if paths]
    if not lines:
        return ""
    return (
        f"\n\n\\* not every run of the configuration has {what}: means over the runs that have one (seeds: theirs); "
        "— = none has. Runs without one:\n" + "\n".join(lines)
    )


def detection_matrix_md(m: Matrix) -> str:
    """The AUC matrix of one configuration (rows: training subset; columns: the fake subset told from real)."""
    return "Detection AUC (real vs each test subset, %):\n\n" + matrix_table(m, "auc")


def detection_csv(matrices: Mapping[Settings, Matrix]) -> tuple[list[str], list[list[Any]]]:
    """One line per filled cell: the configuration, row and test subset, every detection value (mean over seeds)."""
    keys = [f"{k}{'' if kind == 'top' else '_' + kind}" for kind in SCORES for k in DETECTION_METRICS]
    keys += ["false_alarm_pixels", "false_alarm_images"]
    header = ["decoder", "feature", *OTHER_KEYS, "row_subset", "test_subset", *keys, "seeds", "pixel_threshold"]
    body = [
        [*settings_cells(m), a, b, *(num(m.value(a, b, k)) for k in keys), m.cell(a, b, "auc").seeds, THRESHOLD]
        for m in matrices.values()
        for a in m.subsets
        for b in m.subsets
        if (a, b) in m.runs
    ]
    return header, body


# -------------------------------------------------------------------------------------------------- robustness


def robustness_runs(runs: Sequence[RunResult]) -> tuple[list[Perturbation], dict[str, list[RunResult]]]:
    """Every perturbation any run was evaluated with, and per point (``none`` = clean, ``jpeg=70``...) the runs
    with their ``test`` replaced by that point's scores."""
    points: dict[str, list[RunResult]] = {}
    perturbations: list[Perturbation] = []
    for run in runs:
        data = run_evaluation(run, "robustness.json", run.settings.convention)
        if data is None:
            continue
        points.setdefault(CLEAN, []).append(replace(run, test=data["clean"]))
        for item in data["perturbations"]:
            p = Perturbation(item["name"], float(item["strength"]))
            if p not in perturbations:
                perturbations.append(p)
            points.setdefault(p.text, []).append(replace(run, test=data["perturbed"][p.text]))
    return perturbations, points


@dataclass(frozen=True)
class Robustness:
    """The report's robustness section, its figures, robustness.csv and its tables as printed (metric -> header,
    cells), for the LaTeX tables."""

    section: str = ""
    figures: list[Path] = field(default_factory=list)
    csv: Path | None = None
    tables: dict[str, tuple[list[str], list[list[str]]]] = field(default_factory=dict)


def robustness_report(
    runs: Sequence[RunResult], template: Mapping[Settings, Matrix], out: Path, root: Path
) -> Robustness:
    """The report's robustness section, its figures (one per metric) and robustness.csv, per configuration of the
    results table `template` (same labels, seeds and `*` marks); an empty Robustness when no run has a robustness
    evaluation. Run paths in notes are relative to `root`."""
    perturbations, points = robustness_runs(runs)
    if not points:
        return Robustness()
    groups = ordered(perturbations)
    order = [CLEAN, *(p.text for g in groups.values() for p in g)]
    matrices = {point: matrices_like(points.get(point, []), template) for point in order}
    configs = matrices[CLEAN]
    names = {key: m.label for key, m in configs.items()}
    gaps = {key: {p: unevaluated(matrices[p][key], template[key]) for p in order} for key in configs}

    def stat(point: str, key: Settings, which: str, metric: str) -> Stat:
        """The ID or OOD Stat of one configuration at one point (mean None: no run of it has that point)."""
        m = matrices[point][key]
        return (m.id_stat if which == "ID" else m.ood_stat)(metric)

    def text(point: str, key: Settings, which: str, metric: str) -> str:
        s = stat(point, key, which, metric)
        return fmt_stat(s, bool(gaps[key][point]) and s.mean is not None)

    header = ["decoder", "feature", *OTHER_KEYS, "perturbation", "strength"]
    header += [f"{w}_{k}{s}" for k in metric_names() for w in ("id", "ood") for s in ("", "_std")]
    header += ["seeds", "complete", "threshold"]
    rows = []
    for point in order:
        name, _, strength = point.partition("=")
        for key, m in configs.items():
            stats = [stat(point, key, w, k) for k in metric_names() for w in ("ID", "OOD")]
            values = [num(getattr(s, a)) for s in stats for a in ("mean", "std")]
            seeds = matrices[point][key].seeds().seeds
            rows.append([*settings_cells(m), name, strength, *values, seeds, not gaps[key][point], THRESHOLD])
    csv_path = write_csv(out / "robustness.csv", header, rows)

    tables, cells = [], {}
    for metric in metric_names():
        body = [
            [f"{names[key]} {w}", *(text(p, key, w, metric) for p in order), configs[key].seeds().seeds or "0"]
            for key in configs
            for w in ("ID", "OOD")
        ]
        cells[metric] = (["configuration", "clean", *order[1:], "seeds"], body)
        tables.append(f"### {metric_label(metric)}\n\n" + md_table(*cells[metric]))
    missing = {names[key]: list(dict.fromkeys(p for ps in gaps[key].values() for p in ps)) for key in configs}
    section = (
        "## Robustness (test split, %, mean over images)\n\n"
        "Configurations, ID / OOD and seeds as in the results table, from each run's latest `deeploc-eval --perturb` "
        "on its own test data (metric convention of the runs: "
        f"{', '.join(sorted({s.convention for s in configs}))}; pixel threshold {THRESHOLD}). Perturbations: "
        + "; ".join(f"{n}: {g[0].spec.description}" for n, g in groups.items())
        + ".\n\n"
        + "\n\n".join(tables)
        + gaps_note(missing, root, "a `deeploc-eval --perturb` result at every strength")
    )
    figures = []
    settings = list(configs)
    legend = "Solid, wide: ID (tested on the training subset, in-domain); dashed: OOD (the other subsets)."
    provenance = caption(settings, [v for m in configs.values() for v in m.versions])
    for metric in metric_names():
        lines = []
        for key in configs:
            for which, style in (("ID", "-"), ("OOD", "--")):
                values = {
                    name: [stat(p, key, which, metric).mean for p in [CLEAN, *(q.text for q in group)]]
                    for name, group in groups.items()
                }
                if any(v is not None for vs in values.values() for v in vs):
                    width = 3.0 if which == "ID" else 1.5  # the in-domain line stands out
                    lines.append(Line(f"{names[key]} {which}", names[key], style, values, width))
        figure = strength_panels(groups, lines, metric, f"{legend}\n{provenance}; pixel threshold {THRESHOLD}")
        figures.append(save(figure, out / f"robustness_{metric}.png"))
    return Robustness(section, figures, csv_path, cells)
