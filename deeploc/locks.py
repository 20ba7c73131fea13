"""Exclusive advisory file locks (``fcntl.flock``) between processes: the feature store's extraction and run
directories. The kernel releases a lock when its holder exits or is killed, so a crash never leaves a stale lock.
flock is honoured on local file systems and NFSv4; some network file systems ignore it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deeploc.errors import DeeplocError

log = logging.getLogger(__name__)


class LockHeldError(DeeplocError):
    """Another process holds the lock (the message names it: pid, host, since when)."""


@contextlib.contextmanager
def exclusive(path: Path, what: str) -> Iterator[None]:
    """Exclusive flock on ``path``; says so when it has to wait for another process."""
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("%s: another process holds %s; waiting for it to finish", what, path)
            print(f"[{what}] waiting for another process holding {path}", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def exclusive_or_fail(path: Path, what: str, fix: str) -> Iterator[None]:
    """Exclusive flock on ``path`` without waiting: raises :class:`LockHeldError` naming the holder (pid, host,
    start time, written into the file by whoever holds it) and ``fix`` when another process has it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # "a+": opening must not truncate the holder's record before we know whether we hold the lock.
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = describe_holder(_read_holder(path))
            raise LockHeldError(f"{what} is in use by another process ({holder}; lock file {path}): {fix}") from None
        try:
            handle.seek(0)
            handle.truncate()
            record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            handle.write(json.dumps({**record, "what": what}) + "\n")
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def describe_holder(holder: dict[str, Any]) -> str:
    """``pid 123 on host h since 2025-01-01 10:00:00`` (or what is known of it)."""
    if "pid" not in holder:
        return "pid unknown: it has just started"
    return f"pid {holder['pid']} on host {holder.get('host', '?')} since {holder.get('since', '?')}"


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}
