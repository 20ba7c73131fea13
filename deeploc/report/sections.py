"""The sweep report's evaluation sections: detection on real images beside the IoU matrices, and the robustness of
several runs on one figure (``deeploc-report --robustness``).

A run contributes the ``detection.json`` / ``robustness.json`` that ``deeploc-eval --real / --perturb`` wrote in
its ``eval/`` folder for its OWN test data (the data root it was trained on, split ``test``); a robustness file
must also be in the run's metric convention, so its clean scores are the run's. When a run has several (another
perturbation list, a re-run), the newest is used. Their numbers are arranged exactly as the IoU's
(:func:`deeploc.report.build_matrices`): one matrix per configuration, rows the training subsets, ID the diagonal
mean and OOD the off-diagonal mean, mean ± std over seeds.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deeploc.evaluation.detection import SCORES
from deeploc.evaluation.figures import Line, strength_panels
from deeploc.evaluation.perturbations import Perturbation
from deeploc.evaluation.robustness import CLEAN, ordered
from deeploc.evaluation.scoring import THRESHOLD
from deeploc.metrics import metric_label, metric_names
from deeploc.runs.rundir import RunDir

if TYPE_CHECKING:
    from deeploc.report.build import Matrix, RunResult
    from deeploc.report.provenance import Settings

DETECTION_METRICS = ("auc", "ap", "balanced_accuracy")
DETECTION_LABELS = {"auc": "AUC", "ap": "AP", "balanced_accuracy": "bal. acc."}


# ------------------------------------------------------------------------------------------------ reading runs


def run_evaluation(run: RunResult, filename: str, convention: str | None = None) -> dict[str, Any] | None:
    """The newest ``eval/*/<filename>`` of ``run`` on its own test data (and in ``convention`` when given)."""
    try:
        trained = json.loads(RunDir(run.path).metrics_file.read_text(encoding="utf-8"))["config"].get("data")
    except (OSError, ValueError, KeyError, AttributeError):
        return None
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


def detection_matrices(runs: Sequence[RunResult]) -> dict[Settings, Matrix]:
    """One matrix of detection values per configuration (cross and in-domain runs), as the IoU's."""
    from deeploc.report.build import build_matrices

    return build_matrices(detection_runs(runs), "cross")


def detection_md(matrices: Mapping[Settings, Matrix], label_keys: Sequence[str]) -> str:
    """The detection summary: ID / OOD AUC, AP and balanced accuracy per configuration, and the false alarms."""
    from deeploc.report.build import _fmt_stat, _md_table
    from deeploc.report.provenance import LABELS

    header = ["decoder", "feature", *(LABELS[k] for k in label_keys)]
    header += [f"{w} {DETECTION_LABELS[k]}" for k in DETECTION_METRICS for w in ("ID", "OOD")]
    header += ["pixels flagged (real)", "images flagged (real)", "seeds"]
    body = []
    for m in matrices.values():
        row = [m.decoder, m.feature, *(m.settings.show(k) for k in label_keys)]  # type: ignore[union-attr]
        row += [_fmt_stat(s(k)) for k in DETECTION_METRICS for s in (m.id_stat, m.ood_stat)]
        row += [_fmt_stat(m.id_stat(k)) for k in ("false_alarm_pixels", "false_alarm_images")]
        body.append([*row, m.stat(list(m.runs), "auc").seeds])
    return (
        "## Detection on real images (%, test split)\n\n"
        + _md_table(header, body)
        + f"\n\nFake = positive class; image score = {SCORES['top']}; AUC and AP over all real and fake test images "
        "(no subsampling, unlike Dolos' protocol: docs/evaluation.md); balanced accuracy at a threshold chosen on the "
        "valid split; ID = the training subset's fakes, OOD = the other subsets'. False alarms: share of real-image "
        f"pixels with probability > {THRESHOLD} and share of real images with such a pixel (mean over runs). The "
        "max-score values are in detection.csv."
    )


def detection_matrix_md(m: Matrix) -> str:
    """The AUC matrix of one configuration (rows: training subset; columns: the fake subset told from real)."""
    from deeploc.report.build import _fmt_stat, _md_table

    text = {(a, b): _fmt_stat(m.cell(a, b, "auc"), with_n=True) for a in m.subsets for b in m.subsets}
    body = [[a, *(f"**{text[a, b]}**" if a == b else text[a, b] for b in m.subsets)] for a in m.subsets]
    return "Detection AUC (real vs each test subset, %):\n\n" + _md_table(["train \\ test", *m.subsets], body)


def detection_csv(matrices: Mapping[Settings, Matrix]) -> tuple[list[str], list[list[Any]]]:
    """One line per filled cell: the configuration, row and test subset, every detection value (mean over seeds)."""
    from deeploc.report.build import _num, _settings_cells
    from deeploc.report.provenance import OTHER_KEYS

    keys = [f"{k}{'' if kind == 'top' else '_' + kind}" for kind in SCORES for k in DETECTION_METRICS]
    keys += ["false_alarm_pixels", "false_alarm_images"]
    header = ["decoder", "feature", *OTHER_KEYS, "row_subset", "test_subset", *keys, "seeds", "pixel_threshold"]
    body = [
        [*_settings_cells(m), a, b, *(_num(m.value(a, b, k)) for k in keys), m.cell(a, b, "auc").seeds, THRESHOLD]
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


def robustness_report(runs: Sequence[RunResult], out: Path) -> tuple[str, list[Path], Path | None]:
    """The report's robustness section, its figures (one per metric) and robustness.csv; ("", [], None) when no
    run has a robustness evaluation."""
    from deeploc.report.build import _fmt_stat, _md_table, _num, _settings_cells, _write_csv, build_matrices
    from deeploc.report.provenance import OTHER_KEYS, caption
    from deeploc.visualize import save

    perturbations, points = robustness_runs(runs)
    if not points:
        return "", [], None
    groups = ordered(perturbations)
    order = [CLEAN, *(p.text for g in groups.values() for p in g)]
    matrices = {point: build_matrices(points[point], "cross") for point in order}
    configs = matrices[CLEAN]
    names = {key: m.label for key, m in configs.items()}

    def stat(point: str, key: Settings, which: str, metric: str) -> Any:
        """The ID or OOD Stat of one configuration at one point (None: no run of it has that point)."""
        m = matrices[point].get(key)
        return None if m is None else (m.id_stat if which == "ID" else m.ood_stat)(metric)

    header = ["decoder", "feature", *OTHER_KEYS, "perturbation", "strength"]
    header += [f"{w}_{k}{s}" for k in metric_names() for w in ("id", "ood") for s in ("", "_std")] + ["threshold"]
    rows = []
    for point in order:
        name, _, strength = point.partition("=")
        for key, m in configs.items():
            stats = [stat(point, key, w, k) for k in metric_names() for w in ("ID", "OOD")]
            values = [_num(getattr(s, a)) if s is not None else "" for s in stats for a in ("mean", "std")]
            rows.append([*_settings_cells(m), name, strength, *values, THRESHOLD])
    csv_path = _write_csv(out / "robustness.csv", header, rows)

    tables = []
    for metric in metric_names():
        body = [
            [f"{names[key]} {w}", *(_fmt_stat(s) if (s := stat(p, key, w, metric)) is not None else "—" for p in order)]
            for key in configs
            for w in ("ID", "OOD")
        ]
        tables.append(f"### {metric_label(metric)}\n\n" + _md_table(["configuration", "clean", *order[1:]], body))
    section = (
        "## Robustness (test split, %, mean over images)\n\n"
        f"ID / OOD as in the results table, from each run's latest `deeploc-eval --perturb` on its own test data "
        f"(metric convention of the runs: {', '.join(sorted({s.convention for s in configs}))}; pixel threshold "
        f"{THRESHOLD}). Perturbations: "
        + "; ".join(f"{n}: {g[0].spec.description}" for n, g in groups.items())
        + ".\n\n"
        + "\n\n".join(tables)
    )
    figures = []
    settings = list(configs)
    text = caption(settings, [v for m in configs.values() for v in m.versions]) + f"; pixel threshold {THRESHOLD}"
    for metric in metric_names():
        lines = []
        for key in configs:
            for which, style in (("ID", "-"), ("OOD", "--")):
                values = {
                    name: [_mean(stat(p, key, which, metric)) for p in [CLEAN, *(q.text for q in group)]]
                    for name, group in groups.items()
                }
                if any(v is not None for vs in values.values() for v in vs):
                    lines.append(Line(f"{names[key]} {which}", names[key], style, values))
        figure = strength_panels(groups, lines, metric, text)
        figures.append(save(figure, out / f"robustness_{metric}.png"))
    return section, figures, csv_path


def _mean(stat: Any) -> float | None:
    return None if stat is None else stat.mean
