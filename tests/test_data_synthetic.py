"""The synthetic Dolos stand-in: determinism, exact layout, mask convention, idempotency."""

from __future__ import annotations

import inspect
import json
import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import SYNTH_KWARGS

from deeploc.data.errors import DatasetError
from deeploc.data.manipulations import SUBSETS
from deeploc.data.synthetic import DEFAULTS, MANIFEST_NAME, generate_dataset, read_manifest

SPLITS = ("train", "valid", "test")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    kw = {"n_train": 3, "n_valid": 2, "n_test": 2, "size": 48, "n_real": 1}
    a = generate_dataset(tmp_path / "a", seed=3, workers=2, **kw)
    b = generate_dataset(tmp_path / "b", seed=3, workers=1, **kw)
    c = generate_dataset(tmp_path / "c", seed=4, **kw)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert len(fa) == 4 * 2 * 7 + 3 * 1 + 3 * 1 + 3 * 1 + 1  # fake images+masks, real, p2, ffhq, manifest
    assert fa == fb
    assert fa.keys() == fc.keys()
    differing = [k for k in fa if k.endswith(".png") and fa[k] != fc[k]]
    assert len(differing) == len(fa) - 1  # every image differs for another seed


def test_exact_dolos_layout(synthetic_data: Path) -> None:
    assert synthetic_data.name == "wacv_data"
    data = synthetic_data / "data"
    assert sorted(p.name for p in data.iterdir()) == ["celebahq", "ffhq"]
    fake = data / "celebahq" / "fake"
    assert sorted(p.name for p in fake.iterdir()) == sorted([*SUBSETS, "p2"])
    assert not (fake / "p2" / "masks").exists()
    n = {"train": SYNTH_KWARGS["n_train"], "valid": SYNTH_KWARGS["n_valid"], "test": SYNTH_KWARGS["n_test"]}
    all_names: set[str] = set()
    for split in SPLITS:
        names = _names(fake / SUBSETS[0] / "images" / split)
        assert len(names) == n[split]
        assert all(nm.endswith(".png") for nm in names)
        assert not all_names & set(names), "a name appears in two splits"
        all_names |= set(names)
        for subset in SUBSETS:
            assert _names(fake / subset / "images" / split) == names
            assert _names(fake / subset / "masks" / split) == names
        assert len(_names(data / "celebahq" / "real" / split)) == SYNTH_KWARGS["n_real"]
        assert len(_names(data / "ffhq" / "real" / split)) == SYNTH_KWARGS["n_real"]
        assert len(_names(fake / "p2" / "images" / split)) == SYNTH_KWARGS["n_real"]
    manifest = read_manifest(synthetic_data)
    assert manifest is not None
    assert manifest["params"]["n_train"] == SYNTH_KWARGS["n_train"]
    assert manifest["params"]["subsets"] == list(SUBSETS)


def test_masks_follow_dolos_convention_and_are_shared(synthetic_data: Path) -> None:
    fake = synthetic_data / "data" / "celebahq" / "fake"
    fractions, touches_border = [], 0
    for split in SPLITS:
        for name in _names(fake / SUBSETS[0] / "masks" / split):
            raw = [(fake / s / "masks" / split / name).read_bytes() for s in SUBSETS]
            assert all(r == raw[0] for r in raw), f"mask {name} differs between subsets"
            mask = cv2.imread(str(fake / SUBSETS[0] / "masks" / split / name), cv2.IMREAD_UNCHANGED)
            assert mask.shape == (64, 64, 3) and mask.dtype == np.uint8
            assert set(np.unique(mask).tolist()) <= {0, 255}
            assert (mask[..., 0] == mask[..., 1]).all() and (mask[..., 0] == mask[..., 2]).all()
            manipulated = mask[..., 0] != 255
            fractions.append(manipulated.mean())
            border = np.concatenate([manipulated[0], manipulated[-1], manipulated[:, 0], manipulated[:, -1]])
            touches_border += bool(border.any())
    assert min(fractions) >= 0.05 - 1e-9 and max(fractions) <= 0.40 + 1e-9
    assert max(fractions) - min(fractions) > 0.1  # varied sizes
    assert touches_border > 0


def test_manipulations_are_local_and_different(synthetic_data: Path) -> None:
    """Outside the mask every subset equals the real source; inside, each method changes it in its own way."""
    data = synthetic_data / "data" / "celebahq"
    inside_diff: dict[str, list[float]] = {s: [] for s in SUBSETS}
    for name in _names(data / "real" / "train"):
        src = cv2.imread(str(data / "real" / "train" / name)).astype(np.int16)
        mask = cv2.imread(str(data / "fake" / SUBSETS[0] / "masks" / "train" / name))[..., 0] != 255
        outs = {}
        for subset in SUBSETS:
            img = cv2.imread(str(data / "fake" / subset / "images" / "train" / name)).astype(np.int16)
            outs[subset] = img
            assert (img[~mask] == src[~mask]).all(), f"{subset} changed pixels outside the mask of {name}"
            inside_diff[subset].append(float(np.abs(img[mask] - src[mask]).mean()))
        for i, a in enumerate(SUBSETS):
            for b in SUBSETS[i + 1 :]:
                assert np.abs(outs[a][mask] - outs[b][mask]).mean() > 1.0, f"{a} and {b} agree on {name}"
    for subset, diffs in inside_diff.items():
        assert np.mean(diffs) > 2.0, f"{subset} hardly changes the masked region"


def test_idempotent_and_refuses_mismatch(tmp_path: Path) -> None:
    kw = {"n_train": 2, "n_valid": 1, "n_test": 1, "size": 32, "n_real": 0}
    path = generate_dataset(tmp_path, **kw)
    manifest = path / MANIFEST_NAME
    stamp = manifest.stat().st_mtime_ns
    some_file = next((path / "data").rglob("*.png"))
    file_stamp = some_file.stat().st_mtime_ns
    assert generate_dataset(tmp_path, **kw) == path
    assert manifest.stat().st_mtime_ns == stamp and some_file.stat().st_mtime_ns == file_stamp
    with pytest.raises(DatasetError, match=r"other parameters.*n_train.*\(2, 3\)"):
        generate_dataset(tmp_path, **{**kw, "n_train": 3})
    # A file lost after generation is detected from the manifest counts.
    some_file.unlink()
    with pytest.raises(DatasetError, match="incomplete"):
        generate_dataset(tmp_path, **kw)


def test_refuses_foreign_folder_and_ignores_interrupted_run(tmp_path: Path) -> None:
    kw = {"n_train": 2, "n_valid": 1, "n_test": 1, "size": 32, "n_real": 0}
    (tmp_path / "real" / "wacv_data" / "data").mkdir(parents=True)
    with pytest.raises(DatasetError, match=f"no readable {MANIFEST_NAME}"):
        generate_dataset(tmp_path / "real", **kw)
    # An interrupted generation leaves only a hidden partial folder (dead pid): it is cleaned, not used.
    import socket

    root = tmp_path / "interrupted"
    stale = root / f".wacv_data.partial-{socket.gethostname()}-999999999"
    (stale / "data").mkdir(parents=True)
    (stale / "data" / "junk.png").write_bytes(b"x")
    path = generate_dataset(root, **kw)
    assert not stale.exists()
    assert json.loads((path / MANIFEST_NAME).read_text())["params"]["n_train"] == 2
    assert [p.name for p in root.iterdir()] == ["wacv_data"]


def test_fast_enough(tmp_path: Path) -> None:
    start = time.perf_counter()
    generate_dataset(tmp_path, n_train=30, n_valid=5, n_test=5, size=256, n_real=0, workers=min(2, os.cpu_count() or 1))
    elapsed = time.perf_counter() - start
    # 160 manipulated 256x256 images (+ masks); "thousands per minute" means well under 10 s.
    assert elapsed < 10.0, f"{elapsed:.1f} s for 160 images"


def test_rejects_bad_parameters(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="n_valid"):
        generate_dataset(tmp_path, n_train=1, n_valid=0, n_test=1)
    with pytest.raises(DatasetError, match="size"):
        generate_dataset(tmp_path, n_train=1, n_valid=1, n_test=1, size=8)


def test_folder_defaults_are_the_generator_defaults() -> None:
    """dataset_folder_name fills in DEFAULTS: they must be generate_dataset's own defaults."""
    params = inspect.signature(generate_dataset).parameters
    assert {key: params[key].default for key in DEFAULTS} == DEFAULTS
