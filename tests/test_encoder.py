"""The frozen SAM2 encoder: exact equivalence with sam2's predictor, checkpoint loading, clear failures."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch

from deeploc.models.encoders.sam2 import (
    EncoderError,
    SAM2Encoder,
    available_configs,
    build_sam2_model,
    save_random_checkpoint,
)
from deeploc.testing import EncoderContract

MICRO = "sam2.1_hiera_micro"
pytestmark = pytest.mark.filterwarnings("ignore:SAM2 encoder .* RANDOM weights")


@pytest.fixture(scope="module")
def micro_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    return save_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "micro.pt", MICRO, seed=3)


def _predictor_features(model: torch.nn.Module, images: list[np.ndarray], size: int) -> dict[str, torch.Tensor]:
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    predictor = SAM2ImagePredictor(model)
    # The predictor hard-codes the feature sizes of a 1024 input.
    predictor._bb_feat_sizes = [(size // 4, size // 4), (size // 8, size // 8), (size // 16, size // 16)]
    if len(images) == 1:
        predictor.set_image(images[0])
    else:
        predictor.set_image_batch(images)
    feats = predictor._features
    return {
        "image_embed": feats["image_embed"],
        "high_res_feats_0": feats["high_res_feats"][0],
        "high_res_feats_1": feats["high_res_feats"][1],
    }


@pytest.mark.parametrize(("size", "n_images"), [(1024, 1), (256, 3)])
def test_features_equal_sam2_image_predictor(micro_checkpoint, size: int, n_images: int) -> None:
    encoder = SAM2Encoder(MICRO, checkpoint=str(micro_checkpoint), image_size=size)
    rng = np.random.default_rng(size)
    images = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(n_images)]
    expected = _predictor_features(encoder.model, images, size)
    batch = torch.stack([torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in images])
    ours = encoder(batch)
    for name, ref in expected.items():
        assert ours[name].shape == (n_images, *encoder.feature_shape(name))
        torch.testing.assert_close(ours[name], ref, rtol=1e-5, atol=1e-5)


def test_checkpoint_round_trip_loads_the_saved_weights(micro_checkpoint) -> None:
    encoder = SAM2Encoder(MICRO, checkpoint=str(micro_checkpoint), image_size=256)
    saved = torch.load(micro_checkpoint, weights_only=True)["model"]
    for key, value in encoder.model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert encoder.identity()["weights"].startswith("sha256:")
    assert not any(p.requires_grad for p in encoder.parameters())


def test_random_weights_are_seeded_and_warned() -> None:
    with pytest.warns(UserWarning, match="RANDOM weights"):
        first = SAM2Encoder(MICRO, random_init=True, seed=1, image_size=256)
    second = SAM2Encoder(MICRO, random_init=True, seed=1, image_size=256)
    third = SAM2Encoder(MICRO, random_init=True, seed=2, image_size=256)
    w = "model.image_encoder.trunk.patch_embed.proj.weight"
    assert torch.equal(first.state_dict()[w], second.state_dict()[w])
    assert not torch.equal(first.state_dict()[w], third.state_dict()[w])


def test_encoder_stays_frozen_in_eval_mode() -> None:
    encoder = SAM2Encoder(MICRO, random_init=True, image_size=256)
    encoder.train()
    assert not encoder.training and not encoder.model.training
    x = torch.rand(1, 3, 64, 64, requires_grad=True)
    out = encoder(x)["image_embed"]
    assert not out.requires_grad


def test_checkpoint_with_missing_and_extra_keys_fails_clearly(micro_checkpoint, tmp_path) -> None:
    state = torch.load(micro_checkpoint, weights_only=True)["model"]
    state.pop("no_mem_embed")
    state["surprise.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pt"
    torch.save({"model": state}, bad)
    with pytest.raises(EncoderError, match=r"1 missing keys \(e\.g\. no_mem_embed\).*1 unexpected keys"):
        SAM2Encoder(MICRO, checkpoint=str(bad), image_size=256)


def test_checkpoint_for_another_sam2_size_names_it(tmp_path) -> None:
    tiny = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": build_sam2_model("sam2.1_hiera_t", 1024).state_dict()}, tiny)
    with pytest.raises(EncoderError, match=r"does not match encoder.config='sam2.1_hiera_micro'.*looks like hiera_t"):
        SAM2Encoder(MICRO, checkpoint=str(tiny), image_size=256)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"config": "sam3_hiera_x", "random_init": True}, "not a SAM2 config shipped"),
        ({"config": MICRO, "random_init": True, "image_size": 250}, "multiple of 32"),
        ({"config": MICRO}, "encoder.checkpoint is not set"),
        ({"config": MICRO, "checkpoint": "/nonexistent/sam2.pt"}, "does not exist"),
        ({"config": MICRO, "random_init": True, "overrides": {"image_encoder.nope": 1}}, "image_encoder.nope"),
    ],
)
def test_bad_encoder_settings_fail_clearly(kwargs, message) -> None:
    with pytest.raises(EncoderError, match=message):
        SAM2Encoder(**kwargs)


def test_not_a_checkpoint_file_fails_clearly(tmp_path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(EncoderError, match="cannot read SAM2 checkpoint"):
        SAM2Encoder(MICRO, checkpoint=str(junk), image_size=256)


def test_all_packaged_configs_are_listed() -> None:
    names = available_configs()
    for name in ("sam2.1_hiera_t", "sam2.1_hiera_s", "sam2.1_hiera_b+", "sam2.1_hiera_l", "sam2_hiera_s", MICRO):
        assert name in names


class TestSam2MicroContract(EncoderContract):
    name = "sam2"
    options: ClassVar = {"config": "sam2.1_hiera_micro", "image_size": 64, "random_init": True, "seed": 0}
