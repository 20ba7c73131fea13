"""features=auto/cache/stream: the one serving policy (deeploc.features.serving) on real encoders and real files."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from deeploc.errors import ConfigError
from deeploc.features import FeatureStoreError
from deeploc.features.serving import augmentation_blocks_cache, decide
from deeploc.models.encoders.sam2 import SAM2Encoder
from tests.test_feature_store import make_samples

pytestmark = pytest.mark.filterwarnings("ignore:SAM2 encoder .* RANDOM weights")


def test_augmentations_block_the_cache() -> None:
    for off in (None, {}, {"jpeg": {"p": 0.0}}, OmegaConf.create({"blur": None})):
        assert augmentation_blocks_cache(off) == ""
    reason = augmentation_blocks_cache(OmegaConf.create({"jpeg": {"p": 1.0}, "blur": 0.5}))
    assert "ImageCompression" in reason and "GaussianBlur" in reason and "cannot be cached" in reason
    with pytest.raises(ValueError, match="unknown section"):
        augmentation_blocks_cache({"flip": 1.0})


def test_an_adapted_encoder_streams_under_auto_and_is_refused_a_cache(tmp_path: Path) -> None:
    encoder = SAM2Encoder("sam2.1_hiera_micro", random_init=True, image_size=64)
    samples = make_samples(tmp_path / "data", 2)
    args = (encoder, ("image_embed",), samples, tmp_path / "features", "cpu")
    assert decide("auto", *args).mode == "cache"  # frozen (no `adapt` attribute): the tiny cache fits
    encoder.adapt = "lora"  # what an adapted encoder (issue 23) says about itself
    auto = decide("auto", *args)
    assert auto.mode == "stream" and "encoder.adapt=lora" in auto.reason and "cannot be cached" in auto.reason
    with pytest.raises(ConfigError) as refused:
        decide("cache", *args)
    assert "\n" not in str(refused.value)
    assert str(refused.value).startswith("features=cache: encoder.adapt=lora trains the encoder")
    assert decide("auto", *args, extracting=True).mode == "stream"  # deeploc-extract: nothing to extract
    assert not (tmp_path / "features").exists()  # nothing was created for any of them


def test_a_fast_dev_run_pass_encodes_only_its_batches(tmp_path: Path) -> None:
    """debug=fdr reads one batch per loop: it streams instead of caching the whole split (issue 21, item 14), and a
    features=cache that could not fit is still refused, as the real run would be."""
    samples = make_samples(tmp_path / "data", 2)
    encoder = SAM2Encoder("sam2.1_hiera_micro", random_init=True, image_size=64)
    for mode in ("auto", "cache"):
        decision = decide(mode, encoder, ("image_embed",), samples, tmp_path / "features", "cpu", debug_batches=1)
        assert decision.mode == "stream" and "fast_dev_run" in decision.reason
    assert not (tmp_path / "features").exists()
    huge = SAM2Encoder("sam2.1_hiera_micro", random_init=True, image_size=262144)  # 128 GiB of maps per image
    with pytest.raises(FeatureStoreError, match="features=cache: the feature cache needs"):
        decide("cache", huge, ("image_embed",), samples, tmp_path / "features", "cpu", debug_batches=1)
