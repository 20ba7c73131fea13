"""deeploc's own error types: problems a user can fix, reported as one message that names the file or key and the fix.

Every error deeploc raises about its input (data, settings, model files, caches, run directories) derives from
:class:`DeeplocError`. The console commands print such an error as one line and exit 1; the traceback is shown
with ``--verbose`` (and ``HYDRA_FULL_ERROR=1`` for ``deeploc-train`` / ``deeploc-extract``). Anything else is a
bug and keeps its full traceback.
"""

from __future__ import annotations


class DeeplocError(Exception):
    """Base class of the errors deeploc raises about its input; the message names the file or key and the fix."""


class ConfigError(DeeplocError, ValueError):
    """A setting that cannot be used: the message names the config key (as typed on the command line) and the fix."""


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
