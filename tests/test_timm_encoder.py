"""timm backbones (deeploc/models/encoders/timm.py): timm's own maps and preprocessing, weights files, presets."""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import timm
import timm.data
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from deeploc.models.encoders import EncoderError, build_encoder, encoder_from_identity
from deeploc.models.encoders.timm import TimmEncoder, save_timm_weights

CONF = str(Path(__file__).resolve().parents[1] / "conf")
TINY = {"depth": 4, "embed_dim": 32, "num_heads": 1}
pytestmark = pytest.mark.filterwarnings("ignore:timm encoder .* RANDOM weights")


def tiny(**kwargs: object) -> TimmEncoder:
    options = {"model": "vit_small_patch14_dinov2", "layers": [1, 3], "image_size": 112, "model_kwargs": TINY}
    checkpoint = kwargs.pop("checkpoint", None)
    options.update(checkpoint=checkpoint, random_init=checkpoint is None, **kwargs)
    return build_encoder("timm", **options)  # type: ignore[return-value]


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A natural-looking (smooth) 8-bit RGB image."""
    noise = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    return cv2.GaussianBlur(noise, (0, 0), 3)


def test_maps_equal_timms_forward_intermediates() -> None:
    encoder = tiny(seed=3)
    with torch.random.fork_rng():
        torch.manual_seed(3)  # the encoder builds its network under its seed: the same random weights
        reference = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=112, **TINY)
    reference.eval()
    images = torch.rand(2, 3, 112, 112)
    maps = encoder(images)
    with torch.no_grad():
        expected = reference.forward_intermediates(encoder.preprocess(images), indices=4, intermediates_only=True)
    assert list(maps) == ["layer1", "layer3"]
    assert maps["layer1"].shape == (2, *encoder.feature_shape("layer1")) == (2, 32, 8, 8)
    torch.testing.assert_close(maps["layer1"], expected[1], rtol=0, atol=0)
    torch.testing.assert_close(maps["layer3"], expected[3], rtol=0, atol=0)
    assert encoder.feature_specs["layer3"].stride == 14 and encoder.target_stride == 14 / 16


def test_preprocessing_equals_timms_resolved_transform_on_a_non_square_image() -> None:
    encoder = tiny()
    config = timm.data.resolve_data_config({}, model=encoder.model)
    assert config["mean"] == (0.485, 0.456, 0.406) and config["interpolation"] == "bicubic"
    # timm's eval transform of the model's config, squashing the whole image to the input (no crop; docs/backbones.md).
    transform = timm.data.create_transform(**{**config, "input_size": (3, 112, 112), "crop_mode": "squash"})
    for shape in ((90, 130), (200, 300)):
        image = smooth_image(*shape)
        expected = transform(Image.fromarray(image))
        ours = encoder.preprocess(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)[0]
        grey_levels = (ours - expected).abs() * torch.tensor(config["std"]).view(3, 1, 1) * 255
        # PIL resizes 8-bit images with its bicubic kernel (a=-0.5), torch float tensors (a=-0.75): ~1 grey level.
        assert ours.shape == expected.shape == (3, 112, 112)
        assert grey_levels.max() < 1.5 and grey_levels.mean() < 0.4


def test_saved_and_reloaded_weights_give_identical_maps(tmp_path: Path) -> None:
    trained = tiny(seed=7)
    path = save_timm_weights(tmp_path / "weights.safetensors", trained)
    loaded = tiny(checkpoint=str(path))
    images = torch.rand(2, 3, 100, 140)
    for name, fmap in trained(images).items():
        assert torch.equal(fmap, loaded(images)[name])
    assert loaded.weights.startswith("sha256:") and loaded.identity()["model"] == "vit_small_patch14_dinov2"
    # A weights-only .pth of the same tensors (e.g. DINOv2's release format, under "model") loads too ...
    pth = tmp_path / "weights.pth"
    torch.save({"model": trained.model.state_dict()}, pth)
    assert torch.equal(tiny(checkpoint=str(pth))(images)["layer3"], trained(images)["layer3"])
    # ... and a checkpoint's record rebuilds the same encoder from the file (digest checked).
    rebuilt = encoder_from_identity(loaded.identity(), checkpoint=path)
    assert torch.equal(rebuilt(images)["layer1"], loaded(images)["layer1"])


def test_weights_of_another_model_are_refused_by_name(tmp_path: Path) -> None:
    other = build_encoder(
        "timm", model="vit_small_patch16_dinov3", image_size=64, random_init=True, model_kwargs=TINY, layers=[3]
    )
    path = save_timm_weights(tmp_path / "dinov3.safetensors", other)
    with pytest.raises(
        EncoderError, match=r"are for model vit_small_patch16_dinov3, not encoder.model=vit_small_patch14"
    ):
        tiny(checkpoint=str(path))
    # Without a recorded name (a .pth), the shapes say what is wrong and what the file holds.
    deeper = build_encoder(
        "timm", model="vit_small_patch14_dinov2", image_size=112, random_init=True, model_kwargs={**TINY, "depth": 6}
    )
    torch.save(deeper.model.state_dict(), tmp_path / "deeper.pth")
    with pytest.raises(EncoderError, match=r"unexpected keys .*holds a ViT with width 32, 6 blocks, 14-px patches"):
        tiny(checkpoint=str(tmp_path / "deeper.pth"))


def test_bad_input_gives_one_clear_line() -> None:
    with pytest.raises(EncoderError, match=r"not a timm .* model; close matches: vit_small_patch14_dinov2") as err:
        build_encoder("timm", model="vit_smal_patch14_dinov2", random_init=True)
    assert "\n" not in str(err.value)
    with pytest.raises(EncoderError, match=r"encoder.layers=\[4\]: give distinct indices in 0..3 .* 4 feature"):
        tiny(layers=[4])
    with pytest.raises(EncoderError, match=r"image_size=100 is not a multiple of .* stride 14"):
        tiny(image_size=100)
    with pytest.raises(EncoderError, match=r"encoder.checkpoint=.* does not exist"):
        tiny(checkpoint="/nonexistent/dinov2.safetensors")


def test_presets_compose_and_the_micro_preset_builds() -> None:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        for preset, model in (
            ("dinov2_vits14", "vit_small_patch14_dinov2"),
            ("dinov2_vitb14", "vit_base_patch14_dinov2"),
            ("dinov2_vitl14", "vit_large_patch14_dinov2"),
            ("dinov3_vits16", "vit_small_patch16_dinov3"),
            ("dinov3_vitb16", "vit_base_patch16_dinov3"),
            ("dinov3_vitl16", "vit_large_patch16_dinov3"),
        ):
            cfg = compose("train", overrides=[f"encoder={preset}"])
            assert cfg.encoder.model == model and model in timm.list_models()
            for layer in cfg.encoder.layers:  # every listed block has its conf/feature entry
                assert (Path(CONF) / "feature" / f"layer{layer}.yaml").is_file()
        cfg = compose("train", overrides=["encoder=timm_micro", "feature=layer20", "decoder=conv20"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            encoder = instantiate(cfg.encoder)
        assert encoder.identity()["layers"] == [20] and encoder.feature_shape("layer20") == (32, 8, 8)
        assert "adapt" not in encoder.init_config()  # frozen: recorded exactly as before adaptation existed
        cfg = compose(
            "train", overrides=["encoder=timm", "encoder.model=vit_tiny_patch16_224", "encoder.random_init=true"]
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vit = instantiate(cfg.encoder)  # any timm model; defaults: its last block, its pretrained input size
        assert vit.image_size == 224 and list(vit.feature_specs) == ["layer11"]
