"""The DeCLIP-style CONV-N decoder, one implementation parametrised by a layout table per SAM2 feature map.

A decoder is a list of stages; a stage is one block ``c_in -> c_out`` followed by ``N/4 - 1`` blocks
``c_out -> c_out`` (block = Conv2d 5x5 pad 2 -> BatchNorm2d -> ReLU), then optionally a x2 bilinear upsample.
A 5x5 conv head maps the last stage's channels to one logit per pixel. Layouts follow the study so that a
1024 input gives 256x256 logits (stride 4) for every feature map (shared/reference/protocol.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deeploc.features_spec import feature_info


@dataclass(frozen=True)
class Stage:
    """One decoder stage: channels in and out, and whether it ends with a x2 upsample."""

    c_in: int
    c_out: int
    upsample: bool


LAYOUTS: dict[str, tuple[Stage, ...]] = {
    # 64x64 -> 128 -> 256 at a 1024 input.
    "image_embed": (Stage(256, 128, True), Stage(128, 64, True)),
    # Already at stride 4.
    "high_res_feats_0": (Stage(32, 64, False),),
    # Stride 8 -> one x2 resize to stride 4.
    "high_res_feats_1": (Stage(64, 64, True),),
}

OUTPUT_STRIDE = 4


def _block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel_size=5, padding=2), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class ConvDecoder(nn.Module):
    """CONV-``depth`` decoder for SAM2 feature map ``feature``: ``B x C x h x w`` -> ``B x 1 x H x W`` logits.

    Args:
        feature: ``image_embed``, ``high_res_feats_0`` or ``high_res_feats_1``.
        depth: N of CONV-N, a positive multiple of 4 (the study uses 4, 12, 20); N/4 blocks per stage.
        init_std: std of the normal initialisation of conv weights (DeCLIP: 0.02).
    """

    def __init__(self, feature: str, depth: int = 20, init_std: float = 0.02) -> None:
        super().__init__()
        if depth <= 0 or depth % 4:
            raise ValueError(f"decoder depth must be a positive multiple of 4 (CONV-4, CONV-12, CONV-20), got {depth}")
        info = feature_info(feature)
        self.feature = feature
        self.depth = depth
        self.in_channels = info.channels
        self.output_stride = OUTPUT_STRIDE
        blocks_per_stage = depth // 4
        layers: list[nn.Module] = []
        for stage in LAYOUTS[feature]:
            layers += _block(stage.c_in, stage.c_out)
            for _ in range(blocks_per_stage - 1):
                layers += _block(stage.c_out, stage.c_out)
            if stage.upsample:
                layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(LAYOUTS[feature][-1].c_out, 1, kernel_size=5, padding=2)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, init_std)
                nn.init.zeros_(module.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 4 or features.shape[1] != self.in_channels:
            raise ValueError(
                f"{self.feature} decoder expects B x {self.in_channels} x h x w features, got {tuple(features.shape)}"
            )
        return self.head(self.body(features))


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
