"""The sample record every source produces (:class:`Sample`), the split names, and counts per subset and split.

Each :class:`Sample` carries the polarity its mask is drawn in (:mod:`deeploc.data.masks`), so every reader reads
it the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from deeploc.data.masks import DEFAULT_POLARITY

__all__ = ["IMAGE_EXTENSIONS", "REAL_SUBSET", "SPLITS", "Sample", "count_table", "format_count_table"]

SPLITS: tuple[str, ...] = ("train", "valid", "test")
# The subset name of pristine images (DataSource.real_samples).
REAL_SUBSET = "real"
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})


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
