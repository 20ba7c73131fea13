"""A run stopped by SIGTERM outside a requeue: one console line and exit status 143, never a silent success.

Lightning stops training at the next batch on SIGTERM by raising a ``SystemExit`` with status 0 and prints nothing on
the console. A job being requeued (:class:`deeploc.training.cluster.RequeueOnSignal`) has already written its
checkpoint, ignores SIGTERM and exits with its own status (144); this module does not touch that path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import lightning as L

__all__ = ["SIGTERM_EXIT_CODE", "StoppedBySignal", "stop_on_sigterm"]

#: The exit status of a run stopped by SIGTERM (128 + 15, as a shell reports a process the signal ended).
SIGTERM_EXIT_CODE = 143


class StoppedBySignal(SystemExit):
    """A run stopped by SIGTERM outside a requeue (Lightning stops at the next batch): exits with
    :data:`SIGTERM_EXIT_CODE`; ``console_line`` is the one line the command prints (deeploc.cli.app)."""

    def __init__(self, what: str, epoch: int, resumes: str) -> None:
        super().__init__(SIGTERM_EXIT_CODE)
        self.console_line = f"{what} stopped by SIGTERM at epoch {epoch}: {resumes}"

    def __str__(self) -> str:
        return self.console_line


@contextlib.contextmanager
def stop_on_sigterm(trainer: L.Trainer, what: str, resumes: str) -> Iterator[None]:
    """Turn Lightning's SIGTERM stop (a ``SystemExit`` with status 0, silent on the console) into
    :class:`StoppedBySignal` naming ``what`` stopped, the epoch, and ``resumes`` (how the same command continues).
    A job being requeued (:class:`RequeueOnSignal`) ignores SIGTERM and exits with its own status instead."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        yield
    except SIGTERMException:
        raise StoppedBySignal(what, trainer.current_epoch + 1, resumes) from None
