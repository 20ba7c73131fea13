"""Hyper-parameter search: the best trial of a hydra-optuna-sweeper search, printed and saved beside its trials.

``deeploc-train -m hparams_search=optuna`` (conf/hparams_search/optuna.yaml, docs/tuning.md): the sweeper samples
the searched settings, each trial is an ordinary deeploc-train job in the sweep folder (named after its
overrides, so a re-run of the same search skips the finished trials), and the value each trial returns is the best
validation value of ``optimized_metric`` over its epochs (never a test score). The sweeper writes
``<sweep>/optimization_results.yaml`` (the searched settings of the best trial and its value); :class:`BestTrial`,
a Hydra callback of the search, completes it: ``<sweep>/best_trial.yaml`` names the best trial's run directory and
ALL its overrides (the fixed ones of the command line too), with the command that trains it again, and the
console says the same.
"""

from __future__ import annotations

import logging
import math
import shlex
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from deeploc.io import atomic_write_bytes
from deeploc.runs.naming import override_key
from deeploc.runs.rundir import RunDir

log = logging.getLogger("deeploc.training.hparams")

RESULTS_FILE = "optimization_results.yaml"
BEST_FILE = "best_trial.yaml"

__all__ = ["BEST_FILE", "RESULTS_FILE", "BestTrial", "find_best_trial", "fixed_overrides"]


def fixed_overrides(command_line: Iterable[str]) -> list[str]:
    """The overrides of a multirun command line that every job receives as they are (no sweep expression)."""
    lines = list(command_line)
    parsed = OverridesParser.create().parse_overrides(lines)
    return [line for line, override in zip(lines, parsed) if not override.is_sweep_override()]


def _trial_value(run: RunDir, metric: str) -> float | None:
    from deeploc.training.results import best_validation_value

    return best_validation_value(run.read_metrics(), metric)


def find_best_trial(
    sweep_dir: Path, best_params: Mapping[str, Any], best_value: float, fixed: Iterable[str], metric: str
) -> tuple[Path, list[str]] | None:
    """The run directory and overrides of the trial the sweeper reported best: the finished trial of this search
    (its overrides hold ``fixed`` and ``best_params``) whose recorded best value of ``metric`` is ``best_value``."""
    wanted = set(fixed) | {f"{key}={value}" for key, value in best_params.items()}
    for overrides_file in sorted(Path(sweep_dir).glob("*/.hydra/overrides.yaml")):
        overrides = [str(line) for line in yaml.safe_load(overrides_file.read_text()) or []]
        run = RunDir(overrides_file.parent.parent)
        if not wanted <= set(overrides):
            continue
        value = _trial_value(run, metric)
        if value is not None and math.isclose(value, float(best_value), rel_tol=1e-9, abs_tol=1e-12):
            return run.path, overrides
    return None


class BestTrial(Callback):
    """At the end of an Optuna search, print the best trial and save it to ``<sweep>/best_trial.yaml``."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from deeploc.console import quiet_optuna

        quiet_optuna()  # before the sweeper imports and starts Optuna

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        results_file = sweep_dir / RESULTS_FILE
        if not results_file.is_file():
            return
        results = OmegaConf.to_container(OmegaConf.load(results_file))
        if "best_params" not in results:  # a multi-objective search: the sweeper's Pareto front is the answer
            return
        metric = str(config.optimized_metric)
        fixed = fixed_overrides(str(line) for line in config.hydra.overrides.task)
        found = find_best_trial(sweep_dir, results["best_params"], results["best_value"], fixed, metric)
        if found is None:
            log.warning(
                "best trial (%s) not found among the finished trials in %s; the sweeper's summary is %s",
                results["best_params"], sweep_dir, results_file,
            )  # fmt: skip
            return
        run_dir, overrides = found
        # Without hparams_search: the command trains this one configuration (a search needs -m).
        single = [line for line in overrides if override_key(line) != "hparams_search"]
        command = "deeploc-train " + " ".join(shlex.quote(line) for line in single)
        best = {
            "optimized_metric": metric,
            "direction": str(config.hydra.sweeper.direction),
            "best_value": float(results["best_value"]),
            "best_params": results["best_params"],
            "run_dir": str(run_dir),
            "overrides": overrides,
            "command": command,
        }
        atomic_write_bytes(sweep_dir / BEST_FILE, yaml.safe_dump(best, sort_keys=False, width=1000).encode())
        log.info(
            "best trial: %s %s = %s (best validation value of its run) in %s\n  its settings: %s\n  train it again "
            "(e.g. with more seeds or epochs): %s\n  saved: %s",
            metric, best["direction"].removesuffix("imize"), best["best_value"], run_dir,
            " ".join(f"{k}={v}" for k, v in results["best_params"].items()), command, sweep_dir / BEST_FILE,
        )  # fmt: skip
