"""Monitoring that never stops or loses training: W&B trouble falls back, logs survive resumes.

W&B is started when the loggers are built (:func:`build_loggers`), with a bounded wait for its server
(``logger.wandb.settings.init_timeout``). If it cannot start online (no network, no server, no login), the run
logs to W&B offline instead; if it cannot start at all (its folder is read-only, not a folder, the disk is full),
the run goes on without W&B. Either way ONE warning says what happened and what to do (``wandb sync`` later).

CSV and TensorBoard logs keep the history of earlier attempts of a run.

Lightning's CSVLogger deletes ``metrics.csv`` when a run resumes, and both loggers buffer what they log (CSV rows
until 100 steps, TensorBoard events for up to two minutes), so a killed run loses them. Here:

* every row / event reaches the disk when it is logged;
* a new attempt of a run calls :func:`continue_history` with the global step it trains from (the resumed
  checkpoint's, or 0 when training starts over): what earlier attempts logged before that step is kept, what they
  logged at or after it (work the interruption threw away, about to be redone) is superseded. The CSV file drops
  those rows; TensorBoard is given ``purge_step``, so it hides them itself (the event files stay untouched).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from deeploc.io import atomic_file

__all__ = ["ResumableCSVLogger", "ResumableTensorBoardLogger", "build_loggers", "continue_history", "finish_wandb"]

log = logging.getLogger(__name__)

_OFFLINE_MODES = ("offline", "dryrun", "disabled")


def build_loggers(configs: Mapping[str, Any] | None) -> list[Logger]:
    """The configured loggers (Hydra ``logger`` group), W&B already started or replaced by its fallback."""
    loggers = []
    for config in (configs or {}).values():
        if config is None:
            continue
        logger = instantiate(config)
        if isinstance(logger, WandbLogger):
            logger = _start_wandb(logger, config)
        if logger is not None:
            loggers.append(logger)
    return loggers


def _start_wandb(logger: WandbLogger, config: Any) -> WandbLogger | None:
    """``logger`` once its run has started; else the same run offline, else None; one warning when it falls back."""
    _drop_unset_anonymous(logger)
    try:
        _ = logger.experiment  # wandb.init, bounded by settings.init_timeout (other ranks get a dummy)
        return logger
    except Exception as exc:  # W&B raises many kinds of errors; none of them may stop training
        problem = _reason(exc)
    _reset_wandb()
    folder = Path(str(config.get("save_dir") or ".")) / "wandb"
    was_offline = bool(config.get("offline")) or os.environ.get("WANDB_MODE", "") in _OFFLINE_MODES
    if not was_offline:
        try:
            fallback = instantiate(config, offline=True)
            _drop_unset_anonymous(fallback)
            offline_run = Path(fallback.experiment.dir).parent
        except Exception as exc:
            _reset_wandb()
            problem += f"; offline in {folder}: {_reason(exc)}"
        else:
            log.warning(
                "W&B could not start online (%s). Training goes on and logs to W&B offline in %s; upload it when "
                "W&B is reachable with: wandb sync %s",
                problem,
                offline_run,
                offline_run,
            )
            return fallback
    cause = f"it cannot use its folder {folder}" if was_offline else "it could start neither online nor offline"
    log.warning(
        "W&B is off for this run: %s (%s). Training goes on; the metrics are in the run's other logs "
        "(csv/metrics.csv with the default loggers). Check the network and make %s a writable folder (permissions, "
        "free space) for W&B to log again from the next run on.",
        cause,
        problem,
        folder,
    )
    return None


def _drop_unset_anonymous(logger: WandbLogger) -> None:
    """Lightning passes ``anonymous=None`` to ``wandb.init`` when the option is not used, and W&B warns about any
    value of that retired setting; not passing it is the same run without the warning."""
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and init.get("anonymous") is None:
        init.pop("anonymous", None)


def _reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {' '.join(line.strip() for line in lines[:2])}"


def _reset_wandb() -> None:
    """A failed wandb.init leaves its run registered in W&B's service process: stop it so a retry can start."""
    import wandb

    with contextlib.suppress(Exception):
        wandb.teardown()


def finish_wandb(failed: bool = False) -> None:
    """Finish this process's current W&B run, if any (marked failed with ``failed``): a job must never leave its
    run open, or the next job of a sweep would log into it ("a wandb run already in progress ... reuse")."""
    import wandb

    if wandb.run is not None:
        try:
            wandb.finish(exit_code=1 if failed else 0)
        except Exception as exc:  # W&B trouble never ends the work (e.g. a full disk while it writes its files)
            log.warning("W&B could not finish its run (%s); its offline files may be incomplete", _reason(exc))
            _reset_wandb()


def continue_history(loggers: Iterable[Logger], step: int) -> None:
    """Tell the loggers that this attempt trains from global step ``step`` (before they write anything)."""
    for logger in loggers:
        if isinstance(logger, (ResumableCSVLogger, ResumableTensorBoardLogger)):
            logger.continue_from(step)


def _not_started(logger: Logger) -> None:
    if getattr(logger, "_experiment", None) is not None:
        raise RuntimeError(f"{type(logger).__name__}.continue_from must be called before the logger writes anything")


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` that keeps ``metrics.csv`` across attempts of a run and writes each row when it is logged."""

    def __init__(self, *args: Any, flush_logs_every_n_steps: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, flush_logs_every_n_steps=flush_logs_every_n_steps, **kwargs)
        self._restart_step: int | None = None

    def continue_from(self, step: int) -> None:
        """Rows an earlier attempt logged at ``step`` or later are dropped; earlier rows are kept."""
        _not_started(self)
        self._restart_step = int(step)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(self.log_dir, self._restart_step)
        return self._experiment


class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer, reading an existing metrics.csv instead of deleting it."""

    def __init__(self, log_dir: str, restart_step: int | None) -> None:
        self._restart_step = restart_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            keys = list(reader.fieldnames or [])
        kept = [row for row in rows if not self._superseded(row)]
        self.metrics_keys = keys
        if len(kept) != len(rows):
            _write_rows(path, keys, kept)

    def _superseded(self, row: Mapping[str, str]) -> bool:
        try:
            step = int(float(row.get("step") or ""))
        except ValueError:
            return False
        return self._restart_step is not None and step >= self._restart_step

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        # Lightning rewrites the file in place when a new column appears; a kill then would lose the history.
        with open(self.metrics_file_path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        _write_rows(Path(self.metrics_file_path), fieldnames, rows)


def _write_rows(path: Path, fieldnames: list[str], rows: list[Mapping[str, str]]) -> None:
    """Replace a CSV file atomically (a partial file next to it, renamed into place)."""
    with atomic_file(path, "w", suffix=".partial", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)


class ResumableTensorBoardLogger(TensorBoardLogger):
    """``TensorBoardLogger`` that flushes each logged step and hides what an interrupted attempt logged past the
    step this attempt restarts from (TensorBoard's ``purge_step``)."""

    def continue_from(self, step: int) -> None:
        _not_started(self)
        self._kwargs["purge_step"] = int(step)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics(metrics, step)
        self.experiment.flush()
