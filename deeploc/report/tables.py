"""Runs -> one row-subset x test-subset matrix per configuration, and the results table's ID / OOD per metric.

A configuration is every setting that changes results (:class:`deeploc.report.provenance.Settings`): runs that
differ in any of them are never averaged, they become separate rows named by the settings that differ. Repeats of
one configuration with several seeds give mean +- sample std over seeds and n. ID is the mean of the diagonal cells
and OOD the mean of the off-diagonal cells, exactly as reference/protocol.md defines them. Incomplete matrices keep
their missing cells, never dropped. Subsets are ordered as the runs' `data.subsets`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean, stdev
from typing import Any

from deeploc.metrics import metric_names
from deeploc.report.collect import RunResult, in_family, subset_order
from deeploc.report.provenance import LABELS, Settings, sort_key, varying_keys

# The study's maps first, in the protocol's order; other maps (other decoders, encoders) after, by name.
STUDY_FEATURES = ("image_embed", "high_res_feats_0", "high_res_feats_1")

Cell = tuple[str, str]  # (row subset, test subset)


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
    results: list[RunResult] = field(default_factory=list)  # the runs behind it, in the order they were added
    parameters: int | None = None  # the decoder's, equal in every run of one configuration
    versions: list[str | None] = field(default_factory=list)
    cross: bool = False  # a cross run exists, so off-diagonal cells are expected
    validation: dict[Any, list[dict[str, float]]] = field(default_factory=dict)  # seed -> runs' best validation values

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
        self.results.append(run)
        self.validation.setdefault(run.seed, []).append(run.validation)
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

    def validation_stat(self, metric: str) -> Stat:
        """The best validation value of `metric` ("val/iou") over the runs: per seed the mean over its runs (one
        per training subset), then mean and sample std over seeds."""
        per_seed = {
            seed: fmean(values)
            for seed, runs in self.validation.items()
            if (values := [r[metric] for r in runs if metric in r])
        }
        if not per_seed:
            return Stat(None)
        std = stdev(per_seed.values()) if len(per_seed) >= 2 else None
        return Stat(fmean(per_seed.values()), std, len(per_seed), len(per_seed))

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

    def id_cells(self) -> list[Cell]:
        """The diagonal (train subset == test subset; held-out == test for leave-one-out)."""
        return [(s, s) for s in self.subsets]

    def ood_cells(self) -> list[Cell]:
        """The off-diagonal cells."""
        return [(a, b) for a in self.subsets for b in self.subsets if a != b]

    def id_stat(self, metric: str = "iou") -> Stat:
        """Over the available diagonal cells."""
        return self.stat(self.id_cells(), metric)

    def ood_stat(self, metric: str = "iou") -> Stat:
        """Over the available off-diagonal cells."""
        return self.stat(self.ood_cells(), metric)

    def id_mean(self, metric: str = "iou") -> float | None:
        return self.id_stat(metric).mean

    def ood_mean(self, metric: str = "iou") -> float | None:
        return self.ood_stat(metric).mean

    def seeds(self, metric: str = "iou") -> Stat:
        """Seeds per cell over every cell with a `metric` result (n_min, n_max)."""
        return self.stat(list(self.runs), metric)

    def seed_values(self) -> list[Any]:
        """The seeds of the runs behind this matrix (None: a run that recorded none)."""
        return list(dict.fromkeys(seed for seeds in self.runs.values() for seed in seeds))

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
    return dict(sorted(matrices.items(), key=lambda item: (config_order(item[1]), sort_key(item[0]))))


def matrices_like(runs: Iterable[RunResult], template: Mapping[Settings, Matrix]) -> dict[Settings, Matrix]:
    """Other values of the runs of `template` (their detection or robustness scores as `runs`' `test`) arranged
    exactly as `template`: the same configurations in the same order, labels, subsets and expected cells, so every
    table groups, counts seeds and marks gaps as the results table does. A configuration without such runs gets an
    empty matrix; runs of no configuration of `template` are left out."""
    out = {
        key: Matrix(t.decoder, t.feature, t.split, t.subsets, t.settings, t.label_keys, cross=t.cross)
        for key, t in template.items()
    }
    for run in runs:
        if run.settings in out and in_family(run, out[run.settings].split):
            out[run.settings].add(run)
    return out


def unevaluated(m: Matrix, template: Matrix) -> list[Path]:
    """The runs behind `template` that `m` (built by :func:`matrices_like`) lacks: their values are not in `m`."""
    have = set(m.paths)
    return [p for p in template.paths if p not in have]


def summary_table(matrices: Mapping[Settings, Matrix]) -> list[SummaryRow]:
    """ID and OOD of every metric per configuration, with the expected cells each lacks."""
    return [
        SummaryRow(
            m,
            id={k: m.id_stat(k) for k in metric_names()},
            ood={k: m.ood_stat(k) for k in metric_names()},
            missing={k: m.missing(k) if k in reported_metrics(m) else [] for k in metric_names()},
            n_runs=len(m.paths),
        )
        for m in matrices.values()
    ]


def reported_metrics(m: Matrix) -> list[str]:
    """The metrics some run of `m` reports: a metric its runs' convention does not define (TruFor has no IoU) or
    that their deeploc did not compute yet leaves no cell missing."""
    return [k for k in metric_names() if any(m.value(*cell, k) is not None for cell in m.expected())]


def config_order(m: Matrix) -> tuple[int, str, int, str]:
    """The study's order of configurations: by feature (the study's maps first), then decoder depth."""
    digits = re.findall(r"\d+", m.decoder)
    rank = STUDY_FEATURES.index(m.feature) if m.feature in STUDY_FEATURES else len(STUDY_FEATURES)
    return (rank, m.feature, int(digits[0]) if digits else 0, m.decoder)


def label_keys(matrices: Mapping[Settings, Matrix]) -> tuple[str, ...]:
    """The settings that name the configurations of `matrices` (those that differ between them)."""
    return next(iter(matrices.values())).label_keys if matrices else ()
