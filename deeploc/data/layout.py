"""The Dolos on-disk layout: find the dataset root, scan its folders, index (image, mask) samples.

Layout (the archive unzips to a folder named ``wacv_data``)::

    wacv_data/data/celebahq/real/{train,valid,test}/*.png            real images, no masks (index_real)
    wacv_data/data/celebahq/fake/<subset>/images/{split}/<name>.png  manipulated images
    wacv_data/data/celebahq/fake/<subset>/masks/{split}/<name>.png   3-channel masks, 0 = manipulated, 255 = real
    wacv_data/data/celebahq/fake/p2/...                              fully synthetic, no masks (not a localization subset)
    wacv_data/data/ffhq/...                                          another source (ignored unless source="ffhq")

Only ``fake/<subset>`` folders that hold a ``masks/`` folder are localization subsets. Nothing here skips a bad
file: a silently skipped file changes the sample counts and therefore the metrics, so every problem raises a
:class:`DatasetError` naming the files and the fix. Checking the files themselves is :mod:`deeploc.data.validate`'s
job.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from deeploc.data.errors import DatasetError, format_list, format_problems
from deeploc.data.masks import DEFAULT_POLARITY, check_polarity, check_threshold
from deeploc.data.samples import IMAGE_EXTENSIONS, REAL_SUBSET, SPLITS, Sample

__all__ = [
    "DOWNLOAD_HINT",
    "available_subsets",
    "index_real",
    "index_subsets",
    "pair_masks",
    "resolve_root",
    "scan_folder",
]

DOWNLOAD_HINT = (
    "The Dolos download server is often down (bit-ml/dolos issue #3); to work without it, generate a "
    "synthetic dataset in the same layout (data=synthetic, or `deeploc-make-data OUT`)."
)


def resolve_root(root: str | os.PathLike[str]) -> Path:
    """Return the folder that holds ``celebahq/``.

    Accepts the unzipped ``wacv_data`` folder (which holds ``data/``) or its ``data/`` child. Anything else,
    including the folder that holds ``wacv_data/`` (the zip's parent) and a missing path, raises a
    :class:`DatasetError` naming the path looked at and the fix.
    """
    path = Path(root).expanduser().absolute()
    if not path.exists():
        raise DatasetError(
            f"dataset root {path} does not exist. Set data.root=<...>/wacv_data (the folder the Dolos archive "
            f"unzips to). {DOWNLOAD_HINT}"
        )
    if not path.is_dir():
        hint = " Unzip it first." if path.suffix.lower() == ".zip" else ""
        raise DatasetError(
            f"dataset root {path} is a file, not a folder.{hint} Set data.root=<...>/wacv_data. {DOWNLOAD_HINT}"
        )
    if (path / "celebahq").is_dir():
        return path
    if (path / "data" / "celebahq").is_dir():
        return path / "data"
    if (path / "wacv_data").is_dir():
        raise DatasetError(
            f"{path} holds the unzipped archive folder but is not the dataset root itself: "
            f"set data.root={path / 'wacv_data'}"
        )
    zips = sorted(p.name for p in path.glob("*.zip"))
    if zips:
        raise DatasetError(
            f"{path} holds {format_list(zips)} but no unzipped dataset: unzip it there, then set "
            f"data.root={path / 'wacv_data'}. {DOWNLOAD_HINT}"
        )
    found = sorted(p.name for p in path.iterdir())
    raise DatasetError(
        f"{path} is not a Dolos dataset root: expected {path / 'data' / 'celebahq'} (data.root=<...>/wacv_data) "
        f"or {path / 'celebahq'} (data.root=<...>/wacv_data/data); it holds: {format_list(found) or 'nothing'}. "
        f"{DOWNLOAD_HINT}"
    )


def available_subsets(root: str | os.PathLike[str], source: str = "celebahq") -> list[str]:
    """Sorted names of the localization subsets (``fake/<subset>`` folders that hold ``masks/``)."""
    fake = resolve_root(root) / source / "fake"
    if not fake.is_dir():
        return []
    return sorted(p.name for p in fake.iterdir() if p.is_dir() and (p / "masks").is_dir())


def scan_folder(folder: Path, problems: list[str], key: str = "name") -> tuple[dict[str, Path], list[str]]:
    """The image files of one folder by stem, and its subfolders. Non-image files and ``key``s (names, stems)
    with several image files are added to ``problems``; hidden files (names starting with '.') are ignored."""
    by_stem: dict[str, Path] = {}
    other: list[str] = []
    dups: list[str] = []
    subdirs: list[str] = []
    with os.scandir(folder) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                subdirs.append(entry.name)
                continue
            p = Path(entry.path)
            if p.suffix.lower() not in IMAGE_EXTENSIONS:
                other.append(entry.name)
            elif p.stem in by_stem:
                dups.append(p.stem)
            else:
                by_stem[p.stem] = p
    if other:
        problems.append(
            f"{len(other)} non-image file(s) in {folder}: {format_list(sorted(other))}; remove or move them"
        )
    if dups:
        problems.append(
            f"{len(dups)} {key}(s) with several image files in {folder}: {format_list(sorted(dups))}; a {key} "
            f"names one sample, so keep one file per {key}"
        )
    return by_stem, sorted(subdirs)


def pair_masks(
    images: dict[str, Path], masks: dict[str, Path], idir: Path, mdir: Path, problems: list[str], suffix: str = "",
    hint: str = "",
) -> list[str]:  # fmt: skip
    """The sorted stems of ``images`` (from ``idir``) whose mask ``<stem><suffix>`` is in ``masks`` (from ``mdir``).
    Images without a mask and masks without an image are added to ``problems``, each ending with ``hint``."""
    wanted = {stem + suffix: stem for stem in images}
    no_mask = sorted(stem for key, stem in wanted.items() if key not in masks)
    if no_mask:
        problems.append(
            f"{len(no_mask)} image(s) without a mask: {format_list([images[s].name for s in no_mask])} in {idir} have "
            f"no file named <stem>{suffix}.<ext> in {mdir}; restore the masks or remove the images{hint}"
        )
    no_image = sorted(set(masks) - set(wanted))
    if no_image:
        problems.append(
            f"{len(no_image)} mask(s) without an image: {format_list([masks[m].name for m in no_image])} in {mdir} "
            f"(a mask is named <image stem>{suffix}.<ext>) have no image in {idir}; restore the images or remove the "
            f"masks{hint}"
        )
    return sorted(stem for stem in images if stem + suffix in masks)


def index_subsets(
    root: str | os.PathLike[str],
    subsets: Sequence[str] | str,
    splits: Sequence[str] = SPLITS,
    source: str = "celebahq",
    mask_polarity: str = DEFAULT_POLARITY,
    mask_threshold: int | None = None,
    problems: list[str] | None = None,
) -> list[Sample]:
    """Index ``<source>/fake/<subset>/{images,masks}/<split>`` for each subset and split.

    Returns samples ordered by subset (as given), split (as given), then file name, each carrying ``mask_polarity``
    and ``mask_threshold``. Every problem found (missing subset, missing or empty split, image without mask, mask
    without image, non-image files) is collected and raised together as one :class:`DatasetError`; with a
    ``problems`` list they are appended to it instead (deeploc-check lists every problem of a dataset). Problems
    that leave nothing to index (no dataset root, no source or ``fake`` folder) always raise.
    """
    check_polarity(mask_polarity)
    check_threshold(mask_threshold)
    if isinstance(subsets, str):
        subsets = [subsets]
    subsets = list(dict.fromkeys(subsets))
    if not subsets:
        raise DatasetError("index_subsets: no subsets requested")
    for split in splits:
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; splits are {list(SPLITS)}")
    base = resolve_root(root)
    src = base / source
    if not src.is_dir():
        sources = sorted(p.name for p in base.iterdir() if p.is_dir())
        raise DatasetError(f"no {src} folder; sources found under {base}: {format_list(sources) or 'none'}")
    fake = src / "fake"
    if not fake.is_dir():
        raise DatasetError(f"no {fake} folder: the manipulated images are missing. {DOWNLOAD_HINT}")
    existing = available_subsets(base, source)

    found: list[str] = [] if problems is None else problems
    samples: list[Sample] = []
    for subset in subsets:
        sdir = fake / subset
        if not sdir.is_dir():
            found.append(
                f"missing subset folder {sdir}; localization subsets present: {format_list(existing) or 'none'}. "
                "Check the subset name, or download/extract that subset."
            )
            continue
        if not (sdir / "masks").is_dir():
            found.append(
                f"{sdir} has no masks/ folder, so it is not a localization subset (fully synthetic sets such as "
                f"p2 have no masks); choose from: {format_list(existing) or 'none'}"
            )
            continue
        for split in splits:
            idir, mdir = sdir / "images" / split, sdir / "masks" / split
            if not idir.is_dir():
                found.append(f"missing split folder {idir}; re-extract the archive")
                continue
            if not mdir.is_dir():
                found.append(f"missing mask folder {mdir} (images are in {idir}); re-extract the archive")
                continue
            images, img_dirs = scan_folder(idir, found)
            masks, _ = scan_folder(mdir, found)
            if not images:
                nested = f" (it has subfolders {format_list(img_dirs)}; nested folders are not searched)"
                found.append(f"empty split: {idir} holds no images{nested if img_dirs else ''}; re-extract the archive")
                continue
            for name in pair_masks(images, masks, idir, mdir, found):
                samples.append(Sample(images[name], masks[name], subset, split, name, mask_polarity, mask_threshold))
    if found and problems is None:
        raise DatasetError(f"Dolos dataset at {base} ({source}) has problems:{format_problems(found)}")
    return samples


def index_real(folder: Path, split: str, fix: str) -> list[Sample]:
    """Every image of ``folder`` as a real (pristine) sample of ``split``, subset :data:`REAL_SUBSET`, sorted by
    name. A missing or empty folder, non-image files and names with several files are refused together
    (:func:`scan_folder`), the message ending with ``fix``."""
    if not folder.is_dir():
        raise DatasetError(f"no real-image folder {folder}; {fix}")
    problems: list[str] = []
    images, _ = scan_folder(folder, problems)
    if not images:
        problems.append("it holds no images")
    if problems:
        raise DatasetError(f"real-image folder {folder}: " + "; ".join(problems) + f". {fix}")
    return [Sample(images[name], None, REAL_SUBSET, split, name) for name in sorted(images)]
