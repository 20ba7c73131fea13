"""deeploc's own error types: problems a user can fix, reported as one message that names the file or key and the fix.

Every error deeploc raises about its input (data, settings, model files, caches, run directories) derives from
:class:`DeeplocError`. The console commands print such an error as one line and exit 1; the traceback is shown
with ``--verbose`` (and ``HYDRA_FULL_ERROR=1`` for ``deeploc-train`` / ``deeploc-extract``). Anything else is a
bug and keeps its full traceback.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

#: The errors of a write that found no space: a full disk, an exhausted quota, a file size limit.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DeeplocError(Exception):
    """Base class of the errors deeploc raises about its input; the message names the file or key and the fix."""


class ConfigError(DeeplocError, ValueError):
    """A setting that cannot be used: the message names the config key (as typed on the command line) and the fix."""


class DiskFullError(DeeplocError, OSError):
    """No space to write a file: the message names the folder, the space needed and free, and DEEPLOC_OUTPUTS."""

    def __init__(self, path: str | os.PathLike[str], needed: int | None, code: int = errno.ENOSPC) -> None:
        folder = Path(path).parent
        try:
            free = _size(shutil.disk_usage(folder).free)
        except OSError:
            free = "unknown"
        wanted = f"{_size(needed)} needed, " if needed is not None else ""
        self.message = (
            f"no space left to write {Path(path).name} in {folder} ({wanted}{free} free): free space there, or write "
            "deeploc's outputs to a larger disk with DEEPLOC_OUTPUTS=/a/larger/disk (or paths.output_dir=...); "
            "nothing half-written is left, and the same command then resumes"
        )
        super().__init__(code, self.message, str(path))

    def __str__(self) -> str:
        return self.message


def _size(count: int) -> str:
    """A byte count for people: ``3.2 MB``."""
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"  # pragma: no cover


def deeploc_error(exc: BaseException) -> BaseException | None:
    """The error to report in one line for ``exc``, or None when ``exc`` is not one (a bug: show the traceback).

    That is a :class:`DeeplocError`, or a ``ValueError`` raised by deeploc's own code (settings checked where they
    are used), found in ``exc`` or in the errors it was explicitly raised from (``raise ... from``: Hydra's
    ``instantiate`` wraps the errors of the constructors it calls). An error raised while handling another one is a
    new problem and is not replaced by the one it interrupted.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DeeplocError) or (isinstance(current, ValueError) and _raised_by_deeploc(current)):
            return current
        current = current.__cause__
    return None


def _raised_by_deeploc(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc``'s traceback is in the deeploc package."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(tb.tb_frame.f_globals.get("__name__", "")).split(".")[0] == "deeploc"
