"""Any dataset described by a CSV file: one row per image, with the columns ``image``, ``mask``, ``subset`` and
``split`` (others are ignored).

* ``image``, ``mask``: paths relative to the CSV file's folder (the dataset root). Absolute paths and paths that
  leave that folder (``../x.png``) are refused, so a manifest describes one folder and moves with it. The check is
  on the written path (symbolic links inside the folder may point anywhere).
* ``mask`` empty: a pristine (real) image (``deeploc-eval --real``); its ``subset`` must be empty or ``real``.
* ``subset``: any name (a column of every table); ``split``: ``train``, ``valid`` or ``test``.

A row's name is its image's file stem; two images with one stem in one subset and split are refused (names label
overlays and pair images across subsets for leave-one-out). Every problem of the file (missing columns, empty
cells, unknown splits, paths outside the folder, missing files, duplicates) is listed at once, with its line.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from deeploc.data.errors import DatasetError, format_list, format_problems
from deeploc.data.masks import WHITE_POLARITY
from deeploc.data.samples import REAL_SUBSET, SPLITS, Sample
from deeploc.data.sources.base import SOURCES, DataSource

COLUMNS = ("image", "mask", "subset", "split")
DEFAULT_NAME = "manifest.csv"


@SOURCES.register("manifest")
class ManifestSource(DataSource):
    """The samples a CSV manifest lists (module docstring).

    Args:
        root: the CSV file, or a folder holding ``manifest.csv``.
    """

    def __init__(
        self, root: str | Path, mask_polarity: str = WHITE_POLARITY, mask_threshold: int | None = None
    ) -> None:
        super().__init__(root, mask_polarity, mask_threshold)
        self._rows: list[Sample] | None = None

    def root(self) -> Path:
        path = self.given_root.absolute()
        if path.is_dir():
            path = path / DEFAULT_NAME
        if not path.is_file():
            raise DatasetError(
                f"manifest {path} does not exist: set data.root to the CSV file (columns {', '.join(COLUMNS)}) or "
                f"to a folder holding {DEFAULT_NAME}"
            )
        return path

    def rows(self) -> list[Sample]:
        """Every row as a sample (real images with ``mask=None``), in file order; read and checked once."""
        if self._rows is None:
            self._rows = self._read()
        return self._rows

    def _read(self) -> list[Sample]:
        path = self.root()
        base = path.parent
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [c.strip() for c in reader.fieldnames or []]
            missing = [c for c in COLUMNS if c not in header]
            if missing:
                raise DatasetError(
                    f"manifest {path} lacks the column(s) {', '.join(missing)} (its header: {', '.join(header) or 'empty'}"
                    f"); it needs {', '.join(COLUMNS)}, one row per image (mask empty for a real image)"
                )
            lines = [(reader.line_num, {k.strip(): (v or "").strip() for k, v in row.items() if k}) for row in reader]
        problems: list[str] = []
        samples: list[Sample] = []
        for line, row in lines:
            sample = self._sample(base, line, row, problems)
            if sample is not None:
                samples.append(sample)
        if not lines:
            problems.append("it lists no image")
        problems += _duplicates(samples)
        if problems:
            raise DatasetError(f"manifest {path} has problems:{format_problems(problems, 30)}")
        return samples

    def _sample(self, base: Path, line: int, row: dict[str, str], problems: list[str]) -> Sample | None:
        where = f"line {line}"
        split, subset = row["split"], row["subset"]
        bad = len(problems)
        if split not in SPLITS:
            problems.append(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
        image = _inside(base, row["image"], f"{where}: image", problems)
        mask = _inside(base, row["mask"], f"{where}: mask", problems) if row["mask"] else None
        if mask is None and subset not in ("", REAL_SUBSET):
            problems.append(
                f"{where}: image {row['image']!r} of subset {subset!r} has no mask; give its mask, or leave subset "
                "empty if it is a real (pristine) image"
            )
        if mask is not None and not subset:
            problems.append(f"{where}: image {row['image']!r} has a mask but no subset; name its subset")
        if mask is not None and subset == REAL_SUBSET:
            problems.append(f"{where}: subset {REAL_SUBSET!r} is kept for pristine images (no mask); rename it")
        for kind, file in (("image", image), ("mask", mask)):
            if file is not None and not file.is_file():
                problems.append(f"{where}: {kind} {file} does not exist")
        if len(problems) > bad or image is None:
            return None
        name = PurePosixPath(row["image"]).stem
        subset = subset if mask is not None else REAL_SUBSET
        return Sample(image, mask, subset, split, name, self.mask_polarity, self.mask_threshold)

    def available_subsets(self) -> list[str]:
        return list(dict.fromkeys(s.subset for s in self.rows() if not s.real))

    def samples(self, subsets: Sequence[str], splits: Sequence[str] = SPLITS) -> list[Sample]:
        known = self.available_subsets()
        unknown = [s for s in subsets if s not in known]
        if unknown:
            raise DatasetError(
                f"manifest {self.root()} has no subset {format_list(unknown)}; its subsets: {format_list(known)}"
            )
        rows = [s for s in self.rows() if not s.real]
        return sorted(
            (s for s in rows if s.subset in subsets and s.split in splits),
            key=lambda s: (list(subsets).index(s.subset), list(splits).index(s.split), s.name),
        )

    def real_samples(self, split: str) -> list[Sample]:
        real = sorted((s for s in self.rows() if s.real and s.split == split), key=lambda s: s.name)
        if not real:
            raise DatasetError(
                f"manifest {self.root()} lists no real image (a row with an empty mask) in the {split} split; add "
                "them, or evaluate without --real"
            )
        return real


def _inside(base: Path, text: str, what: str, problems: list[str]) -> Path | None:
    """``base / text`` when ``text`` is a relative path that stays inside ``base`` (checked lexically)."""
    if not text:
        problems.append(f"{what} is empty")
        return None
    relative = PurePosixPath(text.replace("\\", "/"))
    if relative.is_absolute() or Path(text).is_absolute():
        # The reason is the absolute path itself, also when it points inside the folder.
        inside = Path(text).is_relative_to(base) if Path(text).is_absolute() else False
        fix = (
            f"write it as {Path(text).relative_to(base).as_posix()!r}" if inside else "write it relative to that folder"
        )
        problems.append(
            f"{what} {text!r} is an absolute path: paths in a manifest are relative to its folder {base} (so the "
            f"manifest and its data move together); {fix}"
        )
        return None
    if PurePosixPath(os.path.normpath(relative)).parts[0] == "..":
        problems.append(
            f"{what} {text!r} is not inside the manifest's folder {base}: write paths relative to the CSV file's "
            "folder, without leading '..'"
        )
        return None
    return base / relative


def _duplicates(samples: list[Sample]) -> list[str]:
    """An image listed twice in one subset and split, or two images with one stem there."""
    problems = []
    groups: dict[tuple[str, str, str], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.subset, s.split, s.name), []).append(s)
    for (subset, split, name), group in groups.items():
        if len(group) > 1:
            files = format_list(sorted({str(s.image) for s in group}))
            problems.append(
                f"subset {subset!r}, split {split}: {len(group)} rows share the name {name!r} ({files}); a name (the "
                "image's file stem) must be unique within a subset and split: list each image once and rename clashing files"
            )
    return problems
