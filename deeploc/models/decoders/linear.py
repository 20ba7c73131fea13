"""The linear probe: one 1x1 convolution on one map, its logits upsampled bilinearly to the target stride.

The cheapest decoder that reads a map at all: it measures how linearly separable manipulated pixels are in that
map, the usual first question about a frozen backbone's features.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deeploc.models.decoders.base import DECODERS, Decoder, upsample_steps
from deeploc.models.encoders.base import FeatureSpec


@DECODERS.register("linear")
class LinearProbe(Decoder):
    """1x1 conv ``C -> 1`` on ``inputs``, then a bilinear resize by ``stride / target_stride``.

    Args:
        init_std: std of the normal initialisation of the weights (DeCLIP: 0.02).
    """

    n_inputs = 1

    def __init__(
        self,
        feature_specs: Mapping[str, FeatureSpec | Sequence[float]],
        target_stride: float = 4.0,
        inputs: str | Sequence[str] | None = None,
        init_std: float = 0.02,
    ) -> None:
        super().__init__(feature_specs, target_stride, inputs)
        (name,) = self.inputs
        spec = self.in_specs[name]
        self.scale = 2 ** upsample_steps(spec.stride, self.target_stride, f"linear probe on {name}")
        self.proj = nn.Conv2d(spec.channels, 1, kernel_size=1)
        self.init_weights(init_std)

    def decode(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.proj(features[self.inputs[0]])
        if self.scale == 1:
            return logits
        return F.interpolate(logits, scale_factor=self.scale, mode="bilinear", align_corners=False)
