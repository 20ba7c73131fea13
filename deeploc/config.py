"""Hydra/OmegaConf glue: resolvers used by conf/, and turning a composed config into plain objects."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Absolute, because Hydra resolves a relative config_path as a Python module ("conf") when the entry point runs
# as a console script, and fails with "Primary config module 'conf' not found".
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

_UNSAFE = re.compile(r"[^A-Za-z0-9_.,=+\-\[\]]")
_MAX_NAME = 120


def run_label(override_dirname: str) -> str:
    """A directory name derived from a run's overrides: stable, filesystem-safe, never empty."""
    if not override_dirname:
        return "default"
    label = _UNSAFE.sub("_", override_dirname)
    if len(label) > _MAX_NAME:
        digest = hashlib.sha1(override_dirname.encode()).hexdigest()[:10]
        label = f"{label[: _MAX_NAME - 11]}-{digest}"
    return label


def stable_id(text: str) -> str:
    """A short id that is the same every time for the same text (W&B run ids that survive resumes)."""
    return hashlib.sha1(str(text).encode()).hexdigest()[:16]


def subset_at(subsets: Any, index: int) -> str:
    """``data.subsets[index]`` with an error that says what is valid (sweeps pick subsets by position)."""
    names = list(subsets)
    if not 0 <= int(index) < len(names):
        raise ValueError(f"subset_index={index} is out of range for data.subsets={names} (0..{len(names) - 1})")
    return str(names[int(index)])


def register_resolvers() -> None:
    """Register the resolvers conf/ uses; safe to call more than once."""
    for name, fn in (("run_label", run_label), ("stable_id", stable_id), ("subset_at", subset_at)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def to_primitive(cfg: DictConfig | dict[str, Any] | None) -> Any:
    """A resolved plain-Python copy of a config node (for logging, JSON and saved hyperparameters)."""
    if cfg is None or not isinstance(cfg, DictConfig):
        return cfg
    return OmegaConf.to_container(cfg, resolve=True)
