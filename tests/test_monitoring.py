"""Monitoring never loses or stops training: logs kept across resumes, W&B trouble falls back with one warning."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from lightning.pytorch.loggers import WandbLogger

from deeploc.training.loggers import ResumableCSVLogger, ResumableTensorBoardLogger, build_loggers, continue_history
from tests.e2e import env_for, train_args

CONF = str(Path(__file__).resolve().parents[1] / "conf")


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


# ------------------------------------------------------------------------------------- W&B trouble


UNREACHABLE = {
    # A real W&B client talking to a port where nothing listens, with a key so that it really tries.
    "WANDB_BASE_URL": "http://127.0.0.1:9",
    "WANDB_API_KEY": "0123456789abcdef0123456789abcdef01234567",
    "WANDB_MODE": "online",
}


def _logger_config(run: Path, *overrides: str) -> Any:
    """The real conf/logger/wandb.yaml (W&B + CSV), pointed at ``run``."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"logger.wandb.save_dir={run}",
                f"logger.csv.save_dir={run}",
                "logger.wandb.id=test-run-0001",
                "logger.wandb.name=test",
                *overrides,
            ],
        )
    return cfg.logger


@pytest.fixture
def wandb_cleanup():
    yield
    import wandb

    if wandb.run is not None:
        wandb.finish()
    wandb.teardown()


def _deeploc_warnings(caplog) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "deeploc.training.loggers" and r.levelno >= logging.WARNING
    ]


@pytest.mark.parametrize("online", [False, True])
def test_an_unusable_wandb_folder_disables_wandb_with_one_warning(
    online: bool, tmp_path: Path, caplog, monkeypatch, wandb_cleanup
) -> None:
    if online:
        for key, value in UNREACHABLE.items():
            monkeypatch.setenv(key, value)
    (tmp_path / "wandb").write_text("not a folder")  # root ignores permissions: a file where the folder belongs
    config = _logger_config(tmp_path, f"logger.wandb.offline={str(not online).lower()}")
    with caplog.at_level(logging.WARNING):
        loggers = build_loggers(config)
    assert [type(lg) for lg in loggers] == [ResumableCSVLogger]
    (message,) = _deeploc_warnings(caplog)
    assert f"{tmp_path / 'wandb'}" in message and "W&B is off for this run" in message and "csv" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the test above covers root")
def test_a_read_only_wandb_folder_disables_wandb_with_one_warning(tmp_path: Path, caplog, wandb_cleanup) -> None:
    (tmp_path / "wandb").mkdir(mode=0o555)
    with caplog.at_level(logging.WARNING):
        loggers = build_loggers(_logger_config(tmp_path))
    assert [type(lg) for lg in loggers] == [ResumableCSVLogger]
    (message,) = _deeploc_warnings(caplog)
    assert f"{tmp_path / 'wandb'}" in message and "W&B is off for this run" in message


def test_an_unreachable_wandb_server_is_waited_for_boundedly_then_the_run_logs_offline(
    tmp_path: Path, caplog, monkeypatch, wandb_cleanup
) -> None:
    for key, value in UNREACHABLE.items():
        monkeypatch.setenv(key, value)
    config = _logger_config(tmp_path, "logger.wandb.offline=false", "logger.wandb.settings.init_timeout=3")
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        loggers = build_loggers(config)
    assert time.monotonic() - start < 45  # bounded by init_timeout, not by W&B's default of 90 s
    assert [type(lg) for lg in loggers] == [ResumableCSVLogger, WandbLogger]
    (offline,) = tmp_path.glob("wandb/offline-run-*")
    assert Path(loggers[1].experiment.dir).parent == offline
    (message,) = _deeploc_warnings(caplog)
    assert "127.0.0.1:9" in message and f"wandb sync {offline}" in message


@pytest.mark.slow  # ~15 s; in-process: test_an_unreachable_wandb_server_is_waited_for_boundedly_then_the_run_logs_offline
def test_training_goes_on_offline_when_the_wandb_server_is_unreachable(shared_workdir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = train_args(
        shared_workdir,
        "trainer.max_epochs=1",
        "overlays=0",
        "logger.wandb.offline=false",
        "logger.wandb.settings.init_timeout=3",
        f"hydra.run.dir={run}",
    )
    env = {**env_for(tmp_path), **UNREACHABLE}
    proc = subprocess.run(
        [sys.executable, "-m", "deeploc.cli.train", *args], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert json.loads((run / "metrics.json").read_text())["status"] == "finished"
    (offline,) = run.glob("wandb/offline-run-*")
    assert any(offline.glob("*.wandb"))  # the run's history, ready for `wandb sync`
    warnings = [line for line in output.splitlines() if "W&B" in line and "127.0.0.1:9" in line]
    assert len(warnings) == 1 and f"wandb sync {offline}" in warnings[0], output[-4000:]


def _wandb_runs(run_dir: Path) -> list[tuple[str, list[dict[str, Any]]]]:
    """(display name, history rows) of every offline W&B run in a run directory."""
    from tests.wandb_files import history, read_records

    found = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        names = [r.run.display_name for r in read_records(path) if r.WhichOneof("record_type") == "run"]
        found.append((names[0] if names else "", history(run_dir)))
    return found


def test_a_failed_sweep_job_finishes_its_wandb_run_and_the_next_job_gets_its_own(
    shared_workdir: Path, tmp_path: Path
) -> None:
    """Job 0 fails after its W&B run started (a CLIP map on a SAM2 encoder); job 1 must log into a run of its own, not
    into job 0's ("a wandb run already in progress ... will reuse this run")."""
    quick = ["trainer.max_epochs=1", "+trainer.limit_train_batches=1", "+trainer.limit_val_batches=1", "overlays=0"]
    args = ["-m", *train_args(shared_workdir, "split=in_domain", *quick, "feature=layer20,high_res_feats_1")]
    proc = subprocess.run(
        [sys.executable, "-m", "deeploc.cli.train", *args], cwd=tmp_path, env=env_for(tmp_path), capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "layer20" in output, output[-4000:]  # the sweep reports job 0's failure
    runs = {path.name: path for path in (tmp_path / "outputs" / "sweeps" / "train").iterdir() if path.is_dir()}
    failed, trained = (next(p for name, p in runs.items() if f"feature={f}" in name) for f in ("layer20", "high_res"))
    assert (trained / "metrics.json").is_file() and not (failed / "metrics.json").exists()
    (failed_run,), (trained_run,) = _wandb_runs(failed), _wandb_runs(trained)
    assert "feature=layer20" in failed_run[0] and "feature=high_res_feats_1" in trained_run[0]
    assert not failed_run[1]  # job 0 logged nothing (job 1's metrics went to its own run)
    assert any("train/loss_epoch" in row for row in trained_run[1]), output[-2000:]
