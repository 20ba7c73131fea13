"""Hyper-parameter search: the best trial of an Optuna search, printed and saved beside its trials.

``deeploc-train -m hparams_search=optuna`` (conf/hparams_search/optuna.yaml, docs/tuning.md): deeploc's Optuna
sweeper (``hydra_plugins/deeploc_optuna``) samples the searched settings, each trial is an ordinary deeploc-train
job in the sweep folder (named after its overrides), and the value each trial returns is the best validation value
of ``optimized_metric`` over its epochs (never a test score). The sweeper writes ``<sweep>/optimization_results.yaml``
(the searched settings of the best trial and its value) and calls :func:`save_best_trial`:
``<sweep>/best_trial.yaml`` names the best trial's run directory and ALL its overrides (the fixed ones of the
command line too), with the command that trains it again, and the console says the same.
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

from deeploc.io import atomic_write_bytes
from deeploc.runs.naming import override_key
from deeploc.runs.rundir import RunDir

log = logging.getLogger("deeploc.training.hparams")

RESULTS_FILE = "optimization_results.yaml"
BEST_FILE = "best_trial.yaml"

__all__ = ["BEST_FILE", "RESULTS_FILE", "find_best_trial", "fixed_overrides", "save_best_trial"]


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


def save_best_trial(
    sweep_dir: Path,
    metric: str,
    direction: str,
    best_params: Mapping[str, Any],
    best_value: float,
    fixed: Iterable[str],
) -> Path | None:
    """Write ``<sweep_dir>/best_trial.yaml`` for the search's best trial (``best_params``, ``best_value``; ``fixed``:
    the command line's fixed overrides) and print it; returns the file, or None when no finished run matches."""
    sweep_dir = Path(sweep_dir)
    found = find_best_trial(sweep_dir, best_params, best_value, fixed, metric)
    if found is None:
        log.warning(
            "best trial (%s) not found among the finished trials in %s; the sweeper's summary is %s",
            dict(best_params), sweep_dir, sweep_dir / RESULTS_FILE,
        )  # fmt: skip
        return None
    run_dir, overrides = found
    # Without hparams_search: the command trains this one configuration (a search needs -m).
    single = [line for line in overrides if override_key(line) != "hparams_search"]
    command = "deeploc-train " + " ".join(shlex.quote(line) for line in single)
    best = {
        "optimized_metric": metric,
        "direction": direction,
        "best_value": float(best_value),
        "best_params": dict(best_params),
        "run_dir": str(run_dir),
        "overrides": overrides,
        "command": command,
    }
    atomic_write_bytes(sweep_dir / BEST_FILE, yaml.safe_dump(best, sort_keys=False, width=1000).encode())
    log.info(
        "best trial: %s %s = %s (best validation value of its run) in %s\n  its settings: %s\n  train it again "
        "(e.g. with more seeds or epochs): %s\n  saved: %s",
        metric, direction.removesuffix("imize"), best["best_value"], run_dir,
        " ".join(f"{k}={v}" for k, v in best_params.items()), command, sweep_dir / BEST_FILE,
    )  # fmt: skip
    return sweep_dir / BEST_FILE
