"""Pictures of predictions that explain themselves: probability heatmaps with their labelled colour bar, tinted
overlays with outlines, the true region as an outline (a tint vanishes on reddish faces), side-by-side panels with a
title above each tile (image | prediction | probability | truth) and a header naming the image, and the figure helpers
every report and evaluation figure uses (a figure with its own canvas, a wrapped caption, saving)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
from matplotlib import colormaps

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TINT = np.array([255, 32, 32], dtype=np.float32)  # red, RGB
WHITE = (255, 255, 255)
INK = (20, 20, 20)
FONT = cv2.FONT_HERSHEY_SIMPLEX
PANEL_TITLES = ("image", "prediction", "probability", "truth")
COLORBAR_LABEL = "P(manipulated)"


def heatmap(prob: np.ndarray) -> np.ndarray:
    """``H x W`` probabilities in [0, 1] -> ``H x W x 3`` uint8 RGB (inferno colour map)."""
    rgba = colormaps["inferno"](np.clip(prob, 0.0, 1.0))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def _font_scale(pixels: int) -> float:
    """A Hershey font scale whose text is about ``pixels`` high."""
    return max(0.25, pixels / 22.0)


def colorbar(height: int) -> np.ndarray:
    """The key of :func:`heatmap` for a map ``height`` pixels high: ``height x w x 3`` uint8 RGB on white, the
    inferno ramp from probability 1 (top) to 0 (bottom), ticks labelled 1, 0.5 and 0 at their values, and what the
    colours mean (:data:`COLORBAR_LABEL`) written upwards on the right."""
    text = max(8, min(24, height // 16))
    scale, thick = _font_scale(text), 1
    label_w = max(cv2.getTextSize(s, FONT, scale, thick)[0][0] for s in ("0", "0.5", "1"))
    margin = max(2, text // 3)
    ramp_w = max(6, text)
    top, bottom = margin + text // 2, height - margin - text // 2
    bar = np.full((height, margin + ramp_w + 3 * margin + label_w + margin, 3), 255, dtype=np.uint8)
    # The label runs along the bar: drawn on a horizontal strip as long as the bar is high, then turned upwards.
    label = np.rot90(title_bar(height, COLORBAR_LABEL, text + margin))
    bar = np.concatenate([bar, label], axis=1)
    if bottom <= top:
        return bar
    values = np.linspace(1.0, 0.0, bottom - top)[:, None].repeat(ramp_w, axis=1)
    bar[top:bottom, margin : margin + ramp_w] = heatmap(values)
    for value, label in ((1.0, "1"), (0.5, "0.5"), (0.0, "0")):
        y = round(top + (1.0 - value) * (bottom - top - 1))
        x = margin + ramp_w
        cv2.line(bar, (x, y), (x + margin - 1, y), INK, 1)
        # Apart from the tick, so that "1" never reads as "-1".
        cv2.putText(bar, label, (x + 3 * margin, y + text // 2), FONT, scale, INK, thick, cv2.LINE_AA)
    return bar


def with_colorbar(rgb: np.ndarray) -> np.ndarray:
    """A :func:`heatmap` with its :func:`colorbar` on the right: ``H x (W + bar) x 3``; the first ``W`` columns are
    ``rgb`` unchanged."""
    return np.concatenate([rgb, colorbar(rgb.shape[0])], axis=1)


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


def outline(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = (0, 255, 0)) -> np.ndarray:
    """``image`` (``H x W x 3`` uint8 RGB) with the border of the region where ``mask`` is true drawn in ``colour``
    over a dark line, so that it shows on any image; the pixels inside are left as they are."""
    out = np.ascontiguousarray(image, dtype=np.uint8).copy()
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    thickness = max(1, round(min(image.shape[:2]) / 128))
    cv2.drawContours(out, contours, -1, INK, thickness + 2)
    cv2.drawContours(out, contours, -1, colour, thickness)
    return out


def title_height(width: int) -> int:
    """The height of the title strip above a tile ``width`` pixels wide."""
    return max(14, min(40, width // 8))


def title_bar(width: int, title: str, height: int | None = None) -> np.ndarray:
    """A white strip ``width`` pixels wide (``height``: :func:`title_height`) with ``title`` centred in dark ink,
    shrunk to fit the width."""
    height = height or title_height(width)
    scale = _font_scale(height * 0.55)
    text_w = cv2.getTextSize(title, FONT, scale, 1)[0][0]
    if text_w > width * 0.95:
        scale *= width * 0.95 / text_w
        text_w = cv2.getTextSize(title, FONT, scale, 1)[0][0]
    strip = np.full((height, width, 3), 255, dtype=np.uint8)
    text_h = cv2.getTextSize(title, FONT, scale, 1)[0][1]
    origin = ((width - text_w) // 2, (height + text_h) // 2)
    cv2.putText(strip, title, origin, FONT, scale, INK, 1, cv2.LINE_AA)
    return strip


def panel(
    image: np.ndarray,
    prob: np.ndarray,
    truth: np.ndarray | None = None,
    threshold: float = 0.5,
    header: str | None = None,
) -> np.ndarray:
    """Image | predicted overlay (``prob > threshold``) | heatmap with its colour bar [| the true region outlined],
    side by side at the image's size, each tile titled (:data:`PANEL_TITLES`) and separated by a thin white gap;
    ``header`` (e.g. the image's name, subset and IoU) in a strip across the top."""
    tiles = [image, overlay(image, prob > threshold), with_colorbar(heatmap(prob))]
    if truth is not None:
        tiles.append(outline(image, truth > 0.5))
    strip = title_height(image.shape[1])
    titled = [np.concatenate([title_bar(t.shape[1], name, strip), t], axis=0) for t, name in zip(tiles, PANEL_TITLES)]
    gap = np.full((titled[0].shape[0], max(2, image.shape[1] // 64), 3), 255, dtype=np.uint8)
    row: list[np.ndarray] = []
    for tile in titled:
        row += [gap, tile] if row else [tile]
    out = np.concatenate(row, axis=1)
    if header is None:
        return out
    return np.concatenate([title_bar(out.shape[1], header, max(16, strip)), out], axis=0)


CAPTION_SIZE = 7.5


def save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG at the resolution every deeploc figure uses."""
    fig.savefig(path, dpi=110)
    return path


def new_figure(width: float, height: float) -> Figure:
    """A matplotlib figure with its own Agg canvas (no pyplot state shared between threads or runs)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def add_caption(fig: Figure, caption: str, note: str = "") -> None:
    """Wrap `caption` (and a red `note` above it) under the axes, growing the figure to make room."""
    width_in, height_in = fig.get_size_inches()
    chars = max(40, int(width_in * 15))
    blocks = [(textwrap.fill(note, chars), "darkred")] if note else []
    blocks += [("\n".join(textwrap.fill(p, chars) for p in caption.split("\n")), "black")]
    lines = sum(text.count("\n") + 1 for text, _ in blocks)
    extra = 0.16 * lines + 0.15  # inches of caption
    fig.set_size_inches(width_in, height_in + extra)
    fraction = extra / (height_in + extra)
    fig.tight_layout(rect=(0, fraction, 1, 1))
    y = 0.02 / (height_in + extra)
    for text, colour in reversed(blocks):
        fig.text(0.01, y, text, fontsize=CAPTION_SIZE, color=colour, ha="left", va="bottom")
        y += (0.16 * (text.count("\n") + 1) + 0.04) / (height_in + extra)
