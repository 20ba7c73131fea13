"""deeploc-predict on a real trained run: outputs equal the LightningModule's, any image works or is refused clearly."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from deeploc.cli.predict import main as predict_main
from deeploc.data.images import read_rgb
from deeploc.inference.inputs import InputError, collect_inputs
from deeploc.inference.loading import load_model
from deeploc.inference.outputs import output_names
from deeploc.inference.predict import predict_images, predict_paths
from deeploc.metrics import IMAGE_SCORE, image_score
from deeploc.runs.checkpoints import ModelError
from deeploc.training.module import LocalizationModule
from deeploc.visualize import colorbar, heatmap

pytestmark = [
    pytest.mark.filterwarnings("ignore:SAM2 encoder .* RANDOM weights"),
    pytest.mark.filterwarnings("ignore:Found keys that are in the model state dict"),
]

# A tiny real training run: generated Dolos-layout data at 64 px, micro SAM2 at a 64 input, CONV-4.
TRAIN_OVERRIDES = [
    "experiment=demo",
    "encoder=micro",
    "encoder.image_size=64",
    "data.synthetic.n_train=16",
    "data.synthetic.n_valid=8",
    "data.synthetic.n_test=8",
    "data.synthetic.size=64",
    "data.num_workers=0",
    "logger=csv",
    "overlays=0",
]


def train_run(base: Path, name: str, *overrides: str) -> Path:
    """Train with the real deeploc-train CLI into ``base/name`` (reused when already finished this session)."""
    run_dir = base / name
    metrics = run_dir / "metrics.json"
    if metrics.is_file() and json.loads(metrics.read_text()).get("status") == "finished":
        return run_dir
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", HYDRA_FULL_ERROR="1", PYTHONWARNINGS="ignore")
    args = [
        *TRAIN_OVERRIDES,
        f"data.root={base / 'data'}",
        f"features.dir={base / 'features'}",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "deeploc.cli.train", *args],
        cwd=base,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"deeploc-train failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return run_dir


def shared_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.getbasetemp() / "deeploc-inference-runs"
    base.mkdir(exist_ok=True)
    return base


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_run(shared_base(tmp_path_factory), "random-encoder", "trainer.max_epochs=2")


@pytest.fixture(scope="module")
def reference(run_dir: Path) -> LocalizationModule:
    """The model as Lightning loads it from the run's best checkpoint (the ground truth for predictions)."""
    return LocalizationModule.load_from_checkpoint(run_dir / "checkpoints" / "best.ckpt", map_location="cpu").eval()


def write_image(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array), path
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of awkward real image files, plus a corrupt PNG and a text file."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    smooth = cv2.resize(rng.integers(0, 256, (6, 9, 3), dtype=np.uint8), (90, 60), interpolation=cv2.INTER_CUBIC)
    write_image(folder / "wide.png", smooth)  # 90 x 60, non-square
    write_image(folder / "gray.png", rng.integers(0, 256, (50, 37), dtype=np.uint8))
    write_image(folder / "rgba.png", rng.integers(0, 256, (41, 64, 4), dtype=np.uint8))
    write_image(folder / "deep16.png", rng.integers(0, 65536, (70, 30, 3), dtype=np.uint16))
    write_image(folder / "gray16.png", rng.integers(0, 65536, (33, 33), dtype=np.uint16))
    write_image(folder / "tiny.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    write_image(folder / "photo.jpg", cv2.resize(smooth, (2000, 1500), interpolation=cv2.INTER_LINEAR))
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (folder / "notes.txt").write_text("not an image\n")
    return folder


GOOD = ("deep16", "gray", "gray16", "photo", "rgba", "tiny", "wide")


def as_input(path: Path) -> torch.Tensor:
    """How a training batch hands an image to the LightningModule: 1 x 3 x H x W float in [0, 1]."""
    return torch.from_numpy(read_rgb(path)).permute(2, 0, 1)[None].float().div(255)


@pytest.fixture(scope="module")
def folder_run(run_dir: Path, images: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    out = tmp_path_factory.mktemp("predictions")
    argv = [str(images), "--model", str(run_dir), "--out", str(out), "--save-probs", "--batch-size", "1"]
    return predict_main([*argv, "--device", "cpu", "--workers", "2", "--quiet"]), out


def test_cli_predictions_equal_the_lightning_module(folder_run, images: Path, reference) -> None:
    rc, out = folder_run
    assert rc == 0
    for name in GOOD:
        (path,) = images.glob(f"{name}.*")
        expected = reference.predict_probabilities(as_input(path))[0]
        probs = torch.from_numpy(np.load(out / "probs" / f"{name}.npy"))
        assert torch.equal(probs, expected), name


def test_outputs_are_pngs_at_the_native_size(folder_run, images: Path) -> None:
    _, out = folder_run
    for name in GOOD:
        (path,) = images.glob(f"{name}.*")
        height, width = read_rgb(path).shape[:2]
        probs = np.load(out / "probs" / f"{name}.npy")
        assert probs.shape == (height, width)
        mask = cv2.imread(str(out / "masks" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (height, width) and mask.dtype == np.uint8
        np.testing.assert_array_equal(mask, np.where(probs > 0.5, 255, 0))
        # The heatmap is the probabilities at the native size, its colour bar appended on the right.
        heat = cv2.cvtColor(cv2.imread(str(out / "heatmaps" / f"{name}.png")), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(heat[:, :width], heatmap(probs))
        np.testing.assert_array_equal(heat[:, width:], colorbar(height))
        over = cv2.imread(str(out / "overlays" / f"{name}.png"))
        assert over.shape == (height, width, 3)
    # The overlay tints the predicted region: pixels differ from the image where, and only near where, mask > 0.
    image = read_rgb(images / "wide.png")
    over = cv2.cvtColor(cv2.imread(str(out / "overlays" / "wide.png")), cv2.COLOR_BGR2RGB)
    mask = cv2.imread(str(out / "masks" / "wide.png"), cv2.IMREAD_UNCHANGED) > 0
    changed = (over != image).any(axis=2)
    assert changed[mask].all() or not mask.any()


def test_summary_lists_scores_and_skipped_files_with_reasons(folder_run, images: Path) -> None:
    _, out = folder_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["image_score"] == IMAGE_SCORE and summary["threshold"] == 0.5
    assert summary["counts"] == {"predicted": len(GOOD), "skipped": 2}
    rows = {Path(r["image"]).name: r for r in summary["images"]}
    assert rows["corrupt.png"]["status"] == "skipped" and "cannot be decoded" in rows["corrupt.png"]["reason"]
    assert rows["notes.txt"]["status"] == "skipped" and "not an image file" in rows["notes.txt"]["reason"]
    for name in GOOD:
        row = next(r for n, r in rows.items() if Path(n).stem == name)
        probs = np.load(out / "probs" / f"{name}.npy")
        assert row["status"] == "ok" and (row["height"], row["width"]) == probs.shape
        assert row["manipulated_fraction"] == pytest.approx(float((probs > 0.5).mean()))
        assert row["max_score"] == pytest.approx(float(probs.max()))
        assert row["mean_score"] == pytest.approx(float(probs.mean()), rel=1e-5)
        top = np.sort(probs.ravel())[::-1][: max(1, int(np.ceil(0.01 * probs.size)))]
        assert row["image_score"] == pytest.approx(float(top.mean()), rel=1e-5)
    with open(out / "summary.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [Path(r["image"]).name for r in table] == [Path(r["image"]).name for r in summary["images"]]
    assert {r["status"] for r in table} == {"ok", "skipped"}
    assert next(r for r in table if r["image"].endswith("notes.txt"))["reason"].startswith("not an image file")


def test_batched_prediction_matches_one_by_one(run_dir: Path, images: Path, reference) -> None:
    model = load_model(run_dir)
    arrays = [read_rgb(images / f) for f in ("wide.png", "gray.png", "rgba.png", "tiny.png", "deep16.png")]
    one_by_one = predict_images(model, arrays, batch_size=1)
    batched = predict_images(model, arrays, batch_size=4)
    for array, single, many in zip(arrays, one_by_one, batched):
        assert single.shape == many.shape == array.shape[:2]
        expected = reference.predict_probabilities(torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255)[0]
        assert torch.equal(single, expected)
        # Batched convolutions may pick other CPU kernels: equal up to float rounding.
        torch.testing.assert_close(many, single, rtol=0, atol=1e-6)


def test_a_single_bad_file_argument_fails_clearly(run_dir: Path, images: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    rc = predict_main([str(images / "corrupt.png"), "--model", str(run_dir), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "corrupt.png" in err and "cannot be decoded as an image" in err
    assert not list((out / "masks").iterdir())

    rc = predict_main([str(tmp_path / "missing.png"), "--model", str(run_dir), "--out", str(out)])
    assert rc == 1 and "missing.png does not exist" in capsys.readouterr().err
    rc = predict_main([str(tmp_path / "*.png"), "--model", str(run_dir), "--out", str(out)])
    assert rc == 1 and "no file matches" in capsys.readouterr().err
    rc = predict_main([str(images / "tiny.png"), "--model", str(tmp_path / "no-run"), "--out", str(out)])
    assert rc == 1 and "no-run does not exist" in capsys.readouterr().err


def test_glob_input_and_too_large_images_are_refused_clearly(run_dir: Path, images: Path, tmp_path: Path) -> None:
    model = load_model(run_dir)
    summary = predict_paths(
        model, [str(images / "*.jpg"), str(images / "tiny.png")], tmp_path, max_pixels=1_000_000, progress=False
    )
    photo, tiny = summary.results
    assert photo.status == "skipped" and "2000x1500 (3.0 megapixels), over the limit of 1.0" in photo.reason
    assert tiny.status == "ok" and (tiny.width, tiny.height) == (8, 8)
    assert (tmp_path / "overlays" / "tiny.png").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is missing")
def test_cuda_requested_without_a_gpu_is_refused(run_dir: Path, images: Path, tmp_path: Path, capsys) -> None:
    rc = predict_main([str(images / "tiny.png"), "--model", str(run_dir), "--out", str(tmp_path), "--device", "cuda"])
    assert rc == 1 and "CUDA is not available" in capsys.readouterr().err
    with pytest.raises(ModelError, match="CUDA is not available"):
        load_model(run_dir, device="cuda")


def test_inputs_and_names(tmp_path: Path) -> None:
    for name in ("a.png", "a.jpg", "b.png", "sub/c.png", ".hidden.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = collect_inputs([tmp_path])
    assert [i.path.name for i in found] == ["a.jpg", "a.png", "b.png"] and not any(i.explicit for i in found)
    assert [i.path.name for i in collect_inputs([tmp_path], recursive=True)][-1] == "c.png"
    assert collect_inputs([tmp_path / "b.png", tmp_path / "b.png"])[0].explicit
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no files"):
        collect_inputs([tmp_path / "empty"])
    assert output_names([Path("x/a.png"), Path("y/a.jpg"), Path("z/a.png"), Path("b.png")]) == [
        "a-png",
        "a-jpg",
        "a-png-2",
        "b",
    ]


def test_image_score_is_the_mean_of_the_top_percent() -> None:
    probs = torch.zeros(100, 100)
    probs[:2, :50] = 0.9  # exactly the top 1% (100 of 10,000 pixels)
    assert image_score(probs) == pytest.approx(0.9)
    probs[0, 0] = 1.0
    assert image_score(probs) == pytest.approx((0.9 * 99 + 1.0) / 100)
    assert image_score(torch.tensor([[0.25]])) == pytest.approx(0.25)
