"""The OmegaConf resolvers conf/ uses, registered when deeploc is imported (CLI, Hydra's compose API in notebooks
or tests): run naming, sweep helpers and the direction of ``optimized_metric``."""

from __future__ import annotations

from omegaconf import OmegaConf

from deeploc.config import cpu_workers, cuda_available, stable_id, subset_at
from deeploc.errors import ConfigError
from deeploc.runs.naming import run_dir_name, run_label, run_name


def optimize_direction(metric: str) -> str:
    """``maximize`` or ``minimize``: how a sweeper treats the value ``deeploc-train`` returns for ``metric``."""
    from deeploc.metrics import OPTIMIZED_METRICS  # torch and torchmetrics only when a sweeper asks

    if metric not in OPTIMIZED_METRICS:
        raise ConfigError(f"optimized_metric={metric!r} must be one of {', '.join(OPTIMIZED_METRICS)}")
    return "maximize" if OPTIMIZED_METRICS[metric] == "max" else "minimize"


def register_resolvers() -> None:
    """Register the resolvers conf/ uses; safe to call more than once."""
    resolvers = {
        "run_label": run_label,
        "run_name": run_name,
        "run_dir_name": run_dir_name,
        "stable_id": stable_id,
        "subset_at": subset_at,
        "cpu_workers": cpu_workers,
        "cuda_available": cuda_available,
        "optimize_direction": optimize_direction,
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
