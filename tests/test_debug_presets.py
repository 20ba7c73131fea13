"""Debug presets (conf/debug): `debug=fdr|limit|overfit|profiler` without `+`, end to end on the micro encoder, and
their runs kept away from real runs' directories."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from deeploc.config import CONF_DIR
from tests.e2e import run_cli, train_args

PRESETS = ("limit", "overfit", "profiler")


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.mark.parametrize("preset", ["fdr", *PRESETS])
def test_every_preset_composes_without_plus_into_the_debug_folders(preset: str) -> None:
    cfg = _compose(f"debug={preset}", "subset_index=1")
    real = _compose("subset_index=1")
    assert cfg.hydra.run.dir.startswith("outputs/debug/runs/") and cfg.hydra.sweep.dir.startswith("outputs/debug/")
    assert real.hydra.run.dir.startswith("outputs/runs/")
    # The debug run's name says it is one: it never takes a real run's checkpoints or results.
    assert Path(cfg.hydra.run.dir).name != Path(real.hydra.run.dir).name and f"debug={preset}" in cfg.hydra.run.dir
    assert cfg.resume is False and cfg.if_finished == "retrain"


@pytest.fixture(scope="module")
def presets(shared_workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`debug=fdr` alone (it keeps nothing), then limit, overfit and profiler as one multirun."""
    work = tmp_path_factory.mktemp("debug_presets")
    common = train_args(shared_workdir, "logger=csv", "overlays=1")
    (work / "fdr").mkdir()
    fdr = run_cli("deeploc.cli.train", [*common, "debug=fdr"], work / "fdr")
    # Batches of 4 (the overfit preset's own size; limit then cuts 8 batches per epoch to 3).
    others = run_cli("deeploc.cli.train", ["-m", *common, "data.batch_size=4", f"debug={','.join(PRESETS)}"], work)
    runs = {}
    for run in (work / "outputs" / "debug" / "sweeps" / "train").iterdir():
        preset = next(p for p in PRESETS if f"debug={p}" in run.name)
        runs[preset] = run
    return {"work": work, "fdr": fdr, "runs": runs, "output": others.stdout + others.stderr}


def test_fdr_runs_fit_validate_and_test_on_one_batch_and_keeps_no_file(presets: dict) -> None:
    output = presets["fdr"].stdout + presets["fdr"].stderr
    assert "fast_dev_run=1: a debug pass (1 batch(es) per loop)" in output and "Test IoU (%)" in output
    # It encodes the batches it reads, not the whole split into the feature cache (issue 21, item 14).
    assert "features=auto streams in a fast_dev_run pass" in output and "[feature store]" not in output
    # Data and features come from the shared folders: nothing at all was written under outputs/.
    assert _files(presets["work"] / "fdr" / "outputs") == []


def test_limit_is_a_real_run_on_a_few_batches(presets: dict) -> None:
    run = presets["runs"]["limit"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["epochs"] == 2
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 2 * 3  # 2 epochs of 3 training batches (of the 8 the tiny set has)
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "overlays").is_dir()


def test_overfit_drives_the_training_loss_near_zero(presets: dict) -> None:
    with open(presets["runs"]["overfit"] / "csv" / "metrics.csv", newline="") as handle:
        losses = [float(row["train/loss_epoch"]) for row in csv.DictReader(handle) if row.get("train/loss_epoch")]
    assert len(losses) == 150
    # From chance (BCE ~0.69) to near zero on the four memorised images.
    assert losses[0] > 0.4 and losses[-1] < 0.05 and losses[-1] < losses[0] / 10


def test_profiler_writes_its_report_into_the_run_directory(presets: dict) -> None:
    run = presets["runs"]["profiler"]
    report = (run / "fit-profiler.txt").read_text()
    assert "FIT Profiler Report" in report and "run_training_epoch" in report
    assert "TEST Profiler Report" in (run / "test-profiler.txt").read_text()
    assert json.loads((run / "metrics.json").read_text())["status"] == "finished"


def test_debug_runs_never_touch_real_run_folders(presets: dict) -> None:
    outputs = presets["work"] / "outputs"
    assert not (outputs / "runs").exists()
    # A sweep OVER debug presets is one multirun: Hydra keeps its multirun.yaml in the sweep folder of the command
    # line (documented); every job's folder is under outputs/debug.
    assert _files(outputs / "sweeps") in ([], ["train/multirun.yaml"])
    assert set(presets["runs"]) == set(PRESETS)
