"""Run a deeploc console module with one real fault injected at a precise moment (used by the reliability tests).

    python tests/faults.py FAULT MODULE [ARGS...]

FAULT is one of
  kill-before-checkpoint-rename  SIGKILL the process as a checkpoint file is about to be renamed into place
                                 (its bytes are written: the worst moment for an interruption);
  disk-full-on-checkpoint-write  the disk fills up (RLIMIT_FSIZE: writes past 64 KiB fail with EFBIG, as ENOSPC
                                 would) as soon as a file in a ``checkpoints/`` folder is opened for writing;
  disk-full-in-wandb-media       the disk is full when W&B copies a logged image into its run folder (an open for
                                 writing under ``wandb/.../media/`` fails with ENOSPC, as a full disk would);
  kill-before-nth-rename         SIGKILL the process as a file whose path matches the regular expression
                                 ``$FAULT_PATH`` is about to be renamed into place for the ``$FAULT_COUNT``-th time
                                 (e.g. the second epoch-end checkpoint of one run directory).

The hooks are Python audit hooks (PEP 578): the process, its files and the failure are all real.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import runpy
import signal
import sys
from typing import Any

DISK_LIMIT = 64 * 1024
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _kill_before_checkpoint_rename(event: str, args: tuple[Any, ...]) -> None:
    if event == "os.rename" and str(args[1]).endswith(".ckpt"):
        os.kill(os.getpid(), signal.SIGKILL)


def _disk_full_on_checkpoint_write(event: str, args: tuple[Any, ...]) -> None:
    if event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    path, mode, flags = os.fsdecode(args[0]), args[1], args[2]
    writing = ("w" in mode or "a" in mode or "+" in mode) if isinstance(mode, str) else bool(flags & _WRITE_FLAGS)
    if writing and f"{os.sep}checkpoints{os.sep}" in path:
        resource.setrlimit(resource.RLIMIT_FSIZE, (DISK_LIMIT, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def _disk_full_in_wandb_media(event: str, args: tuple[Any, ...]) -> None:
    if event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    path, mode, flags = os.fsdecode(args[0]), args[1], args[2]
    writing = ("w" in mode or "a" in mode or "+" in mode) if isinstance(mode, str) else bool(flags & _WRITE_FLAGS)
    if writing and f"{os.sep}wandb{os.sep}" in path and f"{os.sep}media{os.sep}" in path:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


_renames = {"seen": 0}


def _kill_before_nth_rename(event: str, args: tuple[Any, ...]) -> None:
    if event == "os.rename" and re.search(os.environ["FAULT_PATH"], os.fsdecode(args[1])):
        _renames["seen"] += 1
        if _renames["seen"] == int(os.environ["FAULT_COUNT"]):
            os.kill(os.getpid(), signal.SIGKILL)


FAULTS = {
    "kill-before-checkpoint-rename": _kill_before_checkpoint_rename,
    "disk-full-on-checkpoint-write": _disk_full_on_checkpoint_write,
    "kill-before-nth-rename": _kill_before_nth_rename,
    "disk-full-in-wandb-media": _disk_full_in_wandb_media,
}


def main() -> None:
    fault, module, *args = sys.argv[1:]
    sys.addaudithook(FAULTS[fault])
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
