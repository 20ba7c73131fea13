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


def sweep_jobs(conf_dir: str, overrides: list[str]) -> list[list[str]]:
    """The job override lists Hydra's basic sweeper expands a multirun into (config params + command line)."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        # Sweep values (a,b) are only legal in a multirun; the base config needs the others.
        cfg = compose("train", overrides=[o for o in overrides if "," not in o], return_hydra_config=True)
    params = [f"{key}={value}" for key, value in cfg.hydra.sweeper.params.items()]
    parsed = OverridesParser.create().parse_overrides(params + overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
