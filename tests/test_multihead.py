"""Many heads on one stream of batches (deeploc.multihead): each head of a multi-head job IS its single run.

The equivalence tests run the single runs (``deeploc-train -m decoder=conv4,fusion``) and the multi-head job
(``deeploc-train -m heads=[conv4,fusion]``) with the same other overrides in two output folders, and compare each
head's run directory with its single run's: same directory name, decoder weights, BatchNorm statistics and optimiser
state in best.ckpt and last.ckpt (torch.equal: the arithmetic is the same), loop state, test scores, best validation
values and epochs in metrics.json, and overlay images (same bytes). conv4 reads image_embed, fusion all three maps,
so the job's batches carry the union of the heads' maps.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.e2e import env_for, run_cli, train_args

pytestmark = pytest.mark.filterwarnings("ignore:SAM2 encoder .* RANDOM weights")

HEADS = ("conv4", "fusion")
# split=in_domain tests on the training subset only: the test step is the most expensive part of these tiny runs.
COMMON = ("feature=image_embed", "logger=csv", "overlays=1", "split=in_domain")
# DeCLIP's schedule made quick: one epoch without val IoU improvement divides the LR by 10, which is then below
# min_lr: the head stops. fusion's val IoU does not improve in its second epoch (it stops after 2 epochs), conv4's
# does (it trains all 3): the heads stop at different epochs.
DECLIP = ("schedule=declip", "model.plateau_patience=1", "model.min_lr=5e-4", "trainer.max_epochs=3")


def _sweep(shared: Path, workdir: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_cli("deeploc.cli.train", ["-m", *train_args(shared, *COMMON, *overrides)], workdir, check=check)


def _runs(workdir: Path) -> dict[str, Path]:
    """The finished run directories of a workdir's sweep folder, by decoder (``decoder=<name>`` in the name)."""
    finished = [p.parent for p in (workdir / "outputs" / "sweeps" / "train").glob("*/metrics.json")]
    return {name: run for run in finished for name in HEADS if f"decoder={name}," in run.name}


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key}"


def _callback_states(checkpoint: dict, run: Path) -> str:
    states = {
        key: {k: v for k, v in state.items() if k != "current_score"} for key, state in checkpoint["callbacks"].items()
    }
    return json.dumps(states, default=str).replace(str(run), "<run>")


def _assert_same_run(single: Path, head: Path) -> None:
    """Everything a run directory holds that the training determines is the same in both."""
    assert single.name == head.name  # the head's directory is the one its single run uses
    ours, theirs = (json.loads((p / "metrics.json").read_text()) for p in (single, head))
    for key in ("test", "best_val", "best_val_iou", "epochs", "convention", "best_checkpoint", "status"):
        assert ours[key] == theirs[key], key
    assert ours["config"] == theirs["config"]
    for name in ("best.ckpt", "last.ckpt"):
        a, b = _load(single / "checkpoints" / name), _load(head / "checkpoints" / name)
        assert a.keys() == b.keys(), name
        _assert_same_tensors(a["state_dict"], b["state_dict"], f"{name} state_dict")
        (opt_a,), (opt_b,) = a["optimizer_states"], b["optimizer_states"]
        assert opt_a["param_groups"] == opt_b["param_groups"], name
        assert opt_a["state"].keys() == opt_b["state"].keys(), name
        for index in opt_a["state"]:
            _assert_same_tensors(opt_a["state"][index], opt_b["state"][index], f"{name} Adam state {index}")
        for key in ("epoch", "global_step", "loops", "hyper_parameters", "deeploc", "datamodule_hyper_parameters"):
            assert a[key] == b[key], f"{name}: {key}"
        # Callback states: the same, but for the run directory in the paths they hold, and ModelCheckpoint's
        # current_score, which Lightning does not restore on resume (for a single run resumed after a kill too).
        assert _callback_states(a, single) == _callback_states(b, head), name
    overlays = sorted(p.relative_to(single) for p in single.glob("overlays/*/*.png"))
    assert overlays and overlays == sorted(p.relative_to(head) for p in head.glob("overlays/*/*.png"))
    for path in overlays:
        assert (single / path).read_bytes() == (head / path).read_bytes(), path


@pytest.fixture(scope="module")
def stream_runs(shared_workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """Single runs and a multi-head job, the encoder running on every batch (features=stream), study schedule."""
    single, multi = tmp_path_factory.mktemp("stream-single"), tmp_path_factory.mktemp("stream-multi")
    # A 128 px encoder input keeps the per-batch encoder passes cheap (no cache is involved).
    overrides = ("features=stream", "encoder.image_size=128", "trainer.max_epochs=2")
    _sweep(shared_workdir, single, f"decoder={','.join(HEADS)}", *overrides)
    proc = _sweep(shared_workdir, multi, f"heads=[{','.join(HEADS)}]", *overrides)
    return single, multi, proc.stdout + proc.stderr


def test_stream_heads_equal_their_single_runs(stream_runs: tuple[Path, Path, str]) -> None:
    single, multi, _ = stream_runs
    singles, heads = _runs(single), _runs(multi)
    assert set(singles) == set(heads) == set(HEADS)
    for name in HEADS:
        _assert_same_run(singles[name], heads[name])


def test_a_single_run_keeps_the_best_validation_values_over_all_epochs(stream_runs: tuple[Path, Path, str]) -> None:
    # Regression: the test step restored the callbacks' states from best.ckpt, so best_val was the one of the best
    # val/iou epoch instead of the best of each metric over the run (fusion's val/iou does not improve in epoch 2,
    # its val/f1_best does).
    single, _, _ = stream_runs
    for run in _runs(single).values():
        rows = (run / "csv" / "metrics.csv").read_text().splitlines()
        header = rows[0].split(",")
        values = [dict(zip(header, row.split(","))) for row in rows[1:]]
        best_val = json.loads((run / "metrics.json").read_text())["best_val"]
        for key in ("val/iou", "val/f1_best", "val/ap"):
            assert best_val[key] == max(float(v[key]) for v in values if v.get(key)), (run.name, key)


def test_the_multi_head_job_logs_per_head_and_leaves_a_summary(stream_runs: tuple[Path, Path, str]) -> None:
    _, multi, console = stream_runs
    assert "features=stream: the encoder runs on every batch" in console
    for name in HEADS:
        assert f"{name}: epoch 2/2 | train/loss" in console
    (summary_file,) = (multi / "outputs" / "sweeps" / "train").glob("*/heads.json")
    job = summary_file.parent
    summary = json.loads((job / "heads.json").read_text())["heads"]
    assert {name: entry["status"] for name, entry in summary.items()} == dict.fromkeys(HEADS, "finished")
    assert not (job / "checkpoints").exists()  # the job's resume state goes once every head has finished
    for name, run in _runs(multi).items():
        assert summary[name]["run"] == str(run)
        assert (run / ".hydra" / "overrides.yaml").is_file() and (run / "config_resolved.yaml").is_file()
        assert (run / "csv" / "metrics.csv").is_file()


def _killed_and_resumed(shared: Path, workdir: Path, *overrides: str) -> str:
    """Run the multi-head job, kill -9 it as it writes its checkpoint at the end of the second epoch (after the
    heads wrote theirs), then run the same command again; returns the second run's console."""
    args = ["-m", *train_args(shared, *COMMON, f"heads=[{','.join(HEADS)}]", *overrides)]
    # The job's folder is the one whose name starts with heads= (the heads' own folders start with decoder=).
    env = {**env_for(workdir), "FAULT_PATH": r"/heads=[^/]*/checkpoints/last\.ckpt$", "FAULT_COUNT": "2"}
    script = Path(__file__).with_name("faults.py")
    killed = subprocess.run(
        [sys.executable, str(script), "kill-before-nth-rename", "deeploc.cli.train", *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not _runs(workdir)  # nothing finished
    proc = run_cli("deeploc.cli.train", args, workdir)
    return proc.stdout + proc.stderr


def test_cached_heads_with_declips_schedule_resume_after_kill_and_equal_their_single_runs(
    shared_workdir: Path, tmp_path: Path
) -> None:
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir()
    multi.mkdir()
    _sweep(shared_workdir, single, f"decoder={','.join(HEADS)}", *DECLIP)
    console = _killed_and_resumed(shared_workdir, multi, *DECLIP)
    assert "features=auto chose cache" in console  # the default; the tiny cache fits
    assert "resuming the heads from" in console
    singles, heads = _runs(single), _runs(multi)
    epochs = {name: json.loads((run / "metrics.json").read_text())["epochs"] for name, run in singles.items()}
    assert epochs == {"conv4": 3, "fusion": 2}  # fusion stopped alone; conv4 trained on
    for name in HEADS:
        _assert_same_run(singles[name], heads[name])
    # The single-run command finds its runs finished.
    again = _sweep(shared_workdir, multi, f"decoder={','.join(HEADS)}", *DECLIP)
    assert (again.stdout + again.stderr).count("already finished; skipping") == len(HEADS)
