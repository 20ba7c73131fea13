"""Sweeps, resume and monitoring: real Hydra multirun, real Lightning resume, real W&B offline runs."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from deeploc.cli.report import main as report_main
from deeploc.runs.naming import run_name
from tests.e2e import env_for, run_cli, sweep_jobs, train_args

CONF = str(Path(__file__).resolve().parents[1] / "conf")
STUDY_ARCHS = {
    ("conv4", "image_embed"),
    ("conv12", "image_embed"),
    ("conv20", "image_embed"),
    ("conv20", "high_res_feats_0"),
    ("conv20", "high_res_feats_1"),
}


def test_paper_table_expands_to_the_studys_grid() -> None:
    jobs = sweep_jobs(CONF, ["experiment=paper_table", "data=dolos", "data.root=/data/wacv_data"])
    assert len(jobs) == 5 * 4
    seen = set()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        for job in jobs:
            cfg = compose("train", overrides=job)
            assert cfg.data.split.mode == "cross"
            assert cfg.trainer.max_epochs == 20 and cfg.model.lr == pytest.approx(1e-3)
            seen.add((f"conv{cfg.decoder.depth}", cfg.decoder.inputs, cfg.subset))
    assert {(d, f) for d, f, _ in seen} == STUDY_ARCHS
    assert {s for _, _, s in seen} == {"repaint-p2-9k", "ldm", "lama", "pluralistic"}
    assert len(seen) == 20


def test_grid_can_be_narrowed_from_the_command_line() -> None:
    jobs = sweep_jobs(CONF, ["experiment=paper_table", "arch=conv4_image_embed", "subset_index=0,2"])
    assert len(jobs) == 2
    assert all("arch=conv4_image_embed" in job for job in jobs)


def test_leave_one_out_experiment_expands_to_held_out_runs() -> None:
    jobs = sweep_jobs(CONF, ["experiment=leave_one_out"])
    assert len(jobs) == 2 * 4
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=jobs[0])
    assert cfg.data.split.mode == "leave_one_out" and cfg.data.split.n_train == 3000 and cfg.data.batch_size == 32


def test_run_directory_names_are_derived_from_overrides() -> None:
    assert run_name([]) == "default"
    assert run_name(["subset_index=1", "arch=conv4_image_embed"]) == "subset_index=1,arch=conv4_image_embed"
    assert "/" not in run_name(["data.root=/a/b"])
    assert len(run_name(["x=" + "y" * 400])) <= 100


def _offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def test_multirun_sweep_report_and_rerun_resumes_only_the_unfinished_job(shared_workdir: Path, tmp_path: Path) -> None:
    args = train_args(
        shared_workdir,
        "experiment=paper_table",
        "arch=conv4_high_res_feats_1,conv4_image_embed",
        "subset_index=0,1",
        "trainer.max_epochs=2",
        "overlays=0",
    )
    run_cli("deeploc.cli.train", ["-m", *args], tmp_path)
    sweep = tmp_path / "outputs" / "sweeps" / "paper_table"
    runs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert len(runs) == 4
    # Each multirun job is its own W&B run (ids derived from the run directory).
    ids = {_offline_runs(run)[0].name.rsplit("-", 1)[-1] for run in runs}
    assert all(len(_offline_runs(run)) == 1 for run in runs) and len(ids) == 4

    # The report reads the sweep: two configurations, each with two of four matrix rows (incomplete, marked).
    assert report_main([str(sweep), "--out", str(tmp_path / "report")]) == 0
    summary = (tmp_path / "report" / "summary.csv").read_text()
    assert "conv4" in summary and "image_embed" in summary and "high_res_feats_1" in summary

    # Interrupt one job after its checkpoint (its results vanish), then re-run the same sweep command.
    victim = runs[0]
    (victim / "metrics.json").unlink()
    proc = run_cli("deeploc.cli.train", ["-m", *args], tmp_path)
    output = proc.stdout + proc.stderr
    assert output.count("already finished; skipping") == 3
    assert output.count("resuming from") == 1 and str(victim) in output
    assert (victim / "metrics.json").is_file()


def _decoder_state(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def _csv_validation_rows(run_dir: Path) -> dict[int, dict[str, str]]:
    """The validation rows of a run's metrics.csv by epoch (each epoch must appear once)."""
    with open(run_dir / "csv" / "metrics.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("val/iou")]
    epochs = [int(row["epoch"]) for row in rows]
    assert len(epochs) == len(set(epochs)), f"duplicated validation rows: {epochs}"
    return {epoch: {k: row[k] for k in ("step", "val/iou", "val/loss", "val/ap")} for epoch, row in zip(epochs, rows)}


def _tensorboard_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a scalar as TensorBoard shows it (events purged by a later restart are dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def test_resume_after_kill_equals_an_uninterrupted_run(shared_workdir: Path, tmp_path: Path) -> None:
    epochs = 6
    common = train_args(shared_workdir, f"trainer.max_epochs={epochs}", "overlays=0", "logger=[csv,tensorboard]")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_cli("deeploc.cli.train", [*common, f"hydra.run.dir={straight}"], tmp_path)

    # Start the same run elsewhere and kill -9 it as soon as its first epoch checkpoint exists.
    cmd = [sys.executable, "-m", "deeploc.cli.train", *common, f"hydra.run.dir={resumed}"]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env_for(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    last = resumed / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert last.exists(), "the run never wrote a checkpoint"
    interrupted_at = torch.load(last, map_location="cpu", weights_only=True)["epoch"]
    assert interrupted_at < epochs - 1, "the run finished before it could be interrupted"
    assert not (resumed / "metrics.json").exists()

    proc = run_cli("deeploc.cli.train", [*common, f"hydra.run.dir={resumed}"], tmp_path)
    assert "resuming from" in proc.stdout + proc.stderr
    a, b = _decoder_state(straight / "checkpoints" / "last.ckpt"), _decoder_state(last)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (resumed / "metrics.json").is_file()
    # The monitoring history of the interrupted attempt is kept: every epoch's validation row, once, as straight.
    straight_rows = _csv_validation_rows(straight)
    assert sorted(straight_rows) == list(range(epochs))
    assert _csv_validation_rows(resumed) == straight_rows
    for tag in ("val/iou", "val/loss"):
        expected = _tensorboard_scalars(straight, tag)
        assert len(expected) == epochs and _tensorboard_scalars(resumed, tag) == expected


@pytest.mark.slow  # ~20 s; default suite: test_scaleout's requeued job continues its W&B run
def test_resumed_run_continues_the_same_wandb_run(shared_workdir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    common = train_args(shared_workdir, "overlays=0", f"hydra.run.dir={run_dir}")
    run_cli("deeploc.cli.train", [*common, "trainer.max_epochs=1"], tmp_path)
    # A longer schedule in the same run directory continues from last.ckpt and logs into the same W&B run.
    (run_dir / "metrics.json").unlink()
    run_cli("deeploc.cli.train", [*common, "trainer.max_epochs=2"], tmp_path)
    offline = _offline_runs(run_dir)
    assert len(offline) == 2
    assert len({p.name.rsplit("-", 1)[-1] for p in offline}) == 1
