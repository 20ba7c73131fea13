"""Pictures of predictions: probability heatmaps, tinted overlays with outlines, side-by-side panels."""

from __future__ import annotations

import cv2
import numpy as np
from matplotlib import colormaps

TINT = np.array([255, 32, 32], dtype=np.float32)  # red, RGB


def heatmap(prob: np.ndarray) -> np.ndarray:
    """``H x W`` probabilities in [0, 1] -> ``H x W x 3`` uint8 RGB (inferno colour map)."""
    rgba = colormaps["inferno"](np.clip(prob, 0.0, 1.0))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def overlay(
    image: np.ndarray, mask: np.ndarray, alpha: float = 0.45, outline: tuple[int, int, int] = (255, 255, 0)
) -> np.ndarray:
    """Tint the pixels where ``mask`` is true and outline the region; ``image`` is ``H x W x 3`` uint8 RGB."""
    out = image.astype(np.float32)
    region = mask.astype(bool)
    out[region] = (1 - alpha) * out[region] + alpha * TINT
    out = out.round().astype(np.uint8)
    contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    thickness = max(1, round(min(image.shape[:2]) / 256))
    cv2.drawContours(out, contours, -1, outline, thickness)
    return out


def panel(image: np.ndarray, prob: np.ndarray, truth: np.ndarray | None = None, threshold: float = 0.5) -> np.ndarray:
    """Image | predicted overlay | heatmap [| true mask overlay], side by side (all at the image's size)."""
    tiles = [image, overlay(image, prob > threshold), heatmap(prob)]
    if truth is not None:
        tiles.append(overlay(image, truth > 0.5, outline=(0, 255, 0)))
    return np.concatenate(tiles, axis=1)
