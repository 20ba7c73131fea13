"""Frozen-encoder features, computed once and served to every decoder of every run and sweep job.

A :class:`FeatureStore` holds ONE feature map (e.g. SAM2's ``image_embed``, CLIP's ``layer20``) of ONE encoder
identity (kind, architecture, input size, weights digest or random seed, preprocessing, precision: everything
:meth:`FrozenEncoder.cache_identity` returns) for any number of images, keyed by the sha256 of each image FILE.
A :class:`FeatureCache` groups the stores of the maps one decoder reads.

Layout under ``root`` (one root can hold many stores; they share the image-hash memo)::

    root/image_hashes.json                         memo: absolute path -> (size, mtime_ns, ctime_ns, sha256)
    root/<config>-<size>-<feature>-<key16>/        one store; <key16> = sha256 of its identity, truncated
        identity.json                              the full identity; compared on every open
        .lock                                      fcntl.flock'ed around extraction
        entries/<h[:2]>/<h>.f16                    one image's feature map, h = sha256 of the image file

Entry file format (little-endian): 256-byte header = ``DLFEAT1\\n`` + uint32 length + JSON
``{"key", "shape", "dtype", "nbytes", "crc32"}`` padded with spaces; then C*H*W float16 values (C-order), read
through a memory map. Peak RAM therefore does not depend on the number of cached images.

:func:`extract_features` fills the stores of several feature maps of one encoder in a single encoder pass (a sweep
over the three maps encodes each image once).

Keys and reuse
    * different encoder identity / feature / store format -> different folder; a folder whose ``identity.json``
      does not match the expected identity is refused (:class:`FeatureStoreError`), and :meth:`extract` refuses an
      encoder whose ``identity()`` differs from the store's.
    * identical image files (same bytes) share one entry, across subsets, splits, runs and sweep jobs; a changed
      file gets a new hash and is recomputed. Hashes are memoised by (path, size, mtime_ns, ctime_ns): a file
      rewritten in place with the same size within the file system's timestamp resolution would keep its stale
      hash (ctime cannot be set back by a user, so ordinary edits, copies and ``touch`` are all noticed).

Safety
    * every entry is written to a temporary file in the same folder and ``os.replace``-d into place: readers see
      a complete entry or none. Interrupted extraction leaves finished entries; the next call resumes and removes
      stale temporary files.
    * extraction runs under an exclusive ``fcntl.flock`` on the store's ``.lock``: a second job waits, then finds
      the work done (flock is advisory, local file systems and NFSv4 honour it; some network file systems do not).
    * Detected on every read of an entry: missing file, wrong magic, unparsable header, an entry for another image
      (key), wrong shape or dtype, truncated or extended file (exact size check), any change of the feature bytes
      (crc32). A crc failure during training raises :class:`FeatureStoreError` naming the file and the two fixes
      that work: delete that file (the next extraction computes it again), or run ``deeploc-extract``, which
      verifies the crc32 of every entry (``verify=True``) and recomputes the damaged ones, listing them.
      :meth:`missing` and :meth:`extract` use the cheap checks (header, key, shape, dtype, size; no crc unless
      ``verify=True``: reading a whole store at every training start would cost one epoch of reads) and recompute
      what fails them. Maps that are not finite in float16 (NaN, overflow beyond +-65504) are refused at write
      time.
    * NOT detected: an entry deliberately rewritten with a consistent header and crc (the store is no defence
      against tampering); a bit flip in an entry's data when nothing reads it with the crc check; features that
      were wrong when computed (e.g. an encoder whose ``identity()`` misses something that changes its output,
      such as the precision it ran in); an image rewritten in place with the same size and timestamps (see the
      hash memo above).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mmap
import os
import shlex
import shutil
import struct
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from deeploc.data.datasets import image_tensor, mask_tensor, sample_target
from deeploc.data.images import read_rgb
from deeploc.errors import DeeplocError
from deeploc.io import atomic_write_bytes, file_digest
from deeploc.locks import exclusive as _locked

if TYPE_CHECKING:
    from deeploc.data.samples import Sample
    from deeploc.models.encoders import FrozenEncoder

__all__ = [
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "CachedFeatureDataset",
    "FeatureCache",
    "FeatureStore",
    "FeatureStoreError",
    "cache_allowed",
    "entry_bytes",
    "extract_features",
    "format_bytes",
    "identity_key",
    "stored_entries",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MAGIC = b"DLFEAT1\n"
HEADER_SIZE = 256
DTYPE = np.float16
_HASH_MEMO = "image_hashes.json"
_LIST_LIMIT = 5


class FeatureStoreError(DeeplocError, RuntimeError):
    """A feature store that cannot be used as asked; the message names the folder or file and the fix."""


# ------------------------------------------------------------------------------------------------ helpers


def format_bytes(n: float) -> str:
    """Human-readable byte count (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def identity_key(encoder_identity: Mapping[str, Any], feature: str) -> str:
    """sha256 of everything that determines the stored maps: encoder identity, feature name, store format."""
    payload = {"encoder": dict(encoder_identity), "feature": feature, "format": FORMAT_VERSION}
    return hashlib.sha256(_canonical(payload).encode()).hexdigest()


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._+" else "_" for c in text)


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
            bar = _progress(len(todo), "hash images", enabled=progress and len(todo) >= 256)
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
            with _locked(self.lock, "image-hash memo"):
                merged = self._load()
                merged.update(fresh)
                atomic_write_bytes(self.path, [json.dumps(merged, separators=(",", ":")).encode()])
        except OSError as exc:  # e.g. a read-only cache root at evaluation time: the memo is an optimisation
            log.warning("could not update the image-hash memo %s: %s", self.path, exc)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True)


# ------------------------------------------------------------------------------------------- entry format


def _encode_header(key: str, shape: tuple[int, ...], crc: int) -> bytes:
    nbytes = int(np.prod(shape)) * np.dtype(DTYPE).itemsize
    meta = _canonical({"key": key, "shape": list(shape), "dtype": "float16", "nbytes": nbytes, "crc32": crc})
    body = meta.encode()
    room = HEADER_SIZE - len(MAGIC) - 4
    if len(body) > room:
        raise AssertionError("feature entry header too long")
    return MAGIC + struct.pack("<I", len(body)) + body.ljust(room, b" ")


def _check_header(
    path: Path, head: bytes, size: int, key: str, shape: tuple[int, ...]
) -> tuple[dict[str, Any] | None, str]:
    """(header, "") if the entry's header and size are consistent with ``key`` and ``shape``, else (None, reason)."""
    if len(head) < HEADER_SIZE or not head.startswith(MAGIC):
        return None, "not a deeploc feature entry (bad magic or shorter than its header)"
    (length,) = struct.unpack("<I", head[len(MAGIC) : len(MAGIC) + 4])
    try:
        meta = json.loads(head[len(MAGIC) + 4 : len(MAGIC) + 4 + length])
    except ValueError:
        return None, "unreadable header"
    if not isinstance(meta, dict):
        return None, "unreadable header"
    if meta.get("key") != key:
        return None, f"entry belongs to image {meta.get('key')!r}, expected {key!r}"
    if meta.get("dtype") != "float16" or tuple(meta.get("shape", ())) != tuple(shape):
        return None, f"entry holds {meta.get('dtype')} {meta.get('shape')}, expected float16 {list(shape)}"
    nbytes = int(np.prod(shape)) * np.dtype(DTYPE).itemsize
    if meta.get("nbytes") != nbytes or size != HEADER_SIZE + nbytes:
        return None, f"file is {size} bytes, expected {HEADER_SIZE + nbytes} (truncated or overwritten)"
    return meta, ""


class _EntryProblem(Exception):
    """Why an entry is unusable, in a few words (e.g. "crc32 mismatch")."""


def _checked_data(path: Path, key: str, shape: tuple[int, ...], keep: bool) -> np.ndarray | None:
    """Run every check of the module docstring on the entry at ``path``; return a copy of its data when ``keep``.
    Raises :class:`_EntryProblem`."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < HEADER_SIZE:
                raise _EntryProblem(f"{size} bytes, shorter than its header")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                meta, problem = _check_header(path, mapped[:HEADER_SIZE], size, key, shape)
                if meta is None:
                    raise _EntryProblem(problem)
                view = memoryview(mapped)[HEADER_SIZE:]
                try:
                    if zlib.crc32(view) != meta["crc32"]:
                        raise _EntryProblem("crc32 mismatch")
                    return np.frombuffer(view, dtype=DTYPE).reshape(shape).copy() if keep else None
                finally:
                    view.release()
    except FileNotFoundError:
        raise _EntryProblem("missing") from None


def _entry_problem(path: Path, key: str, shape: tuple[int, ...], verify: bool = False) -> str:
    """Why the entry at ``path`` is unusable; "" when it is fine. Cheap checks (header, key, shape, dtype, size)
    always; ``verify`` also reads the data and checks its crc32."""
    if verify:
        try:
            _checked_data(path, key, shape, keep=False)
        except _EntryProblem as exc:
            return str(exc)
        return ""
    try:
        with open(path, "rb") as handle:
            head = handle.read(HEADER_SIZE)
            size = os.fstat(handle.fileno()).st_size
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable: {exc}"
    return _check_header(path, head, size, key, shape)[1]


def read_entry(path: str | Path, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The float16 ``C x H x W`` tensor of one entry, read through a memory map, with every check of the module
    docstring (header, key, shape, dtype, exact size, crc32). Raises :class:`FeatureStoreError` naming the file and
    a fix that works: a missing entry is computed by the next extraction; a damaged one must be deleted first (the
    training command's extraction step only runs the cheap checks) or found by deeploc-extract, which verifies."""
    path = Path(path)
    try:
        data = _checked_data(path, key, shape, keep=True)
    except _EntryProblem as exc:
        if str(exc) == "missing":
            raise FeatureStoreError(
                f"feature entry {path} is missing. Run the extraction again (the training command itself, or "
                "deeploc-extract with the run's overrides): it computes missing entries."
            ) from None
        raise FeatureStoreError(
            f"feature entry {path} is corrupt: {exc}. Delete it (rm {shlex.quote(str(path))}) and run the command "
            "again: its extraction step recomputes missing entries. To find and recompute every damaged entry of "
            "this store, run deeploc-extract with the run's overrides (it checks each entry's crc32)."
        ) from None
    return torch.from_numpy(data)


# ---------------------------------------------------------------------------------------------- the store


class FeatureStore:
    """One feature map of one encoder identity for any number of images, stored once as memory-mapped float16.

    Args:
        root: cache root folder (created if needed); several stores (identities, features) can share it.
        encoder_identity: the encoder's ``cache_identity()`` (where it computes: precision is part of it).
        feature: the one feature map this store holds.
        shape: ``(C, h, w)`` of that map (``encoder.feature_shape(feature)``).

    Example::

        store = FeatureStore.for_encoder(cache_dir, encoder, "image_embed")
        store.extract(samples, encoder, device="cuda")      # computes only what is missing
        dataset = store.dataset(samples)                    # dict(features={name: map}, mask, name, subset, index)

    :class:`FeatureCache` holds the stores of every map a decoder reads.
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
        self.encoder_identity = json.loads(_canonical(dict(encoder_identity)))
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
        identity = json.loads(_canonical(dict(encoder_identity)))
        config = str(identity.get("config") or identity.get("kind") or "encoder")
        name = f"{_slug(config)}-{identity.get('image_size')}-{feature}-{identity_key(identity, feature)[:16]}"
        return Path(root).expanduser().absolute() / name

    @classmethod
    def for_encoder(cls, root: str | os.PathLike[str], encoder: FrozenEncoder, feature: str) -> FeatureStore:
        """The store of ``encoder``'s map ``feature`` as the encoder computes it where it sits now."""
        return cls(root, encoder.cache_identity(), feature, encoder.feature_shape(feature))

    # ------------------------------------------------------------------ layout
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
            if _canonical(found) != _canonical(self._identity_doc):
                raise FeatureStoreError(
                    f"feature store {self.path} was built for a different identity:\n  found    {_canonical(found)}\n"
                    f"  expected {_canonical(self._identity_doc)}\nRefusing to use it; delete the folder to rebuild."
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
        entries = self.path / "entries"
        for sub in os.scandir(entries):
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

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.root)!r}, feature={self.feature!r}, key={self.key[:16]})"

    # ------------------------------------------------------------------- query
    def content_hashes(self, samples: Sequence[Sample], progress: bool = False) -> list[str]:
        """sha256 of each sample's image file (memoised)."""
        return self._memo.hashes([os.path.abspath(s.image) for s in samples], progress=progress)

    def missing(self, samples: Sequence[Sample], verify: bool = False, progress: bool = False) -> list[Sample]:
        """Samples without a usable entry: absent, or failing the header / key / shape / dtype / size checks
        (``verify``: also the crc32 of the data, which reads every entry)."""
        hashes = self.content_hashes(samples, progress=progress)
        bad: dict[str, bool] = {}
        out = []
        for sample, digest in zip(samples, hashes):
            if digest not in bad:
                bad[digest] = bool(_entry_problem(self.entry_path(digest), digest, self.shape, verify))
            if bad[digest]:
                out.append(sample)
        return out

    # ----------------------------------------------------------------- extract
    def extract(
        self,
        samples: Sequence[Sample],
        encoder: torch.nn.Module,
        batch_size: int = 8,
        device: str | torch.device = "cpu",
        num_workers: int = 0,
        progress: bool = True,
        verify: bool = False,
        lock_scope: str | None = None,
    ) -> int:
        """Compute and store the features of every sample that has no usable entry; returns how many were computed.

        Images are read exactly as :class:`~deeploc.data.datasets.ImageMaskDataset` reads them (no augmentation),
        batched, and run through ``encoder(images, names=(feature,))`` on ``device``. Before writing, prints the
        disk space the new entries take, and refuses with :class:`FeatureStoreError` when the file system has less
        free space. Holds the store's lock throughout, so concurrent jobs wait and then compute nothing.
        Existing entries get the cheap checks; ``verify`` also checks their crc32 (reads the whole store).
        See :func:`extract_features` to fill the stores of several feature maps in one encoder pass.
        """
        done = extract_features([self], samples, encoder, batch_size, device, num_workers, progress, verify, lock_scope)
        return done[self.feature]

    def _write_entry(self, digest: str, fmap: torch.Tensor) -> None:
        if tuple(fmap.shape) != self.shape or fmap.dtype != torch.float16:
            raise FeatureStoreError(f"encoder produced {fmap.dtype} {tuple(fmap.shape)}, expected float16 {self.shape}")
        if not bool(torch.isfinite(fmap).all()):
            raise FeatureStoreError(
                f"{self.feature} features of image sha256:{digest} are not finite in float16 (NaN, or values beyond "
                f"+-65504); nothing was written for it in {self.path}"
            )
        data = fmap.numpy().tobytes()
        header = _encode_header(digest, self.shape, zlib.crc32(data))
        path = self.entry_path(digest)
        path.parent.mkdir(exist_ok=True)
        atomic_write_bytes(path, [header, data])

    def _remove_stale_tmp(self) -> None:
        """Delete temporary files left by an interrupted extraction (only called while holding the lock)."""
        for entry in self._entries():
            if entry.name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)

    # ----------------------------------------------------------------- dataset
    def dataset(self, samples: Sequence[Sample], progress: bool = False) -> CachedFeatureDataset:
        """A dataset of ``dict(features={feature: float16 CxHxW}, mask=float32 1xHxW, name, subset, index)``.

        Raises :class:`FeatureStoreError` if any sample has no usable entry (run :meth:`extract` first).
        """
        return CachedFeatureDataset(list(samples), {self.feature: self.entries(samples, progress)})

    def entries(self, samples: Sequence[Sample], progress: bool = False) -> tuple[list[str], list[str], tuple]:
        """(entry paths, content hashes, shape) of ``samples``, each entry checked (header, key, shape, size)."""
        hashes = self.content_hashes(samples, progress=progress)
        bad = [s for s, h in zip(samples, hashes) if _entry_problem(self.entry_path(h), h, self.shape)]
        if bad:
            names = ", ".join(f"{s.subset}/{s.split}/{s.name}" for s in bad[:_LIST_LIMIT])
            more = f" and {len(bad) - _LIST_LIMIT} more" if len(bad) > _LIST_LIMIT else ""
            raise FeatureStoreError(
                f"{len(bad)} of {len(samples)} images have no cached {self.feature} features in {self.path} "
                f"({names}{more}). Run deeploc-extract with the same config (or FeatureStore.extract) first."
            )
        return [str(self.entry_path(h)) for h in hashes], hashes, self.shape


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

    def extract(
        self,
        samples: Sequence[Sample],
        encoder: torch.nn.Module,
        batch_size: int = 8,
        device: str | torch.device = "cpu",
        **kwargs: Any,
    ) -> dict[str, int]:
        """Compute every missing entry of every map (served or not) in one encoder pass (:func:`extract_features`)."""
        stores = [*self.stores.values(), *self.also.values()]
        return extract_features(stores, samples, encoder, batch_size, device, **kwargs)

    def dataset(self, samples: Sequence[Sample], progress: bool = False) -> CachedFeatureDataset:
        """Items ``dict(features={name: float16 CxHxW, ...}, mask, name, subset, index)``."""
        entries = {name: store.entries(samples, progress) for name, store in self.stores.items()}
        return CachedFeatureDataset(list(samples), entries)

    @property
    def nbytes_per_image(self) -> int:
        """Bytes one image takes on disk over all the maps (served or not)."""
        return sum(store.nbytes_per_image for store in [*self.stores.values(), *self.also.values()])

    def describe(self) -> str:
        """One line per store (served or not)."""
        return "\n".join(store.describe() for store in [*self.stores.values(), *self.also.values()])


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
    """:meth:`FeatureStore.extract` for several stores of the SAME encoder identity (typically one per feature
    map) in one encoder pass: each image missing from any store is encoded once, with ``names`` = the stores'
    features, and written to the stores that lack it. Returns the number of entries computed per feature.

    ``lock_scope`` (e.g. ``"shard-0-of-4"``) locks only that scope, so jobs extracting disjoint shards into one
    store run in parallel; they leave stale temporary files to the next unscoped extraction."""
    stores = list({store.path: store for store in stores}.values())
    if not stores:
        return {}
    identity = _canonical(json.loads(_canonical(encoder.cache_identity())))  # type: ignore[operator]
    for store in stores:
        if identity != _canonical(store.encoder_identity):
            raise FeatureStoreError(
                f"encoder identity {identity} does not match feature store {store.path} "
                f"({_canonical(store.encoder_identity)}); build the store from encoder.cache_identity()"
            )
    if len({store.feature for store in stores}) != len(stores):
        raise FeatureStoreError("extract_features: two stores of the same encoder identity hold the same feature")
    hashes = stores[0].content_hashes(samples, progress=progress)
    n_unique = len(set(hashes))
    with contextlib.ExitStack() as locks:
        for store in sorted(stores, key=lambda st: str(st.path)):  # fixed order: no deadlock between jobs
            lock = store.path / (f".lock.{_slug(lock_scope)}" if lock_scope else ".lock")
            locks.enter_context(_locked(lock, f"feature store {store.path}"))
        # Under the locks: what is missing now (another job may just have computed it).
        todo: dict[str, tuple[Sample, list[FeatureStore]]] = {}
        damaged: dict[str, list[str]] = {}  # feature -> "<entry path> (<problem>)" of entries present but unusable
        for store in stores:
            if lock_scope is None:  # other scopes may be writing their temporary files right now
                store._remove_stale_tmp()
            seen: set[str] = set()
            for sample, digest in zip(samples, hashes):
                if digest in seen:
                    continue
                seen.add(digest)
                problem = _entry_problem(store.entry_path(digest), digest, store.shape, verify)
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
            more = f" (+{len(entries) - _LIST_LIMIT} more)" if len(entries) > _LIST_LIMIT else ""
            print(
                f"[feature store] {feature}: {len(entries)} damaged {'entry' if len(entries) == 1 else 'entries'} "
                f"recomputed: {', '.join(entries[:_LIST_LIMIT])}{more}",
                flush=True,
            )
        return done


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
            raise FeatureStoreError(
                f"not enough disk space for the feature cache in {folders}: needs {needed} bytes "
                f"({format_bytes(needed)}), {free} bytes ({format_bytes(free)}) free. Train without a cache with "
                "features=stream (the encoder runs on every batch, nothing is written), free space, or point "
                "features.dir at a larger disk."
            )


def entry_bytes(shape: Sequence[int]) -> int:
    """Bytes one entry of a ``(C, h, w)`` map takes on disk (header + float16 values)."""
    return HEADER_SIZE + int(np.prod(shape)) * np.dtype(DTYPE).itemsize


def stored_entries(store_path: str | os.PathLike[str]) -> int:
    """How many entries the store at ``store_path`` holds (0 when it does not exist); nothing is read or created."""
    entries = Path(store_path) / "entries"
    if not entries.is_dir():
        return 0
    return sum(
        entry.name.endswith(".f16") for sub in os.scandir(entries) if sub.is_dir() for entry in os.scandir(sub.path)
    )


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
        collate_fn=_as_list,
        pin_memory=torch.device(device).type == "cuda",
    )
    bar = _progress(len(todo), f"extract {'+'.join(names)}", enabled=progress)
    done = dict.fromkeys(counts, 0)
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
                        store._write_entry(digest, maps[store.feature][j])
                        done[store.feature] += 1
                    bar.update(1)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    log.info("extracted %d images (%s) in %.1f s (%.2f img/s)", len(todo), names, seconds, len(todo) / seconds)
    return done


def _as_list(batch: list[Any]) -> list[Any]:
    return batch


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


class CachedFeatureDataset(Dataset):
    """Cached feature maps plus masks; each item reads one memory-mapped entry per map (checked, see the module
    doc) and the mask, never the image.

    Args:
        samples: the samples, in dataset order.
        entries: per map name, (entry paths, content hashes, shape) aligned with ``samples``.
    """

    def __init__(self, samples: list[Sample], entries: Mapping[str, tuple[list[str], list[str], tuple]]) -> None:
        self.samples = samples
        self.entries = dict(entries)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        features = {
            name: read_entry(paths[index], keys[index], shape) for name, (paths, keys, shape) in self.entries.items()
        }
        return {
            "features": features,
            "mask": mask_tensor(sample_target(sample)),
            "name": sample.name,
            "subset": sample.subset,
            "index": index,
        }


# ------------------------------------------------------------------------------------------- augmentation


def cache_allowed(augment_cfg: Any) -> tuple[bool, str]:
    """Whether cached features may be used with this ``data.augment`` config, and the reason the run logs.

    Cached features are the encoder's output on the UNAUGMENTED image; an augmentation applied to the image before
    the encoder (colour jitter, JPEG, blur) changes every epoch, so it cannot be cached. "On" means exactly what
    :func:`deeploc.data.augment.build_augmentations` builds (an invalid config raises its ValueError).
    """
    from deeploc.data.augment import build_augmentations

    with contextlib.suppress(ImportError):
        from omegaconf import DictConfig, OmegaConf

        if isinstance(augment_cfg, DictConfig):
            augment_cfg = OmegaConf.to_container(augment_cfg, resolve=True)
    pipeline = build_augmentations(augment_cfg)
    if pipeline is None:
        return True, "feature cache usable: no image augmentation, so the frozen encoder's features never change"
    active = ", ".join(type(t).__name__ for t in pipeline.transforms)
    return False, (
        f"image augmentations are on ({active}): they change the encoder input every epoch, so its features "
        "cannot be cached"
    )
