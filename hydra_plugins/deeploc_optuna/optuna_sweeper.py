"""The Hydra Sweeper plugin class (Hydra imports this module when it scans for plugins: no Optuna import here)."""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class OptunaSweeper(Sweeper):
    """An Optuna search whose trials are Hydra jobs, kept in a persistent (journal) storage: see ``_impl``."""

    def __init__(self, **settings: Any) -> None:
        from hydra_plugins.deeploc_optuna._impl import OptunaSearch

        self.search = OptunaSearch(**settings)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.search.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        self.search.sweep(arguments)
