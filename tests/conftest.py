"""Shared pytest fixtures."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# The tests run in a clean environment: settings a user's shell may hold (DEEPLOC_OUTPUTS, a signing key, a
# dataset or checkpoint path, a SLURM job, W&B online, HYDRA_FULL_ERROR) would change what deeploc does and make
# results depend on who runs the suite. Removed here, at import, so session fixtures and subprocesses
# (tests/e2e.env_for copies os.environ) never see them; a test that needs one sets it itself.
ISOLATED_ENV = (
    "DOLOS_ROOT",
    "SAM2_CHECKPOINT",
    "CLIP_CHECKPOINT",
    "HYDRA_FULL_ERROR",
    "MASTER_ADDR",
    "MASTER_PORT",
    "WANDB_MODE",
    "WANDB_DIR",
    "WANDB_PROJECT",
    "WANDB_ENTITY",
    "WANDB_API_KEY",
    "WANDB_BASE_URL",
)
ISOLATED_PREFIXES = ("DEEPLOC_", "SLURM_", "SUBMITIT_")
for _name in [n for n in os.environ if n in ISOLATED_ENV or n.startswith(ISOLATED_PREFIXES)]:
    del os.environ[_name]
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

# Small synthetic Dolos-layout dataset shared by the data tests (64x64 keeps it to about a second).
SYNTH_KWARGS = {"n_train": 12, "n_valid": 4, "n_test": 4, "size": 64, "seed": 0, "n_real": 2}


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated dataset (read-only by convention); returns its ``wacv_data`` folder."""
    from deeploc.data.synthetic import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("synthetic"), **SYNTH_KWARGS)


@pytest.fixture
def synthetic_copy(synthetic_data: Path, tmp_path: Path) -> Path:
    """A private copy of ``synthetic_data`` that a test may corrupt; returns its ``wacv_data`` folder."""
    dst = tmp_path / "copy" / "wacv_data"
    shutil.copytree(synthetic_data, dst)
    return dst


@pytest.fixture(scope="session")
def shared_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder shared by end-to-end tests: generated data and feature cache are made once per session."""
    return tmp_path_factory.mktemp("shared")


@pytest.fixture
def srun_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An ``srun`` on PATH (submitit's SLURM executor looks for one before it writes the sbatch script); these tests
    stop before anything is submitted."""
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "srun").write_text("#!/bin/sh\nexit 0\n")
    (folder / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}:{os.environ['PATH']}")
