"""Shared pytest fixtures."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

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
