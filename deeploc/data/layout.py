"""The Dolos on-disk layout: find the dataset root, index (image, mask) samples, validate the files.

Layout (the archive unzips to a folder named ``wacv_data``)::

    wacv_data/data/celebahq/real/{train,valid,test}/*.png            real images, no masks (ignored here)
    wacv_data/data/celebahq/fake/<subset>/images/{split}/<name>.png  manipulated images
    wacv_data/data/celebahq/fake/<subset>/masks/{split}/<name>.png   3-channel masks, 0 = manipulated, 255 = real
    wacv_data/data/celebahq/fake/p2/...                              fully synthetic, no masks (not a localization subset)
    wacv_data/data/ffhq/...                                          another source (ignored unless source="ffhq")

Only ``fake/<subset>`` folders that hold a ``masks/`` folder are localization subsets. Nothing here skips a bad
file: a silently skipped file changes the sample counts and therefore the metrics, so every problem raises a
:class:`DatasetError` naming the files and the fix.

Images and masks are decoded with OpenCV (``cv2.imdecode``) everywhere in deeploc; :func:`read_rgb` and
:func:`read_mask` are the two readers the datasets use too, so validation checks exactly what training reads.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from deeploc.data.errors import DatasetError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MASK_MANIPULATED_MAX",
    "MASK_MAX_AMBIGUOUS_FRACTION",
    "SPLITS",
    "DatasetError",
    "Sample",
    "available_subsets",
    "count_table",
    "format_count_table",
    "index_subsets",
    "read_mask",
    "read_rgb",
    "resolve_root",
    "validate_samples",
]

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "valid", "test")
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})

# Mask tolerance. The loader's rule (the Dolos convention) is ``manipulated = mask[..., 0] != 255``: any value
# other than exactly 255 counts as manipulated. Values close to 0 are therefore harmless noise (they are
# manipulated either way), but a value such as 250 would silently turn a real pixel into a manipulated one.
# So a mask pixel is "clean" when it is exactly 255 or <= MASK_MANIPULATED_MAX, and a mask is accepted when at
# most MASK_MAX_AMBIGUOUS_FRACTION of its pixels are not clean (room for anti-aliased region edges, not for a
# JPEG-saved or resampled mask, whose real area is full of 250-254 values).
MASK_MANIPULATED_MAX = 32
MASK_MAX_AMBIGUOUS_FRACTION = 0.01

# Bump when the validation rules change: older cache entries are then ignored.
_VALIDATION_VERSION = 1
_LIST_LIMIT = 20

DOWNLOAD_HINT = (
    "The Dolos download server is often down (bit-ml/dolos issue #3); to work without it, generate a "
    "synthetic dataset in the same layout (data=synthetic, or `deeploc-make-data OUT`)."
)


@dataclass(frozen=True)
class Sample:
    """One manipulated image and its mask. ``name`` is the file stem, shared across subsets in Dolos."""

    image: Path
    mask: Path
    subset: str
    split: str
    name: str


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
            f"{path} holds {_fmt_list(zips)} but no unzipped dataset: unzip it there, then set "
            f"data.root={path / 'wacv_data'}. {DOWNLOAD_HINT}"
        )
    found = sorted(p.name for p in path.iterdir())
    raise DatasetError(
        f"{path} is not a Dolos dataset root: expected {path / 'data' / 'celebahq'} (data.root=<...>/wacv_data) "
        f"or {path / 'celebahq'} (data.root=<...>/wacv_data/data); it holds: {_fmt_list(found) or 'nothing'}. "
        f"{DOWNLOAD_HINT}"
    )


def available_subsets(root: str | os.PathLike[str], source: str = "celebahq") -> list[str]:
    """Sorted names of the localization subsets (``fake/<subset>`` folders that hold ``masks/``)."""
    fake = resolve_root(root) / source / "fake"
    if not fake.is_dir():
        return []
    return sorted(p.name for p in fake.iterdir() if p.is_dir() and (p / "masks").is_dir())


# -------------------------------------------------------------------------------------------------- index


def _fmt_list(items: Sequence[object], limit: int = _LIST_LIMIT) -> str:
    items = list(items)
    shown = ", ".join(str(x) for x in items[:limit])
    if len(items) > limit:
        shown += f" (+{len(items) - limit} more)"
    return shown


def _scan(folder: Path) -> tuple[dict[str, Path], list[str], list[str], list[str]]:
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


def index_subsets(
    root: str | os.PathLike[str],
    subsets: Sequence[str] | str,
    splits: Sequence[str] = SPLITS,
    source: str = "celebahq",
) -> list[Sample]:
    """Index ``<source>/fake/<subset>/{images,masks}/<split>`` for each subset and split.

    Returns samples ordered by subset (as given), split (as given), then file name. Every problem found
    (missing subset, missing or empty split, image without mask, mask without image, non-image files) is
    collected and raised together as one :class:`DatasetError`.
    """
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
        raise DatasetError(f"no {src} folder; sources found under {base}: {_fmt_list(sources) or 'none'}")
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
                f"missing subset folder {sdir}; localization subsets present: {_fmt_list(existing) or 'none'}. "
                "Check the subset name, or download/extract that subset."
            )
            continue
        if not (sdir / "masks").is_dir():
            problems.append(
                f"{sdir} has no masks/ folder, so it is not a localization subset (fully synthetic sets such as "
                f"p2 have no masks); choose from: {_fmt_list(existing) or 'none'}"
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
            images, img_other, img_dups, img_dirs = _scan(idir)
            masks, mask_other, mask_dups, _ = _scan(mdir)
            for folder, other in ((idir, img_other), (mdir, mask_other)):
                if other:
                    problems.append(
                        f"{len(other)} non-image file(s) in {folder}: {_fmt_list(other)}; remove or move them"
                    )
            for folder, dups in ((idir, img_dups), (mdir, mask_dups)):
                if dups:
                    problems.append(
                        f"{len(dups)} name(s) with several image files in {folder}: {_fmt_list(dups)}; "
                        "keep one file per name"
                    )
            if not images:
                nested = f" (it has subfolders {_fmt_list(img_dirs)}; nested folders are not searched)"
                problems.append(
                    f"empty split: {idir} holds no images{nested if img_dirs else ''}; re-extract the archive"
                )
                continue
            no_mask = sorted(images.keys() - masks.keys())
            if no_mask:
                problems.append(
                    f"{len(no_mask)} image(s) without a mask: {_fmt_list([images[n].name for n in no_mask])} "
                    f"in {idir} have no file of the same name in {mdir}; restore the masks or remove the images"
                )
            no_image = sorted(masks.keys() - images.keys())
            if no_image:
                problems.append(
                    f"{len(no_image)} mask(s) without an image: {_fmt_list([masks[n].name for n in no_image])} "
                    f"in {mdir} have no file of the same name in {idir}; restore the images or remove the masks"
                )
            for name in sorted(images.keys() & masks.keys()):
                samples.append(Sample(images[name], masks[name], subset, split, name))
    if problems:
        raise DatasetError(f"Dolos dataset at {base} ({source}) has problems:\n  - " + "\n  - ".join(problems))
    return samples


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


def read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a Dolos mask as HxW uint8: channel 0 in RGB order (``mask[..., 0]``), 255 = real, else manipulated."""
    p = Path(path)
    out = _read_rgb_or_reason(p)
    if isinstance(out, str):
        raise DatasetError(f"mask {p}: {out}")
    return np.ascontiguousarray(out[..., 0])


# ----------------------------------------------------------------------------------------------- validate


def _check_sample(sample: Sample) -> list[str]:
    """Reasons why a sample is unusable (empty when it is fine)."""
    reasons: list[str] = []
    img = _read_rgb_or_reason(sample.image)
    if isinstance(img, str):
        reasons.append(f"image {sample.image}: {img}")
    mask = _read_rgb_or_reason(sample.mask)
    if isinstance(mask, str):
        reasons.append(f"mask {sample.mask}: {mask}")
        return reasons
    red = mask[..., 0]
    ambiguous = int(np.count_nonzero((red > MASK_MANIPULATED_MAX) & (red < 255)))
    if ambiguous > MASK_MAX_AMBIGUOUS_FRACTION * red.size:
        reasons.append(
            f"mask {sample.mask}: not binary, {ambiguous} pixels ({100.0 * ambiguous / red.size:.1f}%) are neither "
            f"255 (real) nor <= {MASK_MANIPULATED_MAX} (manipulated); was it saved as JPEG or resized?"
        )
    if not isinstance(img, str) and img.shape[:2] != mask.shape[:2]:
        reasons.append(
            f"mask {sample.mask}: size {mask.shape[1]}x{mask.shape[0]} differs from its image {sample.image} "
            f"({img.shape[1]}x{img.shape[0]}, WxH)"
        )
    return reasons


def _stat_key(sample: Sample) -> tuple[str, list[int]] | None:
    """Cache key and fingerprint of image and mask; None if a file is missing.

    The fingerprint is (size, mtime_ns, ctime_ns, inode) of both files: ctime changes on every write and on
    ``touch``/``utime``, and cannot be set back, so a rewritten file is never mistaken for a validated one.
    """
    try:
        si, sm = os.stat(sample.image), os.stat(sample.mask)
    except OSError:
        return None
    fp = [si.st_size, si.st_mtime_ns, si.st_ctime_ns, si.st_ino, sm.st_size, sm.st_mtime_ns, sm.st_ctime_ns, sm.st_ino]
    return f"{sample.image}\t{sample.mask}", fp


def _cache_header() -> dict[str, object]:
    return {
        "version": _VALIDATION_VERSION,
        "mask_manipulated_max": MASK_MANIPULATED_MAX,
        "mask_max_ambiguous_fraction": MASK_MAX_AMBIGUOUS_FRACTION,
    }


def _load_cache(cache_file: Path | None) -> dict[str, list[int]]:
    if cache_file is None or not cache_file.is_file():
        return {}
    try:
        data = json.loads(cache_file.read_text())
        if data.get("header") != _cache_header():
            return {}
        entries = data["entries"]
        return {str(k): list(v) for k, v in entries.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        log.warning("ignoring unreadable validation cache %s", cache_file)
        return {}


def _save_cache(cache_file: Path, entries: dict[str, list[int]]) -> None:
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"header": _cache_header(), "entries": entries}))
        os.replace(tmp, cache_file)
    except OSError as exc:  # a read-only cache location must not stop training
        log.warning("could not write validation cache %s: %s", cache_file, exc)


def validate_samples(
    samples: Iterable[Sample],
    cache_file: str | os.PathLike[str] | None = None,
    workers: int = 2,
) -> None:
    """Decode every image and mask and check them; raise :class:`DatasetError` listing the bad files.

    Checks: both files decode (corrupt, truncated and non-image files fail); the image is RGB or convertible
    (gray, RGBA, 16 bit); the mask has the image's height and width; the mask is binary up to noise (see
    ``MASK_MANIPULATED_MAX`` / ``MASK_MAX_AMBIGUOUS_FRACTION`` above). ``workers`` threads decode in parallel
    (OpenCV releases the GIL).

    With ``cache_file``, samples that passed are remembered by (path, size, mtime_ns, ctime_ns, inode) of both
    files, so re-validating an unchanged dataset only costs a ``stat`` per file; any rewrite, replacement or
    ``touch`` of a file invalidates its entry, as does a change of the validation rules. Failed samples are
    never cached. The cache is a JSON file replaced atomically; concurrent writers can only lose entries.
    """
    samples = list(samples)
    cache_path = Path(cache_file) if cache_file is not None else None
    cache = _load_cache(cache_path)
    missing: list[str] = []
    todo: list[tuple[Sample, str | None, list[int] | None]] = []
    for s in samples:
        keyed = _stat_key(s)
        if keyed is None:
            which = [str(p) for p in (s.image, s.mask) if not p.exists()]
            missing.append(f"{_fmt_list(which)}: file is missing")
            continue
        key, fp = keyed
        if cache.get(key) != fp:
            todo.append((s, key, fp))

    def check(item: tuple[Sample, str | None, list[int] | None]) -> list[str]:
        return _check_sample(item[0])

    if todo:
        log.info("validating %d of %d samples (%d cached)", len(todo), len(samples), len(samples) - len(todo))
    if workers > 1 and len(todo) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(check, todo, chunksize=64))
    else:
        results = [check(item) for item in todo]

    bad = list(missing)
    changed = False
    for (_, key, fp), reasons in zip(todo, results):
        if reasons:
            bad.extend(reasons)
        elif key is not None and fp is not None:
            cache[key] = fp
            changed = True
    if cache_path is not None and changed:
        _save_cache(cache_path, cache)
    if bad:
        shown = "\n  - ".join(bad[:_LIST_LIMIT])
        more = f"\n  (+{len(bad) - _LIST_LIMIT} more)" if len(bad) > _LIST_LIMIT else ""
        raise DatasetError(
            f"{len(bad)} problem(s) in {len(samples)} samples:\n  - {shown}{more}\n"
            "Fix or replace these files (re-extract the archive, or regenerate a synthetic dataset). Bad files are "
            "never skipped, because skipping would silently change the sample counts and the metrics."
        )


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
