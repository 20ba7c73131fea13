"""Hydra/OmegaConf glue: resolvers used by conf/, and turning a composed config into plain objects."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from deeploc.errors import ConfigError
from deeploc.naming import run_dir_name, run_label, run_name

# Absolute, because Hydra resolves a relative config_path as a Python module ("conf") when the entry point runs
# as a console script, and fails with "Primary config module 'conf' not found".
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

__all__ = ["CONF_DIR", "register_resolvers", "run_label", "stable_id", "subset_at", "to_primitive"]


def stable_id(text: str) -> str:
    """A short id that is the same every time for the same text (W&B run ids that survive resumes)."""
    return hashlib.sha1(str(text).encode()).hexdigest()[:16]


def subset_at(subsets: Any, index: int) -> str:
    """``data.subsets[index]`` with an error that says what is valid (sweeps pick subsets by position)."""
    names = list(subsets)
    if not 0 <= int(index) < len(names):
        raise ConfigError(f"subset_index={index} is out of range for data.subsets={names} (0..{len(names) - 1})")
    return str(names[int(index)])


def register_resolvers() -> None:
    """Register the resolvers conf/ uses; safe to call more than once."""
    resolvers = {
        "run_label": run_label,
        "run_name": run_name,
        "run_dir_name": run_dir_name,
        "stable_id": stable_id,
        "subset_at": subset_at,
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def to_primitive(cfg: DictConfig | dict[str, Any] | None) -> Any:
    """A resolved plain-Python copy of a config node (for logging, JSON and saved hyperparameters)."""
    if cfg is None or not isinstance(cfg, DictConfig):
        return cfg
    return OmegaConf.to_container(cfg, resolve=True)
