"""The fusion decoder: every map of the encoder at once (the study decoded each SAM2 map on its own).

FPN-style: a lateral 1x1 convolution takes each input map to a common ``width``, each is resized bilinearly to
the target stride (SAM2: stride 4, 256 x 256 for a 1024 input) and the results are summed; then CONV-N's blocks
refine the sum (``depth / 4`` blocks of Conv 5x5 -> BN -> ReLU at ``width`` channels) and a 5x5 head gives one
logit per pixel. Design and parameter counts: docs/decoders.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deeploc.models.decoders.base import DECODERS, Decoder, DecoderError, conv_block, upsample_steps
from deeploc.models.encoders.base import FeatureSpec


@DECODERS.register("fusion")
class FusionDecoder(Decoder):
    """Lateral 1x1 convs to ``width`` at the target stride, summed, then ``depth / 4`` CONV blocks and a head.

    Args:
        inputs: the maps to fuse; None = every map of the encoder.
        depth: N of CONV-N, a positive multiple of 4; N/4 blocks after the fusion.
        width: channels of the laterals and the blocks.
        init_std: std of the normal initialisation of conv weights (DeCLIP: 0.02).
    """

    def __init__(
        self,
        feature_specs: Mapping[str, FeatureSpec | Sequence[float]],
        target_stride: float = 4.0,
        inputs: str | Sequence[str] | None = None,
        depth: int = 4,
        width: int = 64,
        init_std: float = 0.02,
    ) -> None:
        super().__init__(feature_specs, target_stride, inputs)
        if not isinstance(depth, int) or depth <= 0 or depth % 4:
            raise DecoderError(f"fusion decoder depth must be a positive multiple of 4, got {depth!r}")
        if not isinstance(width, int) or width < 1:
            raise DecoderError(f"fusion decoder width must be a positive integer, got {width!r}")
        self.depth = depth
        self.scales = {
            name: 2 ** upsample_steps(spec.stride, self.target_stride, f"fusion of {name}")
            for name, spec in self.in_specs.items()
        }
        self.laterals = nn.ModuleDict(
            {name: nn.Conv2d(spec.channels, width, kernel_size=1) for name, spec in self.in_specs.items()}
        )
        blocks: list[nn.Module] = []
        for _ in range(depth // 4):
            blocks += conv_block(width, width)
        self.body = nn.Sequential(*blocks)
        self.head = nn.Conv2d(width, 1, kernel_size=5, padding=2)
        self.init_weights(init_std)

    @classmethod
    def label_for(cls, options: Mapping[str, Any]) -> str:
        return f"fusion{options['depth']}"

    def decode(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        fused = None
        for name in self.inputs:
            lateral = self.laterals[name](features[name])
            if self.scales[name] != 1:
                lateral = F.interpolate(lateral, scale_factor=self.scales[name], mode="bilinear", align_corners=False)
            fused = lateral if fused is None else fused + lateral
        return self.head(self.body(fused))
