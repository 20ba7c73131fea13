"""`deeploc-train`: compose conf/, check the settings, then train one run or a multi-head job (``heads=[...]``)."""

from __future__ import annotations

import logging
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from deeploc.cli.app import run_hydra_app
from deeploc.config import CONF_DIR
from deeploc.console import quiet_console
from deeploc.errors import deeploc_error
from deeploc.registry import import_modules
from deeploc.training.backbones import choose_backbone
from deeploc.training.results import best_validation_value
from deeploc.training.run import train as train_single
from deeploc.training.settings import check_choices, check_config

log = logging.getLogger("deeploc.training.run")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train and test one configuration; returns the content of the run's metrics.json. With ``heads`` set, train
    every head on one stream of batches instead (:mod:`deeploc.multihead`); returns ``{"heads": {name: metrics}}``."""
    choose_backbone(cfg, HydraConfig.get())  # experiment=backbones: backbone.<family>=<encoder>
    check_config(cfg)
    check_choices(HydraConfig.get())
    if cfg.get("heads") is not None:  # heads=[] too: refused by the job, never an ordinary run
        from deeploc.multihead.job import train_heads

        return train_heads(cfg)
    return train_single(cfg)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def train_job(cfg: DictConfig) -> float | None:
    """One Hydra job: train and test ``cfg``. Returns the best validation value of ``optimized_metric`` over the
    run (what a Hydra sweeper optimises; never a test score)."""
    quiet_console()
    try:
        import_modules(cfg.get("plugins"), "plugins")  # before anything is built or checked
        metrics = train(cfg)
    except Exception as exc:
        if HydraConfig.get().mode == RunMode.MULTIRUN and deeploc_error(exc) is not None:
            log.error("%s", deeploc_error(exc))  # in this job's log; the sweep reports the first failure at its end
        raise
    if "heads" in metrics:  # a multi-head job: no single value to optimise
        for name, results in metrics["heads"].items():
            value = best_validation_value(results, cfg.optimized_metric)
            log.info("head %s: best validation %s of the run: %s", name, cfg.optimized_metric, shown(value, cfg))
        return None
    value = best_validation_value(metrics, cfg.optimized_metric)
    log.info("best validation %s of the run: %s (the value returned to Hydra)", cfg.optimized_metric, shown(value, cfg))
    return value


def shown(value: float | None, cfg: DictConfig) -> str:
    """``optimized_metric``'s value for the console: percentages with 2 decimals, a loss with 4 (never 7.8e-11)."""
    if value is None:
        return "none (no validation epoch)"
    return f"{value:.4f}" if str(cfg.optimized_metric).endswith("loss") else f"{value:.2f}"


def main() -> None:
    """Console entry point ``deeploc-train [--verbose] [Hydra options] [overrides]``: errors a user can fix print one
    line (the traceback with --verbose or HYDRA_FULL_ERROR=1) and exit with status 1."""
    run_hydra_app("deeploc-train", train_job)


if __name__ == "__main__":
    main()
