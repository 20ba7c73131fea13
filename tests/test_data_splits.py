"""Split protocols: in-domain, cross, leave-one-out (shared names, seeded), leak checks."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from deeploc.data.errors import DatasetError
from deeploc.data.layout import index_subsets
from deeploc.data.manipulations import SUBSETS
from deeploc.data.samples import Sample
from deeploc.data.splits import SplitPlan, check_disjoint, cross, in_domain, leave_one_out, make_split

SUBS = ["lama", "ldm", "pluralistic", "repaint-p2-9k"]
COUNTS = {"train": 40, "valid": 12, "test": 10}


def _samples(subsets=SUBS, counts=COUNTS, drop: dict[str, set[str]] | None = None) -> list[Sample]:
    """In-memory samples in Dolos naming: names shared across subsets, disjoint across splits."""
    out = []
    start = 0
    for split, n in counts.items():
        names = [f"{i:05d}" for i in range(start, start + n)]
        start += n
        for sub in subsets:
            for nm in names:
                if drop and nm in drop.get(sub, set()):
                    continue
                base = Path("/d/celebahq/fake") / sub
                out.append(
                    Sample(base / "images" / split / f"{nm}.png", base / "masks" / split / f"{nm}.png", sub, split, nm)
                )
    random.Random(0).shuffle(out)  # the functions must not depend on input order
    return out


def _ids(samples: list[Sample]) -> list[tuple[str, str, str]]:
    return [(s.subset, s.split, s.name) for s in samples]


def test_in_domain() -> None:
    plan = in_domain(_samples(), "ldm")
    assert (len(plan.train), len(plan.valid)) == (40, 12)
    assert list(plan.test) == ["ldm"] and len(plan.test["ldm"]) == 10
    assert {s.subset for s in plan.train + plan.valid} == {"ldm"}
    assert {s.split for s in plan.train} == {"train"} and {s.split for s in plan.valid} == {"valid"}
    assert {s.split for s in plan.test["ldm"]} == {"test"}


def test_cross_tests_on_each_subset_in_order() -> None:
    order = ["pluralistic", "lama", "repaint-p2-9k", "ldm"]
    plan = cross(_samples(), "lama", order)
    assert plan.test_subsets == order
    assert {s.subset for s in plan.train} == {"lama"} and len(plan.train) == 40 and len(plan.valid) == 12
    for sub in order:
        assert len(plan.test[sub]) == 10 and {s.subset for s in plan.test[sub]} == {sub}


def test_leave_one_out_uses_the_same_names_in_every_seen_subset() -> None:
    samples = _samples()
    plan = leave_one_out(samples, "pluralistic", SUBS, n_train=15, n_valid=5, seed=42)
    seen = ["lama", "ldm", "repaint-p2-9k"]
    assert len(plan.train) == 45 and len(plan.valid) == 15
    for stage, n in ((plan.train, 15), (plan.valid, 5)):
        per_subset = {sub: sorted(s.name for s in stage if s.subset == sub) for sub in seen}
        assert all(len(v) == n for v in per_subset.values())
        assert per_subset["lama"] == per_subset["ldm"] == per_subset["repaint-p2-9k"]
        assert "pluralistic" not in {s.subset for s in stage}
    assert {s.split for s in plan.train} == {"train"} and {s.split for s in plan.valid} == {"valid"}
    # test: held-out subset first (full test split), then the seen subsets in `subsets` order
    assert plan.test_subsets == ["pluralistic", *seen]
    assert all(len(v) == 10 for v in plan.test.values())
    # the selection is the protocol's: random.Random(seed) shuffles the sorted train names, first n
    names = sorted({s.name for s in samples if s.split == "train"})
    rng = random.Random(42)
    rng.shuffle(names)
    assert [s.name for s in plan.train if s.subset == "lama"] == names[:15]


def test_leave_one_out_is_seeded() -> None:
    a = leave_one_out(_samples(), "lama", SUBS, n_train=10, n_valid=4, seed=42)
    b = leave_one_out(list(reversed(_samples())), "lama", SUBS, n_train=10, n_valid=4, seed=42)
    c = leave_one_out(_samples(), "lama", SUBS, n_train=10, n_valid=4, seed=7)
    assert _ids(a.train) == _ids(b.train) and _ids(a.valid) == _ids(b.valid)
    assert {s.name for s in a.train} != {s.name for s in c.train}


def test_leave_one_out_fails_instead_of_shrinking() -> None:
    with pytest.raises(DatasetError) as err:
        leave_one_out(_samples(), "lama", SUBS, n_train=41, n_valid=4)
    msg = str(err.value)
    assert "needs 41 train images" in msg and "ldm: 40" in msg and "never shrunk" in msg
    with pytest.raises(DatasetError, match="needs 13 valid images"):
        leave_one_out(_samples(), "lama", SUBS, n_train=40, n_valid=13)


def test_leave_one_out_requires_shared_names() -> None:
    # ldm lacks one train name but has an extra one: same count, different names
    samples = _samples(drop={"ldm": {"00003"}})
    samples.append(Sample(Path("/d/x.png"), Path("/d/xm.png"), "ldm", "train", "99999"))
    with pytest.raises(DatasetError, match=r"missing from 'ldm': 00003"):
        leave_one_out(samples, "pluralistic", SUBS, n_train=40, n_valid=4)


def test_no_test_file_in_train_or_valid() -> None:
    for plan in (
        in_domain(_samples(), "lama"),
        cross(_samples(), "lama", SUBS),
        leave_one_out(_samples(), "ldm", SUBS, n_train=20, n_valid=6),
    ):
        test_files = {s.image for v in plan.test.values() for s in v}
        assert not test_files & {s.image for s in plan.train + plan.valid}
    s = _samples()[0]
    with pytest.raises(DatasetError, match=r"split leak: 1 file\(s\) are in both test and train"):
        check_disjoint(SplitPlan(train=[s], valid=[], test={"x": [s]}))


def test_make_split_dispatch_and_errors() -> None:
    samples = _samples()
    assert _ids(make_split(samples, "in_domain", "lama", SUBS).train) == _ids(in_domain(samples, "lama").train)
    assert make_split(samples, "cross", "lama", SUBS).test_subsets == SUBS
    loo = make_split(samples, "leave_one_out", "lama", SUBS, n_train=8, n_valid=2, seed=1)
    assert len(loo.train) == 24 and loo.test_subsets[0] == "lama"
    with pytest.raises(DatasetError, match=r"unknown split mode 'crosss'.*in_domain"):
        make_split(samples, "crosss", "lama", SUBS)
    with pytest.raises(DatasetError, match=r"held-out subset 'other' is not in subsets"):
        make_split(samples, "leave_one_out", "other", SUBS)
    with pytest.raises(DatasetError, match=r"no samples for subset 'other', split 'train'"):
        make_split(samples, "in_domain", "other", SUBS)


def test_splits_on_a_generated_dataset(synthetic_data: Path) -> None:
    samples = index_subsets(synthetic_data, list(SUBSETS))
    plan = make_split(samples, "leave_one_out", "splice-jpeg", list(SUBSETS), n_train=5, n_valid=2, seed=42)
    assert len(plan.train) == 15 and len(plan.valid) == 6
    assert plan.test_subsets == ["splice-jpeg", "inpaint-telea", "copy-move", "blur-noise"]
    names = {sub: {s.name for s in plan.train if s.subset == sub} for sub in SUBSETS[:3]}
    assert names["inpaint-telea"] == names["copy-move"] == names["blur-noise"]
    assert all(s.image.is_file() for s in plan.all_samples())
    assert len(plan.all_samples()) == 15 + 6 + 4 * 4
