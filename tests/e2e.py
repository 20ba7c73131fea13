"""Helpers for end-to-end tests: run the real console entry points in subprocesses on tiny generated data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# A generated dataset small enough for CPU tests; the micro SAM2 config keeps feature extraction to seconds.
TINY_DATA = [
    "data.synthetic.n_train=32",
    "data.synthetic.n_valid=8",
    "data.synthetic.n_test=8",
    "data.synthetic.size=128",
    "data.batch_size=8",
    "data.num_workers=0",
    "encoder=micro",
]


def env_for(workdir: Path) -> dict[str, str]:
    """Environment of a test job: outputs under `workdir`, W&B offline and quiet."""
    env = dict(os.environ)
    env.update(
        DEEPLOC_OUTPUTS=str(workdir / "outputs"),
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        NO_ALBUMENTATIONS_UPDATE="1",
        HYDRA_FULL_ERROR="1",
        PYTHONWARNINGS="ignore",
    )
    return env


def run_cli(
    module: str, args: list[str], workdir: Path, check: bool = True, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run ``python -m <module> <args>`` in `workdir`; on failure show its output."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=workdir,
        env=env_for(workdir),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{module} {args} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return proc


def train_args(shared: Path, *overrides: str) -> list[str]:
    """Overrides that point a train job at the shared tiny dataset and feature cache."""
    return [
        f"data.root={shared / 'data'}",
        f"features.dir={shared / 'features'}",
        *TINY_DATA,
        *overrides,
    ]
