"""How a job gets its encoder maps (``features.mode``): THE one place that decides between the feature cache and
the stream. ``deeploc-train``, multi-head jobs and ``deeploc-extract`` all ask :func:`decide` (training through
:func:`serve`); nothing else decides.

* ``cache``: every image is encoded once into the feature cache (:mod:`deeploc.features.store`) and the maps are read
  back every epoch. Refused before any work when the cache cannot fit on its disk (:func:`check_fits`).
* ``stream``: the encoder runs on every batch on the training device; nothing is written.
* ``auto`` (the default): cache when it fits, else stream (:func:`choose`); one log line says which and why.

Whatever the mode, the maps are streamed when the encoder is adapted (``encoder.adapt`` not ``frozen``: its maps
change every step; ``features=cache`` is refused), when image augmentations are on (they change the encoder's input
every epoch; a warning), and in a ``trainer.fast_dev_run`` pass (it reads a batch or two: encoding them beats caching
the split).

The cache's size is estimated before anything is computed (:func:`estimate`): the job's images times the bytes of
the maps it reads, less what the stores of those maps already hold.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deeploc.errors import ConfigError
from deeploc.features.entry import FeatureStoreError, entry_bytes, format_bytes
from deeploc.features.extraction import FeatureCache
from deeploc.features.store import FeatureStore, stored_entries

if TYPE_CHECKING:
    from deeploc.data.layout import Sample
    from deeploc.models.encoders import FrozenEncoder


log = logging.getLogger(__name__)

MODES = ("auto", "cache", "stream")
# features=auto caches only when the new entries take at most this share of the free disk space: the space left
# over is for checkpoints, logs and other jobs.
DISK_SHARE = 0.9


@dataclass(frozen=True)
class Decision:
    """How a job's maps are served (``mode``: "cache" or "stream") and the log line that says why."""

    mode: str
    reason: str
    warn: bool = False  # the user asked for something that cannot be honoured (logged as a warning)


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


def decide(
    mode: str,
    encoder: FrozenEncoder,
    names: Sequence[str],
    samples: Sequence[Sample],
    cache_dir: str | os.PathLike[str],
    device: str,
    augment: Any = None,
    debug_batches: int = 0,
    extracting: bool = False,
) -> Decision:
    """Whether a job streams the maps ``names`` of ``encoder`` for ``samples`` or reads them from the cache under
    ``cache_dir``, as ``features.mode`` = ``mode`` asks (module docstring); the encoder moves to ``device`` (where it
    will compute: its precision is part of the cache key) when the cache is considered.

    ``augment``: the ``data.augment`` settings; ``debug_batches``: the batches per loop of a ``fast_dev_run`` pass
    (0: a real run); ``extracting``: asked by deeploc-extract, which fills the cache whenever the job would read it
    (``auto`` included) and refuses one that cannot fit. Raises :class:`ConfigError` (an adapted encoder) or
    :class:`FeatureStoreError` (no room) for a ``features=cache`` that cannot work.
    """
    early = stream_without_cache(mode, encoder, augment, debug_batches)
    if early is not None:
        return early
    encoder.to(device)
    est = estimate(cache_dir, encoder, names, samples)
    if mode == "cache" or extracting:
        check_fits(est)
        if debug_batches:  # the refusal above is what a debug pass is for; the cache itself is not
            return Decision("stream", _debug_reason(mode, debug_batches))
        return Decision("cache", f"features={mode}: {est.describe()} in {est.folder}")
    chosen, why = choose(est, device)
    return Decision(chosen, f"features=auto chose {chosen}: {why}")


def stream_without_cache(mode: str, encoder: Any, augment: Any = None, debug_batches: int = 0) -> Decision | None:
    """The decision of :func:`decide` where it needs no look at the cache (a stream; nothing is read or built), else
    None. Raises :class:`ConfigError` for ``features=cache`` with an adapted encoder."""
    if mode == "stream":
        return Decision("stream", f"features={mode}: the encoder runs on every batch (no feature cache)")
    adapt = getattr(encoder, "adapt", "frozen")
    if adapt != "frozen":
        why = f"encoder.adapt={adapt} trains the encoder, so its maps change every step and cannot be cached"
        if mode == "cache":
            raise ConfigError(f"features=cache: {why}. Use features=stream or features=auto (they stream).")
        return Decision("stream", f"features={mode} streams: {why}; the encoder runs on every batch")
    blocked = augmentation_blocks_cache(augment)
    if blocked:
        return Decision("stream", f"feature cache not used: {blocked}; the encoder runs on every batch", warn=True)
    if debug_batches and mode == "auto":
        return Decision("stream", _debug_reason(mode, debug_batches))
    return None


def _debug_reason(mode: str, batches: int) -> str:
    return (
        f"features={mode} streams in a fast_dev_run pass: it reads {batches} batch(es) per loop, so the encoder runs "
        "on those only instead of caching the whole split"
    )


def serve(
    mode: str,
    encoder: FrozenEncoder,
    names: Sequence[str],
    samples: Sequence[Sample],
    cache_dir: str | os.PathLike[str],
    device: str,
    augment: Any = None,
    batch_size: int = 16,
    debug_batches: int = 0,
) -> FeatureCache | None:
    """:func:`decide`, log why, and when it says cache, fill the cache on ``device`` (encoder batches of
    ``batch_size``) and return it (its ``dataset(samples)`` serves the maps); None when the maps are streamed. The
    encoder is back on the CPU afterwards (the trainer places it)."""
    decision = decide(mode, encoder, names, samples, cache_dir, device, augment, debug_batches)
    log.log(logging.WARNING if decision.warn else logging.INFO, "%s", decision.reason)
    cache = None
    if decision.mode == "cache":
        cache = FeatureCache(cache_dir, encoder, names)
        cache.extract(samples, encoder, batch_size=batch_size, device=device)
    encoder.to("cpu")
    return cache


def augmentation_blocks_cache(augment: Any) -> str:
    """Why cached features cannot be used with these ``data.augment`` settings ("" when they can).

    Cached features are the encoder's output on the UNAUGMENTED image; an augmentation applied to the image before
    the encoder (colour jitter, JPEG, blur) changes every epoch, so it cannot be cached. "On" means exactly what
    :func:`deeploc.data.augment.build_augmentations` builds (an invalid config raises its ValueError).
    """
    from omegaconf import DictConfig, OmegaConf

    from deeploc.data.augment import build_augmentations

    if isinstance(augment, DictConfig):
        augment = OmegaConf.to_container(augment, resolve=True)
    pipeline = build_augmentations(augment)
    if pipeline is None:
        return ""
    active = ", ".join(type(t).__name__ for t in pipeline.transforms)
    return (
        f"image augmentations are on ({active}): they change the encoder input every epoch, so its features "
        "cannot be cached"
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
