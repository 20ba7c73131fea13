"""The study's protocol through the real CLI: split modes, schedules, determinism, augmentations, eval."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import pytest
import torch

from deeploc.cli.evaluate import main as eval_main
from deeploc.testing import sam2_conv
from tests.e2e import run_cli, train_args


def _train(shared: Path, workdir: Path, name: str, *overrides: str, check: bool = True):
    run_dir = workdir / name
    proc = run_cli(
        "deeploc.cli.train",
        train_args(shared, "overlays=0", "logger=csv", f"hydra.run.dir={run_dir}", *overrides),
        workdir,
        check=check,
    )
    return run_dir, proc


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow  # ~18 s; default suite: test_golden, test_multihead (runs equal bit for bit)
def test_in_domain_runs_are_identical_with_the_same_seed(shared_workdir: Path, tmp_path: Path) -> None:
    first, _ = _train(shared_workdir, tmp_path, "a", "split=in_domain", "subset_index=1", "trainer.max_epochs=2")
    second, _ = _train(shared_workdir, tmp_path, "b", "split=in_domain", "subset_index=1", "trainer.max_epochs=2")
    a, b = _metrics(first), _metrics(second)
    assert list(a["test"]) == ["copy-move"] and a["config"]["split"] == "in_domain"
    assert a["test"] == b["test"]


def test_leave_one_out_trains_on_the_other_subsets_and_tests_the_held_out_first(
    shared_workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, proc = _train(
        shared_workdir,
        tmp_path,
        "loo",
        "split=leave_one_out",
        "subset=blur-noise",
        "split.n_train=12",
        "split.n_valid=4",
        "trainer.max_epochs=1",
    )
    metrics = _metrics(run_dir)
    assert next(iter(metrics["test"])) == "blur-noise"
    assert set(metrics["test"]) == {"inpaint-telea", "copy-move", "blur-noise", "splice-jpeg"}
    assert all(scores["n_images"] == 8 for scores in metrics["test"].values())
    log = proc.stdout + proc.stderr
    # 12 train + 4 valid images from each of the three seen subsets.
    assert "train 36, valid 12" in log
    # Every printout says which subset was held out and which were seen (never "in-domain").
    assert "trained on inpaint-telea, copy-move, splice-jpeg (held out: blur-noise)" in log
    assert "blur-noise (held out)" in log and log.count("(seen)") == 3 and "in-domain" not in log
    features = str(shared_workdir / "features")
    assert eval_main([str(run_dir), "--out", str(tmp_path / "eval"), "--features-dir", features]) == 0
    printed = capsys.readouterr().out
    assert "blur-noise (held out)" in printed and printed.count("(seen)") == 3 and "in-domain" not in printed


def test_leave_one_out_asking_for_more_images_than_exist_fails_clearly(shared_workdir: Path, tmp_path: Path) -> None:
    _, proc = _train(shared_workdir, tmp_path, "loo", "split=leave_one_out", "trainer.max_epochs=1", check=False)
    assert proc.returncode != 0
    assert "3000" in proc.stderr and "n_train" in proc.stderr


def test_declip_schedule_divides_lr_and_stops_under_min_lr(shared_workdir: Path, tmp_path: Path) -> None:
    # lr=0 keeps the weights (and so val IoU) constant: the plateau triggers after `patience` epochs.
    run_dir, _ = _train(
        shared_workdir,
        tmp_path,
        "declip",
        "schedule=declip",
        "model.lr=0",
        "model.plateau_patience=2",
        "trainer.max_epochs=50",
    )
    metrics = _metrics(run_dir)
    assert metrics["epochs"] == 3  # epoch 1 sets the best, epochs 2-3 do not improve -> LR / 10 < min_lr -> stop


@pytest.mark.slow  # ~9 s; in-process: test_feature_serving.py::test_augmentations_block_the_cache
def test_augmentations_disable_the_feature_cache(shared_workdir: Path, tmp_path: Path) -> None:
    run_dir, proc = _train(
        shared_workdir, tmp_path, "aug", "trainer.max_epochs=1", "+data.augment.jpeg.p=1.0", "data.synthetic.n_train=32"
    )
    assert "feature cache not used" in proc.stdout + proc.stderr
    assert _metrics(run_dir)["status"] == "finished"


@pytest.fixture(scope="module")
def finished_run(shared_workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir, _ = _train(shared_workdir, tmp_path_factory.mktemp("finished"), "run", "trainer.max_epochs=2")
    return run_dir


def test_eval_reproduces_the_run_and_tests_other_subsets(
    finished_run: Path, shared_workdir: Path, tmp_path: Path
) -> None:
    run_dir = finished_run
    out = tmp_path / "eval"
    assert eval_main([str(run_dir), "--out", str(out), "--features-dir", str(shared_workdir / "features")]) == 0
    evaluated_file = json.loads((out / "eval.json").read_text())
    assert evaluated_file["convention"] == _metrics(run_dir)["convention"] == "study"  # both default
    evaluated = evaluated_file["test"]
    trained = _metrics(run_dir)["test"]
    for subset, scores in trained.items():
        for key in ("iou", "f1_fixed", "f1_best", "ap"):
            assert evaluated[subset][key] == pytest.approx(scores[key], abs=1e-6)
    assert (out / "eval.csv").read_text().count("\n") == 1 + len(trained)
    # A subset list and split of the user's choice, without retraining.
    out2 = tmp_path / "eval2"
    assert eval_main([str(run_dir), "--out", str(out2), "--subsets", "copy-move", "--split", "valid"]) == 0
    assert list(json.loads((out2 / "eval.json").read_text())["test"]) == ["copy-move"]


def test_eval_on_masks_drawn_white_is_manipulated(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same test images with inverted masks: refused as inverted, then scored exactly as the originals once
    deeploc-eval is told the polarity (issue 16, item 2)."""
    data = Path(_metrics(finished_run)["config"]["data"])
    inverted = tmp_path / "inverted" / "data"
    shutil.copytree(data, inverted)
    for mask in inverted.glob("celebahq/fake/copy-move/masks/test/*.png"):
        cv2.imwrite(str(mask), 255 - cv2.imread(str(mask)))
    common = [str(finished_run), "--subsets", "copy-move"]
    assert eval_main([*common, "--out", str(tmp_path / "a")]) == 0
    assert eval_main([*common, "--data-root", str(inverted), "--out", str(tmp_path / "b")]) == 1
    assert "--mask-polarity white_is_manipulated" in capsys.readouterr().err
    white = ["--data-root", str(inverted), "--mask-polarity", "white_is_manipulated", "--out", str(tmp_path / "c")]
    assert eval_main([*common, *white]) == 0
    original = json.loads((tmp_path / "a" / "eval.json").read_text())["test"]["copy-move"]
    assert json.loads((tmp_path / "c" / "eval.json").read_text())["test"]["copy-move"] == original


def test_eval_folders_of_different_data_never_collide(finished_run: Path, tmp_path: Path) -> None:
    data = Path(_metrics(finished_run)["config"]["data"])
    copies = [tmp_path / parent / data.name for parent in ("a", "b")]  # two datasets with one folder name
    for copy in copies:
        shutil.copytree(data, copy)
        assert eval_main([str(finished_run), "--data-root", str(copy), "--subsets", "copy-move"]) == 0
    folders = sorted((finished_run / "eval").glob(f"{data.name}-test-*"))
    assert len(folders) == 2
    assert {json.loads((folder / "eval.json").read_text())["data"] for folder in folders} == {str(c) for c in copies}


def test_retesting_with_another_decoder_is_refused(finished_run: Path, shared_workdir: Path) -> None:
    _, proc = _train(
        shared_workdir,
        finished_run.parent,
        "run",
        "trainer.max_epochs=2",
        "decoder=conv12",
        "if_finished=eval",
        check=False,
    )
    assert proc.returncode != 0
    assert "conv12 on" in proc.stderr and "the config asks for" in proc.stderr


def test_training_from_the_cache_matches_training_on_the_fly(shared_workdir: Path, tmp_path: Path) -> None:
    cached, _ = _train(shared_workdir, tmp_path, "cached", "trainer.max_epochs=2", "features=cache")
    on_the_fly, _ = _train(shared_workdir, tmp_path, "fly", "trainer.max_epochs=2", "features=stream")
    a = torch.load(cached / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    b = torch.load(on_the_fly / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    # The only difference is the float16 rounding of the stored features (relative error ~5e-4). Conv weights
    # stay within 1% (relative norm); conv biases feeding a BatchNorm are not compared: BN cancels them, so their
    # gradients are ~0 and Adam turns that noise into arbitrary values (BN's running mean tracks the same shift).
    weights = [k for k in a if k.endswith("weight")]
    for key in weights:
        assert (a[key] - b[key]).norm() <= 1e-2 * a[key].norm(), key
    assert any(not torch.equal(a[k], b[k]) for k in weights)  # the two paths really read different inputs
    # And the two decoders predict the same thing.
    decoders = []
    for state in (a, b):
        decoder = sam2_conv("high_res_feats_1", 4).eval()
        decoder.load_state_dict({k.removeprefix("decoder."): v for k, v in state.items()})
        decoders.append(decoder)
    features = torch.randn(4, 64, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pa, pb = (torch.sigmoid(d(features)) for d in decoders)
    torch.testing.assert_close(pa, pb, rtol=0, atol=1e-2)
