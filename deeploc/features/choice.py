"""How a training job gets its encoder maps (``features.mode``): read from the feature cache, or computed per batch.

* ``cache``: every image is encoded once into the feature cache (:mod:`deeploc.features.store`) and the maps are read
  back every epoch. Refused before any work when the cache cannot fit on its disk (:func:`check_fits`).
* ``stream``: the frozen encoder runs on every batch on the training device; nothing is written (``none``, the
  name of deeploc 0.1, is gone: Hydra refuses ``features=none`` listing the choices).
* ``auto`` (the default): cache when it fits, else stream (:func:`choose`); one log line says which and why.

The cache's size is estimated before anything is computed (:func:`estimate`): the job's images times the bytes of
the maps it reads, less what the stores of those maps already hold.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from deeploc.features.store import FeatureStore, FeatureStoreError, entry_bytes, format_bytes, stored_entries

if TYPE_CHECKING:
    from deeploc.data.layout import Sample
    from deeploc.models.encoders import FrozenEncoder

__all__ = ["DISK_SHARE", "MODES", "CacheEstimate", "available_ram", "check_fits", "choose", "estimate"]

MODES = ("auto", "cache", "stream")
# features=auto caches only when the new entries take at most this share of the free disk space: the space left
# over is for checkpoints, logs and other jobs.
DISK_SHARE = 0.9


@dataclass(frozen=True)
class CacheEstimate:
    """What caching a job's maps would take, and the room there is for it."""

    folder: Path  # features.dir
    images: int  # distinct image files the job reads
    maps: tuple[str, ...]
    bytes_per_image: int  # over all maps, entry headers included
    stored: int  # bytes the stores of these maps already hold (entries of any image)
    free_disk: int  # in the file system of ``folder``
    available_ram: int  # what the page cache can hold without swapping

    @property
    def total(self) -> int:
        """Bytes of the whole cache of the job's images."""
        return self.images * self.bytes_per_image

    @property
    def needed(self) -> int:
        """Bytes still to write (at least; entries held for other images do not count for this job)."""
        return max(0, self.total - self.stored)

    def describe(self) -> str:
        return (
            f"{self.images} images x {len(self.maps)} map(s) ({'+'.join(self.maps)}, "
            f"{format_bytes(self.bytes_per_image)} per image) = {format_bytes(self.total)}"
        )


def available_ram() -> int:
    """Bytes of memory available without swapping (``MemAvailable``; total physical memory where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _free_disk(folder: Path) -> int:
    """Free bytes in the file system ``folder`` is (or will be) on: its nearest existing parent's."""
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    return shutil.disk_usage(existing).free


def estimate(
    root: str | os.PathLike[str], encoder: FrozenEncoder, names: Sequence[str], samples: Sequence[Sample]
) -> CacheEstimate:
    """The size of the cache of ``names`` for ``samples`` under ``root`` (``features.dir``), where the encoder sits
    now (its precision is part of the stores' key). Reads and creates nothing but directory listings."""
    folder = Path(root).expanduser().absolute()
    identity = encoder.cache_identity()
    maps = tuple(dict.fromkeys(names))
    sizes = {name: entry_bytes(encoder.feature_shape(name)) for name in maps}
    stored = sum(stored_entries(FeatureStore.location(folder, identity, n)) * sizes[n] for n in maps)
    return CacheEstimate(
        folder=folder,
        images=len({os.path.abspath(s.image) for s in samples}),
        maps=maps,
        bytes_per_image=sum(sizes.values()),
        stored=stored,
        free_disk=_free_disk(folder),
        available_ram=available_ram(),
    )


def choose(est: CacheEstimate, device: str) -> tuple[str, str]:
    """``("cache" | "stream", why)`` for ``features=auto``, the encoder computing on ``device`` ("cpu", "cuda").

    Cache when the entries still to write fit in :data:`DISK_SHARE` of the free disk space and, on an accelerator,
    the whole cache fits in the available RAM: a cache the page cache cannot hold is read back from disk every
    epoch, which is slower than recomputing the maps on a GPU. On the CPU the encoder is far slower than any disk,
    so a cache that fits on disk is always used.
    """
    free = f"{format_bytes(est.free_disk)} free in {est.folder}"
    if est.needed > DISK_SHARE * est.free_disk:
        return "stream", (
            f"the feature cache would take {est.describe()}, {format_bytes(est.needed)} of it still to write, and "
            f"there is only {free}: the encoder runs on every batch instead (nothing is written)"
        )
    ram = format_bytes(est.available_ram)
    if device != "cpu" and est.total > est.available_ram:
        return "stream", (
            f"the feature cache ({est.describe()}) fits on disk ({free}) but not in RAM ({ram} available): every "
            f"epoch would read it back from disk, slower than recomputing the maps on the {device}"
        )
    reason = f"the feature cache ({est.describe()}) fits on disk ({free})"
    if device == "cpu":
        return "cache", f"{reason}; on the CPU, encoding each image once saves far more than reading it back costs"
    return "cache", f"{reason} and in RAM ({ram} available)"


def check_fits(est: CacheEstimate) -> None:
    """Refuse ``features=cache`` before any work when its disk cannot hold the entries still to write."""
    if est.needed > est.free_disk:
        raise FeatureStoreError(
            f"features=cache: the feature cache needs {format_bytes(est.needed)} more ({est.describe()}) but "
            f"{est.folder} has {format_bytes(est.free_disk)} free. Use features=stream (the encoder runs on every "
            "batch, nothing is written to disk), or point features.dir at a disk with enough free space."
        )
