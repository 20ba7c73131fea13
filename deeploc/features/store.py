"""Frozen-encoder features, computed once and served to every decoder of every run and sweep job.

A :class:`FeatureStore` holds ONE feature map (e.g. SAM2's ``image_embed``, CLIP's ``layer20``) of ONE encoder
identity (kind, architecture, input size, weights digest or random seed, preprocessing, precision: everything
:meth:`FrozenEncoder.cache_identity` returns) for any number of images, keyed by the sha256 of each image FILE.
Entries: :mod:`deeploc.features.entry`; filling stores: :mod:`deeploc.features.extraction`; whether a job uses the
cache at all: :mod:`deeploc.features.serving`.

Layout under ``root`` (one root can hold many stores; they share the image-hash memo)::

    root/image_hashes.json                         memo: absolute path -> (size, mtime_ns, ctime_ns, sha256)
    root/<config>-<size>-<feature>-<key16>/        one store; <key16> = sha256 of its identity, truncated
        identity.json                              the full identity; compared on every open
        .lock                                      fcntl.flock'ed around extraction
        entries/<h[:2]>/<h>.f16                    one image's feature map, h = sha256 of the image file

Keys and reuse: another encoder identity, feature or store format gets another folder; a folder whose
``identity.json`` differs from the expected identity is refused (:class:`FeatureStoreError`). Identical image files
share one entry across subsets, splits, runs and sweep jobs; a changed file gets a new hash and is recomputed. The
memo of hashes by (path, size, mtime_ns, ctime_ns) misses only a file rewritten in place with the same size within
the file system's timestamp resolution (ctime cannot be set back, so edits, copies and ``touch`` are noticed). NOT
detected: features that were wrong when computed (an encoder whose ``identity()`` misses something that changes its
output, such as the precision it ran in).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from deeploc.features.dataset import CachedFeatureDataset
from deeploc.features.entry import (
    FORMAT_VERSION,
    FeatureStoreError,
    canonical,
    entry_bytes,
    entry_problem,
    format_bytes,
    identity_key,
    write_entry,
)
from deeploc.io import atomic_write_bytes, file_digest
from deeploc.locks import exclusive

if TYPE_CHECKING:
    from deeploc.data.layout import Sample
    from deeploc.models.encoders import FrozenEncoder


log = logging.getLogger(__name__)

_HASH_MEMO = "image_hashes.json"
LIST_LIMIT = 5  # images or entries named in one message


def slug(text: str) -> str:
    """``text`` with every character but letters, digits and ``._+`` replaced by ``_`` (a file-name part)."""
    return "".join(c if c.isalnum() or c in "._+" else "_" for c in text)


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm progress bar over ``total`` images (a no-op bar when not ``enabled``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True)


class _HashMemo:
    """sha256 of image files, memoised in ``root/image_hashes.json`` by (path, size, mtime_ns, ctime_ns)."""

    def __init__(self, root: Path) -> None:
        self.path = root / _HASH_MEMO
        self.lock = root / f".{_HASH_MEMO}.lock"
        self._memo: dict[str, list[Any]] | None = None

    def _load(self) -> dict[str, list[Any]]:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):  # absent or damaged: rehash (it is only a memo)
            return {}

    def hashes(self, paths: Sequence[str], progress: bool = False) -> list[str]:
        if self._memo is None:
            self._memo = self._load()
        memo = self._memo
        out: list[str] = []
        fresh: dict[str, list[Any]] = {}
        todo: list[tuple[int, str, list[int]]] = []
        for i, path in enumerate(paths):
            try:
                st = os.stat(path)
            except OSError as exc:
                raise FeatureStoreError(f"cannot read image {path}: {exc}") from exc
            stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns]
            hit = memo.get(path)
            if hit is not None and hit[:3] == stamp:
                out.append(hit[3])
            else:
                out.append("")
                todo.append((i, path, stamp))
        if todo:
            bar = progress_bar(len(todo), "hash images", enabled=progress and len(todo) >= 256)
            for i, path, stamp in todo:
                out[i] = file_digest(path)
                fresh[path] = [*stamp, out[i]]
                bar.update(1)
            bar.close()
            memo.update(fresh)
            self._save(fresh)
        return out

    def _save(self, fresh: dict[str, list[Any]]) -> None:
        """Merge new hashes into the memo file (read-merge-replace under a lock, so concurrent jobs add up)."""
        try:
            with exclusive(self.lock, "image-hash memo"):
                merged = self._load()
                merged.update(fresh)
                atomic_write_bytes(self.path, [json.dumps(merged, separators=(",", ":")).encode()])
        except OSError as exc:  # e.g. a read-only cache root at evaluation time: the memo is an optimisation
            log.warning("could not update the image-hash memo %s: %s", self.path, exc)


class FeatureStore:
    """One feature map of one encoder identity for any number of images, stored once as memory-mapped float16.

    Args:
        root: cache root folder (created if needed); several stores (identities, features) can share it.
        encoder_identity: the encoder's ``cache_identity()`` (where it computes: precision is part of it).
        feature: the one feature map this store holds.
        shape: ``(C, h, w)`` of that map (``encoder.feature_shape(feature)``).

    Example::

        store = FeatureStore.for_encoder(cache_dir, encoder, "image_embed")
        extract_features([store], samples, encoder, device="cuda")   # computes only what is missing
        dataset = store.dataset(samples)          # dict(features={name: map}, mask, name, subset, index)

    :class:`~deeploc.features.extraction.FeatureCache` holds the stores of every map a decoder reads.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        encoder_identity: Mapping[str, Any],
        feature: str,
        shape: Sequence[int],
    ) -> None:
        if len(shape) != 3 or any(int(n) < 1 for n in shape):
            raise FeatureStoreError(f"feature {feature!r}: shape {list(shape)} is not (C, h, w)")
        self.root = Path(root).expanduser().absolute()
        self.encoder_identity = json.loads(canonical(dict(encoder_identity)))
        self.feature = feature
        self.shape = tuple(int(n) for n in shape)
        self.key = identity_key(self.encoder_identity, feature)
        self.path = self.location(self.root, self.encoder_identity, feature)
        self._identity_doc = {
            "format": FORMAT_VERSION,
            "key": self.key,
            "feature": feature,
            "shape": list(self.shape),
            "dtype": "float16",
            "encoder": self.encoder_identity,
        }
        self._memo = _HashMemo(self.root)
        self._open()

    @staticmethod
    def location(root: str | os.PathLike[str], encoder_identity: Mapping[str, Any], feature: str) -> Path:
        """The folder of the store of ``feature`` for ``encoder_identity`` under ``root`` (it need not exist yet)."""
        identity = json.loads(canonical(dict(encoder_identity)))
        config = str(identity.get("config") or identity.get("kind") or "encoder")
        name = f"{slug(config)}-{identity.get('image_size')}-{feature}-{identity_key(identity, feature)[:16]}"
        return Path(root).expanduser().absolute() / name

    @classmethod
    def for_encoder(cls, root: str | os.PathLike[str], encoder: FrozenEncoder, feature: str) -> FeatureStore:
        """The store of ``encoder``'s map ``feature`` as the encoder computes it where it sits now."""
        return cls(root, encoder.cache_identity(), feature, encoder.feature_shape(feature))

    def _open(self) -> None:
        ident = self.path / "identity.json"
        try:
            (self.path / "entries").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FeatureStoreError(f"cannot create feature store folder {self.path}: {exc}") from exc
        if ident.exists():
            try:
                found = json.loads(ident.read_text())
            except ValueError as exc:
                raise FeatureStoreError(
                    f"{ident} is unreadable ({exc}); delete the folder {self.path} to rebuild this store"
                ) from exc
            if canonical(found) != canonical(self._identity_doc):
                raise FeatureStoreError(
                    f"feature store {self.path} was built for a different identity:\n  found    {canonical(found)}\n"
                    f"  expected {canonical(self._identity_doc)}\nRefusing to use it; delete the folder to rebuild."
                )
        else:
            atomic_write_bytes(ident, [json.dumps(self._identity_doc, indent=2, sort_keys=True).encode()])

    @property
    def nbytes_per_image(self) -> int:
        """Bytes one cached image takes on disk (header + float16 map)."""
        return entry_bytes(self.shape)

    def entry_path(self, content_hash: str) -> Path:
        return self.path / "entries" / content_hash[:2] / f"{content_hash}.f16"

    def _entries(self) -> Iterator[os.DirEntry[str]]:
        for sub in os.scandir(self.path / "entries"):
            if sub.is_dir():
                yield from os.scandir(sub.path)

    def describe(self) -> str:
        """One line: feature, encoder, folder, number of entries and their size."""
        files = [e for e in self._entries() if e.name.endswith(".f16")]
        ident = self.encoder_identity
        return (
            f"FeatureStore {self.feature} {list(self.shape)} float16 of {ident.get('config')}@{ident.get('image_size')}"
            f" ({ident.get('weights')}) at {self.path}: {len(files)} images, "
            f"{format_bytes(len(files) * self.nbytes_per_image)} ({format_bytes(self.nbytes_per_image)} per image)"
        )

    def content_hashes(self, samples: Sequence[Sample], progress: bool = False) -> list[str]:
        """sha256 of each sample's image file (memoised)."""
        return self._memo.hashes([os.path.abspath(s.image) for s in samples], progress=progress)

    def missing(self, samples: Sequence[Sample], verify: bool = False, progress: bool = False) -> list[Sample]:
        """Samples without a usable entry: absent, or failing the header / key / shape / dtype / size checks
        (``verify``: also the crc32 of the data, which reads every entry)."""
        hashes = self.content_hashes(samples, progress=progress)
        bad: dict[str, bool] = {}
        for digest in hashes:
            if digest not in bad:
                bad[digest] = bool(entry_problem(self.entry_path(digest), digest, self.shape, verify))
        return [sample for sample, digest in zip(samples, hashes) if bad[digest]]

    def write_entry(self, digest: str, fmap: torch.Tensor) -> None:
        """Store ``fmap`` (float16, this store's shape, finite) as the entry of the image with hash ``digest``."""
        if tuple(fmap.shape) != self.shape or fmap.dtype != torch.float16:
            raise FeatureStoreError(f"encoder produced {fmap.dtype} {tuple(fmap.shape)}, expected float16 {self.shape}")
        if not bool(torch.isfinite(fmap).all()):
            raise FeatureStoreError(
                f"{self.feature} features of image sha256:{digest} are not finite in float16 (NaN, or values beyond "
                f"+-65504); nothing was written for it in {self.path}"
            )
        write_entry(self.entry_path(digest), digest, fmap)

    def remove_stale_tmp(self) -> None:
        """Delete temporary files left by an interrupted extraction (only called while holding the lock)."""
        for entry in self._entries():
            if entry.name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)

    def dataset(self, samples: Sequence[Sample], progress: bool = False) -> CachedFeatureDataset:
        """A dataset of ``dict(features={feature: float16 CxHxW}, mask=float32 1xHxW, name, subset, index)``.

        Raises :class:`FeatureStoreError` if any sample has no usable entry (extract first).
        """
        return CachedFeatureDataset(list(samples), {self.feature: self.entries(samples, progress)})

    def entries(self, samples: Sequence[Sample], progress: bool = False) -> tuple[list[str], list[str], tuple]:
        """(entry paths, content hashes, shape) of ``samples``, each entry checked (header, key, shape, size)."""
        hashes = self.content_hashes(samples, progress=progress)
        bad = [s for s, h in zip(samples, hashes) if entry_problem(self.entry_path(h), h, self.shape)]
        if bad:
            names = ", ".join(f"{s.subset}/{s.split}/{s.name}" for s in bad[:LIST_LIMIT])
            more = f" and {len(bad) - LIST_LIMIT} more" if len(bad) > LIST_LIMIT else ""
            raise FeatureStoreError(
                f"{len(bad)} of {len(samples)} images have no cached {self.feature} features in {self.path} "
                f"({names}{more}). Run deeploc-extract with the same config (or extract_features) first."
            )
        return [str(self.entry_path(h)) for h in hashes], hashes, self.shape


def stored_entries(store_path: str | os.PathLike[str]) -> int:
    """How many entries the store at ``store_path`` holds (0 when it does not exist); nothing is read or created."""
    entries = Path(store_path) / "entries"
    if not entries.is_dir():
        return 0
    return sum(
        entry.name.endswith(".f16") for sub in os.scandir(entries) if sub.is_dir() for entry in os.scandir(sub.path)
    )
