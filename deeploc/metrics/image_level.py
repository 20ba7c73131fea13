"""The image-level score a localizer's map gives (detection, deeploc-predict)."""

from __future__ import annotations

import math
from typing import Any

import torch

TOP_FRACTION = 0.01
IMAGE_SCORE = "mean of the top 1% of the per-pixel manipulation probabilities (at least one pixel)"


def image_score(probs: torch.Tensor | Any, top_fraction: float = TOP_FRACTION) -> float:
    """Mean of the top ``top_fraction`` of the probabilities (at least one value): the image-level score that
    detection and deeploc-predict use."""
    flat = torch.as_tensor(probs).reshape(-1).float()
    k = max(1, math.ceil(top_fraction * flat.numel()))
    return float(flat.topk(k).values.mean())
