"""Overlays and W&B panels reuse the maps a run was scored on: kept by the test step or read from the feature cache,
the encoder never runs again; without them, it runs once per subset for every head together. Each panel names its
image, subset and IoU, outlines the truth (no tint) and labels its colour bar."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from deeploc.config import CONF_DIR
from deeploc.data.samples import Sample
from deeploc.runs.rundir import RunDir
from deeploc.training.callbacks import panel_header
from deeploc.training.results import write_overlays
from deeploc.training.run import serve_features
from deeploc.training.steps import build_datamodule, build_model
from deeploc.training.test_maps import TestMaps
from deeploc.visualize import COLORBAR_LABEL, INK, colorbar, outline, panel, title_bar, title_height

pytestmark = pytest.mark.filterwarnings("ignore:SAM2 encoder .* RANDOM weights")


def _counting(encoder) -> list[int]:
    """Record the batch size of every call of ``encoder`` (the real encoder still computes)."""
    calls: list[int] = []
    forward = encoder.forward

    def counted(images, names=None):
        calls.append(images.shape[0])
        return forward(images, names)

    encoder.forward = counted
    return calls


def _setup(tmp_path: Path, features: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"data.root={tmp_path / 'data'}", "data.synthetic.n_train=8", "data.synthetic.n_valid=2",
                "data.synthetic.n_test=3", "data.synthetic.size=64", "data.num_workers=0", "data.eval_batch_size=2",
                "encoder=micro", "encoder.image_size=128", "decoder=fusion", f"features={features}",
                f"features.dir={tmp_path / 'features'}",
            ],
        )  # fmt: skip
    datamodule = build_datamodule(cfg)
    heads = [build_model(cfg)]
    heads.append(build_model(cfg, encoder=heads[0].encoder))  # a second head on the same encoder
    return cfg, datamodule, heads


def _same_pictures(runs_a: list[RunDir], runs_b: list[RunDir]) -> None:
    for run_a, run_b in zip(runs_a, runs_b):
        paths = sorted(run_a.path.glob("overlays/*/*.png"))
        assert paths
        for path in paths:
            a = np.asarray(Image.open(path), dtype=float)
            b = np.asarray(Image.open(run_b.path / path.relative_to(run_a.path)), dtype=float)
            # fp16 cached maps vs fp32 encoder output, or another batch size: the same picture to within rounding
            assert a.shape == b.shape and np.abs(a - b).mean() < 0.5


def test_overlays_of_a_cached_run_read_the_cache_and_without_it_encode_once_per_subset(tmp_path: Path) -> None:
    cfg, datamodule, heads = _setup(tmp_path, "cache")
    assert serve_features(cfg, datamodule, heads[0].encoder, heads[0].decoder.inputs) == "cache"
    calls = _counting(heads[0].encoder)
    cached = [RunDir(tmp_path / "cached-a"), RunDir(tmp_path / "cached-b")]
    written = write_overlays(heads, datamodule, cached, count=2)
    subsets = list(datamodule.plan.test)
    assert calls == [] and len(written) == 2 * 2 * len(subsets)
    # Header strip (name, subset, IoU) + tile titles + the 64 px image.
    assert Image.open(written[0]).size[1] == max(16, title_height(64)) + title_height(64) + 64

    datamodule.set_dataset_factory(None)  # the same run, images in every dataset and no maps kept
    encoded = [RunDir(tmp_path / "encoded-a"), RunDir(tmp_path / "encoded-b")]
    write_overlays(heads, datamodule, encoded, count=2)
    assert calls == [2] * len(subsets)  # one pass per subset, shared by both heads
    _same_pictures(cached, encoded)


def test_a_streamed_run_draws_its_overlays_from_the_maps_its_test_step_kept(tmp_path: Path) -> None:
    _, datamodule, (model, _) = _setup(tmp_path, "stream")
    calls = _counting(model.encoder)
    model.test_maps = TestMaps(3)  # more than one test batch (eval_batch_size=2)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.test(model, datamodule=datamodule, verbose=False)
    subsets = list(datamodule.plan.test)
    assert calls == [2, 1] * len(subsets)  # the test itself: 3 images per subset
    kept = [RunDir(tmp_path / "kept")]
    write_overlays([model], datamodule, kept, count=3, kept=model.test_maps)
    assert calls == [2, 1] * len(subsets)  # no pass for the overlays
    encoded = [RunDir(tmp_path / "encoded")]
    write_overlays([model], datamodule, encoded, count=3)
    assert calls[2 * len(subsets) :] == [3] * len(subsets)
    _same_pictures(kept, encoded)


def test_the_truth_is_outlined_not_tinted() -> None:
    image = np.full((128, 128, 3), (210, 60, 60), np.uint8)  # a reddish image: a red tint would vanish on it
    truth = np.zeros((128, 128), bool)
    truth[32:96, 32:96] = True
    drawn = outline(image, truth)
    np.testing.assert_array_equal(drawn[40:88, 40:88], image[40:88, 40:88])  # inside: untouched
    np.testing.assert_array_equal(drawn[:24], image[:24])  # away from the border: untouched
    edge = drawn[32, 40:88]
    assert (edge == (0, 255, 0)).all() or (edge == INK).all()  # the border: bright line over a dark one
    assert (drawn[30:35, 60] == INK).all(axis=1).any() and (drawn[30:35, 60] == (0, 255, 0)).all(axis=1).any()
    tile = panel(image, truth.astype(float), truth)[-128:, -128:]  # the truth tile is the outline
    np.testing.assert_array_equal(tile, drawn)


def test_every_colour_bar_says_what_it_shows() -> None:
    bar = colorbar(256)
    # Its right edge is the label, written upwards along the bar (16 px text + 5 px margin at this height).
    label = np.rot90(title_bar(256, COLORBAR_LABEL, 21))
    np.testing.assert_array_equal(bar[:, -21:], label)
    rows, cols = np.nonzero((label < 100).all(axis=2))
    assert rows.max() - rows.min() > 4 * (cols.max() - cols.min())  # a line of text running up the bar


def test_a_panel_header_names_the_image_its_subset_and_its_iou(tmp_path: Path) -> None:
    truth = np.zeros((64, 64), bool)
    truth[16:48, 16:48] = True
    prob = np.zeros((64, 64), np.float32)
    prob[16:48, 16:32] = 0.9  # half of the region
    sample = Sample(tmp_path / "00007.png", tmp_path / "m.png", "copy-move", "test", "00007")
    header = panel_header(sample, prob, truth)
    assert header == "00007 (copy-move): IoU 50.0%"
    image = np.zeros((64, 64, 3), np.uint8)
    with_header, without = panel(image, prob, truth, header=header), panel(image, prob, truth)
    assert with_header.shape[0] == without.shape[0] + max(16, title_height(64))
    np.testing.assert_array_equal(with_header[-without.shape[0] :], without)
    assert (with_header[: max(16, title_height(64))] < 100).any()  # ink: the header is written
