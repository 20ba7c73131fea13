"""Overlays and W&B panels reuse the maps a run was scored on: from the feature cache, the encoder never runs again;
streamed, it runs once per subset for every head together."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from deeploc.config import CONF_DIR
from deeploc.runs import RunDir
from deeploc.train import build_datamodule, build_model, serve_features, write_overlays

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


def test_overlays_of_a_cached_run_read_the_cache_and_streamed_runs_encode_once_per_subset(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"data.root={tmp_path / 'data'}", "data.synthetic.n_train=8", "data.synthetic.n_valid=2",
                "data.synthetic.n_test=2", "data.synthetic.size=64", "data.num_workers=0",
                "encoder=micro", "encoder.image_size=128", "decoder=fusion", "features=cache",
                f"features.dir={tmp_path / 'features'}",
            ],
        )  # fmt: skip
    datamodule = build_datamodule(cfg)
    heads = [build_model(cfg)]
    heads.append(build_model(cfg, encoder=heads[0].encoder))  # a second head on the same encoder
    assert serve_features(cfg, datamodule, heads[0].encoder, heads[0].decoder.inputs) == "cache"
    calls = _counting(heads[0].encoder)
    cached = [RunDir(tmp_path / "cached-a"), RunDir(tmp_path / "cached-b")]
    written = write_overlays(heads, datamodule, cached, count=2)
    subsets = list(datamodule.plan.test)
    assert calls == [] and len(written) == 2 * 2 * len(subsets)

    datamodule.set_dataset_factory(None)  # the same run, streamed: images in every dataset
    streamed = [RunDir(tmp_path / "stream-a"), RunDir(tmp_path / "stream-b")]
    write_overlays(heads, datamodule, streamed, count=2)
    assert calls == [2] * len(subsets)  # one pass per subset, shared by both heads
    for run_cached, run_streamed in zip(cached, streamed):
        for path in run_cached.path.glob("overlays/*/*.png"):
            a = np.asarray(Image.open(path), dtype=float)
            b = np.asarray(Image.open(run_streamed.path / path.relative_to(run_cached.path)), dtype=float)
            # fp16 cached maps vs fp32 encoder output: the same picture to within rounding of a few pixels
            assert a.shape == b.shape and np.abs(a - b).mean() < 0.5
