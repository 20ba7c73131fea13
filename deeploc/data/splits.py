"""Which samples train, validate and test a run: pure functions over ``list[Sample]``.

Three protocols (protocol.md):

- ``in_domain``: train/valid on one subset, test on the same subset's test split.
- ``cross``: train/valid on one subset, test on each subset of a list (the 4x4 ID/OOD matrix, one row per run).
- ``leave_one_out``: train/valid on ``n_train``/``n_valid`` images from EACH of the other subsets, with the SAME
  file names in every subset (seeded shuffle of one subset's sorted name list, take the first n); test on the
  held-out subset's full test split, then on the seen subsets' test splits.

Every plan is checked: no test file is in train or valid, and train and valid share no file.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from deeploc.data.errors import DatasetError
from deeploc.data.samples import Sample

__all__ = [
    "SPLIT_MODES",
    "SplitPlan",
    "check_disjoint",
    "cross",
    "in_domain",
    "leave_one_out",
    "make_split",
    "subsets_needed",
]

log = logging.getLogger(__name__)

SPLIT_MODES: tuple[str, ...] = ("in_domain", "cross", "leave_one_out")


@dataclass(frozen=True)
class SplitPlan:
    """Samples per stage. ``test`` maps a test subset name to its samples; its key order is the evaluation order."""

    train: list[Sample]
    valid: list[Sample]
    test: dict[str, list[Sample]] = field(default_factory=dict)

    @property
    def test_subsets(self) -> list[str]:
        return list(self.test)

    def all_samples(self) -> list[Sample]:
        """Every sample the plan uses (train, valid, then test in order), without duplicates."""
        seen: dict[tuple[str, str], Sample] = {}
        for s in [*self.train, *self.valid, *(s for v in self.test.values() for s in v)]:
            seen.setdefault((str(s.image), str(s.mask)), s)
        return list(seen.values())


def _select(samples: Sequence[Sample], subset: str, split: str) -> list[Sample]:
    chosen = [s for s in samples if s.subset == subset and s.split == split]
    if not chosen:
        present = sorted({(s.subset, s.split) for s in samples})
        raise DatasetError(
            f"no samples for subset {subset!r}, split {split!r}; indexed (subset, split) pairs: "
            f"{present[:20]}{' ...' if len(present) > 20 else ''}. Index that subset (data.subsets) or fix the name."
        )
    return chosen


def check_disjoint(plan: SplitPlan) -> SplitPlan:
    """Raise if a test file is in train or valid, or train and valid share a file. Not an ``assert``: always on."""
    train = {s.image for s in plan.train}
    valid = {s.image for s in plan.valid}
    test = {s.image for v in plan.test.values() for s in v}
    for a, b, what in (
        (test, train, "test and train"),
        (test, valid, "test and valid"),
        (train, valid, "train and valid"),
    ):
        both = sorted(a & b)
        if both:
            raise DatasetError(f"split leak: {len(both)} file(s) are in both {what}: {', '.join(map(str, both[:10]))}")
    return plan


def in_domain(samples: Sequence[Sample], subset: str) -> SplitPlan:
    """Train, valid and test on one subset's own splits."""
    return check_disjoint(
        SplitPlan(
            train=_select(samples, subset, "train"),
            valid=_select(samples, subset, "valid"),
            test={subset: _select(samples, subset, "test")},
        )
    )


def cross(samples: Sequence[Sample], subset: str, test_subsets: Sequence[str]) -> SplitPlan:
    """Train/valid on ``subset``; test on the test split of each of ``test_subsets`` (in the given order)."""
    test_subsets = list(dict.fromkeys(test_subsets))
    if not test_subsets:
        raise DatasetError("cross: test_subsets is empty")
    return check_disjoint(
        SplitPlan(
            train=_select(samples, subset, "train"),
            valid=_select(samples, subset, "valid"),
            test={t: _select(samples, t, "test") for t in test_subsets},
        )
    )


def _shared_names(samples: Sequence[Sample], seen: list[str], split: str, n: int, rng: random.Random) -> list[Sample]:
    """``n`` names from the first seen subset's ``split`` (sorted, shuffled by ``rng``), taken from every seen subset."""
    by_subset = {sub: {s.name: s for s in _select(samples, sub, split)} for sub in seen}
    too_small = {sub: len(v) for sub, v in by_subset.items() if len(v) < n}
    if too_small:
        counts = ", ".join(f"{sub}: {c}" for sub, c in too_small.items())
        raise DatasetError(
            f"leave_one_out needs {n} {split} images from each seen subset, but {counts}. Lower "
            f"n_{split} (split.n_{split}) or use a larger dataset; the selection is never shrunk silently."
        )
    names = sorted(by_subset[seen[0]])
    rng.shuffle(names)
    chosen = names[:n]
    for sub in seen[1:]:
        absent = [nm for nm in chosen if nm not in by_subset[sub]]
        if absent:
            raise DatasetError(
                f"leave_one_out uses the same file names in every seen subset, but {len(absent)} of the {n} "
                f"{split} names chosen from {seen[0]!r} are missing from {sub!r}: {', '.join(absent[:10])}"
                f"{' ...' if len(absent) > 10 else ''}. The subsets must share file names (as Dolos does)."
            )
    # Grouped by subset, then in shuffled-name order (the training loader shuffles anyway).
    return [by_subset[sub][nm] for sub in seen for nm in chosen]


def leave_one_out(
    samples: Sequence[Sample],
    held_out: str,
    subsets: Sequence[str],
    n_train: int = 3000,
    n_valid: int = 300,
    seed: int = 42,
) -> SplitPlan:
    """Train/valid on ``n_train``/``n_valid`` shared names from each subset except ``held_out``.

    Names: ``random.Random(seed)`` shuffles the sorted train names of the first seen subset (in ``subsets``
    order) and the first ``n_train`` are taken; then the same generator shuffles the sorted valid names and the
    first ``n_valid`` are taken. (The study shuffled unsorted directory listings with ``random.seed(42)``, whose
    order depends on the file system, so its exact selection cannot be reproduced; this one is stable.)

    Test: ``held_out``'s full test split first, then each seen subset's full test split, in ``subsets`` order.
    """
    subsets = list(dict.fromkeys(subsets))
    if held_out not in subsets:
        raise DatasetError(f"leave_one_out: held-out subset {held_out!r} is not in subsets {subsets}")
    seen = [s for s in subsets if s != held_out]
    if not seen:
        raise DatasetError(f"leave_one_out needs at least one subset besides {held_out!r}; got {subsets}")
    if n_train <= 0 or n_valid <= 0:
        raise DatasetError(f"leave_one_out: n_train and n_valid must be positive, got {n_train}, {n_valid}")
    rng = random.Random(seed)
    train = _shared_names(samples, seen, "train", n_train, rng)
    valid = _shared_names(samples, seen, "valid", n_valid, rng)
    test = {held_out: _select(samples, held_out, "test")}
    test.update({sub: _select(samples, sub, "test") for sub in seen})
    return check_disjoint(SplitPlan(train=train, valid=valid, test=test))


def make_split(
    samples: Sequence[Sample],
    mode: str,
    subset: str,
    subsets: Sequence[str],
    n_train: int = 3000,
    n_valid: int = 300,
    seed: int = 42,
) -> SplitPlan:
    """Dispatch on ``mode``: ``in_domain`` (subset), ``cross`` (train subset, test on ``subsets``), or
    ``leave_one_out`` (``subset`` is held out; ``n_train``/``n_valid``/``seed`` apply only here)."""
    if mode == "in_domain":
        return in_domain(samples, subset)
    if mode == "cross":
        return cross(samples, subset, subsets)
    if mode == "leave_one_out":
        return leave_one_out(samples, subset, subsets, n_train=n_train, n_valid=n_valid, seed=seed)
    raise DatasetError(f"unknown split mode {mode!r}; choose one of {list(SPLIT_MODES)}")


def subsets_needed(mode: str, subset: str, subsets: Sequence[str]) -> list[str]:
    """The subsets a split of ``mode`` reads, in order (what to index)."""
    if mode == "in_domain":
        return [subset]
    if mode in ("cross", "leave_one_out"):
        return list(dict.fromkeys([subset, *subsets]))
    raise DatasetError(f"unknown split mode {mode!r}; choose one of {list(SPLIT_MODES)}")
