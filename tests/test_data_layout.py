"""Root resolution, indexing and validation of the Dolos layout, on real files."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import SYNTH_KWARGS

from deeploc.data import validate
from deeploc.data.errors import DatasetError
from deeploc.data.images import read_mask, read_rgb
from deeploc.data.layout import available_subsets, index_subsets, resolve_root
from deeploc.data.manipulations import SUBSETS
from deeploc.data.samples import Sample, count_table, format_count_table
from deeploc.data.validate import validate_samples

FAKE = Path("data/celebahq/fake")


def _first(root: Path, subset: str = "copy-move", split: str = "train", kind: str = "images") -> Path:
    return sorted((root / FAKE / subset / kind / split).iterdir())[0]


# ------------------------------------------------------------------------------------------------ root


def test_resolve_root_accepts_wacv_data_and_data(synthetic_data: Path) -> None:
    data = synthetic_data / "data"
    assert resolve_root(synthetic_data) == data
    assert resolve_root(data) == data
    assert resolve_root(str(data)) == data


def test_resolve_root_rejects_zip_parent_with_fix(synthetic_data: Path) -> None:
    parent = synthetic_data.parent
    with pytest.raises(DatasetError) as err:
        resolve_root(parent)
    assert f"data.root={synthetic_data}" in str(err.value)


def test_resolve_root_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "wacv_data"
    with pytest.raises(DatasetError) as err:
        resolve_root(missing)
    msg = str(err.value)
    assert str(missing) in msg and "data=synthetic" in msg and "often down" in msg


def test_resolve_root_folder_with_zip_and_unrelated_folder(tmp_path: Path) -> None:
    (tmp_path / "wacv_data.zip").write_bytes(b"PK")
    with pytest.raises(DatasetError, match=r"unzip it there.*wacv_data"):
        resolve_root(tmp_path)
    other = tmp_path / "other"
    (other / "stuff").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"not a Dolos dataset root.*stuff"):
        resolve_root(other)
    with pytest.raises(DatasetError, match="is a file"):
        resolve_root(tmp_path / "wacv_data.zip")


# ----------------------------------------------------------------------------------------------- index


def test_index_generated_dataset(synthetic_data: Path) -> None:
    samples = index_subsets(synthetic_data, list(SUBSETS))
    n = SYNTH_KWARGS["n_train"] + SYNTH_KWARGS["n_valid"] + SYNTH_KWARGS["n_test"]
    assert len(samples) == 4 * n
    table = count_table(samples)
    assert list(table) == list(SUBSETS)
    for row in table.values():
        assert row == {"train": 12, "valid": 4, "test": 4}
    # ordered by subset (as given), split (as given), then name; masks pair by name
    first = [s for s in samples if s.subset == SUBSETS[0] and s.split == "train"]
    assert [s.name for s in first] == sorted(s.name for s in first)
    assert samples[0].subset == SUBSETS[0] and samples[0].split == "train"
    assert samples[-1].subset == SUBSETS[-1] and samples[-1].split == "test"
    for s in samples:
        assert s.image.name == s.mask.name == f"{s.name}.png"
        assert s.image.parent == synthetic_data / FAKE / s.subset / "images" / s.split
        assert s.mask.parent == synthetic_data / FAKE / s.subset / "masks" / s.split
    # p2 (no masks), real/ and ffhq/ are ignored
    assert available_subsets(synthetic_data) == sorted(SUBSETS)
    assert not any("real" in s.image.parts or "ffhq" in s.image.parts for s in samples)
    text = format_count_table(table)
    assert "copy-move" in text and " 20" in text


def test_index_some_splits_and_order(synthetic_data: Path) -> None:
    samples = index_subsets(synthetic_data, ["splice-jpeg", "copy-move"], splits=("test", "valid"))
    assert [(s.subset, s.split) for s in samples][:1] == [("splice-jpeg", "test")]
    assert count_table(samples) == {"splice-jpeg": {"valid": 4, "test": 4}, "copy-move": {"valid": 4, "test": 4}}


def test_missing_subset_lists_existing(synthetic_data: Path) -> None:
    with pytest.raises(DatasetError) as err:
        index_subsets(synthetic_data, ["lama", "copy-move"])
    msg = str(err.value)
    assert str(synthetic_data / FAKE / "lama") in msg
    for s in SUBSETS:
        assert s in msg


def test_subset_without_masks_is_not_a_localization_subset(synthetic_data: Path) -> None:
    with pytest.raises(DatasetError, match=r"p2 has no masks/ folder"):
        index_subsets(synthetic_data, ["p2"])


def test_empty_split(synthetic_copy: Path) -> None:
    for kind in ("images", "masks"):
        folder = synthetic_copy / FAKE / "blur-noise" / kind / "valid"
        for p in folder.iterdir():
            p.unlink()
    with pytest.raises(DatasetError) as err:
        index_subsets(synthetic_copy, ["blur-noise"])
    assert f"empty split: {synthetic_copy / FAKE / 'blur-noise' / 'images' / 'valid'}" in str(err.value)


def test_missing_mask_and_orphan_mask(synthetic_copy: Path) -> None:
    mask = _first(synthetic_copy, kind="masks")
    mask.unlink()
    other_image = sorted((synthetic_copy / FAKE / "copy-move" / "images" / "test").iterdir())[0]
    other_image.unlink()
    with pytest.raises(DatasetError) as err:
        index_subsets(synthetic_copy, ["copy-move"])
    msg = str(err.value)
    assert "1 image(s) without a mask" in msg and mask.name in msg
    assert "1 mask(s) without an image" in msg and other_image.name in msg
    assert str(mask.parent) in msg


def test_non_image_file_in_split_folder(synthetic_copy: Path) -> None:
    junk = synthetic_copy / FAKE / "copy-move" / "images" / "train" / "notes.txt"
    junk.write_text("hello")
    (junk.parent / ".DS_Store").write_bytes(b"\0")  # hidden files are ignored
    with pytest.raises(DatasetError) as err:
        index_subsets(synthetic_copy, ["copy-move"])
    msg = str(err.value)
    assert "1 non-image file(s)" in msg and "notes.txt" in msg and ".DS_Store" not in msg


# -------------------------------------------------------------------------------------------- validate


def test_generated_dataset_validates(synthetic_data: Path) -> None:
    validate_samples(index_subsets(synthetic_data, list(SUBSETS)), workers=2)


def _validate_error(samples: list[Sample]) -> str:
    with pytest.raises(DatasetError) as err:
        validate_samples(samples, workers=2)
    return str(err.value)


def test_corrupt_png_is_named(synthetic_copy: Path) -> None:
    img = _first(synthetic_copy)
    data = img.read_bytes()
    img.write_bytes(data[: len(data) // 2])  # truncated
    samples = index_subsets(synthetic_copy, ["copy-move"])
    msg = _validate_error(samples)
    assert f"image {img}: cannot be decoded" in msg
    assert msg.startswith("1 problem(s)")


def test_text_file_named_png_is_named(synthetic_copy: Path) -> None:
    mask = _first(synthetic_copy, subset="blur-noise", split="test", kind="masks")
    mask.write_text("not an image")
    msg = _validate_error(index_subsets(synthetic_copy, ["blur-noise"]))
    assert f"mask {mask}: cannot be decoded" in msg


def test_mask_of_another_size_is_named(synthetic_copy: Path) -> None:
    mask = _first(synthetic_copy, kind="masks")
    cv2.imwrite(str(mask), np.full((32, 48, 3), 255, np.uint8))
    msg = _validate_error(index_subsets(synthetic_copy, ["copy-move"]))
    assert f"mask {mask}: size 48x32 differs from its image" in msg


def test_non_binary_mask_is_named(synthetic_copy: Path) -> None:
    mask = _first(synthetic_copy, kind="masks")
    m = cv2.imread(str(mask))
    noisy = np.where(m == 255, 250, m).astype(np.uint8)  # e.g. a JPEG-saved mask: 250 would read "manipulated"
    cv2.imwrite(str(mask), noisy)
    msg = _validate_error(index_subsets(synthetic_copy, ["copy-move"]))
    assert f"mask {mask}: not binary" in msg


def test_gray_and_rgba_images_are_convertible(tmp_path: Path) -> None:
    gray, rgba, mask = tmp_path / "g.png", tmp_path / "a.png", tmp_path / "m.png"
    cv2.imwrite(str(gray), np.full((32, 32), 7, np.uint8))
    bgra = np.zeros((32, 32, 4), np.uint8)
    bgra[..., 0], bgra[..., 2], bgra[..., 3] = 10, 200, 255  # B=10, R=200
    cv2.imwrite(str(rgba), bgra)
    m = np.full((32, 32), 255, np.uint8)
    m[:4] = 0
    cv2.imwrite(str(mask), m)
    validate_samples([Sample(gray, mask, "s", "train", "g"), Sample(rgba, mask, "s", "train", "a")])
    assert read_rgb(gray).shape == (32, 32, 3) and (read_rgb(gray) == 7).all()
    assert read_rgb(rgba)[0, 0].tolist() == [200, 0, 10]  # RGB order
    assert (read_mask(mask) != 255).sum() == 4 * 32


def test_many_problems_are_listed_with_a_count(synthetic_copy: Path) -> None:
    base = synthetic_copy / FAKE / "inpaint-telea"
    for folder in (base / "images" / "train", base / "masks" / "train", base / "images" / "valid"):
        for p in folder.iterdir():
            p.write_bytes(b"garbage")
    samples = index_subsets(synthetic_copy, ["inpaint-telea"])
    msg = _validate_error(samples)
    assert msg.startswith("28 problem(s) in 20 samples")
    assert msg.count("cannot be decoded") == 20  # the first 20 are listed ...
    assert "(+8 more)" in msg  # ... and the rest counted


def test_validation_cache_skips_unchanged_and_catches_changes(
    synthetic_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    samples = index_subsets(synthetic_copy, ["copy-move"])
    cache = tmp_path / "cache" / "valid.json"
    calls: list[Path] = []
    real_check = validate.check_sample

    def counting(sample: Sample) -> list[str]:
        calls.append(sample.image)
        return real_check(sample)

    monkeypatch.setattr(validate, "check_sample", counting)
    validate_samples(samples, cache_file=cache, workers=1)
    assert len(calls) == len(samples) and cache.is_file()
    calls.clear()
    validate_samples(samples, cache_file=cache, workers=1)
    assert calls == []
    # Rewriting a file (even with the same size and an old mtime) invalidates its entry.
    img = samples[3].image
    st = img.stat()
    img.write_bytes(b"\0" * st.st_size)
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(DatasetError, match=str(img)):
        validate_samples(samples, cache_file=cache, workers=1)
    assert calls == [img]
    # A deleted file is reported as missing, cache or not.
    samples[5].mask.unlink()
    with pytest.raises(DatasetError, match=f"{samples[5].mask}: file is missing"):
        validate_samples(samples, cache_file=cache, workers=1)
