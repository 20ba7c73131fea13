"""DeCLIP's CONV-N decoder, its layout derived from the map it reads (the study's decoder on any backbone).

A decoder is a list of stages; a stage is one block ``c_in -> c_out`` followed by ``N/4 - 1`` blocks
``c_out -> c_out`` (block = Conv2d 5x5 pad 2 -> BatchNorm2d -> ReLU), then optionally a x2 bilinear upsample; a
5x5 conv head maps the last stage's channels to one logit per pixel (shared/reference/protocol.md).

The layout follows from the map's spec: ``k = log2(stride / target_stride)`` x2 upsamplings reach the target
stride, one per stage, so there are ``max(1, k)`` stages; each halves the channels, never below ``min_channels``
(64). On SAM2 (target stride 4) this gives the study's layouts: image_embed 256 -> 128 -> 64 (two upsamplings),
high_res_feats_1 64 -> 64 (one), high_res_feats_0 32 -> 64 (none); on CLIP ViT-L/14 (1024 channels, stride 14,
target 14/16) DeCLIP's 1024 -> 512 -> 256 -> 128 -> 64 with four.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from deeploc.models.decoders.base import DECODERS, Decoder, DecoderError, conv_block, upsample_steps
from deeploc.models.encoders.base import FeatureSpec


@DECODERS.register("conv")
class ConvDecoder(Decoder):
    """CONV-``depth`` on one map (``inputs``).

    Args:
        depth: N of CONV-N, a positive multiple of 4 (the study uses 4, 12, 20); N/4 blocks per stage.
        min_channels: the narrowest stage (DeCLIP and the study: 64).
        init_std: std of the normal initialisation of conv weights (DeCLIP: 0.02).
    """

    n_inputs = 1

    def __init__(
        self,
        feature_specs: Mapping[str, FeatureSpec | Sequence[float]],
        target_stride: float = 4.0,
        inputs: str | Sequence[str] | None = None,
        depth: int = 20,
        min_channels: int = 64,
        init_std: float = 0.02,
    ) -> None:
        super().__init__(feature_specs, target_stride, inputs)
        if not isinstance(depth, int) or depth <= 0 or depth % 4:
            raise DecoderError(
                f"decoder depth must be a positive multiple of 4 (CONV-4, CONV-12, CONV-20), got {depth!r}"
            )
        self.depth = depth
        (name,) = self.inputs
        spec = self.in_specs[name]
        steps = upsample_steps(spec.stride, self.target_stride, f"CONV-{depth} on {name}")
        layers: list[nn.Module] = []
        c_in = spec.channels
        for stage in range(max(1, steps)):
            c_out = max(min_channels, c_in // 2)
            layers += conv_block(c_in, c_out)
            for _ in range(depth // 4 - 1):
                layers += conv_block(c_out, c_out)
            if stage < steps:
                layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(c_in, 1, kernel_size=5, padding=2)
        self.init_weights(init_std)

    @classmethod
    def label_for(cls, options: Mapping[str, Any]) -> str:
        return f"conv{options['depth']}"

    def decode(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.body(features[self.inputs[0]]))
