"""Any dataset laid out as an images folder and a masks folder matched by file stem (and optionally a folder of
pristine images): the common form of public localization sets (CASIA, COVERAGE, IMD2020 after a rename, your own).

One folders dataset is ONE localization subset, named ``subset`` (default: the dataset folder's name). Its
images belong to one split (``splits: test``, the default: a test-only set, e.g. for cross-dataset evaluation;
``train`` or ``valid`` likewise), or to the split named by a subfolder (``splits: folders``:
``images/{train,valid,test}/``, and the same under the masks and real folders), which is what training needs.
Datasets whose files do not fit this (several subsets, a split list, masks named unlike their images beyond a
suffix) are described by a CSV instead: :mod:`deeploc.data.sources.manifest`. Recipes: docs/datasets.md.

Nothing is skipped: a missing folder, an image without a mask, a mask without an image, two files with one stem
(``a.png`` and ``a.jpg``) and non-image files are refused together, naming the files and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from deeploc.data.errors import DatasetError, format_list, format_problems
from deeploc.data.layout import index_real, pair_masks, scan_folder
from deeploc.data.masks import WHITE_POLARITY
from deeploc.data.samples import SPLITS, Sample
from deeploc.data.sources.base import SOURCES, DataSource

SPLIT_FOLDERS = "folders"


@SOURCES.register("folders")
class FoldersSource(DataSource):
    """Images and masks matched by file stem (``<images>/<stem>.<ext>`` -> ``<masks>/<stem><mask_suffix>.<ext>``).

    Args:
        root: the dataset folder; the folder options below are relative to it.
        images: the folder of manipulated images.
        masks: the folder of their masks (any image format; gray, in ``mask_polarity``, binarised with
            ``mask_threshold`` when set).
        real: the folder of pristine images (``deeploc-eval --real``), or None.
        subset: the subset name (tables, ``data.subsets``); default: the dataset folder's name.
        splits: ``test`` / ``train`` / ``valid`` (every image in that split) or ``folders`` (one subfolder per split).
        mask_suffix: what a mask's stem adds to its image's (CASIA's ground truths: ``_gt``; IMD2020: ``_mask``).
    """

    def __init__(
        self,
        root: str | Path,
        mask_polarity: str = WHITE_POLARITY,
        mask_threshold: int | None = None,
        images: str = "images",
        masks: str = "masks",
        real: str | None = None,
        subset: str | None = None,
        splits: str = "test",
        mask_suffix: str = "",
    ) -> None:
        super().__init__(root, mask_polarity, mask_threshold)
        if splits not in (*SPLITS, SPLIT_FOLDERS):
            raise DatasetError(
                f"data.source_options.splits={splits!r}: choose test, train or valid (every image in that split) or "
                f"{SPLIT_FOLDERS} (images/<split>/, masks/<split>/ subfolders)"
            )
        self.images, self.masks, self.real, self.splits = images, masks, real, splits
        self.subset = subset or self.root().name
        self.mask_suffix = mask_suffix

    def root(self) -> Path:
        path = self.given_root.absolute()
        if not path.is_dir():
            raise DatasetError(f"dataset folder {path} does not exist or is not a folder: set data.root to it")
        return path

    def available_subsets(self) -> list[str]:
        return [self.subset]

    def _split_folders(self, folder: Path, splits: Sequence[str]) -> dict[str, Path]:
        """The folder of each requested split that this dataset has (all of them with ``splits: folders``)."""
        if self.splits == SPLIT_FOLDERS:
            return {split: folder / split for split in splits}
        return {self.splits: folder} if self.splits in splits else {}

    def samples(self, subsets: Sequence[str], splits: Sequence[str] = SPLITS) -> list[Sample]:
        unknown = [s for s in subsets if s != self.subset]
        if unknown:
            raise DatasetError(
                f"the folders dataset at {self.root()} is one subset, {self.subset!r}, not {format_list(unknown)}: "
                f"pass --subsets {self.subset} (data.subsets=[{self.subset}]), or name it with "
                "data.source_options.subset"
            )
        problems: list[str] = []
        samples: list[Sample] = []
        masks_root = self.root() / self.masks
        for split, idir in self._split_folders(self.root() / self.images, splits).items():
            samples += self._index(
                idir, masks_root / split if self.splits == SPLIT_FOLDERS else masks_root, split, problems
            )
        if problems:
            raise DatasetError(f"folders dataset at {self.root()} has problems:{format_problems(problems)}")
        return samples

    def _index(self, idir: Path, mdir: Path, split: str, problems: list[str]) -> list[Sample]:
        for folder, option in ((idir, "images"), (mdir, "masks")):
            if not folder.is_dir():
                problems.append(f"no folder {folder}; set data.source_options.{option} (--source-option {option}=...)")
        if problems:
            return []
        images, _ = scan_folder(idir, problems, "stem")
        masks, _ = scan_folder(mdir, problems, "stem")
        if not images:
            problems.append(f"{idir} holds no images")
        suffix, hint = self.mask_suffix, ", or set data.source_options.mask_suffix"
        return [
            Sample(images[s], masks[s + suffix], self.subset, split, s, self.mask_polarity, self.mask_threshold)
            for s in pair_masks(images, masks, idir, mdir, problems, suffix, hint)
        ]

    def real_samples(self, split: str) -> list[Sample]:
        if self.real is None:
            raise DatasetError(
                f"the folders dataset at {self.root()} has no real-image folder: set data.source_options.real "
                "(--source-option real=<folder>) or evaluate without --real"
            )
        folders = self._split_folders(self.root() / self.real, [split])
        if split not in folders:
            raise DatasetError(
                f"the folders dataset at {self.root()} puts every image in the {self.splits} split "
                f"(data.source_options.splits={self.splits}), so it has no {split} images (deeploc-eval --real: pass "
                "--threshold-split none when there is no valid split to choose the detection threshold on)"
            )
        return index_real(folders[split], split, "set data.source_options.real to the folder of pristine images")
