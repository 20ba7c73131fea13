"""Reading a sweep: every run directory under it (one holding `.hydra/config.yaml` or `metrics.json`), as a
RunResult (what produced it and its per-test-subset scores) or a MissingRun (why it gave no result).

A run's scores are read by :func:`test_scores` only, so a change of metrics.json's score layout is one edit here.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from deeploc.errors import DeeplocError
from deeploc.metrics import metric_names
from deeploc.metrics.store import SCORES_DIR
from deeploc.report.provenance import LOO, Settings, read_settings
from deeploc.runs.rundir import HEADS_FILE, METRICS_FILE, RunDir
from deeploc.training.hparams import BEST_FILE

DOLOS_SUBSETS = ("repaint-p2-9k", "ldm", "lama", "pluralistic")
SPLITS = ("cross", "in_domain", LOO)
CONFIG_KEYS = ("decoder", "feature", "split", "subset")


Scores = dict[str, dict[str, float]]  # test subset -> metric -> value (%)


@dataclass(frozen=True)
class ImageScores:
    """Every test image's scores in one subset: image keys (names, else dataset positions) in file order, and per
    metric the values (%; NaN = undefined for that image, left out of the mean)."""

    keys: tuple[str, ...]
    values: dict[str, np.ndarray]


@dataclass(frozen=True)
class RunResult:
    """One finished run: what produced it and its per-test-subset scores (percentages)."""

    path: Path
    settings: Settings
    split: str
    subset: str  # training subset; the held-out subset for leave_one_out
    test: Scores
    seed: Any = None  # int, or None when metrics.json records none
    subsets: tuple[str, ...] = ()  # the run's data.subsets, in order
    version: str | None = None  # deeploc version that wrote metrics.json (None: <= 0.1.0)
    epochs: int | None = None  # epochs actually trained
    parameters: int | None = None  # the decoder's trainable parameters (None: not recorded, deeploc <= 0.1)
    validation: dict[str, float] = field(default_factory=dict)  # best value of each validation metric ("val/iou")

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
        if HEADS_FILE in filenames and METRICS_FILE not in filenames:
            continue  # a multi-head job's own folder: its heads' run directories are the runs
        if METRICS_FILE in filenames or RunDir(here).hydra_config.is_file():
            result = read_run(here)
            (runs if isinstance(result, RunResult) else missing).append(result)  # type: ignore[arg-type]
    return runs, missing


@dataclass(frozen=True)
class Search:
    """A finished hyper-parameter search in the sweep (its ``best_trial.yaml``): the validation metric it optimized,
    in which direction, and the run directory of the trial it chose."""

    folder: Path
    metric: str  # e.g. "val/iou"
    direction: str  # "maximize" or "minimize"
    best_run: Path

    def holds(self, path: Path) -> bool:
        """Whether run directory `path` is a trial of this search."""
        return path.resolve().is_relative_to(self.folder.resolve())


def find_searches(sweep_dir: str | Path) -> list[Search]:
    """Every finished hyper-parameter search under `sweep_dir` (a readable ``best_trial.yaml``)."""
    found = []
    for path in sorted(Path(sweep_dir).rglob(BEST_FILE)):
        try:
            best = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(best, dict) and all(isinstance(best.get(k), str) for k in ("optimized_metric", "run_dir")):
            run = Path(best["run_dir"])
            run = run if run.is_absolute() else path.parent / run
            found.append(Search(path.parent, best["optimized_metric"], str(best.get("direction", "")), run))
    return found


def read_metrics(run_dir: Path) -> dict[str, Any] | None:
    """A run's metrics.json as a dict; None when it is absent, unreadable or not a JSON object."""
    try:
        data = json.loads((run_dir / METRICS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def test_scores(metrics: Mapping[str, Any]) -> Scores:
    """The test scores of a metrics.json object: subset -> registered metric -> finite value (%).

    The one reader of metrics.json's score layout (today ``metrics["test"][subset][metric]``, in the convention of
    ``metrics["convention"]``)."""
    test = metrics.get("test")
    return {
        str(subset): {m: float(v) for m, v in cell.items() if m in metric_names() and is_number(v)}
        for subset, cell in (test.items() if isinstance(test, dict) else [])
        if isinstance(cell, dict)
    }


def image_scores(run_dir: Path, convention: str) -> dict[str, ImageScores]:
    """The per-image test scores a run saved, in `convention`: ``scores/<subset>.csv`` with columns ``index``,
    ``name``, then ``<metric>[<convention>]``; {} when the run saved none (runs of older versions). Unreadable files
    are left out (the report then says "no per-image scores" for their cells)."""
    found = {}
    for path in sorted((run_dir / SCORES_DIR).glob("*.csv")):
        try:
            with path.open(newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
            keys = tuple(row.get("name") or row["index"] for row in rows)
            columns = {m: f"{m}[{convention}]" for m in metric_names()}
            values = {m: np.array([float(row[c]) for row in rows]) for m, c in columns.items() if rows and c in rows[0]}
        except (OSError, KeyError, ValueError, csv.Error):
            continue
        if values and len(set(keys)) == len(keys):
            found[path.stem] = ImageScores(keys, values)
    return found


def read_run(run_dir: Path) -> RunResult | MissingRun:
    """One run directory as a RunResult, or a MissingRun saying what is wrong with it."""
    path = run_dir / METRICS_FILE
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
    bad = [k for k in CONFIG_KEYS if not isinstance(config.get(k), str)]
    if bad:
        return MissingRun(run_dir, f"metrics.json config: {', '.join(bad)} missing or not a name (string)")
    if config["split"] not in SPLITS:
        return MissingRun(run_dir, f"unknown split {config['split']!r} (expected one of {', '.join(SPLITS)})")
    scores = test_scores(data)
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
        validation={str(k): float(v) for k, v in (data.get("best_val") or {}).items() if is_number(v)},
    )


def is_number(v: object) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def in_family(run: RunResult, split: str) -> bool:
    """Whether `run` feeds the matrices of `split` ("cross": cross and in_domain runs; "leave_one_out")."""
    return (run.split == LOO) == (split == LOO)


def subset_order(runs: Sequence[RunResult]) -> list[str]:
    """The subsets the runs used, ordered as their data.subsets (first run first); unlisted ones after them."""
    used = {r.subset for r in runs} | {t for r in runs for t in r.test}
    listed = [s for s in dict.fromkeys(s for r in runs for s in r.subsets) if s in used]
    return listed + ordered_subsets(used - set(listed))


def ordered_subsets(names: Iterable[str]) -> list[str]:
    """Dolos subsets in the protocol's order, then any others alphabetically."""
    return sorted(names, key=lambda s: (DOLOS_SUBSETS.index(s) if s in DOLOS_SUBSETS else len(DOLOS_SUBSETS), s))
