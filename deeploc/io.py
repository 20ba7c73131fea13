"""Files that are never seen half-written, and file digests: the one place deeploc writes atomically.

Every file a later step trusts (metrics.json, checkpoints, exports, feature-cache entries, CSV histories, caches)
is written to a temporary file in the target's own folder and renamed over the target, so a reader sees the old
complete file or the new complete one, never a mix; on any error the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_file", "atomic_write_bytes", "file_digest", "finite_or_null", "fsync_folder", "write_json_atomic"]


@contextlib.contextmanager
def atomic_file(
    path: str | os.PathLike[str], mode: str = "wb", suffix: str = ".tmp", fsync: bool = False, **open_kwargs: Any
) -> Iterator[IO[Any]]:
    """A handle on a hidden temporary file next to ``path``, renamed over ``path`` when the block succeeds.

    ``fsync``: flush the data and the rename to disk (checkpoints: a crash right after must not lose them).
    The temporary name is ``.<name>.<random><suffix>``, so a folder's leftovers of killed writers can be found.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as handle:
            yield handle
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if fsync:
        fsync_folder(target.parent)


def atomic_write_bytes(
    path: str | os.PathLike[str],
    chunks: bytes | Iterable[bytes | memoryview],
    suffix: str = ".tmp",
    fsync: bool = False,
) -> Path:
    """Write ``chunks`` to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path, "wb", suffix=suffix, fsync=fsync) as handle:
        for chunk in [chunks] if isinstance(chunks, bytes) else chunks:
            handle.write(chunk)
    return Path(path)


def write_json_atomic(path: str | os.PathLike[str], payload: Any) -> Path:
    """Write strict JSON atomically.

    NaN and +-inf (an undefined score, e.g. trufor's AP when every mask is empty) become ``null``: JSON has no
    such numbers, and strict readers (jq, JavaScript, many JSON libraries) reject Python's bare ``NaN``. The
    counts of undefined cases next to the means say why a value is null.
    """
    with atomic_file(path, "w") as handle:
        json.dump(finite_or_null(payload), handle, indent=2, sort_keys=False, allow_nan=False)
        handle.write("\n")
    return Path(path)


def finite_or_null(value: Any) -> Any:
    """A copy of a JSON-like value with every non-finite float replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


def fsync_folder(folder: str | os.PathLike[str]) -> None:
    """Make a rename in ``folder`` durable (some file systems cannot fsync a directory: then nothing happens)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def file_digest(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """sha256 (hex) of a file's contents: weights files, checkpoints, images in the feature cache."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def torch_load_failure(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in one line, without torch's advice to retry with
    ``weights_only=False`` (which would run whatever code the file pickles: never do that for a refused file)."""
    text = str(exc)
    if "Weights only load failed" not in text:
        return next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    skip = ("weights only load failed", "weights_only", "check the documentation")
    details = []
    for line in text.splitlines():
        line = line.split("WeightsUnpickler error:", 1)[-1].strip()
        if line and not any(s in line.lower() for s in skip):
            details.append(line)
    return "it holds something other than plain tensors" + (f" ({'; '.join(details)})" if details else "")
