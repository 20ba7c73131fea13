"""The three SAM2 feature maps the study decodes: names, channels and strides.

One table shared by the encoder, the feature store, the decoder factory and export metadata, so no module
re-derives shapes on its own.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FeatureInfo:
    """Channels and stride (relative to the encoder input) of one SAM2 feature map."""

    name: str
    channels: int
    stride: int


FEATURES: dict[str, FeatureInfo] = {
    "image_embed": FeatureInfo("image_embed", 256, 16),
    "high_res_feats_0": FeatureInfo("high_res_feats_0", 32, 4),
    "high_res_feats_1": FeatureInfo("high_res_feats_1", 64, 8),
}


def feature_info(name: str) -> FeatureInfo:
    """Look up a feature map by name, failing with the valid names."""
    try:
        return FEATURES[name]
    except KeyError:
        raise ValueError(f"unknown feature {name!r}; choose one of {sorted(FEATURES)}") from None


def feature_shape(name: str, image_size: int) -> tuple[int, int, int]:
    """(C, H, W) of feature `name` for a square encoder input of `image_size` pixels."""
    info = feature_info(name)
    side = image_size // info.stride
    return (info.channels, side, side)
