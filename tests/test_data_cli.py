"""deeploc-make-data and deeploc-check main() calls."""

from __future__ import annotations

from pathlib import Path

import pytest

from deeploc.cli import check, make_data
from deeploc.data.synthetic import SUBSETS


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
    assert f"data.root={out / 'wacv_data'}" in text
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
