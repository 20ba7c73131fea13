"""The folders and manifest data sources, and real (pristine) images of every source: counts, polarity, bad input
refused by name. Every case writes real files and reads them through the real sources, validation and datasets."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np
import pytest
import torch
from test_data_datamodule import data_module

from deeploc.data.datasets import ImageMaskDataset
from deeploc.data.errors import DatasetError
from deeploc.data.images import read_mask, read_rgb
from deeploc.data.layout import index_subsets
from deeploc.data.manipulations import SUBSETS
from deeploc.data.masks import WHITE_POLARITY as WHITE
from deeploc.data.samples import REAL_SUBSET
from deeploc.data.sources import build_source
from deeploc.data.validate import validate_samples
from deeploc.testing import SourceContract
from tests.conftest import SYNTH_KWARGS

FAKE = Path("data/celebahq/fake")
REAL = Path("data/celebahq/real")


def folders_copy(
    wacv: Path, dest: Path, subset: str, splits: tuple[str, ...] = ("test",), per_split: bool = False
) -> Path:
    """A folders-layout copy of one generated subset: images/ as they are, masks/ inverted to white-is-manipulated
    (how public datasets draw them) and saved as <stem>_gt.png, real/ the pristine images."""
    for split in splits:
        tail = Path(split) if per_split else Path()
        for kind in ("images", "masks"):
            (dest / kind / tail).mkdir(parents=True, exist_ok=True)
        (dest / "real" / tail).mkdir(parents=True, exist_ok=True)
        for image in sorted((wacv / FAKE / subset / "images" / split).iterdir()):
            shutil.copy(image, dest / "images" / tail / image.name)
            mask = cv2.imread(str(wacv / FAKE / subset / "masks" / split / image.name), cv2.IMREAD_GRAYSCALE)
            cv2.imwrite(str(dest / "masks" / tail / f"{image.stem}_gt.png"), 255 - mask)
        for image in sorted((wacv / REAL / split).iterdir()):
            shutil.copy(image, dest / "real" / tail / image.name)
    return dest


def manifest_copy(wacv: Path, dest: Path, subsets: list[str], splits: tuple[str, ...]) -> Path:
    """A manifest describing a copy of the generated data (masks white-is-manipulated), real images included."""
    rows = []
    for subset in subsets:
        for split in splits:
            for image in sorted((wacv / FAKE / subset / "images" / split).iterdir()):
                target = dest / subset / split
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy(image, target / image.name)
                mask = cv2.imread(str(wacv / FAKE / subset / "masks" / split / image.name), cv2.IMREAD_GRAYSCALE)
                cv2.imwrite(str(target / f"{image.stem}.mask.png"), 255 - mask)
                rows.append(
                    [f"{subset}/{split}/{image.name}", f"{subset}/{split}/{image.stem}.mask.png", subset, split]
                )
    for split in splits:
        for image in sorted((wacv / REAL / split).iterdir()):
            (dest / "real" / split).mkdir(parents=True, exist_ok=True)
            shutil.copy(image, dest / "real" / split / image.name)
            rows.append([f"real/{split}/{image.name}", "", "", split])
    write_csv(dest / "manifest.csv", [["image", "mask", "subset", "split", "note"], *[[*r, "x"] for r in rows]])
    return dest / "manifest.csv"


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return path


def same_targets(a: list, b: list) -> None:
    """Two lists of samples read as the same images and the same manipulated pixels."""
    assert len(a) == len(b) > 0
    for x, y in zip(ImageMaskDataset(a), ImageMaskDataset(b)):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])


# ------------------------------------------------------------------------------------------------ real images


def test_generated_and_dolos_sources_list_their_real_images(synthetic_data: Path) -> None:
    source = build_source("dolos", root=synthetic_data)
    n_real = SYNTH_KWARGS["n_real"]
    for split in ("train", "valid", "test"):
        real = source.real_samples(split)
        assert [s.image for s in real] == sorted((synthetic_data / REAL / split).iterdir())
        assert len(real) == min(n_real, SYNTH_KWARGS[f"n_{split}"])
        assert all(s.mask is None and s.real and s.subset == REAL_SUBSET and s.split == split for s in real)
    stats = validate_samples(real, workers=1)  # decoded and size-checked; no mask rule applies
    assert all(st.manipulated == 0 for st in stats.values())
    item = ImageMaskDataset(real)[0]
    assert item["mask"].shape == (1, *read_rgb(real[0].image).shape[:2]) and not item["mask"].any()


def test_missing_or_bad_real_folders_are_refused_by_name(synthetic_copy: Path) -> None:
    source = build_source("dolos", root=synthetic_copy)
    (synthetic_copy / REAL / "valid" / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"real/valid: 1 non-image file\(s\) in \S+real/valid: notes.txt"):
        source.real_samples("valid")
    shutil.rmtree(synthetic_copy / REAL / "test")
    with pytest.raises(DatasetError, match=r"no real-image folder .*real/test; re-extract"):
        source.real_samples("test")
    with pytest.raises(DatasetError, match="unknown split 'dev'"):
        source.real_samples("dev")


# ------------------------------------------------------------------------------------------------------ folders


def test_folders_source_reads_the_same_images_and_masks_as_dolos(synthetic_data: Path, tmp_path: Path) -> None:
    root = folders_copy(synthetic_data, tmp_path / "casia", "copy-move")
    source = build_source("folders", root=root, mask_suffix="_gt")  # white_is_manipulated by default
    assert source.available_subsets() == ["casia"]
    samples = source.samples(["casia"])
    assert [s.split for s in samples] == ["test"] * SYNTH_KWARGS["n_test"]
    validate_samples(samples, workers=1)
    same_targets(samples, index_subsets(synthetic_data, ["copy-move"], splits=("test",)))
    real = build_source("folders", root=root, real="real").real_samples("test")
    assert [s.name for s in real] == sorted(p.stem for p in (synthetic_data / REAL / "test").iterdir())


def test_folders_source_with_split_folders_trains_like_dolos(synthetic_data: Path, tmp_path: Path) -> None:
    splits = ("train", "valid", "test")
    root = folders_copy(synthetic_data, tmp_path / "mine", "blur-noise", splits, per_split=True)
    options = {"splits": "folders", "mask_suffix": "_gt", "real": "real"}
    split = {"mode": "in_domain", "subset": "mine"}
    dm = data_module(root, subsets=["mine"], split=split, source="folders", source_options=options, mask_polarity=WHITE)
    assert (len(dm.plan.train), len(dm.plan.valid), len(dm.plan.test["mine"])) == tuple(
        SYNTH_KWARGS[f"n_{s}"] for s in splits
    )
    same_targets(dm.plan.valid, index_subsets(synthetic_data, ["blur-noise"], splits=("valid",)))
    assert [s.split for s in dm.data_source.real_samples("valid")] == ["valid"] * 2


def test_folders_source_refuses_bad_layouts_naming_each_problem(synthetic_data: Path, tmp_path: Path) -> None:
    root = folders_copy(synthetic_data, tmp_path / "bad", "copy-move")
    images = sorted((root / "images").iterdir())
    images[0].unlink()  # its mask has no image now
    (root / "masks" / f"{images[1].stem}_gt.png").unlink()  # image without mask
    cv2.imwrite(str(root / "images" / f"{images[2].stem}.jpg"), cv2.imread(str(images[2])))  # stem collision
    (root / "masks" / "Thumbs.db").write_bytes(b"x")
    with pytest.raises(DatasetError) as err:
        build_source("folders", root=root, mask_suffix="_gt").samples(["bad"])
    msg = str(err.value)
    assert f"1 image(s) without a mask: {images[1].name}" in msg and "mask_suffix" in msg
    assert f"1 mask(s) without an image: {images[0].stem}_gt.png" in msg
    assert f"1 stem(s) with several image files in {root / 'images'}: {images[2].stem}" in msg
    assert "1 non-image file(s)" in msg and "Thumbs.db" in msg
    # Without the suffix, no mask matches: every image is named.
    with pytest.raises(DatasetError, match=r"image\(s\) without a mask"):
        build_source("folders", root=folders_copy(synthetic_data, tmp_path / "ok", "copy-move")).samples(["ok"])


def test_folders_source_settings_are_checked(synthetic_data: Path, tmp_path: Path) -> None:
    root = folders_copy(synthetic_data, tmp_path / "d", "copy-move")
    with pytest.raises(ValueError, match=r"data\.mask_polarity='inverted'"):
        build_source("folders", root=root, mask_polarity="inverted")
    with pytest.raises(DatasetError, match=r"splits='all'.*test, train or valid.*folders"):
        build_source("folders", root=root, splits="all")
    with pytest.raises(DatasetError, match=r"one subset, 'd', not lama: pass --subsets d"):
        build_source("folders", root=root, mask_suffix="_gt").samples(["lama"])
    with pytest.raises(DatasetError, match=r"no folder .*/gt; set data\.source_options\.masks"):
        build_source("folders", root=root, masks="gt").samples(["d"])
    with pytest.raises(DatasetError, match=r"no real-image folder: set data\.source_options\.real"):
        build_source("folders", root=root).real_samples("test")
    with pytest.raises(DatasetError, match="every image in the test split"):
        build_source("folders", root=root, real="real").real_samples("valid")
    with pytest.raises(DatasetError, match=r"data source 'folders': .*unexpected keyword argument 'image'"):
        build_source("folders", root=root, image="x")
    # The wrong polarity: the inverted-split rule catches it.
    with pytest.raises(DatasetError, match="look inverted"):
        validate_samples(
            build_source("folders", root=root, mask_suffix="_gt", mask_polarity="black_is_manipulated").samples(["d"]),
            workers=1,
        )


# ----------------------------------------------------------------------------------------------------- manifest


def test_manifest_source_reads_the_same_samples_as_dolos(synthetic_data: Path, tmp_path: Path) -> None:
    subsets = ["copy-move", "splice-jpeg"]
    csv_path = manifest_copy(synthetic_data, tmp_path / "m", subsets, ("valid", "test"))
    for root in (csv_path, csv_path.parent):  # the file, or the folder holding manifest.csv
        source = build_source("manifest", root=root)
        assert source.root() == csv_path and source.available_subsets() == subsets
    samples = source.samples(subsets, ("valid", "test"))
    assert [(s.subset, s.split) for s in samples] == [
        (sub, sp) for sub in subsets for sp in ("valid", "test") for _ in range(SYNTH_KWARGS[f"n_{sp}"])
    ]
    validate_samples(samples, workers=1)
    same_targets(samples, index_subsets(synthetic_data, subsets, splits=("valid", "test")))
    real = source.real_samples("test")
    assert [s.name for s in real] == sorted(p.stem for p in (synthetic_data / REAL / "test").iterdir())
    assert all(s.mask is None and s.subset == REAL_SUBSET for s in real)
    with pytest.raises(DatasetError, match=r"no real image .* in the train split"):
        source.real_samples("train")
    with pytest.raises(DatasetError, match=r"has no subset lama; its subsets: copy-move, splice-jpeg"):
        source.samples(["lama"])


def test_manifest_with_missing_columns_is_refused(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "m.csv", [["image", "subset", "fold"], ["a.png", "x", "test"]])
    with pytest.raises(DatasetError, match=r"lacks the column\(s\) mask, split \(its header: image, subset, fold\)"):
        build_source("manifest", root=path).rows()
    with pytest.raises(DatasetError, match=r"manifest .*nothing.csv does not exist"):
        build_source("manifest", root=tmp_path / "nothing.csv").rows()


def test_manifest_problems_are_listed_with_their_line(synthetic_data: Path, tmp_path: Path) -> None:
    csv_path = manifest_copy(synthetic_data, tmp_path / "m", ["copy-move"], ("test",))
    rows = list(csv.reader(csv_path.open()))
    first, second = rows[1], rows[2]
    outside = tmp_path / "outside.png"
    shutil.copy(synthetic_data / FAKE / "copy-move" / "images" / "test" / Path(first[0]).name, outside)
    bad = [
        rows[0],
        first,
        ["../outside.png", first[1], "copy-move", "test"],  # leaves the folder
        [str(outside), first[1], "copy-move", "test"],  # absolute
        [second[0], "", "copy-move", "test"],  # a manipulated image without its mask
        [second[0], second[1], "copy-move", "dev"],  # unknown split
        ["copy-move/test/missing.png", second[1], "copy-move", "test"],  # no such file
        [first[0], first[1], "copy-move", "test"],  # listed twice
        [second[0], second[1], "", "test"],  # mask but no subset
        [str(csv_path.parent / second[0]), second[1], "copy-move", "test"],  # absolute, inside the folder
    ]
    with pytest.raises(DatasetError) as err:
        build_source("manifest", root=write_csv(csv_path, bad)).rows()
    msg = str(err.value)
    assert "line 3: image '../outside.png' is not inside the manifest's folder" in msg
    assert f"line 4: image {str(outside)!r} is an absolute path" in msg
    # Inside the folder, the reason is still that it is absolute (not "not inside"), with the relative spelling.
    inside = str(csv_path.parent / second[0])
    assert f"line 10: image {inside!r} is an absolute path" in msg and f"write it as {second[0]!r}" in msg
    assert "line 5: image" in msg and "has no mask; give its mask" in msg
    assert "line 6: split 'dev' is not one of train, valid, test" in msg
    assert "line 7: image" in msg and "missing.png does not exist" in msg
    assert f"2 rows share the name {Path(first[0]).stem!r}" in msg
    assert "line 9: image" in msg and "has a mask but no subset" in msg


def test_datamodule_trains_from_a_manifest(synthetic_data: Path, tmp_path: Path) -> None:
    csv_path = manifest_copy(synthetic_data, tmp_path / "m", list(SUBSETS[:2]), ("train", "valid", "test"))
    subsets = list(SUBSETS[:2])
    split = {"mode": "cross", "subset": SUBSETS[0]}
    dm = data_module(csv_path, subsets=subsets, split=split, source="manifest", mask_polarity="white_is_manipulated")
    assert dm.test_subsets == subsets
    batch = next(iter(dm.val_dataloader()))
    truth = read_mask(synthetic_data / FAKE / SUBSETS[0] / "masks" / "valid" / dm.plan.valid[0].image.name) != 255
    assert torch.equal(batch["mask"][0, 0].bool(), torch.from_numpy(np.ascontiguousarray(truth)))


# ------------------------------------------------------------------------------------------------ Hydra configs


def test_data_folders_and_manifest_configs_build_their_sources(synthetic_data: Path, tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from deeploc.config import CONF_DIR
    from tests.test_settings import _problem

    root = folders_copy(synthetic_data, tmp_path / "mine", "copy-move", ("train", "valid", "test"), per_split=True)
    csv_path = manifest_copy(synthetic_data, tmp_path / "m", ["copy-move"], ("train", "valid", "test"))
    configs = {
        "folders": [f"data.root={root}", "data.source_options.subset=mine", "data.source_options.mask_suffix=_gt"],
        "manifest": [f"data.root={csv_path}", "data.subsets=[copy-move]"],
    }
    for name, overrides in configs.items():
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("train", overrides=[f"data={name}", "split=in_domain", "data.num_workers=0", *overrides])
        dm = instantiate(cfg.data, validate_cache=None)
        dm.setup("fit")
        assert dm.data_source.registry_name == name and dm.mask_polarity == "white_is_manipulated"
        assert len(dm.plan.train) == SYNTH_KWARGS["n_train"] and len(dm.plan.test[cfg.subset]) == SYNTH_KWARGS["n_test"]
    assert "data.source_options.subset is not set" in _problem("data=folders", f"data.root={root}")
    assert "data.mask_threshold=300 must be null" in _problem("data.mask_threshold=300")


# ------------------------------------------------------------------------------------ the shipped contract


def _write_pairs(folder: Path, names: list[str], mask_name: str = "{}.png") -> None:
    """Small PNG images and white-is-manipulated masks (``mask_name`` formats the mask file of each stem)."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir(parents=True)
    for name in names:
        cv2.imwrite(str(folder / "images" / f"{name}.png"), rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
        mask = np.zeros((32, 32), np.uint8)
        mask[8:16, 8:20] = 255
        cv2.imwrite(str(folder / "masks" / mask_name.format(name)), mask)


class TestFoldersSourceContract(SourceContract):
    name = "folders"
    counts: ClassVar = {("mine", "test"): 3}

    def make_dataset(self, folder: Path) -> dict:
        _write_pairs(folder / "mine", ["a", "b", "c"])
        return {"root": folder / "mine", "subset": "mine"}


class TestManifestSourceContract(SourceContract):
    name = "manifest"
    counts: ClassVar = {("x", "train"): 2, ("x", "test"): 1}

    def make_dataset(self, folder: Path) -> dict:
        _write_pairs(folder, ["a", "b", "c"])
        rows = ["image,mask,subset,split"]
        rows += [f"images/{n}.png,masks/{n}.png,x,{s}" for n, s in zip("abc", ["train", "train", "test"])]
        (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
        return {"root": folder / "manifest.csv"}
