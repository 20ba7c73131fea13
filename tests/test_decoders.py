"""The built-in decoders: each passes the decoder contract; CONV-N has the study's (and DeCLIP's) layouts."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from deeploc.models.decoders import DECODERS, DecoderError, build_decoder, count_parameters
from deeploc.models.encoders import FeatureSpec
from deeploc.testing import SAM2_SPECS, DecoderContract
from deeploc.testing import sam2_conv as conv

# protocol.md: params CONV-4/12/20 per feature (~1.0 / 2.1 / 3.1 M; ~0.05 / 0.26 / 0.46 M; ~0.10 / 0.31 / 0.51 M).
EXPECTED_MILLIONS = {
    ("image_embed", 4): 1.0,
    ("image_embed", 12): 2.1,
    ("image_embed", 20): 3.1,
    ("high_res_feats_0", 4): 0.05,
    ("high_res_feats_0", 12): 0.26,
    ("high_res_feats_0", 20): 0.46,
    ("high_res_feats_1", 4): 0.10,
    ("high_res_feats_1", 12): 0.31,
    ("high_res_feats_1", 20): 0.51,
}
# DeCLIP on CLIP ViT-L/14 (1024 x 16 x 16 tokens, logits 256 x 256): ~17.4 / 34.8 / 52.2 M (issue 14).
CLIP_SPECS = {"layer20": FeatureSpec(1024, 14)}
CLIP_TARGET_STRIDE = 14 / 16
DECLIP_MILLIONS = {4: 17.4, 12: 34.8, 20: 52.2}


def _conv5(c_in: int, c_out: int) -> int:
    return c_in * c_out * 25 + c_out


class TestConvContract(DecoderContract):
    name = "conv"
    options: ClassVar[dict] = {"inputs": "image_embed", "depth": 4}


class TestConvOnHighResContract(DecoderContract):
    name = "conv"
    options: ClassVar[dict] = {"inputs": "high_res_feats_0", "depth": 12}


class TestLinearContract(DecoderContract):
    name = "linear"
    options: ClassVar[dict] = {"inputs": "high_res_feats_1"}


class TestFusionContract(DecoderContract):
    name = "fusion"
    options: ClassVar[dict] = {"depth": 4, "width": 16}


@pytest.mark.parametrize(("feature", "depth"), sorted(EXPECTED_MILLIONS))
def test_parameter_counts_match_the_study(feature: str, depth: int) -> None:
    assert count_parameters(conv(feature, depth)) / 1e6 == pytest.approx(EXPECTED_MILLIONS[feature, depth], abs=0.05)


@pytest.mark.parametrize("depth", sorted(DECLIP_MILLIONS))
def test_conv_on_clip_has_declips_layout_and_parameter_counts(depth: int) -> None:
    decoder = build_decoder("conv", CLIP_SPECS, CLIP_TARGET_STRIDE, inputs="layer20", depth=depth)
    assert count_parameters(decoder) / 1e6 == pytest.approx(DECLIP_MILLIONS[depth], abs=0.05)
    widths = [m.out_channels for m in decoder.body if isinstance(m, torch.nn.Conv2d)][:: depth // 4]
    assert widths == [512, 256, 128, 64]
    with torch.no_grad():
        assert decoder.eval()({"layer20": torch.randn(1, 1024, 16, 16)}).shape == (1, 1, 256, 256)


def test_conv4_image_embed_exact_count() -> None:
    # conv 256->128 + BN, conv 128->64 + BN, head 64->1.
    expected = _conv5(256, 128) + 2 * 128 + _conv5(128, 64) + 2 * 64 + _conv5(64, 1)
    assert count_parameters(conv("image_embed", 4)) == expected


def test_fusion_exact_count() -> None:
    # lateral 1x1 convs to width 64 (256, 32, 64 channels in), one 5x5 block at 64 (+BN), head 64->1.
    laterals = (256 + 32 + 64) * 64 + 3 * 64
    expected = laterals + _conv5(64, 64) + 2 * 64 + _conv5(64, 1)
    assert count_parameters(build_decoder("fusion", SAM2_SPECS, 4.0, depth=4)) == expected


@pytest.mark.parametrize("feature", ["image_embed", "high_res_feats_0", "high_res_feats_1"])
def test_output_is_stride_4_of_a_1024_input(feature: str) -> None:
    spec = SAM2_SPECS[feature]
    side = 1024 // int(spec.stride)
    with torch.no_grad():
        out = conv(feature, 4).eval()(torch.randn(1, spec.channels, side, side))
    assert out.shape == (1, 1, 256, 256)


def test_number_of_convolutions_is_n_for_four_stages_and_fewer_here() -> None:
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in conv("image_embed", 12).modules())
    assert convs == 2 * 3 + 1  # 2 stages x 3 blocks + head


def test_init_is_normal_002_with_zero_bias() -> None:
    torch.manual_seed(0)
    decoder = conv("image_embed", 20)
    assert decoder.body[0].weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.count_nonzero(decoder.body[0].bias) == 0


def test_old_single_tensor_call_still_works_for_single_map_decoders() -> None:
    decoder = conv("high_res_feats_1", 4).eval()
    maps = torch.randn(1, 64, 8, 8)
    assert torch.equal(decoder(maps), decoder({"high_res_feats_1": maps}))
    with pytest.raises(DecoderError, match="pass a dict of maps"):
        build_decoder("fusion", SAM2_SPECS, 4.0)(maps)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("conv", {"inputs": "image_embed", "depth": 6}, "multiple of 4"),
        ("conv", {"depth": 4}, "reads exactly 1 map"),
        ("linear", {"inputs": ["image_embed", "high_res_feats_0"]}, "reads exactly 1 map"),
        ("conv", {"inputs": "image_embed", "depth": 4, "widht": 3}, "unexpected keyword argument 'widht'"),
        ("fusion", {"width": 0}, "width must be a positive integer"),
    ],
)
def test_bad_decoder_settings_name_the_problem(name: str, options: dict, message: str) -> None:
    with pytest.raises(DecoderError, match=message):
        build_decoder(name, SAM2_SPECS, 4.0, **options)


def test_a_stride_that_is_not_a_power_of_two_away_is_refused() -> None:
    with pytest.raises(DecoderError, match="not a power-of-two multiple"):
        build_decoder("conv", {"odd": FeatureSpec(8, 12)}, 4.0, inputs="odd", depth=4)


def test_unknown_decoder_name_lists_the_registered_ones_and_how_to_register() -> None:
    with pytest.raises(KeyError, match=r"unknown decoder 'unet'; registered decoders: \['conv', 'fusion', 'linear'"):
        DECODERS.get("unet")
