"""deeploc-train end to end: real Hydra, real Lightning, real SAM2 code (micro config), real W&B offline files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from deeploc import __version__
from deeploc.cli.report import main as report_main
from deeploc.data.images import read_mask
from tests.e2e import run_cli, train_args


@pytest.fixture(scope="module")
def trained_run(shared_workdir: Path) -> Path:
    """One real training run on generated data: CONV-4 on high_res_feats_1, cached features."""
    workdir = shared_workdir / "train"
    workdir.mkdir(exist_ok=True)
    run_dir = workdir / "run"
    run_cli(
        "deeploc.cli.train",
        train_args(shared_workdir, "trainer.max_epochs=25", "overlays=2", f"hydra.run.dir={run_dir}"),
        workdir,
    )
    return run_dir


def _constant_predictor_iou(run_dir: Path, subset: str) -> float:
    """Mean IoU (%) of the better constant predictor on a test subset (all-zero scores 0 on non-empty masks)."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    root = Path(metrics["config"]["data"]) / "celebahq" / "fake" / subset / "masks" / "test"
    masks = [read_mask(p) != 255 for p in sorted(root.glob("*.png"))]
    return float(np.mean([100 * m.mean() for m in masks]))


def test_train_learns_and_writes_run_artefacts(trained_run: Path) -> None:
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    assert metrics["convention"] == "study"  # the default metrics.convention
    config = metrics["config"]
    assert config["decoder"] == "conv4" and config["feature"] == "high_res_feats_1" and config["split"] == "cross"
    subsets = config["subsets"]
    assert set(metrics["test"]) == set(subsets)
    for scores in metrics["test"].values():
        assert scores["n_images"] == 8
        assert {"iou", "f1_fixed", "f1_best", "ap"} <= set(scores)
    trained_on = config["subset"]
    baseline = _constant_predictor_iou(trained_run, trained_on)
    # Above the best constant predictor (all-zero scores 0, all-one scores the mask fraction), in IoU and in
    # AP (whose chance level is the mask fraction too).
    scores = metrics["test"][trained_on]
    assert scores["iou"] > baseline + 5, (scores, baseline)
    assert scores["ap"] > baseline + 20, (scores, baseline)
    # Configs, checkpoints, overlays, W&B offline run and CSV logs are on disk.
    assert (trained_run / ".hydra" / "config.yaml").is_file()
    assert "sam2.1_hiera_micro" in (trained_run / "config_resolved.yaml").read_text()
    assert (trained_run / "checkpoints" / "best.ckpt").is_file() and (
        trained_run / "checkpoints" / "last.ckpt"
    ).is_file()
    assert len(list((trained_run / "overlays").glob("*/*.png"))) == 2 * len(subsets)
    offline = list((trained_run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))
    # Validation prediction panels after epoch 1, every 5th and the last (25 epochs -> 1, 5, 10, 15, 20, 25).
    panels = list(offline[0].glob("files/media/images/val/predictions_*.png"))
    assert len({p.name.split("_")[1] for p in panels}) == 6 and len(panels) == 6 * 4
    assert (trained_run / "csv" / "metrics.csv").is_file()


def test_checkpoint_holds_only_the_decoder_and_loads_with_weights_only(trained_run: Path) -> None:
    ckpt = torch.load(trained_run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["state_dict"] and all(key.startswith("decoder.") for key in ckpt["state_dict"])
    assert ckpt["deeploc"]["encoder"]["config"] == "sam2.1_hiera_micro"
    assert ckpt["hyper_parameters"]["encoder"]["config"] == "sam2.1_hiera_micro"


def test_rerunning_a_finished_run_skips_it(trained_run: Path, shared_workdir: Path) -> None:
    before = (trained_run / "metrics.json").stat().st_mtime_ns
    proc = run_cli(
        "deeploc.cli.train",
        train_args(shared_workdir, "trainer.max_epochs=25", "overlays=2", f"hydra.run.dir={trained_run}"),
        trained_run.parent,
    )
    assert "already finished; skipping" in proc.stdout + proc.stderr
    assert (trained_run / "metrics.json").stat().st_mtime_ns == before


def test_the_run_records_what_produced_its_scores_and_the_report_shows_it(trained_run: Path, tmp_path: Path) -> None:
    metrics = json.loads((trained_run / "metrics.json").read_text())
    config = metrics["config"]
    resolved = yaml.safe_load((trained_run / "config_resolved.yaml").read_text())
    assert config["weights"] == f"random:seed={resolved['encoder']['seed']}"
    assert config["max_epochs"] == resolved["trainer"]["max_epochs"] == 25
    assert (config["lr"], config["weight_decay"]) == (resolved["model"]["lr"], resolved["model"]["weight_decay"])
    assert config["batch_size"] == resolved["data"]["batch_size"] == 8 and config["schedule"] == "fixed"
    # The study's optimizer and loss, recorded as plain values (a run with another one is another experiment).
    assert config["optimization"]["optimizer"]["_target_"] == "torch.optim.adam.Adam"
    assert config["optimization"]["loss"]["_target_"].endswith("BCEWithLogitsLoss")
    assert config["optimization"]["lr_scheduler"] is None
    assert config["data_params"] == resolved["data"]["synthetic"] and config["generated_data"]
    assert (config["n_train"], config["n_valid"]) == (32, 8)  # TINY_DATA's generated sizes
    assert config["deeploc_version"] == __version__
    # The console table (also in train.log) labels the training subset's row in-domain, the others out-of-domain.
    log = (trained_run / "train.log").read_text()
    assert f"{config['subset']} (in-domain)" in log and log.count("(out-of-domain)") == len(config["subsets"]) - 1

    out = tmp_path / "report"
    assert report_main([str(trained_run), "--out", str(out), "--compare-study"]) == 0
    report = (out / "report.md").read_text()
    for line in (
        "| encoder | sam2.1_hiera_micro |",
        "| weights | random (seed 0) |",
        "| input size | 256 |",
        "| max epochs | 25 |",
        "| batch size | 8 |",
        f"| metric convention | {metrics.get('convention', 'trufor')} |",
        f"| deeploc (runs) | {__version__} |",
    ):
        assert line in report, line
    assert "| data | generated: " in report and "size=128" in report
    # Subsets in data.subsets order (not alphabetical), and no comparison with the study on generated subsets.
    assert "| train \\ test | " + " | ".join(config["subsets"]) + " |" in report
    assert "does not apply" in report
    assert {p.name for p in out.glob("*.png")} == {"heatmap_conv4_high_res_feats_1.png", "id_ood.png"}


def test_unknown_config_option_fails_naming_it(tmp_path: Path) -> None:
    proc = run_cli("deeploc.cli.train", ["decoder=conv7"], tmp_path, check=False)
    assert proc.returncode != 0
    assert "decoder" in proc.stderr and "conv7" in proc.stderr and "conv20" in proc.stderr


def test_missing_dolos_root_fails_before_training(tmp_path: Path) -> None:
    proc = run_cli(
        "deeploc.cli.train", ["data=dolos", f"data.root={tmp_path / 'nowhere'}", "encoder=micro"], tmp_path, check=False
    )
    assert proc.returncode != 0
    assert str(tmp_path / "nowhere") in proc.stderr
    assert not list((tmp_path / "outputs").rglob("*.ckpt"))


@pytest.mark.slow  # ~6 s; default suite: test_missing_dolos_root_fails_before_training
def test_dolos_without_a_root_names_the_key_and_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DOLOS_ROOT", raising=False)
    proc = run_cli("deeploc.cli.train", ["data=dolos", "encoder=micro"], tmp_path, check=False)
    assert proc.returncode != 0
    assert "data.root is not set" in proc.stderr and "wacv_data" in proc.stderr
