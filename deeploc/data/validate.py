"""Validating samples: every image and mask decoded and checked, the dataset-wide rules, a cache of what passed.

Nothing here skips a bad file: a silently skipped file changes the sample counts and therefore the metrics, so every
problem is collected and :func:`validate_samples` raises one :class:`DatasetError` naming the files and the fix.
What a mask must look like is :mod:`deeploc.data.masks`' job; files are decoded with the readers training uses
(:mod:`deeploc.data.images`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from deeploc.data.errors import LIST_LIMIT, DatasetError, format_list, format_problems
from deeploc.data.images import read_rgb_or_reason
from deeploc.data.masks import (
    MASK_MANIPULATED_MAX,
    MASK_MAX_AMBIGUOUS_FRACTION,
    MaskRules,
    MaskStats,
    empty_mask_problem,
    inspect_mask,
    polarity_problem,
)
from deeploc.data.samples import Sample
from deeploc.io import atomic_write_bytes

__all__ = ["MIN_IMAGE_SIDE", "check_sample", "dataset_problems", "inspect_samples", "validate_samples"]

log = logging.getLogger(__name__)

# The smallest image side accepted. The encoder resizes any image to its input size, so this is a sanity floor,
# not a technical limit: below it an image holds next to nothing for SAM2 to see (a 32 px image is upsampled 32x
# to 1024) and the metrics' 15x15 erosion / 11x11 dilation band covers most of it. Dolos images are 256 px, the
# generator's smallest are 32 px.
MIN_IMAGE_SIDE = 32

# Bump when the validation rules or the cached statistics change: older cache entries are then ignored.
_VALIDATION_VERSION = 2


def check_sample(sample: Sample) -> tuple[list[str], MaskStats | None]:
    """Reasons why a sample is unusable (empty when it is fine), and its mask's statistics when it is (a real
    image's: its size, nothing manipulated)."""
    reasons: list[str] = []
    img = read_rgb_or_reason(sample.image)
    if isinstance(img, str):
        reasons.append(f"image {sample.image}: {img}")
    elif min(img.shape[:2]) < MIN_IMAGE_SIDE:
        reasons.append(
            f"image {sample.image}: {img.shape[1]}x{img.shape[0]} pixels, smaller than {MIN_IMAGE_SIDE} px per side "
            "(too small to localize anything in); remove it or replace it with the full-size file"
        )
    if sample.mask is None:
        return reasons, (None if reasons or isinstance(img, str) else MaskStats(*img.shape[:2], 0, 0))
    mask = read_rgb_or_reason(sample.mask)
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


_CACHE_HEADER = {
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
        if data.get("header") != _CACHE_HEADER:
            return {}
        entries = data["entries"]
        return {str(k): [int(x) for x in v] for k, v in entries.items() if len(v) == _FINGERPRINT_LEN + 4}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        log.warning("ignoring unreadable validation cache %s", cache_file)
        return {}


def _save_cache(cache_file: Path, entries: dict[str, list[int]]) -> None:
    try:
        atomic_write_bytes(cache_file, json.dumps({"header": _CACHE_HEADER, "entries": entries}).encode())
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
            results = list(pool.map(lambda item: check_sample(item[0]), todo, chunksize=64))
    else:
        results = [check_sample(item[0]) for item in todo]

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
        raise DatasetError(
            f"{len(bad)} problem(s) in {len(samples)} samples:{format_problems(bad, LIST_LIMIT)}\n"
            "Fix or replace these files (re-extract the archive, or regenerate a synthetic dataset), or change the "
            "named setting. Bad files are never skipped, because skipping would silently change the sample counts "
            "and the metrics."
        )
    return stats
