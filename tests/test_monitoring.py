"""Monitoring never loses or stops training: logs kept across resumes, W&B trouble falls back with one warning."""

from __future__ import annotations

import csv
from pathlib import Path

from deeploc.monitoring import ResumableCSVLogger, ResumableTensorBoardLogger, continue_history


def _csv_rows(root: Path) -> list[dict[str, str]]:
    with open(root / "csv" / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _attempt_csv(root: Path, restart: int, steps: range, offset: float, extra: str | None = None) -> None:
    """One attempt of a run that logs ``loss = offset + step`` and is then killed (never finalised)."""
    logger = ResumableCSVLogger(root, name="csv", version="")
    continue_history([logger], restart)
    for step in steps:
        metrics = {"loss": offset + step}
        if extra is not None and step == steps[-1]:
            metrics[extra] = 1.0  # a column that appears late: the file is rewritten with a new header
        logger.log_metrics(metrics, step=step)


def test_csv_rows_are_written_when_logged_and_kept_up_to_the_restart_step(tmp_path: Path) -> None:
    _attempt_csv(tmp_path, 0, range(10), 0.0, extra="val/iou")
    assert [(r["step"], r["loss"]) for r in _csv_rows(tmp_path)] == [(str(s), f"{float(s)}") for s in range(10)]

    # Resumed from a checkpoint at step 6: the first attempt's steps 6..9 are redone, their rows superseded.
    _attempt_csv(tmp_path, 6, range(6, 8), 100.0, extra="lr")
    rows = _csv_rows(tmp_path)
    assert [(r["step"], float(r["loss"])) for r in rows] == [(str(s), float(s)) for s in range(6)] + [
        ("6", 106.0),
        ("7", 107.0),
    ]
    assert set(rows[0]) == {"step", "loss", "val/iou", "lr"}

    # Training starts over (if_finished=retrain, resume=false): nothing earlier is kept.
    _attempt_csv(tmp_path, 0, range(2), 200.0)
    assert [float(r["loss"]) for r in _csv_rows(tmp_path)] == [200.0, 201.0]


def _tensorboard(root: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(root / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_tensorboard_events_are_flushed_when_logged_and_a_restart_hides_the_redone_steps(tmp_path: Path) -> None:
    for restart, steps, offset in ((0, range(10), 0.0), (6, range(6, 8), 100.0)):
        logger = ResumableTensorBoardLogger(tmp_path, name="tensorboard", version="", default_hp_metric=False)
        continue_history([logger], restart)
        for step in steps:
            logger.log_metrics({"loss": offset + step}, step=step)  # then killed: never closed
        if restart == 0:
            assert _tensorboard(tmp_path, "loss") == [(s, float(s)) for s in range(10)]
    assert _tensorboard(tmp_path, "loss") == [(s, float(s)) for s in range(6)] + [(6, 106.0), (7, 107.0)]
