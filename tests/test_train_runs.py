"""deeploc-train's run directories and command line, end to end: real Hydra, Lightning, processes and files."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from deeploc.config import CONF_DIR
from tests.e2e import env_for, run_cli, train_args


def _csv_column(run_dir: Path, key: str) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as handle:
        return [float(row[key]) for row in csv.DictReader(handle) if row.get(key)]


def _compact_env(workdir: Path) -> dict[str, str]:
    """A user's environment: no HYDRA_FULL_ERROR (tests/e2e.py sets it for readable failures)."""
    env = env_for(workdir)
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def _train(workdir: Path, args: list[str], env: dict[str, str] | None = None, prefix: list[str] | None = None):
    return subprocess.run(
        [*(prefix or []), sys.executable, "-m", "deeploc.cli.train", *args],
        cwd=workdir,
        env=env or _compact_env(workdir),
        capture_output=True,
        text=True,
        timeout=600,
    )


# ------------------------------------------------------------------------------------- value for sweepers


def test_main_returns_the_best_validation_value_of_optimized_metric(shared_workdir: Path, tmp_path: Path) -> None:
    from deeploc.cli.train import train_job

    run_dir = tmp_path / "run"
    overrides = train_args(shared_workdir, "trainer.max_epochs=4", "overlays=0", "logger=csv", "model.lr=0.01")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    try:
        returned = train_job(cfg)
        val_iou = _csv_column(run_dir, "val/iou")
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert len(val_iou) == 4 and len(set(val_iou)) > 1
        assert returned == pytest.approx(max(val_iou), abs=1e-4)
        assert returned == pytest.approx(metrics["best_val_iou"], abs=1e-6)
        # The value is not a test score.
        assert all(returned != pytest.approx(s["iou"]) for s in metrics["test"].values())
        # A finished run returns its recorded best again, for any optimized metric (val/loss: the lowest).
        cfg.optimized_metric = "val/loss"
        assert train_job(cfg) == pytest.approx(min(_csv_column(run_dir, "val/loss")), abs=1e-4)
    finally:
        HydraConfig.instance().cfg = None


# ---------------------------------------------------------------------------------------- run directories


@pytest.mark.slow  # ~15 s; resume: tests/test_checkpoints.py
def test_an_interrupted_run_is_resumed_in_place(shared_workdir: Path, tmp_path: Path) -> None:
    args = train_args(shared_workdir, "trainer.max_epochs=1", "overlays=0", "logger=csv")
    run_cli("deeploc.cli.train", args, tmp_path)
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    (run_dir / "metrics.json").unlink()  # as if interrupted before its test

    proc = run_cli("deeploc.cli.train", args, tmp_path)
    assert f"resuming from {run_dir / 'checkpoints' / 'last.ckpt'}" in proc.stdout + proc.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "finished"
    assert [p.name for p in (tmp_path / "outputs" / "runs").iterdir()] == [run_dir.name]
    # The full overrides (paths in full) are in the run.
    recorded = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    assert f"data.root={shared_workdir / 'data'}" in recorded
    # Epoch summaries print percentages in fixed notation.
    epochs = [line for line in (run_dir / "train.log").read_text().splitlines() if "| val/iou " in line]
    assert epochs and all(re.search(r"val/iou \d+\.\d\d \|", line) for line in epochs), epochs


def test_a_second_identical_command_is_refused_while_the_first_runs(shared_workdir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = train_args(shared_workdir, "trainer.max_epochs=200", "overlays=0", "logger=csv", f"hydra.run.dir={run_dir}")
    first = subprocess.Popen(
        [sys.executable, "-m", "deeploc.cli.train", *args],
        cwd=tmp_path,
        env=_compact_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        lock = run_dir / ".lock"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and first.poll() is None:
            if lock.exists() and f'"pid": {first.pid}' in lock.read_text():
                break
            time.sleep(0.1)
        assert first.poll() is None, "the first run ended before the second could start"
        second = _train(tmp_path, args)
        assert first.poll() is None, "the first run should still be training"
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 1
    assert f"is in use by another process (pid {first.pid} on host" in second.stderr
    assert "Traceback" not in second.stderr
    # The kernel released the lock when the first process died (kill -9): the next command may take it.
    from deeploc.locks import exclusive_or_fail

    with exclusive_or_fail(lock, "the run directory", fix="none needed"):
        assert f'"pid": {os.getpid()}' in lock.read_text()


@pytest.fixture(scope="module")
def debug_then_real(shared_workdir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A `trainer.fast_dev_run=1` pass, then a real 1-epoch run, in one run directory (hydra.run.dir)."""
    workdir = tmp_path_factory.mktemp("debug_then_real")
    run_dir = workdir / "run"
    common = train_args(shared_workdir, "overlays=2", "logger=csv", f"hydra.run.dir={run_dir}")
    debug = run_cli("deeploc.cli.train", [*common, "trainer.fast_dev_run=1"], workdir)
    after_debug = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())
    real = run_cli("deeploc.cli.train", [*common, "trainer.max_epochs=1"], workdir)
    return run_dir, common, debug, after_debug, real


@pytest.mark.slow  # ~17 s; default suite: test_debug_presets (debug=fdr)
def test_fast_dev_run_works_without_plus_and_leaves_nothing_a_real_run_would_take_as_its_own(debug_then_real) -> None:
    run_dir, _, debug, after_debug, real = debug_then_real
    assert "fast_dev_run=1: a debug pass" in debug.stdout + debug.stderr
    assert "metrics.json" not in after_debug and not any(p.endswith(".ckpt") or "overlays" in p for p in after_debug)
    assert "resuming from" not in real.stdout + real.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["epochs"] == 1
    assert len(_csv_column(run_dir, "val/iou")) == 1  # the debug pass logged nothing


@pytest.mark.slow  # ~6 s (+ the fixture); in-process: tests/test_naming.py
def test_a_run_directory_of_another_existing_dataset_is_not_reused(debug_then_real, tmp_path: Path) -> None:
    _, common, *_ = debug_then_real
    data = next(a.split("=", 1)[1] for a in common if a.startswith("data.root="))
    copy = tmp_path / "elsewhere" / Path(data).name
    shutil.copytree(data, copy)
    proc = run_cli("deeploc.cli.train", [*common, "trainer.max_epochs=1", f"data.root={copy}"], tmp_path, check=False)
    assert proc.returncode == 1
    assert f"data.root={copy}" in proc.stderr and f"data.root={data}" in proc.stderr


def test_a_failed_run_leaves_no_result_and_the_next_run_completes_it(shared_workdir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    common = train_args(shared_workdir, "trainer.max_epochs=1", "overlays=2", f"hydra.run.dir={run_dir}")
    # Bad data: fails before any training, leaving no checkpoint or log a later run would continue.
    bad = run_cli("deeploc.cli.train", [*common, "data.subsets=[nope]"], tmp_path, check=False)
    assert bad.returncode == 1 and "nope" in bad.stderr
    assert not list(run_dir.rglob("*.ckpt")) and not (run_dir / "csv").exists() and not (run_dir / "wandb").exists()
    # Writing the overlays fails after training: metrics.json, the mark of a finished run, must not exist.
    run_dir.joinpath("overlays").write_text("not a folder")
    broken = run_cli("deeploc.cli.train", common, tmp_path, check=False)
    assert broken.returncode == 1 and "resuming from" not in broken.stdout + broken.stderr
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and not (run_dir / "metrics.json").exists()
    run_dir.joinpath("overlays").unlink()
    fixed = run_cli("deeploc.cli.train", common, tmp_path)
    assert "resuming from" in fixed.stdout + fixed.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "finished"
    assert len(list((run_dir / "overlays").glob("*/*.png"))) == 2 * 4


# ---------------------------------------------------------------------------------------------- messages


def test_deeploc_errors_print_one_line_without_traceback_unless_verbose(tmp_path: Path) -> None:
    args = ["data=dolos", f"data.root={tmp_path / 'nowhere'}", "encoder=micro"]
    proc = _train(tmp_path, args)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr
    (message,) = [line for line in proc.stderr.splitlines() if line.startswith("deeploc-train: ")]
    assert str(tmp_path / "nowhere") in message and proc.stderr.rstrip().endswith(message)
    verbose = _train(tmp_path, ["--verbose", *args])
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr and str(tmp_path / "nowhere") in verbose.stderr


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.batch_size=abc", "data.batch_size='abc' must be a positive integer"),
        pytest.param(
            "trainer.precision=bogus",
            "Lightning refused the trainer settings (trainer.*): Precision 'bogus' is invalid",
            marks=pytest.mark.slow,  # ~8 s: a second process start for one more message
        ),
    ],
)
def test_bad_settings_fail_before_any_work(override: str, message: str, shared_workdir: Path, tmp_path: Path) -> None:
    features = tmp_path / "features"
    args = [*train_args(shared_workdir, override), f"features.dir={features}"]
    proc = _train(tmp_path, args)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert message in proc.stderr
    assert not features.exists()  # no feature extraction


def test_other_commands_print_one_line_and_the_traceback_with_verbose(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from deeploc.cli.check import main as check_main
    from deeploc.cli.export import main as export_main
    from deeploc.data.errors import DatasetError
    from deeploc.runs.checkpoints import ModelError

    missing = tmp_path / "nowhere"
    assert check_main([str(missing)]) == 1
    assert capsys.readouterr().err.startswith("deeploc-check: ")
    with pytest.raises(DatasetError):
        check_main([str(missing), "--verbose"])
    assert export_main([str(missing)]) == 1
    assert capsys.readouterr().err.startswith("deeploc-export: ")
    with pytest.raises(ModelError):
        export_main([str(missing), "--verbose"])
    # deeploc-extract runs through Hydra like deeploc-train.
    proc = subprocess.run(
        [sys.executable, "-m", "deeploc.cli.extract", "data=dolos", f"data.root={missing}", "encoder=micro"],
        cwd=tmp_path,
        env=_compact_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith("deeploc-extract: ") and str(missing) in proc.stderr


def test_read_only_output_folder_names_the_setting_and_the_fix(tmp_path: Path) -> None:
    outputs = tmp_path / "readonly"
    outputs.mkdir()
    outputs.chmod(0o555)
    prefix = []
    if os.geteuid() == 0:  # root ignores permissions unless it drops the capability to
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot make a folder read-only")
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    env = {**_compact_env(tmp_path), "DEEPLOC_OUTPUTS": str(outputs)}
    try:
        proc = _train(tmp_path, ["encoder=micro"], env=env, prefix=prefix)
    finally:
        outputs.chmod(0o755)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(outputs) in proc.stderr and "DEEPLOC_OUTPUTS" in proc.stderr and "paths.output_dir" in proc.stderr


def test_conflicting_arch_and_decoder_in_a_sweep_trains_nothing(tmp_path: Path) -> None:
    args = ["-m", "experiment=paper_table", "decoder=conv4", "feature=image_embed", "subset_index=0", "encoder=micro"]
    proc = _train(tmp_path, args)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "arch=" in proc.stderr and "decoder=conv4" in proc.stderr and "feature=image_embed" in proc.stderr
    assert not list((tmp_path / "outputs").rglob("*.ckpt"))


@pytest.mark.slow  # ~7 s; in-process: tests/test_settings.py
def test_a_sweep_experiment_without_m_is_refused(tmp_path: Path) -> None:
    proc = _train(tmp_path, ["experiment=paper_table", "encoder=micro"])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "Add -m: deeploc-train -m experiment=paper_table encoder=micro" in proc.stderr


# ------------------------------------------------------------------------------------ divergence, SIGTERM


def test_a_diverging_run_stops_with_one_line_naming_model_lr_and_is_recorded_diverged(
    shared_workdir: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    args = train_args(shared_workdir, "model.lr=1e9", "trainer.max_epochs=3", "overlays=0", "logger=csv")
    proc = _train(tmp_path, [*args, "split=in_domain", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("deeploc-train: ")]
    assert "training diverged at epoch 1" in line and "model.lr=1e+09 now" in line, line
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and metrics["test"] == {} and metrics["reason"] in line
    assert metrics["config"]["lr"] == 1e9


def test_the_divergence_rule() -> None:
    from deeploc.training.module import divergence

    assert divergence(0.7, 0.69) == "" and divergence(600.0, 0.69) == ""
    assert "not finite" in divergence(float("nan"), 0.69) and "not finite" in divergence(float("inf"), 0.69)
    assert "over 1000 x the first step's 0.69" in divergence(1e20, 0.69)


def test_sigterm_mid_run_prints_one_line_and_exits_143_and_the_same_command_resumes(
    shared_workdir: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    args = [*train_args(shared_workdir, "trainer.max_epochs=200", "overlays=0", "logger=csv"), "split=in_domain"]
    args.append(f"hydra.run.dir={run_dir}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "deeploc.cli.train", *args], cwd=tmp_path, env=_compact_env(tmp_path),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and not (run_dir / "checkpoints/last.ckpt").exists():
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be stopped"
        proc.send_signal(15)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr[-3000:]
    (line,) = [line for line in stderr.splitlines() if line.startswith("deeploc-train: ")]
    assert "stopped by SIGTERM at epoch" in line and "the same command resumes the run from" in line, line
    assert "Traceback" not in stderr and not (run_dir / "metrics.json").exists()


def test_a_settings_error_every_sweep_job_shares_is_refused_once_before_any_job(tmp_path: Path) -> None:
    proc = _train(tmp_path, ["-m", "model.lr=-1", "seed=1,2", "encoder=micro"])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "Error executing job" not in proc.stderr  # Hydra's line before deeploc's: gone
    lines = [line for line in proc.stderr.splitlines() if "model.lr=-1" in line]
    assert lines == ["deeploc-train: model.lr=-1 must be a number >= 0"], proc.stderr[-3000:]
    assert not (tmp_path / "outputs").exists()  # no job started: no sweep folder, no stub run directories
    single = _train(tmp_path, ["model.lr=-1", "encoder=micro"])
    assert single.returncode == 1 and "Error executing job" not in single.stderr
    assert not (tmp_path / "outputs").exists()  # a refused run leaves no stub run directory


def test_a_job_error_in_a_sweep_is_one_line_naming_the_job(tmp_path: Path) -> None:
    proc = _train(tmp_path, ["-m", "data=dolos", f"data.root={tmp_path / 'nowhere'}", "seed=1", "encoder=micro"])
    assert proc.returncode == 1 and "Error executing job" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("deeploc-train: ")]
    assert str(tmp_path / "nowhere") in line and line.endswith(
        "(job ['data=dolos', " + repr(f"data.root={tmp_path / 'nowhere'}") + ", 'seed=1', 'encoder=micro'])"
    ), line
