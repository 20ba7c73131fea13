"""Checkpoint files written atomically in their own folder.

Lightning's default ``TorchCheckpointIO`` writes through fsspec, which stages the file in the system temp folder
and moves it into place; across file systems the move is a copy straight into the target, so a full disk
truncates a good ``last.ckpt`` and a kill leaves the staged file in the temp folder. :class:`AtomicCheckpointIO`
writes a hidden partial file next to the target, fsyncs it and renames it over the target: the target is always
either the previous complete checkpoint or the new complete one. A partial file left by a kill is removed by the
next successful save in that folder (one process writes a run's checkpoints: rank 0, under the run's lock).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from deeploc.errors import DISK_FULL, DiskFullError
from deeploc.io import atomic_write_bytes

PARTIAL_SUFFIX = ".partial"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves go through a partial file in the target's folder, fsync and rename."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: fsspec's own transaction is the only option there
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options, got {storage_options}")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Serialised in memory first: torch's zip writer would mask a disk error (ENOSPC) with its own RuntimeError.
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        try:
            atomic_write_bytes(target, [buffer.getbuffer()], suffix=PARTIAL_SUFFIX, fsync=True)
        except OSError as exc:
            if exc.errno in DISK_FULL:  # one clear line; the previous checkpoint is intact (atomic write)
                raise DiskFullError(target, buffer.getbuffer().nbytes, exc.errno) from exc
            raise
        for stale in target.parent.glob(f".*{PARTIAL_SUFFIX}"):
            stale.unlink(missing_ok=True)


def with_atomic_checkpoints(plugins: Iterable[Any]) -> list[Any]:
    """Trainer plugins plus :class:`AtomicCheckpointIO`, unless a checkpoint IO plugin is configured already."""
    plugins = list(plugins)
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


def checkpoint_step(path: str | os.PathLike[str]) -> int:
    """The global step a checkpoint was taken at (where a run resumed from it continues)."""
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
