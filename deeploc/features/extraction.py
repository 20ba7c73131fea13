"""Filling feature stores: ONE encoder pass computes every missing map of every store of an encoder identity.

* Every entry is written to a temporary file in its folder and renamed into place (:func:`deeploc.io.atomic_file`):
  an interrupted or failed extraction (Ctrl-C, kill, disk full) leaves finished entries and nothing half-written;
  the next call resumes and removes stale temporary files.
* Extraction runs under an exclusive ``fcntl.flock`` on each store's ``.lock``: a second job waits, then finds the
  work done (flock is advisory; local file systems and NFSv4 honour it, some network file systems do not).
* Before computing, it prints the disk space the new entries take and refuses when the disk has less free; a disk
  that fills up during the pass anyway (other writers) ends it with the same one-line message.
* Existing entries get the cheap checks; ``verify`` also checks their crc32 and recomputes damaged ones, listing
  them. Maps that are not finite in float16 (NaN, overflow beyond +-65504) are refused at write time.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset

from deeploc.data.datasets import image_tensor
from deeploc.data.images import read_rgb
from deeploc.features.dataset import CachedFeatureDataset
from deeploc.features.entry import FeatureStoreError, canonical, entry_problem, format_bytes
from deeploc.features.store import LIST_LIMIT, FeatureStore, progress_bar, slug
from deeploc.locks import exclusive

if TYPE_CHECKING:
    from deeploc.data.layout import Sample
    from deeploc.models.encoders import FrozenEncoder


log = logging.getLogger(__name__)
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


class FeatureCache:
    """The stores of several maps of one encoder (the maps a decoder reads): filled in ONE encoder pass, served
    as one dataset whose items hold a dict of maps.

    The same pass also fills the stores of the maps the encoder was asked for (:meth:`FrozenEncoder.selected_maps`:
    CLIP's ``encoder.layers``), which are stored but not served: the next run of a sweep over them finds its map
    cached.

    Args:
        root: cache root folder (``features.dir``).
        encoder: the frozen encoder, on the device it will compute on (the precision is part of the key).
        features: the map names (``decoder.inputs``).
    """

    def __init__(self, root: str | os.PathLike[str], encoder: FrozenEncoder, features: Sequence[str]) -> None:
        if not features:
            raise FeatureStoreError("a feature cache needs at least one map name")
        self.stores = {name: FeatureStore.for_encoder(root, encoder, name) for name in dict.fromkeys(features)}
        self.also = {
            name: FeatureStore.for_encoder(root, encoder, name)
            for name in encoder.selected_maps()
            if name not in self.stores
        }

    @property
    def every_store(self) -> list[FeatureStore]:
        """The stores served and those only filled."""
        return [*self.stores.values(), *self.also.values()]

    def extract(
        self,
        samples: Sequence[Sample],
        encoder: torch.nn.Module,
        batch_size: int = 8,
        device: str | torch.device = "cpu",
        **kwargs: Any,
    ) -> dict[str, int]:
        """Compute every missing entry of every map (served or not) in one encoder pass (:func:`extract_features`)."""
        return extract_features(self.every_store, samples, encoder, batch_size, device, **kwargs)

    def dataset(self, samples: Sequence[Sample], progress: bool = False) -> CachedFeatureDataset:
        """Items ``dict(features={name: float16 CxHxW, ...}, mask, name, subset, index)``."""
        entries = {name: store.entries(samples, progress) for name, store in self.stores.items()}
        return CachedFeatureDataset(list(samples), entries)

    def describe(self) -> str:
        """One line per store (served or not)."""
        return "\n".join(store.describe() for store in self.every_store)


def extract_features(
    stores: Sequence[FeatureStore],
    samples: Sequence[Sample],
    encoder: torch.nn.Module,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    verify: bool = False,
    lock_scope: str | None = None,
) -> dict[str, int]:
    """Fill several stores of the SAME encoder identity (typically one per feature map) in one encoder pass: each
    image without a usable entry in any store is encoded once, with ``names`` = the stores' features, and written to
    the stores that lack it. Returns the number of entries computed per feature.

    Images are read exactly as :class:`~deeploc.data.datasets.ImageMaskDataset` reads them (no augmentation) and
    run through ``encoder(images, names=...)`` on ``device``. ``verify`` also checks the crc32 of existing entries
    (reads the whole store). ``lock_scope`` (e.g. ``"shard-0-of-4"``) locks only that scope, so jobs extracting
    disjoint shards into one store run in parallel; they leave stale temporary files to the next unscoped
    extraction."""
    stores = list({store.path: store for store in stores}.values())  # a folder per (identity, feature)
    if not stores:
        return {}
    identity = canonical(json.loads(canonical(encoder.cache_identity())))  # type: ignore[operator]
    for store in stores:
        if identity != canonical(store.encoder_identity):
            raise FeatureStoreError(
                f"encoder identity {identity} does not match feature store {store.path} "
                f"({canonical(store.encoder_identity)}); build the store from encoder.cache_identity()"
            )
    hashes = stores[0].content_hashes(samples, progress=progress)
    n_unique = len(set(hashes))
    with contextlib.ExitStack() as locks:
        for store in sorted(stores, key=lambda st: str(st.path)):  # fixed order: no deadlock between jobs
            lock = store.path / (f".lock.{slug(lock_scope)}" if lock_scope else ".lock")
            locks.enter_context(exclusive(lock, f"feature store {store.path}"))
        # Under the locks: what is missing now (another job may just have computed it).
        todo: dict[str, tuple[Sample, list[FeatureStore]]] = {}
        damaged: dict[str, list[str]] = {}  # feature -> "<entry path> (<problem>)" of entries present but unusable
        for store in stores:
            if lock_scope is None:  # other scopes may be writing their temporary files right now
                store.remove_stale_tmp()
            seen: set[str] = set()
            for sample, digest in zip(samples, hashes):
                if digest in seen:
                    continue
                seen.add(digest)
                problem = entry_problem(store.entry_path(digest), digest, store.shape, verify)
                if problem:
                    todo.setdefault(digest, (sample, []))[1].append(store)
                if problem not in ("", "missing"):
                    damaged.setdefault(store.feature, []).append(f"{store.entry_path(digest)} ({problem})")
        counts = {store.feature: sum(store in needing for _, needing in todo.values()) for store in stores}
        for store in stores:
            if not counts[store.feature]:
                checked = ", crc32 verified" if verify else ""
                print(f"[feature store] all {n_unique} images already cached in {store.path}{checked}", flush=True)
        if not todo:
            return dict.fromkeys(counts, 0)
        _check_disk_space(stores, counts, n_unique)
        done = _compute(todo, encoder, batch_size, device, num_workers, progress, counts)
        for feature, entries in damaged.items():
            more = f" (+{len(entries) - LIST_LIMIT} more)" if len(entries) > LIST_LIMIT else ""
            print(
                f"[feature store] {feature}: {len(entries)} damaged {'entry' if len(entries) == 1 else 'entries'} "
                f"recomputed: {', '.join(entries[:LIST_LIMIT])}{more}",
                flush=True,
            )
        return done


def _disk_full(folders: str, needed: int, free: int) -> FeatureStoreError:
    """The one-line refusal when the disk of ``folders`` cannot hold the ``needed`` bytes still to write."""
    return FeatureStoreError(
        f"not enough disk space for the feature cache in {folders}: needs {needed} bytes ({format_bytes(needed)}), "
        f"{free} bytes ({format_bytes(free)}) free. Train without a cache with features=stream (the encoder runs on "
        "every batch, nothing is written), free space, or put the cache on a larger disk: features.dir=..., or "
        "DEEPLOC_OUTPUTS=/larger/disk (the cache is under it by default). Entries already written are kept: the "
        "same command resumes."
    )


def _check_disk_space(stores: Sequence[FeatureStore], counts: dict[str, int], n_unique: int) -> None:
    """Print what will be written where; refuse when a file system has less free space than that."""
    per_device: dict[int, list[FeatureStore]] = {}
    for store in stores:
        if counts[store.feature]:
            n, size = counts[store.feature], store.nbytes_per_image
            print(
                f"[feature store] {store.feature}: computing {n} of {n_unique} images x {format_bytes(size)} = "
                f"{format_bytes(n * size)} into {store.path}",
                flush=True,
            )
            per_device.setdefault(os.stat(store.path).st_dev, []).append(store)
    for group in per_device.values():
        needed = sum(counts[store.feature] * store.nbytes_per_image for store in group)
        free = shutil.disk_usage(group[0].path).free
        folders = ", ".join(str(store.path) for store in group)
        print(f"[feature store] disk: {format_bytes(needed)} needed, {format_bytes(free)} free ({folders})", flush=True)
        if needed > free:
            raise _disk_full(folders, needed, free)


def _compute(
    todo: dict[str, tuple[Sample, list[FeatureStore]]],
    encoder: torch.nn.Module,
    batch_size: int,
    device: str | torch.device,
    num_workers: int,
    progress: bool,
    counts: dict[str, int],
) -> dict[str, int]:
    names = tuple(sorted({store.feature for _, needing in todo.values() for store in needing}))
    encoder = encoder.to(device).eval()
    loader = DataLoader(
        _ImageReader([(digest, sample) for digest, (sample, _) in todo.items()]),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=list,
        pin_memory=torch.device(device).type == "cuda",
    )
    bar = progress_bar(len(todo), f"extract {'+'.join(names)}", enabled=progress)
    done = dict.fromkeys(counts, 0)
    store: FeatureStore | None = None  # the store being written
    start = time.perf_counter()
    try:
        for batch in loader:
            # Group by image size: the encoder resizes, but only equal sizes stack.
            by_shape: dict[tuple[int, ...], list[tuple[str, torch.Tensor]]] = {}
            for digest, image in batch:
                by_shape.setdefault(tuple(image.shape), []).append((digest, image))
            for group in by_shape.values():
                images = torch.stack([im for _, im in group]).to(device, non_blocking=True)
                with torch.inference_mode():
                    maps = encoder(images, names=names)
                maps = {name: fmap.to("cpu", torch.float16).contiguous() for name, fmap in maps.items()}
                for j, (digest, _) in enumerate(group):
                    for store in todo[digest][1]:
                        store.write_entry(digest, maps[store.feature][j])
                        done[store.feature] += 1
                    bar.update(1)
    except OSError as exc:  # the entry being written was removed (atomic write): what is on disk is whole
        if exc.errno not in _DISK_FULL or store is None:
            raise
        stores = {s.path: s for _, needing in todo.values() for s in needing}.values()
        left = sum((counts[s.feature] - done[s.feature]) * s.nbytes_per_image for s in stores)
        raise _disk_full(str(store.path), left, shutil.disk_usage(store.path).free) from None
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    log.info("extracted %d images (%s) in %.1f s (%.2f img/s)", len(todo), names, seconds, len(todo) / seconds)
    return done


class _ImageReader(Dataset):
    """(content hash, image tensor) for extraction."""

    def __init__(self, todo: list[tuple[str, Sample]]) -> None:
        self.digests = [digest for digest, _ in todo]
        self.samples = [sample for _, sample in todo]

    def __len__(self) -> int:
        return len(self.digests)

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor]:
        # The image exactly as ImageMaskDataset reads it (no augmentation): cached and online training agree.
        return self.digests[i], image_tensor(read_rgb(self.samples[i].image))
