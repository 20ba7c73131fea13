"""Monitoring that survives resumes: CSV and TensorBoard logs that keep the history of earlier attempts.

Lightning's CSVLogger deletes ``metrics.csv`` when a run resumes, and both loggers buffer what they log (CSV rows
until 100 steps, TensorBoard events for up to two minutes), so a killed run loses them. Here:

* every row / event reaches the disk when it is logged;
* a new attempt of a run calls :func:`continue_history` with the global step it trains from (the resumed
  checkpoint's, or 0 when training starts over): what earlier attempts logged before that step is kept, what they
  logged at or after it (work the interruption threw away, about to be redone) is superseded. The CSV file drops
  those rows; TensorBoard is given ``purge_step``, so it hides them itself (the event files stay untouched).
"""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

__all__ = ["ResumableCSVLogger", "ResumableTensorBoardLogger", "continue_history"]


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
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


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
