"""Mask conventions and dataset rules: coloured masks, polarity, empty masks, thin regions, image sizes.

Every case writes real files and goes through the real readers, validation and data module.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from test_data_datamodule import data_module

from deeploc.data.datamodule import LocalizationDataModule
from deeploc.data.datasets import ImageMaskDataset
from deeploc.data.errors import DatasetError
from deeploc.data.images import read_mask
from deeploc.data.layout import index_subsets
from deeploc.data.manipulations import SUBSETS
from deeploc.data.masks import MaskRules
from deeploc.data.regions import f1_positive_count, f1_split
from deeploc.data.samples import Sample
from deeploc.data.validate import MIN_IMAGE_SIDE, validate_samples

FAKE = Path("data/celebahq/fake")


def _masks(root: Path, subset: str, split: str) -> list[Path]:
    return sorted((root / FAKE / subset / "masks" / split).iterdir())


def _images(root: Path, subset: str, split: str) -> list[Path]:
    return sorted((root / FAKE / subset / "images" / split).iterdir())


def _invert(paths: list[Path]) -> None:
    for p in paths:
        cv2.imwrite(str(p), 255 - cv2.imread(str(p), cv2.IMREAD_UNCHANGED))


def _error(samples: list[Sample], **rules: object) -> str:
    with pytest.raises(DatasetError) as err:
        validate_samples(samples, workers=1, rules=MaskRules(**rules))  # type: ignore[arg-type]
    return str(err.value)


# ------------------------------------------------------------------------------------------- coloured masks


@pytest.mark.parametrize("background", [255, 0])
def test_coloured_mask_is_refused_naming_the_file(synthetic_copy: Path, background: int) -> None:
    """A red region drawn on white (or black): channel 0 alone would read 0% (or 100%) manipulated."""
    mask = _masks(synthetic_copy, "copy-move", "train")[0]
    coloured = np.full((64, 64, 3), background, np.uint8)
    coloured[10:30, 10:40] = (0, 0, 255)  # BGR: pure red
    cv2.imwrite(str(mask), coloured)
    msg = _error(index_subsets(synthetic_copy, ["copy-move"]))
    assert f"mask {mask}: coloured" in msg
    assert "channels disagree on" in msg and "gray" in msg


def test_gray_masks_saved_with_three_equal_channels_or_one_channel_are_fine(synthetic_copy: Path) -> None:
    masks = _masks(synthetic_copy, "copy-move", "train")
    gray = cv2.imread(str(masks[0]), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(masks[0]), gray)  # one channel
    stats = validate_samples(index_subsets(synthetic_copy, ["copy-move"]), workers=1)
    sample = next(s for s in stats if s.mask == masks[0])
    assert stats[sample].manipulated == int((gray != 255).sum())


# ------------------------------------------------------------------------------------------- polarity, empty


def test_empty_mask_is_refused_with_the_count_and_the_allow_key(synthetic_copy: Path) -> None:
    masks = _masks(synthetic_copy, "blur-noise", "valid")
    for p in masks[:2]:
        cv2.imwrite(str(p), np.full((64, 64, 3), 255, np.uint8))  # all real: nothing manipulated
    samples = index_subsets(synthetic_copy, ["blur-noise"])
    msg = _error(samples)
    assert "2 mask(s) with no manipulated pixel" in msg
    assert str(masks[0]) in msg and str(masks[1]) in msg
    assert "data.allow_empty_masks=true" in msg and "data.mask_polarity" in msg
    stats = validate_samples(samples, workers=1, rules=MaskRules(allow_empty=True))
    assert sorted(s.mask for s, st in stats.items() if st.manipulated == 0) == masks[:2]


def test_inverted_split_is_refused_then_read_correctly_with_white_polarity(synthetic_copy: Path) -> None:
    truth = [read_mask(p) != 255 for p in _masks(synthetic_copy, "copy-move", "train")]
    _invert(_masks(synthetic_copy, "copy-move", "train"))
    samples = index_subsets(synthetic_copy, ["copy-move"], splits=("train",))
    msg = _error(samples)
    mean = 100 * (1 - np.mean([t.mean() for t in truth]))
    assert f"copy-move/train: the masks mark {mean:.1f}% of each image as manipulated on average" in msg
    assert "data.mask_polarity=white_is_manipulated" in msg and "data.max_manipulated_fraction" in msg
    # Declared polarity: validation passes and every reader sees the true regions again.
    white = index_subsets(synthetic_copy, ["copy-move"], splits=("train",), mask_polarity="white_is_manipulated")
    validate_samples(white, workers=1)
    items = ImageMaskDataset(white)
    for i, t in enumerate(truth):
        assert torch.equal(items[i]["mask"][0].bool(), torch.from_numpy(t))
    # Regions that genuinely cover most of each image: allowed by raising the limit.
    validate_samples(samples, workers=1, rules=MaskRules(max_manipulated_fraction=1.0))


def test_all_black_masks_are_refused_under_either_polarity(synthetic_copy: Path) -> None:
    for p in _masks(synthetic_copy, "splice-jpeg", "test"):
        cv2.imwrite(str(p), np.zeros((64, 64, 3), np.uint8))
    samples = index_subsets(synthetic_copy, ["splice-jpeg"], splits=("test",))
    assert "100.0% of each image as manipulated" in _error(samples)
    white = index_subsets(synthetic_copy, ["splice-jpeg"], splits=("test",), mask_polarity="white_is_manipulated")
    assert "4 mask(s) with no manipulated pixel" in _error(white)


def test_unknown_settings_name_the_key(synthetic_data: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.mask_polarity='inverted'.*black_is_manipulated or white"):
        index_subsets(synthetic_data, ["copy-move"], mask_polarity="inverted")
    with pytest.raises(ValueError, match=r"data\.max_manipulated_fraction=0.0 must be in \(0, 1\]"):
        MaskRules(max_manipulated_fraction=0.0)


def test_datamodule_takes_the_mask_settings(synthetic_copy: Path) -> None:
    _invert([p for sub in SUBSETS for split in ("train", "valid", "test") for p in _masks(synthetic_copy, sub, split)])
    with pytest.raises(DatasetError, match=r"data\.mask_polarity=white_is_manipulated"):
        data_module(synthetic_copy)
    dm = data_module(synthetic_copy, mask_polarity="white_is_manipulated")
    batch = next(iter(dm.val_dataloader()))
    first = dm.plan.valid[0]
    assert torch.equal(batch["mask"][0, 0].bool(), torch.from_numpy(read_mask(first.mask) == 255))
    assert dm.hparams["mask_polarity"] == "white_is_manipulated"
    with pytest.raises(ValueError, match=r"data\.mask_polarity"):
        LocalizationDataModule(str(synthetic_copy), list(SUBSETS), {"mode": "cross", "subset": "x"}, mask_polarity="x")


def test_validation_cache_is_keyed_by_polarity(synthetic_copy: Path, tmp_path: Path) -> None:
    cache = tmp_path / "v.json"
    samples = index_subsets(synthetic_copy, ["copy-move"], splits=("valid",))
    black = validate_samples(samples, cache_file=cache, workers=1)
    assert len(json.loads(cache.read_text())["entries"]) == len(samples)
    assert validate_samples(samples, cache_file=cache, workers=1) == black  # statistics come back from the cache
    white = index_subsets(synthetic_copy, ["copy-move"], splits=("valid",), mask_polarity="white_is_manipulated")
    # An entry made under the other polarity is not reused: the masks read inverted are refused, not waved through.
    with pytest.raises(DatasetError, match="as manipulated on average"):
        validate_samples(white, cache_file=cache, workers=1)


# ------------------------------------------------------------------------------------------- thin regions


def test_f1_positive_count_equals_the_metric_erosion() -> None:
    rng = np.random.default_rng(0)
    masks = [rng.random((40, 50)) > rng.uniform(0.05, 0.6) for _ in range(20)]
    thin = np.zeros((40, 50), bool)
    thin[5:19, 5:45] = True  # 14 px tall: thinner than the 15x15 erosion
    border = np.zeros((40, 50), bool)
    border[:8, :9] = True  # in the corner: not eroded from the border side, so (0, 0) and (0, 1) survive
    block = np.zeros((40, 50), bool)
    block[10:25, 10:25] = True  # exactly 15x15: one positive
    masks += [thin, border, block, np.zeros((40, 50), bool), np.ones((40, 50), bool), np.ones((3, 3), bool)]
    for m in masks:
        expected = int(f1_split(torch.from_numpy(m)[None])[0].sum())
        assert int(f1_positive_count(torch.from_numpy(m)[None])[0]) == expected
    assert f1_positive_count(torch.from_numpy(np.stack([thin, block, border]))).tolist() == [0, 1, 2]


def test_thin_and_empty_masks_are_counted(synthetic_copy: Path) -> None:
    masks = _masks(synthetic_copy, "inpaint-telea", "test")
    stripe = np.full((64, 64, 3), 255, np.uint8)
    stripe[20:30] = 0  # a 10 px stripe: no F1 positive survives the 15x15 erosion
    cv2.imwrite(str(masks[0]), stripe)
    cv2.imwrite(str(masks[1]), np.full((64, 64, 3), 255, np.uint8))
    samples = index_subsets(synthetic_copy, ["inpaint-telea"], splits=("test",))
    stats = validate_samples(samples, workers=1, rules=MaskRules(allow_empty=True))
    by_mask = {s.mask: st for s, st in stats.items()}
    assert by_mask[masks[0]].manipulated == 640 and by_mask[masks[0]].f1_positive == 0
    assert by_mask[masks[1]].manipulated == 0 and by_mask[masks[1]].f1_positive == 0
    third = torch.from_numpy(read_mask(masks[2]) != 255)[None]
    assert by_mask[masks[2]].f1_positive == int(f1_split(third)[0].sum())


# ------------------------------------------------------------------------------------------- image sizes


def test_tiny_image_is_refused_naming_the_file(synthetic_copy: Path) -> None:
    image, mask = _images(synthetic_copy, "copy-move", "valid")[1], _masks(synthetic_copy, "copy-move", "valid")[1]
    cv2.imwrite(str(image), np.full((1, 1, 3), 90, np.uint8))
    cv2.imwrite(str(mask), np.zeros((1, 1, 3), np.uint8))
    msg = _error(index_subsets(synthetic_copy, ["copy-move"]))
    assert f"image {image}: 1x1 pixels, smaller than {MIN_IMAGE_SIDE} px per side" in msg


def test_mixed_sizes_in_a_folder_are_refused(synthetic_copy: Path) -> None:
    image, mask = _images(synthetic_copy, "copy-move", "valid")[2], _masks(synthetic_copy, "copy-move", "valid")[2]
    big = cv2.resize(cv2.imread(str(image)), (96, 96))
    cv2.imwrite(str(image), big)
    cv2.imwrite(str(mask), cv2.resize(cv2.imread(str(mask)), (96, 96), interpolation=cv2.INTER_NEAREST))
    msg = _error(index_subsets(synthetic_copy, ["copy-move"]))
    assert "copy-move/valid mixes image sizes (64x64: 3, 96x96: 1" in msg and str(image) in msg


def test_mixed_sizes_across_subsets_of_one_batch_are_refused(synthetic_copy: Path) -> None:
    """Leave-one-out trains on three subsets together: every folder is uniform, the training batches are not."""
    for image, mask in zip(_images(synthetic_copy, "copy-move", "train"), _masks(synthetic_copy, "copy-move", "train")):
        cv2.imwrite(str(image), cv2.resize(cv2.imread(str(image)), (48, 48)))
        cv2.imwrite(str(mask), cv2.resize(cv2.imread(str(mask)), (48, 48), interpolation=cv2.INTER_NEAREST))
    split = {"mode": "leave_one_out", "subset": "blur-noise", "n_train": 4, "n_valid": 2}
    with pytest.raises(DatasetError, match=r"the train split mixes image sizes \(48x48: 4, 64x64: 8"):
        data_module(synthetic_copy, split=split)
    data_module(synthetic_copy, split={"mode": "in_domain", "subset": "copy-move"})  # one size per batch: fine


# ---------------------------------------------------------------------------------------------- mask threshold


def _as_jpeg(paths: list[Path]) -> None:
    """Re-save masks through JPEG (values ring around region edges), keeping their .png names."""
    for p in paths:
        ok, data = cv2.imencode(".jpg", cv2.imread(str(p), cv2.IMREAD_UNCHANGED), [cv2.IMWRITE_JPEG_QUALITY, 75])
        assert ok and cv2.imwrite(str(p), cv2.imdecode(data, cv2.IMREAD_UNCHANGED))


def test_mask_threshold_reads_jpeg_saved_masks_that_are_refused_without_it(synthetic_copy: Path) -> None:
    paths = _masks(synthetic_copy, "copy-move", "valid")
    truth = [read_mask(p) != 255 for p in paths]
    _as_jpeg(paths)
    samples = index_subsets(synthetic_copy, ["copy-move"], splits=("valid",))
    error = _error(samples)
    assert "not binary" in error and "data.mask_threshold=127" in error  # the refusal names the fix
    thresholded = index_subsets(synthetic_copy, ["copy-move"], splits=("valid",), mask_threshold=127)
    validate_samples(thresholded, workers=1)
    items = ImageMaskDataset(thresholded)
    for i, (path, t) in enumerate(zip(paths, truth)):
        read = items[i]["mask"][0].bool().numpy()
        # Independently: the JPEG'd file's channel 0 binarised at 127 (black = manipulated).
        assert np.array_equal(read, cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) <= 127)
        assert (read != t).mean() < 0.02  # the JPEG ringing moves at most a few edge pixels


def test_mask_threshold_reads_zero_one_masks_with_white_polarity(synthetic_copy: Path) -> None:
    paths = _masks(synthetic_copy, "blur-noise", "test")
    truth = [read_mask(p) != 255 for p in paths]
    for p, t in zip(paths, truth):
        cv2.imwrite(str(p), t.astype(np.uint8))  # 1 = manipulated, 0 = real: almost black to the eye
    white = index_subsets(
        synthetic_copy, ["blur-noise"], splits=("test",), mask_polarity="white_is_manipulated", mask_threshold=0
    )
    validate_samples(white, workers=1)
    for i, t in enumerate(truth):
        assert torch.equal(ImageMaskDataset(white)[i]["mask"][0].bool(), torch.from_numpy(t))


@pytest.mark.parametrize("value", [-1, 255, 1.5, True, "127"])
def test_bad_mask_thresholds_name_the_key(synthetic_data: Path, value: object) -> None:
    with pytest.raises(ValueError, match=r"data\.mask_threshold=.* must be null .* or an integer in \[0, 254\]"):
        index_subsets(synthetic_data, ["copy-move"], mask_threshold=value)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"data\.mask_threshold"):
        LocalizationDataModule(
            str(synthetic_data), list(SUBSETS), {"mode": "cross", "subset": "copy-move"}, mask_threshold=value
        )


def test_validation_cache_is_keyed_by_mask_threshold(synthetic_copy: Path, tmp_path: Path) -> None:
    cache = tmp_path / "v.json"
    paths = _masks(synthetic_copy, "copy-move", "valid")
    _as_jpeg(paths)
    thresholded = index_subsets(synthetic_copy, ["copy-move"], splits=("valid",), mask_threshold=127)
    validate_samples(thresholded, cache_file=cache, workers=1)
    exact = index_subsets(synthetic_copy, ["copy-move"], splits=("valid",))
    with pytest.raises(DatasetError, match="not binary"):  # the thresholded entries are not reused
        validate_samples(exact, cache_file=cache, workers=1)
