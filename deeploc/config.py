"""Hydra/OmegaConf glue: where conf/ is, the plain resolvers it uses, and turning a composed config into plain objects."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from deeploc.errors import ConfigError

# Absolute, because Hydra resolves a relative config_path as a Python module ("conf") when the entry point runs
# as a console script, and fails with "Primary config module 'conf' not found".
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

__all__ = [
    "CONF_DIR",
    "cpu_workers",
    "cuda_available",
    "stable_id",
    "subset_at",
    "to_primitive",
]


def stable_id(text: str) -> str:
    """A short id that is the same every time for the same text (W&B run ids that survive resumes)."""
    return hashlib.sha1(str(text).encode()).hexdigest()[:16]


def subset_at(subsets: Any, index: int) -> str:
    """``data.subsets[index]`` with an error that says what is valid (sweeps pick subsets by position)."""
    names = list(subsets)
    if not 0 <= int(index) < len(names):
        raise ConfigError(f"subset_index={index} is out of range for data.subsets={names} (0..{len(names) - 1})")
    return str(names[int(index)])


def cpu_workers(limit: int) -> int:
    """Data-loader workers: ``limit``, or fewer when this process may use fewer CPUs (a 2-core machine, a SLURM
    allocation); more workers than CPUs only compete with the training process."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    return max(0, min(int(limit), available))


def cuda_available() -> bool:
    """Whether a CUDA device is visible: pinned host memory only speeds up copies to one."""
    import torch

    return torch.cuda.is_available()


def to_primitive(cfg: DictConfig | dict[str, Any] | None) -> Any:
    """A resolved plain-Python copy of a config node (for logging, JSON and saved hyperparameters)."""
    if cfg is None or not isinstance(cfg, DictConfig):
        return cfg
    return OmegaConf.to_container(cfg, resolve=True)
