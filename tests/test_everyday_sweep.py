"""A researcher's everyday sweep, for real: `deeploc-train -m seed=0,1` on the micro encoder with the default loggers
(W&B offline + CSV), read as a person would: its console (quiet), its W&B panels, its report over seeds."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deeploc.cli.report import main as report_main
from tests.e2e import env_for, train_args
from tests.wandb_files import history

EPOCHS = 2
SEEDS = (0, 1)
PANEL_IMAGES = 2
# Third-party lines a short run used to print (issue 15), each as it appears on the console.
NOISE = {
    "Lightning's litlogger tip": "litlogger",
    "the pytree deprecation": "LeafSpec",
    "the log_every_n_steps warning": "log_every_n_steps",
    "W&B's anonymous warning": "anonymous setting",
    "the eval-mode warning for the frozen encoder": "in eval mode",
    "Lightning's accelerator lines": "GPU available",
    "Lightning's checkpoint-restored lines": "Restoring states from the checkpoint",
    "W&B's run summary": "Run summary:",
}


@pytest.fixture(scope="module")
def sweep(shared_workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The sweep, run as a user would: no warning filters of the test harness, W&B not silenced."""
    import subprocess
    import sys

    work = tmp_path_factory.mktemp("everyday")
    env = env_for(work)
    for key in ("PYTHONWARNINGS", "WANDB_SILENT"):
        env.pop(key)
    args = train_args(
        shared_workdir,
        f"seed={','.join(map(str, SEEDS))}",
        f"trainer.max_epochs={EPOCHS}",
        "model.lr=0.01",
        "overlays=1",
        f"callbacks.panel.n_images={PANEL_IMAGES}",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "deeploc.cli.train", "-m", *args],
        cwd=work, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    sweep_dir = work / "outputs" / "sweeps" / "train"
    runs = {
        json.loads((p / "metrics.json").read_text())["config"]["seed"]: p for p in sweep_dir.iterdir() if p.is_dir()
    }
    return {"console": proc.stdout + proc.stderr, "dir": sweep_dir, "runs": runs, "work": work}


@pytest.mark.parametrize("what", NOISE)
def test_the_console_has_none_of_the_known_third_party_noise(sweep: dict, what: str) -> None:
    assert NOISE[what] not in sweep["console"], f"{what} is on the console"


def test_the_console_has_deeplocs_lines_once_and_no_progress_bar_when_not_a_terminal(sweep: dict) -> None:
    console = sweep["console"]
    for epoch in range(1, EPOCHS + 1):
        assert console.count(f"epoch {epoch}/{EPOCHS} | train/loss") == len(SEEDS)
    assert console.count("requeue on SIGUSR1 armed") == len(SEEDS)  # once per job, not again for testing
    assert console.count("test results (%, mean over images)") == len(SEEDS)
    # Not a terminal (captured, like a SLURM log): no progress bar, whose metrics Rich would wrap over lines; the
    # epoch lines say it (the bar on a terminal: tests/test_console.py, its numbering: test_ergonomics_units.py).
    assert not re.search(r"Epoch \d+/\d+", console) and "it/s" not in console
    # Lightning's informational lines are not lost: they are in each job's log file.
    assert all("GPU available" in (run / "train.log").read_text() for run in sweep["runs"].values())


def _panels(run: Path) -> dict[str, list[dict]]:
    """W&B image panels of a run by key: their captions and the media files W&B saved."""
    panels: dict[str, list[dict]] = {}
    for row in history(run):
        for key, value in row.items():
            if key.endswith("/captions"):
                base = key.removesuffix("/captions")
                panels.setdefault(base, []).append({"captions": value, "files": row[f"{base}/filenames"]})
    return panels


def test_wandb_panels_at_the_first_and_last_epoch_and_for_each_test_subset(sweep: dict) -> None:
    run = sweep["runs"][SEEDS[0]]
    metrics = json.loads((run / "metrics.json").read_text())
    subsets = metrics["config"]["subsets"]
    panels = _panels(run)
    assert set(panels) == {"val/predictions", *(f"test/{s}/predictions" for s in subsets)}
    # every_n_epochs=5 is never reached in 2 epochs: the first and the last epoch are shown all the same.
    val = panels["val/predictions"]
    assert [p["captions"][0].split(",")[0] for p in val] == [f"epoch {e}" for e in range(1, EPOCHS + 1)]
    media = next(run.glob("wandb/offline-run-*/files"))
    for subset in subsets:
        [logged] = panels[f"test/{subset}/predictions"]
        assert len(logged["captions"]) == PANEL_IMAGES
        for caption in logged["captions"]:
            name = re.fullmatch(rf"tested model, test subset {re.escape(subset)}, image (\S+)", caption).group(1)
            assert (run / "overlays" / subset).is_dir() and name  # a real test image of that subset
        for file in logged["files"]:
            picture = np.asarray(Image.open(media / file))
            # Four titled tiles of the 128-pixel images (the probability tile with its colour bar).
            assert picture.shape[0] > 128 and picture.shape[1] > 4 * 128


def test_the_report_gives_mean_and_std_over_the_seeds(sweep: dict, tmp_path: Path) -> None:
    import csv

    assert report_main([str(sweep["dir"]), "--out", str(tmp_path)]) == 0
    with open(tmp_path / "summary.csv", newline="") as handle:
        [row] = list(csv.DictReader(handle))
    assert row["seeds"] == str(len(SEEDS)) and row["n_runs"] == str(len(SEEDS))
    # Independently: the in-domain score of each seed's run, from its own metrics.json.
    per_seed = []
    for run in sweep["runs"].values():
        metrics = json.loads((run / "metrics.json").read_text())
        per_seed.append(metrics["test"][metrics["config"]["subset"]]["ap"])
    assert float(row["id_ap"]) == pytest.approx(statistics.mean(per_seed), abs=1e-3)
    assert float(row["id_ap_std"]) == pytest.approx(statistics.stdev(per_seed), abs=1e-3)
    assert statistics.stdev(per_seed) > 0  # the seeds really differ
