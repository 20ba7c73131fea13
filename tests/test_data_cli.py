"""deeploc-make-data and deeploc-check main() calls."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from deeploc.cli import check, make_data
from deeploc.data.images import read_mask
from deeploc.data.manipulations import SUBSETS
from deeploc.data.regions import f1_split
from deeploc.data.samples import SPLITS


def test_make_data_then_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    args = [
        str(out),
        "--n-train",
        "3",
        "--n-valid",
        "2",
        "--n-test",
        "2",
        "--size",
        "32",
        "--n-real",
        "1",
        "--seed",
        "1",
    ]
    assert make_data.main(args) == 0
    text = capsys.readouterr().out
    assert f"data.root={out / 'wacv_data'} data.source=dolos data.synthetic=null" in text
    assert all(s in text for s in SUBSETS)
    assert len(list((out / "wacv_data/data/celebahq/fake/copy-move/images/train").iterdir())) == 3
    assert make_data.main(args) == 0  # idempotent
    assert make_data.main([*args[:-1], "2"]) == 1  # another seed into the same root
    assert "other parameters" in capsys.readouterr().err

    assert check.main([str(out / "wacv_data")]) == 0
    text = capsys.readouterr().out
    assert "OK: 28 samples valid" in text
    assert "copy-move" in text and "     3       2       2       7" in text
    assert check.main([str(out / "wacv_data" / "data"), "--subsets", "blur-noise", "--splits", "test"]) == 0
    assert "OK: 2 samples valid" in capsys.readouterr().out


def test_check_fails_on_bad_data(synthetic_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = sorted((synthetic_copy / "data/celebahq/fake/inpaint-telea/images/valid").iterdir())[2]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert check.main([str(synthetic_copy), "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert f"image {bad}: cannot be decoded" in err
    assert check.main([str(synthetic_copy), "--subsets", "copy-move"]) == 0  # other subsets are fine


def test_check_fails_on_wrong_root(synthetic_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert check.main([str(synthetic_data.parent)]) == 1
    assert f"set data.root={synthetic_data}" in capsys.readouterr().err
    assert check.main([str(synthetic_data), "--subsets", "ldm"]) == 1
    assert "missing subset folder" in capsys.readouterr().err


def _fake(root: Path, subset: str, kind: str, split: str) -> list[Path]:
    return sorted((root / "data/celebahq/fake" / subset / kind / split).iterdir())


def test_check_counts_empty_and_thin_masks_per_subset(synthetic_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    masks = _fake(synthetic_copy, "inpaint-telea", "masks", "test")
    stripe = np.full((64, 64, 3), 255, np.uint8)
    stripe[20:30] = 0  # 10 px tall: no pixel survives the metrics' 15x15 erosion
    cv2.imwrite(str(masks[0]), stripe)
    cv2.imwrite(str(masks[1]), np.full((64, 64, 3), 255, np.uint8))  # empty
    assert check.main([str(synthetic_copy), "--workers", "1"]) == 1  # empty masks are refused by default
    captured = capsys.readouterr()
    assert "1 mask(s) with no manipulated pixel" in captured.err and str(masks[1]) in captured.err
    assert check.main([str(synthetic_copy), "--workers", "1", "--allow-empty-masks"]) == 0
    out = capsys.readouterr().out
    assert "thin" in out and "15x15" in out
    for subset in SUBSETS:
        # Expected counts from the metric's own erosion, mask by mask.
        truth = [read_mask(p) != 255 for split in SPLITS for p in _fake(synthetic_copy, subset, "masks", split)]
        positives = [int(f1_split(torch.from_numpy(t)[None])[0].sum()) for t in truth]
        empty = sum(not t.any() for t in truth)
        thin = sum(t.any() and n == 0 for t, n in zip(truth, positives))
        row = next(line.split() for line in out.splitlines() if line.startswith(subset) and "64x64" in line)
        # subset, masks, empty, thin (no F1 positive after the 15x15 erosion), mean manipulated %, size
        assert row[:4] == [subset, str(len(truth)), str(empty), str(thin)], out
        assert float(row[4]) == pytest.approx(100 * np.mean([t.mean() for t in truth]), abs=0.05)


def test_check_lists_every_problem_in_one_pass(synthetic_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Index problems (a missing mask) no longer hide file problems, and nothing is cut at 20 lines."""
    orphan = _fake(synthetic_copy, "inpaint-telea", "images", "valid")[0]
    _fake(synthetic_copy, "inpaint-telea", "masks", "valid")[0].unlink()
    broken = _fake(synthetic_copy, "copy-move", "images", "train")
    for p in broken:
        p.write_bytes(b"garbage")
    coloured = _fake(synthetic_copy, "blur-noise", "masks", "test")[1]
    red = np.full((64, 64, 3), 255, np.uint8)
    red[5:40, 5:40] = (0, 0, 255)
    cv2.imwrite(str(coloured), red)
    for p in _fake(synthetic_copy, "splice-jpeg", "masks", "train"):
        cv2.imwrite(str(p), 255 - cv2.imread(str(p)))
    for p in _fake(synthetic_copy, "copy-move", "masks", "train"):  # masks of the broken images: still readable
        assert p.is_file()

    assert check.main([str(synthetic_copy), "--workers", "2"]) == 1
    err = capsys.readouterr().err
    assert f"image(s) without a mask: {orphan.name}" in err
    assert all(f"image {p}: cannot be decoded" in err for p in broken)  # all 12, none cut
    assert f"mask {coloured}: coloured" in err
    assert "splice-jpeg/train: the masks mark" in err and "data.mask_polarity=white_is_manipulated" in err
    assert "more)" not in err
    assert err.count("\n  - ") == 1 + len(broken) + 1 + 1, err
