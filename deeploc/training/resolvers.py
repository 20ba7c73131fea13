"""The OmegaConf resolvers conf/ uses, registered when deeploc is imported (CLI, Hydra's compose API in notebooks
or tests): run naming, sweep helpers and the direction of ``optimized_metric``."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from deeploc.config import cpu_workers, cuda_available, stable_id, subset_at
from deeploc.errors import ConfigError
from deeploc.registry import import_modules
from deeploc.runs.naming import run_name


def optimize_direction(metric: str, plugins: Any = ()) -> str:
    """``maximize`` or ``minimize``: how a sweeper treats the value ``deeploc-train`` returns for ``metric`` (a
    metric of ``plugins`` included: the sweeper asks before any job imports them)."""
    from deeploc.metrics import optimized_metrics  # torch and torchmetrics only when a sweeper asks

    import_modules(list(plugins or ()), "plugins")
    directions = optimized_metrics()
    if metric not in directions:
        raise ConfigError(
            f"optimized_metric={metric!r} must be one of {', '.join(directions)} (a metric of your own: register it "
            "and list its module under plugins)"
        )
    return "maximize" if directions[metric] == "max" else "minimize"


def register_resolvers() -> None:
    """Register the resolvers conf/ uses; safe to call more than once."""
    resolvers = {
        "run_name": run_name,
        "stable_id": stable_id,
        "subset_at": subset_at,
        "cpu_workers": cpu_workers,
        "cuda_available": cuda_available,
        "optimize_direction": optimize_direction,
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
