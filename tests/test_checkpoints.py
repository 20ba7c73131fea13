"""Checkpoints are written atomically in their own folder: a full disk or a kill never costs the previous one."""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from deeploc.runs.checkpoint_io import AtomicCheckpointIO
from deeploc.testing import sam2_conv
from deeploc.training.module import LocalizationModule
from tests.e2e import env_for, run_cli, train_args

pytestmark = [
    pytest.mark.filterwarnings("ignore:SAM2 encoder .* RANDOM weights"),
    pytest.mark.filterwarnings("ignore:Found .* module\\(s\\) in eval mode"),  # the frozen encoder, on purpose
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`"),
]

MICRO = {"config": "sam2.1_hiera_micro", "image_size": 64, "random_init": True, "seed": 0}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fitted_trainer(root: Path) -> L.Trainer:
    """A real Trainer that has fitted LocalizationModule for one step on cached-feature batches."""
    model = LocalizationModule(encoder=MICRO, decoder=sam2_conv("high_res_feats_1", 4))
    channels, side, _ = model.encoder.feature_shape("high_res_feats_1")
    maps = {"high_res_feats_1": torch.randn(2, channels, side, side)}
    batches = [{"features": maps, "mask": (torch.rand(2, 1, 64, 64) > 0.7).float()}]
    trainer = L.Trainer(
        default_root_dir=root,
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(model, DataLoader(batches, batch_size=None))
    return trainer


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    system_temp = tmp_path / "system-temp"
    system_temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_temp))
    trainer = _fitted_trainer(tmp_path)
    target = tmp_path / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(target)
    before = target.read_bytes()

    # A real write failure half way through the file: the process may not write past half its size.
    assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN  # Python's default: EFBIG instead of a signal
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, hard))
    try:
        with pytest.raises(OSError) as failed:
            trainer.save_checkpoint(target)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert failed.value.errno == errno.EFBIG
    # One line for the user: the folder, the space needed and free, and where else to write.
    message = str(failed.value)
    assert f"no space left to write last.ckpt in {target.parent} (" in message and " needed, " in message
    assert " free)" in message and "DEEPLOC_OUTPUTS" in message and "resumes" in message
    assert target.read_bytes() == before
    assert torch.load(target, map_location="cpu", weights_only=True)["global_step"] == 1
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]  # the partial file is gone
    assert not any(system_temp.iterdir())


def _system_temp(tmp_path: Path) -> Path:
    """A system temp folder on another file system than the run when there is one (/dev/shm), as on clusters."""
    if Path("/dev/shm").is_dir() and os.stat("/dev/shm").st_dev != os.stat(tmp_path).st_dev:
        return Path(tempfile.mkdtemp(dir="/dev/shm", prefix="deeploc-test-"))
    folder = tmp_path / "system-temp"
    folder.mkdir()
    return folder


def _run_with_fault(fault: str, args: list[str], workdir: Path, system_temp: Path) -> subprocess.CompletedProcess:
    env = {**env_for(workdir), "TMPDIR": str(system_temp)}
    env.pop("HYDRA_FULL_ERROR")  # as a user runs it: deeploc's one-line errors
    script = Path(__file__).with_name("faults.py")
    return subprocess.run(
        [sys.executable, str(script), fault, "deeploc.cli.train", *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow  # ~30 s; in-process: test_a_failed_checkpoint_write_keeps_the_previous_checkpoint
def test_disk_full_or_kill_during_a_checkpoint_write_never_costs_the_previous_one(
    shared_workdir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    args = train_args(shared_workdir, "overlays=0", "logger=csv", f"hydra.run.dir={run}")
    run_cli("deeploc.cli.train", [*args, "trainer.max_epochs=1"], tmp_path)
    (run / "metrics.json").unlink()  # continue this run for a second epoch
    checkpoints = run / "checkpoints"
    before = {p.name: _sha(p) for p in checkpoints.glob("*.ckpt")}
    assert set(before) == {"best.ckpt", "last.ckpt"}
    system_temp = _system_temp(tmp_path)
    try:
        # The disk fills up while the second epoch's checkpoint is written: the run fails, saying so.
        proc = _run_with_fault("disk-full-on-checkpoint-write", [*args, "trainer.max_epochs=2"], tmp_path, system_temp)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        (line,) = [line for line in proc.stderr.splitlines() if line.startswith("deeploc-train: no space left")]
        assert str(checkpoints) in line and "DEEPLOC_OUTPUTS" in line, line
        assert {p.name: _sha(p) for p in checkpoints.iterdir()} == before  # intact, nothing partial left
        assert not any(system_temp.iterdir())

        # Killed (SIGKILL) with the new checkpoint written but not yet in place.
        proc = _run_with_fault("kill-before-checkpoint-rename", [*args, "trainer.max_epochs=2"], tmp_path, system_temp)
        assert proc.returncode == -signal.SIGKILL
        assert {p.name: _sha(p) for p in checkpoints.glob("*.ckpt")} == before
        assert not any(system_temp.iterdir()), "a checkpoint was staged in the system temp folder"
    finally:
        shutil.rmtree(system_temp, ignore_errors=True)
    for name in before:
        assert torch.load(checkpoints / name, map_location="cpu", weights_only=True)["epoch"] == 0

    # The same command then resumes from the intact last.ckpt, finishes, and leaves no partial file behind.
    proc = run_cli("deeploc.cli.train", [*args, "trainer.max_epochs=2"], tmp_path)
    assert f"resuming from {checkpoints / 'last.ckpt'}" in proc.stdout + proc.stderr
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.ckpt", "last.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 1


def test_a_checkpoint_without_a_decoder_record_is_refused_with_the_fix() -> None:
    from deeploc.runs.checkpoints import ModelError, checkpoint_decoder_record

    old = {"hyper_parameters": {"feature": "image_embed", "depth": 4}, "deeploc": {}}  # deeploc 0.1's CONV-N
    with pytest.raises(ModelError, match=r"checkpoint x.ckpt records no decoder .*deeploc 0.1.*if_finished=retrain"):
        checkpoint_decoder_record(old, "checkpoint x.ckpt")


@pytest.mark.parametrize("kind", ["malicious", "random"])
def test_a_refused_file_never_suggests_weights_only_false(kind: str, tmp_path: Path) -> None:
    from deeploc.runs.checkpoints import ModelError, read_checkpoint

    path = tmp_path / f"{kind}.ckpt"
    if kind == "malicious":

        class Payload:
            def __reduce__(self):
                return (os.system, ("echo pwned",))

        torch.save({"state_dict": Payload()}, path)
    else:
        path.write_bytes(os.urandom(512))
    with pytest.raises(ModelError) as err:
        read_checkpoint(path)
    message = str(err.value)
    assert str(path) in message and "weights_only=False" not in message and "Re-running" not in message, message
    assert "\n" not in message


def test_resuming_from_a_checkpoint_of_other_settings_names_the_file_and_how_to_start_over(
    shared_workdir: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    args = train_args(shared_workdir, "trainer.max_epochs=1", "overlays=0", "logger=csv", f"hydra.run.dir={run_dir}")
    run_cli("deeploc.cli.train", args, tmp_path)
    (run_dir / "metrics.json").unlink()  # as if interrupted: the next launch resumes from last.ckpt
    env = env_for(tmp_path)
    env.pop("HYDRA_FULL_ERROR")  # the user's view: one line
    proc = subprocess.run(
        [sys.executable, "-m", "deeploc.cli.train", *args, "encoder.seed=1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert f"{run_dir / 'checkpoints' / 'last.ckpt'}: checkpoint was trained on encoder" in proc.stderr
    assert f"delete {run_dir / 'checkpoints'}" in proc.stderr and "hydra.run.dir=" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_full_disk_as_wandb_copies_a_panel_only_switches_wandb_off(shared_workdir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = train_args(shared_workdir, "trainer.max_epochs=2", "overlays=0", "split=in_domain", f"hydra.run.dir={run}")
    proc = _run_with_fault("disk-full-in-wandb-media", args, tmp_path, _system_temp(tmp_path))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in output, output[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["epochs"] == 2
    (line,) = [line for line in output.splitlines() if "W&B is off for the rest of this run" in line]
    assert "no space left to write" in line and " free)" in line and "DEEPLOC_OUTPUTS" in line, line
    epochs = [row for row in csv.DictReader((run / "csv" / "metrics.csv").open()) if row.get("val/iou")]
    assert len(epochs) == 2  # the run's other logs went on after W&B was switched off
