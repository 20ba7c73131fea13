"""The on-disk format of one cached feature map (an *entry*), its checks, and the key of a store's identity.

Entry file format (little-endian): 256-byte header = ``DLFEAT1\\n`` + uint32 length + JSON
``{"key", "shape", "dtype", "nbytes", "crc32"}`` padded with spaces; then C*H*W float16 values (C-order), read
through a memory map, so peak RAM does not depend on the number of cached images. Entries are written atomically
(:func:`write_entry`): a reader sees a complete entry or none.

Detected on every read (:func:`read_entry`): missing file, wrong magic, unparsable header, an entry for another
image (key), wrong shape or dtype, truncated or extended file (exact size check), any change of the feature bytes
(crc32). :func:`entry_problem` runs the cheap checks (header, key, shape, dtype, size; the crc32 only with
``verify``: reading a whole store at every training start would cost one epoch of reads). NOT detected: an entry
deliberately rewritten with a consistent header and crc (the cache is no defence against tampering).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shlex
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deeploc.errors import DeeplocError
from deeploc.io import atomic_write_bytes

FORMAT_VERSION = 1
MAGIC = b"DLFEAT1\n"
HEADER_SIZE = 256
DTYPE = np.float16


class FeatureStoreError(DeeplocError, RuntimeError):
    """A feature store that cannot be used as asked; the message names the folder or file and the fix.

    Constructed from its message alone: a DataLoader worker re-raises it in the main process by its type."""


def format_bytes(n: float) -> str:
    """Human-readable byte count (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def canonical(obj: Any) -> str:
    """The JSON text that identities are compared and hashed by (sorted keys, no spaces)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def identity_key(encoder_identity: Mapping[str, Any], feature: str) -> str:
    """sha256 of everything that determines the stored maps: encoder identity, feature name, store format."""
    payload = {"encoder": dict(encoder_identity), "feature": feature, "format": FORMAT_VERSION}
    return hashlib.sha256(canonical(payload).encode()).hexdigest()


def entry_bytes(shape: Sequence[int]) -> int:
    """Bytes one entry of a ``(C, h, w)`` map takes on disk (header + float16 values)."""
    return HEADER_SIZE + int(np.prod(shape)) * np.dtype(DTYPE).itemsize


def _encode_header(key: str, shape: tuple[int, ...], crc: int) -> bytes:
    meta = canonical(
        {"key": key, "shape": list(shape), "dtype": "float16", "nbytes": entry_bytes(shape) - HEADER_SIZE, "crc32": crc}
    )
    body = meta.encode()
    room = HEADER_SIZE - len(MAGIC) - 4
    if len(body) > room:
        raise AssertionError("feature entry header too long")
    return MAGIC + struct.pack("<I", len(body)) + body.ljust(room, b" ")


def write_entry(path: Path, key: str, fmap: torch.Tensor) -> None:
    """Write the float16 map ``fmap`` of the image with content hash ``key`` atomically to ``path``."""
    data = fmap.numpy().tobytes()
    path.parent.mkdir(exist_ok=True)
    atomic_write_bytes(path, [_encode_header(key, tuple(fmap.shape), zlib.crc32(data)), data])


def _check_header(head: bytes, size: int, key: str, shape: tuple[int, ...]) -> tuple[dict[str, Any] | None, str]:
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
    nbytes = entry_bytes(shape) - HEADER_SIZE
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
                meta, problem = _check_header(mapped[:HEADER_SIZE], size, key, shape)
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


def entry_problem(path: Path, key: str, shape: tuple[int, ...], verify: bool = False) -> str:
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
    return _check_header(head, size, key, shape)[1]


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
