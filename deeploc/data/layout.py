"""The Dolos on-disk layout: find the dataset root, index (image, mask) samples, validate the files.

Layout (the archive unzips to a folder named ``wacv_data``)::

    wacv_data/data/celebahq/real/{train,valid,test}/*.png            real images, no masks (index_real)
    wacv_data/data/celebahq/fake/<subset>/images/{split}/<name>.png  manipulated images
    wacv_data/data/celebahq/fake/<subset>/masks/{split}/<name>.png   3-channel masks, 0 = manipulated, 255 = real
    wacv_data/data/celebahq/fake/p2/...                              fully synthetic, no masks (not a localization subset)
    wacv_data/data/ffhq/...                                          another source (ignored unless source="ffhq")

Only ``fake/<subset>`` folders that hold a ``masks/`` folder are localization subsets. Nothing here skips a bad
file: a silently skipped file changes the sample counts and therefore the metrics, so every problem raises a
:class:`DatasetError` naming the files and the fix. What a mask must look like is :mod:`deeploc.data.masks`' job;
each :class:`Sample` carries the polarity its mask is drawn in, so every reader reads it the same way.

Images and masks are decoded with OpenCV (``cv2.imdecode``) everywhere in deeploc; :func:`read_rgb` and
:func:`read_mask` are the two readers the datasets use too, so validation checks exactly what training reads.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from deeploc.data.errors import LIST_LIMIT, DatasetError, format_list
from deeploc.data.masks import (
    DEFAULT_POLARITY,
    MASK_MANIPULATED_MAX,
    MASK_MAX_AMBIGUOUS_FRACTION,
    MaskRules,
    MaskStats,
    binarize,
    check_polarity,
    check_threshold,
    empty_mask_problem,
    inspect_mask,
    polarity_problem,
    to_dolos,
)
from deeploc.io import atomic_write_bytes

__all__ = [
    "IMAGE_EXTENSIONS",
    "MIN_IMAGE_SIDE",
    "REAL_SUBSET",
    "SPLITS",
    "DatasetError",
    "Sample",
    "available_subsets",
    "count_table",
    "dataset_problems",
    "find_samples",
    "format_count_table",
    "image_size",
    "index_real",
    "index_subsets",
    "inspect_samples",
    "read_mask",
    "read_rgb",
    "resolve_root",
    "scan_folder",
    "scan_pair",
    "validate_samples",
]

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "valid", "test")
# The subset name of pristine images (DataSource.real_samples).
REAL_SUBSET = "real"
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})

# The smallest image side accepted. The encoder resizes any image to its input size, so this is a sanity floor,
# not a technical limit: below it an image holds next to nothing for SAM2 to see (a 32 px image is upsampled 32x
# to 1024) and the metrics' 15x15 erosion / 11x11 dilation band covers most of it. Dolos images are 256 px, the
# generator's smallest are 32 px.
MIN_IMAGE_SIDE = 32

# Bump when the validation rules or the cached statistics change: older cache entries are then ignored.
_VALIDATION_VERSION = 2

DOWNLOAD_HINT = (
    "The Dolos download server is often down (bit-ml/dolos issue #3); to work without it, generate a "
    "synthetic dataset in the same layout (data=synthetic, or `deeploc-make-data OUT`)."
)


@dataclass(frozen=True)
class Sample:
    """One manipulated image and its mask, or a pristine (real) image, whose ``mask`` is None: every pixel real.
    ``name`` is the file stem, shared across subsets in Dolos; ``mask_polarity`` and ``mask_threshold`` say how the
    mask is drawn (:mod:`deeploc.data.masks`)."""

    image: Path
    mask: Path | None
    subset: str
    split: str
    name: str
    mask_polarity: str = DEFAULT_POLARITY
    mask_threshold: int | None = None

    @property
    def real(self) -> bool:
        """A pristine image: no mask, nothing manipulated."""
        return self.mask is None


# --------------------------------------------------------------------------------------------------- root


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


# -------------------------------------------------------------------------------------------------- index


def scan_pair(
    idir: Path, mdir: Path, problems: list[str], key: str
) -> tuple[dict[str, Path], dict[str, Path], list[str]]:
    """Scan an image folder and its mask folder (:func:`scan_folder`): (images, masks, the image folder's subfolders).
    Non-image files and ``key``s (names, stems) with several image files are added to ``problems``."""
    images, img_other, img_dups, img_dirs = scan_folder(idir)
    masks, mask_other, mask_dups, _ = scan_folder(mdir)
    for folder, other in ((idir, img_other), (mdir, mask_other)):
        if other:
            problems.append(f"{len(other)} non-image file(s) in {folder}: {format_list(other)}; remove or move them")
    for folder, dups in ((idir, img_dups), (mdir, mask_dups)):
        if dups:
            problems.append(
                f"{len(dups)} {key}(s) with several image files in {folder}: {format_list(dups)}; images and masks "
                f"are matched by {key}, so keep one file per {key}"
            )
    return images, masks, img_dirs


def scan_folder(folder: Path) -> tuple[dict[str, Path], list[str], list[str], list[str]]:
    """Files of one split folder: (stem -> image path, non-image file names, duplicate stems, subfolders).

    Hidden files (names starting with '.') are ignored.
    """
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
    return by_stem, sorted(other), sorted(dups), sorted(subdirs)


def find_samples(
    root: str | os.PathLike[str],
    subsets: Sequence[str] | str,
    splits: Sequence[str] = SPLITS,
    source: str = "celebahq",
    mask_polarity: str = DEFAULT_POLARITY,
    mask_threshold: int | None = None,
) -> tuple[list[Sample], list[str]]:
    """:func:`index_subsets` without raising on problems of the layout: ``(samples found, problems)``.

    Problems that leave nothing to index (no dataset root, no source or ``fake`` folder) still raise.
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

    problems: list[str] = []
    samples: list[Sample] = []
    for subset in subsets:
        sdir = fake / subset
        if not sdir.is_dir():
            problems.append(
                f"missing subset folder {sdir}; localization subsets present: {format_list(existing) or 'none'}. "
                "Check the subset name, or download/extract that subset."
            )
            continue
        if not (sdir / "masks").is_dir():
            problems.append(
                f"{sdir} has no masks/ folder, so it is not a localization subset (fully synthetic sets such as "
                f"p2 have no masks); choose from: {format_list(existing) or 'none'}"
            )
            continue
        for split in splits:
            idir, mdir = sdir / "images" / split, sdir / "masks" / split
            if not idir.is_dir():
                problems.append(f"missing split folder {idir}; re-extract the archive")
                continue
            if not mdir.is_dir():
                problems.append(f"missing mask folder {mdir} (images are in {idir}); re-extract the archive")
                continue
            images, masks, img_dirs = scan_pair(idir, mdir, problems, "name")
            if not images:
                nested = f" (it has subfolders {format_list(img_dirs)}; nested folders are not searched)"
                problems.append(
                    f"empty split: {idir} holds no images{nested if img_dirs else ''}; re-extract the archive"
                )
                continue
            no_mask = sorted(images.keys() - masks.keys())
            if no_mask:
                problems.append(
                    f"{len(no_mask)} image(s) without a mask: {format_list([images[n].name for n in no_mask])} "
                    f"in {idir} have no file of the same name in {mdir}; restore the masks or remove the images"
                )
            no_image = sorted(masks.keys() - images.keys())
            if no_image:
                problems.append(
                    f"{len(no_image)} mask(s) without an image: {format_list([masks[n].name for n in no_image])} "
                    f"in {mdir} have no file of the same name in {idir}; restore the images or remove the masks"
                )
            for name in sorted(images.keys() & masks.keys()):
                samples.append(Sample(images[name], masks[name], subset, split, name, mask_polarity, mask_threshold))
    return samples, problems


def index_subsets(
    root: str | os.PathLike[str],
    subsets: Sequence[str] | str,
    splits: Sequence[str] = SPLITS,
    source: str = "celebahq",
    mask_polarity: str = DEFAULT_POLARITY,
    mask_threshold: int | None = None,
) -> list[Sample]:
    """Index ``<source>/fake/<subset>/{images,masks}/<split>`` for each subset and split.

    Returns samples ordered by subset (as given), split (as given), then file name, each carrying
    ``mask_polarity`` and ``mask_threshold``. Every problem found (missing subset, missing or empty split, image without mask, mask
    without image, non-image files) is collected and raised together as one :class:`DatasetError`.
    """
    samples, problems = find_samples(root, subsets, splits, source, mask_polarity, mask_threshold)
    if problems:
        base = resolve_root(root)
        raise DatasetError(f"Dolos dataset at {base} ({source}) has problems:\n  - " + "\n  - ".join(problems))
    return samples


def index_real(folder: Path, split: str, fix: str) -> list[Sample]:
    """Every image of ``folder`` as a real (pristine) sample of ``split``, subset :data:`REAL_SUBSET`, sorted by
    name. A missing or empty folder, non-image files and names with several files are refused together, the
    message ending with ``fix``."""
    if not folder.is_dir():
        raise DatasetError(f"no real-image folder {folder}; {fix}")
    images, other, dups, _ = scan_folder(folder)
    problems = []
    if other:
        problems.append(f"{len(other)} non-image file(s): {format_list(other)}; remove or move them")
    if dups:
        problems.append(f"{len(dups)} name(s) with several image files: {format_list(dups)}; keep one file per name")
    if not images:
        problems.append("it holds no images")
    if problems:
        raise DatasetError(f"real-image folder {folder}: " + "; ".join(problems) + f". {fix}")
    return [Sample(images[name], None, REAL_SUBSET, split, name) for name in sorted(images)]


# --------------------------------------------------------------------------------------------------- read


def _decode(path: Path) -> np.ndarray | None:
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError:
        return None
    if data.size == 0:
        return None
    return cv2.imdecode(data, cv2.IMREAD_UNCHANGED)


def _as_rgb_uint8(arr: np.ndarray) -> np.ndarray | str:
    """Convert a cv2-decoded array (BGR / BGRA / gray, 8 or 16 bit) to HxWx3 uint8 RGB, or return a reason."""
    if arr.dtype == np.uint16:
        arr = np.round(arr.astype(np.float32) / 257.0).astype(np.uint8)
    elif arr.dtype != np.uint8:
        return f"unsupported pixel type {arr.dtype}"
    if arr.ndim == 2:
        return cv2.cvtColor(arr, cv2.COLOR_GRAY2RGB)
    if arr.ndim == 3 and arr.shape[2] == 1:
        return cv2.cvtColor(arr[..., 0], cv2.COLOR_GRAY2RGB)
    if arr.ndim == 3 and arr.shape[2] == 3:
        return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    if arr.ndim == 3 and arr.shape[2] == 4:
        return cv2.cvtColor(arr, cv2.COLOR_BGRA2RGB)
    return f"unsupported shape {arr.shape} (not gray, RGB or RGBA)"


def _read_rgb_or_reason(path: Path) -> np.ndarray | str:
    arr = _decode(path)
    if arr is None:
        if not path.exists():
            return "file is missing"
        return "cannot be decoded as an image (corrupt, truncated, empty or not an image file)"
    return _as_rgb_uint8(arr)


def read_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image as HxWx3 uint8 RGB; raise :class:`DatasetError` naming the file if it cannot be read."""
    p = Path(path)
    out = _read_rgb_or_reason(p)
    if isinstance(out, str):
        raise DatasetError(f"image {p}: {out}")
    return out


def read_mask(
    path: str | os.PathLike[str], polarity: str = DEFAULT_POLARITY, threshold: int | None = None
) -> np.ndarray:
    """Read a mask as HxW uint8 in the Dolos convention (255 = real, else manipulated) whatever ``polarity`` it is
    drawn in (binarised first with ``threshold``, see :mod:`deeploc.data.masks`): channel 0 in RGB order
    (``mask[..., 0]``); validation checks that the other channels agree."""
    p = Path(path)
    out = _read_rgb_or_reason(p)
    if isinstance(out, str):
        raise DatasetError(f"mask {p}: {out}")
    return np.ascontiguousarray(to_dolos(binarize(out[..., 0], threshold), polarity))


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(height, width)`` of an image file, from its header when Pillow reads it (else by decoding it)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
            return height, width
    except Exception:  # not readable by Pillow: OpenCV decides (and names the file when it cannot)
        return read_rgb(path).shape[:2]


# ----------------------------------------------------------------------------------------------- validate


def _check_sample(sample: Sample) -> tuple[list[str], MaskStats | None]:
    """Reasons why a sample is unusable (empty when it is fine), and its mask's statistics when it is (a real
    image's: its size, nothing manipulated)."""
    reasons: list[str] = []
    img = _read_rgb_or_reason(sample.image)
    if isinstance(img, str):
        reasons.append(f"image {sample.image}: {img}")
    elif min(img.shape[:2]) < MIN_IMAGE_SIDE:
        reasons.append(
            f"image {sample.image}: {img.shape[1]}x{img.shape[0]} pixels, smaller than {MIN_IMAGE_SIDE} px per side "
            "(too small to localize anything in); remove it or replace it with the full-size file"
        )
    if sample.mask is None:
        return reasons, (None if reasons or isinstance(img, str) else MaskStats(*img.shape[:2], 0, 0))
    mask = _read_rgb_or_reason(sample.mask)
    if isinstance(mask, str):
        reasons.append(f"mask {sample.mask}: {mask}")
        return reasons, None
    mask_reasons, stats = inspect_mask(mask, sample.mask_polarity, sample.mask_threshold)
    reasons.extend(f"mask {sample.mask}: {reason}" for reason in mask_reasons)
    if not isinstance(img, str) and img.shape[:2] != mask.shape[:2]:
        reasons.append(
            f"mask {sample.mask}: size {mask.shape[1]}x{mask.shape[0]} differs from its image {sample.image} "
            f"({img.shape[1]}x{img.shape[0]}, WxH)"
        )
    return reasons, (None if reasons else stats)


def _stat_key(sample: Sample) -> tuple[str, list[int]] | None:
    """Cache key and fingerprint of image and mask; None if a file is missing.

    The key holds the mask polarity and threshold (the statistics depend on them). The fingerprint is (size,
    mtime_ns, ctime_ns, inode) of both files (a real image's twice): ctime changes on every write and on
    ``touch``/``utime``, and cannot be set back, so a rewritten file is never mistaken for a validated one.
    """
    try:
        si = os.stat(sample.image)
        sm = si if sample.mask is None else os.stat(sample.mask)
    except OSError:
        return None
    fp = [si.st_size, si.st_mtime_ns, si.st_ctime_ns, si.st_ino, sm.st_size, sm.st_mtime_ns, sm.st_ctime_ns, sm.st_ino]
    threshold = "" if sample.mask_threshold is None else f"\t>{sample.mask_threshold}"
    return f"{sample.image}\t{sample.mask}\t{sample.mask_polarity}{threshold}", fp


_FINGERPRINT_LEN = 8  # cache entry = fingerprint + (height, width, manipulated, f1_positive)


def _cache_header() -> dict[str, object]:
    return {
        "version": _VALIDATION_VERSION,
        "mask_manipulated_max": MASK_MANIPULATED_MAX,
        "mask_max_ambiguous_fraction": MASK_MAX_AMBIGUOUS_FRACTION,
        "min_image_side": MIN_IMAGE_SIDE,
    }


def _load_cache(cache_file: Path | None) -> dict[str, list[int]]:
    if cache_file is None or not cache_file.is_file():
        return {}
    try:
        data = json.loads(cache_file.read_text())
        if data.get("header") != _cache_header():
            return {}
        entries = data["entries"]
        return {str(k): [int(x) for x in v] for k, v in entries.items() if len(v) == _FINGERPRINT_LEN + 4}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        log.warning("ignoring unreadable validation cache %s", cache_file)
        return {}


def _save_cache(cache_file: Path, entries: dict[str, list[int]]) -> None:
    try:
        atomic_write_bytes(cache_file, json.dumps({"header": _cache_header(), "entries": entries}).encode())
    except OSError as exc:  # a read-only cache location must not stop training
        log.warning("could not write validation cache %s: %s", cache_file, exc)


def inspect_samples(
    samples: Iterable[Sample],
    cache_file: str | os.PathLike[str] | None = None,
    workers: int = 2,
) -> tuple[dict[Sample, MaskStats], list[str]]:
    """Decode and check every image and mask: ``(statistics of the good samples, every problem found)``.

    Checks per sample: both files decode (corrupt, truncated and non-image files fail); the image is RGB or
    convertible (gray, RGBA, 16 bit) and at least ``MIN_IMAGE_SIDE`` px per side; the mask has the image's height
    and width and follows :func:`deeploc.data.masks.inspect_mask` (binary up to noise, channels agree).
    ``workers`` threads decode in parallel (OpenCV releases the GIL).

    With ``cache_file``, samples that passed are remembered with their statistics by (path, polarity, size,
    mtime_ns, ctime_ns, inode) of both files, so re-validating an unchanged dataset only costs a ``stat`` per file;
    any rewrite, replacement or ``touch`` of a file invalidates its entry, as does a change of the rules. Failed
    samples are never cached. The cache is a JSON file replaced atomically; concurrent writers can only lose
    entries.
    """
    samples = list(samples)
    cache_path = Path(cache_file) if cache_file is not None else None
    cache = _load_cache(cache_path)
    problems: list[str] = []
    stats: dict[Sample, MaskStats] = {}
    todo: list[tuple[Sample, str, list[int]]] = []
    for s in samples:
        keyed = _stat_key(s)
        if keyed is None:
            which = [str(p) for p in (s.image, s.mask) if p is not None and not p.exists()]
            problems.append(f"{format_list(which)}: file is missing")
            continue
        key, fp = keyed
        hit = cache.get(key)
        if hit is not None and hit[:_FINGERPRINT_LEN] == fp:
            stats[s] = MaskStats(*hit[_FINGERPRINT_LEN:])
        else:
            todo.append((s, key, fp))

    if todo:
        log.info("validating %d of %d samples (%d cached)", len(todo), len(samples), len(samples) - len(todo))
    if workers > 1 and len(todo) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(lambda item: _check_sample(item[0]), todo, chunksize=64))
    else:
        results = [_check_sample(item[0]) for item in todo]

    for (sample, key, fp), (reasons, found) in zip(todo, results):
        problems.extend(reasons)
        if found is not None:
            stats[sample] = found
            cache[key] = [*fp, found.height, found.width, found.manipulated, found.f1_positive]
    if cache_path is not None and any(found is not None for _, found in results):
        _save_cache(cache_path, cache)
    return {s: stats[s] for s in samples if s in stats}, problems


def _size_problem(group: str, members: Sequence[Sample], stats: Mapping[Sample, MaskStats]) -> str | None:
    by_size: dict[tuple[int, int], list[Sample]] = {}
    for s in members:
        if s in stats:
            by_size.setdefault((stats[s].height, stats[s].width), []).append(s)
    if len(by_size) < 2:
        return None
    sizes = sorted(by_size)
    counts = ", ".join(f"{w}x{h}: {len(by_size[(h, w)])}" for h, w in sizes)
    rarest = min(sizes, key=lambda hw: len(by_size[hw]))
    return (
        f"{group} mixes image sizes ({counts}, WxH), but a batch needs one size: e.g. "
        f"{format_list([s.image for s in by_size[rarest]], 5)} are {rarest[1]}x{rarest[0]}. Resize the images and "
        "masks of the odd size (masks with nearest-neighbour interpolation) or remove them"
    )


def dataset_problems(
    stats: Mapping[Sample, MaskStats],
    rules: MaskRules | None = None,
    batches: Mapping[str, Sequence[Sample]] | None = None,
) -> list[str]:
    """The rules on groups of samples, from their statistics (:func:`inspect_samples`): empty masks (unless
    ``rules.allow_empty``), masks that mark most of each image as manipulated across a ``<subset>/<split>``
    folder (wrong polarity), and mixed image sizes within a batch group (``batches``: name -> samples; default:
    each ``<subset>/<split>`` folder)."""
    rules = rules or MaskRules()
    problems: list[str] = []
    folders: dict[str, list[Sample]] = {}
    for s in stats:
        folders.setdefault(f"{s.subset}/{s.split}", []).append(s)
    masked = [s for s in stats if not s.real]  # real images have no mask to check
    if not rules.allow_empty:
        for polarity in sorted({s.mask_polarity for s in masked}):
            empty = [s.mask for s in masked if s.mask_polarity == polarity and stats[s].manipulated == 0]
            if empty:
                problems.append(empty_mask_problem(empty, polarity))  # type: ignore[arg-type]
    for group, members in folders.items():
        members = [s for s in members if not s.real]
        problem = members and polarity_problem(group, [stats[s] for s in members], members[0].mask_polarity, rules)
        if problem:
            problems.append(problem)
    for group, members in (batches if batches is not None else folders).items():
        problem = _size_problem(group, members, stats)
        if problem:
            problems.append(problem)
    return problems


def validate_samples(
    samples: Iterable[Sample],
    cache_file: str | os.PathLike[str] | None = None,
    workers: int = 2,
    rules: MaskRules | None = None,
    batches: Mapping[str, Sequence[Sample]] | None = None,
) -> dict[Sample, MaskStats]:
    """:func:`inspect_samples` then :func:`dataset_problems`; raise one :class:`DatasetError` listing every
    problem (the first ``LIST_LIMIT`` of them, and how many more), or return each sample's statistics."""
    samples = list(samples)
    stats, bad = inspect_samples(samples, cache_file, workers)
    bad += dataset_problems(stats, rules, batches)
    if bad:
        shown = "\n  - ".join(bad[:LIST_LIMIT])
        more = f"\n  (+{len(bad) - LIST_LIMIT} more)" if len(bad) > LIST_LIMIT else ""
        raise DatasetError(
            f"{len(bad)} problem(s) in {len(samples)} samples:\n  - {shown}{more}\n"
            "Fix or replace these files (re-extract the archive, or regenerate a synthetic dataset), or change the "
            "named setting. Bad files are never skipped, because skipping would silently change the sample counts "
            "and the metrics."
        )
    return stats


# ------------------------------------------------------------------------------------------------- counts


def count_table(samples: Iterable[Sample]) -> dict[str, dict[str, int]]:
    """Counts per subset (first-seen order) and split (train, valid, test order): ``{subset: {split: n}}``."""
    table: dict[str, dict[str, int]] = {}
    for s in samples:
        row = table.setdefault(s.subset, {})
        row[s.split] = row.get(s.split, 0) + 1
    return {sub: {sp: row[sp] for sp in SPLITS if sp in row} for sub, row in table.items()}


def format_count_table(table: dict[str, dict[str, int]]) -> str:
    """A small fixed-width text table of :func:`count_table` output, with a total column."""
    width = max([len("subset"), *(len(s) for s in table)])
    lines = [f"{'subset':<{width}}  " + "  ".join(f"{sp:>6}" for sp in SPLITS) + f"  {'total':>6}"]
    for sub, row in table.items():
        cells = "  ".join(f"{row.get(sp, 0):>6}" for sp in SPLITS)
        lines.append(f"{sub:<{width}}  {cells}  {sum(row.values()):>6}")
    return "\n".join(lines)
