"""CONV-N decoders: the study's layouts, output shapes and parameter counts."""

from __future__ import annotations

import pytest
import torch

from deeploc.features_spec import feature_shape
from deeploc.models.decoders import ConvDecoder, count_parameters

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


def _conv5(c_in: int, c_out: int) -> int:
    return c_in * c_out * 25 + c_out


@pytest.mark.parametrize(("feature", "depth"), sorted(EXPECTED_MILLIONS))
def test_parameter_counts_match_the_study(feature: str, depth: int) -> None:
    params = count_parameters(ConvDecoder(feature, depth))
    assert params / 1e6 == pytest.approx(EXPECTED_MILLIONS[feature, depth], abs=0.05)


def test_conv4_image_embed_exact_count() -> None:
    # conv 256->128 + BN, conv 128->64 + BN, head 64->1.
    expected = _conv5(256, 128) + 2 * 128 + _conv5(128, 64) + 2 * 64 + _conv5(64, 1)
    assert count_parameters(ConvDecoder("image_embed", 4)) == expected


SHAPE_CASES = [(f, d, 256) for f in ("image_embed", "high_res_feats_0", "high_res_feats_1") for d in (4, 12, 20)]
# Output shape does not depend on depth, so the costly 1024 input is checked at CONV-4 only.
SHAPE_CASES += [(f, 4, 1024) for f in ("image_embed", "high_res_feats_0", "high_res_feats_1")]


@pytest.mark.parametrize(("feature", "depth", "image_size"), SHAPE_CASES)
def test_output_is_stride_4_of_the_encoder_input(feature: str, depth: int, image_size: int) -> None:
    decoder = ConvDecoder(feature, depth).eval()
    c, h, w = feature_shape(feature, image_size)
    with torch.no_grad():
        out = decoder(torch.randn(1, c, h, w))
    assert out.shape == (1, 1, image_size // 4, image_size // 4)


def test_number_of_convolutions_is_n_for_four_stages_and_fewer_here() -> None:
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in ConvDecoder("image_embed", 12).modules())
    assert convs == 2 * 3 + 1  # 2 stages x 3 blocks + head


def test_init_is_normal_002_with_zero_bias() -> None:
    torch.manual_seed(0)
    decoder = ConvDecoder("image_embed", 20)
    weight = decoder.body[0].weight
    assert weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.count_nonzero(decoder.body[0].bias) == 0


@pytest.mark.parametrize(
    ("feature", "depth", "message"), [("clip", 4, "unknown feature"), ("image_embed", 6, "multiple of 4")]
)
def test_bad_decoder_settings(feature: str, depth: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ConvDecoder(feature, depth)


def test_wrong_feature_map_is_refused() -> None:
    with pytest.raises(ValueError, match="expects B x 64"):
        ConvDecoder("high_res_feats_1", 4)(torch.randn(1, 32, 8, 8))
