"""Confidence intervals of the report's values and paired comparisons of configurations, from the per-image test
scores the runs saved (:func:`deeploc.report.collect.image_scores`; statistics: :mod:`deeploc.report.stats`).

A cell's data are, per seed of the configuration, its run's per-image scores on the cell's test subset (runs
repeating a seed averaged image by image), in the run's own metric convention. ID / OOD use every diagonal /
off-diagonal cell with such scores.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deeploc.errors import DeeplocError
from deeploc.metrics import metric_label, metric_names
from deeploc.report.collect import ImageScores, image_scores
from deeploc.report.provenance import LOO, OTHER_KEYS, Settings
from deeploc.report.render import md_table, num, settings_cells
from deeploc.report.stats import Block, Interval, PairedResult, bootstrap, holm, paired_test
from deeploc.report.tables import Cell, Matrix, reported_metrics

NO_SCORES = "no per-image scores"
NO_RUN = "no run"


class CompareError(DeeplocError):
    """A requested comparison cannot be made (unknown configuration, different test images)."""


@dataclass(frozen=True)
class Bootstrap:
    """How intervals are drawn: `n` draws from numpy's generator seeded with `seed`, at `level`."""

    n: int = 1000
    seed: int = 0
    level: float = 0.95

    def describe(self) -> str:
        return (
            f"{self.level:.0%} percentile bootstrap intervals over test images and, where a configuration has "
            f"several, seeds (two-level; {self.n} draws, --ci-seed {self.seed})"
        )


class ImageData:
    """Per-image scores of runs, read once per run directory."""

    def __init__(self) -> None:
        self._cache: dict[Path, dict[str, ImageScores]] = {}

    def of(self, m: Matrix, cell: Cell, metric: str) -> tuple[Block | None, tuple[str, ...], str]:
        """The Block of one cell (seeds in sorted order x images) and its image keys, or None and why."""
        row, test = cell
        by_seed: dict[object, list[ImageScores]] = {}
        for run in m.results:
            if run.subset != row or test not in run.test:
                continue
            if run.path not in self._cache:
                self._cache[run.path] = image_scores(run.path, run.settings.convention)
            scores = self._cache[run.path].get(test)
            if scores is None or metric not in scores.values:
                return None, (), NO_SCORES
            by_seed.setdefault(run.seed, []).append(scores)
        if not by_seed:
            return None, (), NO_RUN
        keys = next(iter(by_seed.values()))[0].keys
        if any(s.keys != keys for runs in by_seed.values() for s in runs):
            return None, (), "seeds scored different images"
        rows = [np.mean([s.values[metric] for s in by_seed[seed]], axis=0) for seed in sorted(by_seed, key=str)]
        return Block(test, np.stack(rows)), keys, ""

    def blocks(self, m: Matrix, cells: Iterable[Cell], metric: str) -> tuple[list[Block], str]:
        """The Blocks of the cells that have a run; [] and why when one of them lacks per-image scores."""
        out = []
        for cell in cells:
            block, _, reason = self.of(m, cell, metric)
            if block is None and reason != NO_RUN:
                return [], reason
            if block is not None:
                out.append(block)
        return out, "" if out else NO_RUN


def interval(data: ImageData, m: Matrix, cells: Sequence[Cell], metric: str, how: Bootstrap) -> Interval:
    """The interval of the mean of `cells` of `m` (a reason instead when there is none)."""
    blocks, reason = data.blocks(m, cells, metric)
    if reason:
        return Interval(None, reason=reason)
    return bootstrap(blocks, how.n, how.seed, how.level)


def ci_text(ci: Interval) -> str:
    """``[61.20, 63.80]``, or the reason there is no interval."""
    return f"[{ci.low:.2f}, {ci.high:.2f}]" if ci.ok else ci.reason


def matrix_intervals(data: ImageData, m: Matrix, metric: str, how: Bootstrap) -> dict[str, Interval]:
    """ID, OOD and every cell with a run ("a→b") of `m`."""
    out = {"ID": interval(data, m, m.id_cells(), metric, how), "OOD": interval(data, m, m.ood_cells(), metric, how)}
    out.update({f"{a}→{b}": interval(data, m, [(a, b)], metric, how) for a, b in m.runs})
    return out


def ci_section(
    matrices: Mapping[Settings, Matrix], data: ImageData, how: Bootstrap
) -> tuple[str, list[list], dict[Settings, dict[str, dict[str, Interval]]]]:
    """The Markdown tables (ID / OOD per metric, then the IoU cells of each matrix), the ci.csv rows and the
    intervals (configuration -> metric -> "ID" / "OOD" / "a→b")."""
    shown = [k for k in metric_names() if any(k in reported_metrics(m) for m in matrices.values())]
    found = {key: {k: matrix_intervals(data, m, k, how) for k in shown} for key, m in matrices.items()}
    header = ["configuration", *(f"{w} {metric_label(k)}" for k in shown for w in ("ID", "OOD"))]
    body = [
        [m.label, *(ci_text(found[key][k][w]) for k in shown for w in ("ID", "OOD"))] for key, m in matrices.items()
    ]
    parts = [md_table(header, body)]
    for key, m in matrices.items() if "iou" in shown else ():  # conventions without IoU (trufor) have no cells
        text = {c: ci_text(found[key]["iou"][f"{c[0]}→{c[1]}"]) if c in m.runs else "—" for c in m.expected()}
        corner = "held-out \\ test" if m.split == LOO else "train \\ test"
        rows = [[a, *(text.get((a, b), "—") for b in m.subsets)] for a in m.subsets]
        parts.append(f"IoU cells of {m.label}:\n\n" + md_table([corner, *m.subsets], rows))
    csv_rows = [
        [
            *settings_cells(m),
            m.split,
            k,
            what,
            num(ci.value),
            num(ci.low),
            num(ci.high),
            ci.n_images,
            ci.n_seeds,
            ci.reason,
            how.n,
            how.seed,
        ]
        for key, m in matrices.items()
        for k in shown
        for what, ci in found[key][k].items()
    ]
    return "\n\n".join(parts), csv_rows, found


CI_HEADER = ["decoder", "feature", *OTHER_KEYS, "split", "metric", "value_of", "value", "low", "high"]
CI_HEADER += ["n_images", "n_seeds", "no_interval_because", "draws", "ci_seed"]


def compare(
    matrices: Mapping[Settings, Matrix], pairs: Sequence[tuple[str, str]], data: ImageData, how: Bootstrap
) -> list[tuple[str, str, str, PairedResult]]:
    """A - B of ID and OOD IoU (over the cells both have) for each pair of configuration labels, paired on the same
    test images, with Holm's correction over all the tests. Raises CompareError naming an unknown label or images that differ."""
    by_label = {m.label: m for m in matrices.values()}
    results = []
    for a_label, b_label in pairs:
        for label in (a_label, b_label):
            if label not in by_label:
                raise CompareError(
                    f"--compare {label!r}: no such configuration; the report names them: {', '.join(by_label)}"
                )
        a, b = by_label[a_label], by_label[b_label]
        for which in ("ID", "OOD"):
            cells = [c for c in (a.id_cells() if which == "ID" else a.ood_cells()) if c in a.runs and c in b.runs]
            if not cells:
                continue  # e.g. OOD of in_domain runs: nothing to compare
            _same_images(data, a, b, cells)
            blocks_a, why_a = data.blocks(a, cells, "iou")
            blocks_b, why_b = data.blocks(b, cells, "iou")
            if why_a or why_b:
                raise CompareError(f"--compare {a_label!r} {b_label!r} ({which}): {why_a or why_b}")
            try:
                result = paired_test(blocks_a, blocks_b, how.n, how.seed, how.level)
            except ValueError as err:
                raise CompareError(f"--compare {a_label!r} {b_label!r} ({which}): {err}") from None
            results.append((a_label, b_label, which, result))
        if not results or results[-1][:2] != (a_label, b_label):
            raise CompareError(f"--compare {a_label!r} {b_label!r}: no cell (train and test subset) in common")
    adjusted = holm([r.p for *_, r in results])
    return [(a, b, w, PairedResult(r.difference, r.low, r.high, r.p, p)) for (a, b, w, r), p in zip(results, adjusted)]


def _same_images(data: ImageData, a: Matrix, b: Matrix, cells: Sequence[Cell]) -> None:
    for cell in cells:
        (_, keys_a, _), (_, keys_b, _) = data.of(a, cell, "iou"), data.of(b, cell, "iou")
        if keys_a and keys_b and keys_a != keys_b:
            only = len(set(keys_a) ^ set(keys_b))
            raise CompareError(
                f"--compare {a.label!r} {b.label!r}: they were tested on different images of {cell[1]} "
                f"({len(keys_a)} vs {len(keys_b)} images, {only} not in both, or in another order); a paired test "
                "needs the same images: test both on the same data (deeploc-eval) and compare again"
            )


def compare_md(results: Sequence[tuple[str, str, str, PairedResult]], how: Bootstrap) -> str:
    """The comparisons table and its caption (pairing, interval, p-value, Holm's correction)."""
    header = ["A", "B", "IoU", "A − B", f"{how.level:.0%} CI", "p", "p (Holm)"]
    body = [
        [a, b, w, f"{r.difference:+.2f}", f"[{r.low:+.2f}, {r.high:+.2f}]", f"{r.p:.4f}", f"{r.p_holm:.4f}"]
        for a, b, w, r in results
    ]
    return (
        "## Paired comparisons (IoU, %)\n\n"
        + md_table(header, body)
        + f"\n\nPaired bootstrap on the same test images ({how.n} draws, --ci-seed {how.seed}): each draw resamples "
        "the images once for both configurations and each one's seeds; p is two-sided (bootstrap test of no "
        f"difference). Holm's correction over the {len(results)} test{'s' * (len(results) != 1)} of this table (ID and OOD of every pair, over "
        "the cells both configurations have): "
        "a difference is significant at 5 % when p (Holm) < 0.05."
    )
