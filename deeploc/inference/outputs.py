"""deeploc-predict's outputs: per image a heatmap, a mask, an overlay (and the probabilities), and the run's
summary.json and summary.csv. Every file is at the input image's native size (heatmaps: plus their colour bar)."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from deeploc.data.images import encode_png
from deeploc.metrics import IMAGE_SCORE
from deeploc.visualize import heatmap, overlay, with_colorbar

__all__ = ["ImageResult", "PredictionSummary", "output_names", "write_outputs", "write_result", "write_summary"]


RESIZE_POLICY = (
    "whole image resized (bilinear, antialiased, aspect ratio not kept) to the encoder's square input; "
    "probabilities resized back bilinearly to the native size"
)
CSV_FIELDS = (
    "image",
    "status",
    "width",
    "height",
    "manipulated_fraction",
    "max_score",
    "mean_score",
    "image_score",
    "heatmap",
    "mask",
    "overlay",
    "probs",
    "reason",
)


@dataclass
class ImageResult:
    """One input file: its scores and output files, or why it was skipped."""

    image: str
    status: str = "ok"  # "ok" | "skipped"
    width: int | None = None
    height: int | None = None
    manipulated_fraction: float | None = None
    max_score: float | None = None
    mean_score: float | None = None
    image_score: float | None = None
    heatmap: str | None = None
    mask: str | None = None
    overlay: str | None = None
    probs: str | None = None
    reason: str | None = None
    explicit: bool = field(default=False, repr=False)


@dataclass
class PredictionSummary:
    """All results of one run, and where the summary files were written."""

    results: list[ImageResult]
    json_path: Path | None = None
    csv_path: Path | None = None

    @property
    def predicted(self) -> list[ImageResult]:
        return [r for r in self.results if r.status == "ok"]

    @property
    def skipped(self) -> list[ImageResult]:
        return [r for r in self.results if r.status != "ok"]


def output_names(paths: Sequence[Path]) -> list[str]:
    """Unique output names: the file stem; ``stem-ext`` for stems shared by several inputs; then ``-2``, ``-3``."""
    stems: dict[str, int] = {}
    for path in paths:
        stems[path.stem] = stems.get(path.stem, 0) + 1
    names: list[str] = []
    used: set[str] = set()
    for path in paths:
        name = path.stem if stems[path.stem] == 1 else f"{path.stem}-{path.suffix.lstrip('.').lower() or 'file'}"
        unique, n = name, 2
        while unique in used:
            unique, n = f"{name}-{n}", n + 1
        used.add(unique)
        names.append(unique)
    return names


def _write_png(path: Path, rgb_or_gray: np.ndarray) -> None:
    path.write_bytes(encode_png(rgb_or_gray if rgb_or_gray.ndim == 2 else cv2.cvtColor(rgb_or_gray, cv2.COLOR_RGB2BGR)))


def write_outputs(
    image: np.ndarray, probs: np.ndarray, out_dir: Path, name: str, threshold: float, save_probs: bool
) -> dict[str, str]:
    """Write one image's heatmap, mask and overlay (and with ``save_probs`` its probabilities) under ``out_dir``;
    return their paths relative to ``out_dir``, by kind."""
    mask = probs > threshold  # strict, as deeploc.metrics
    files = {
        "heatmap": Path("heatmaps") / f"{name}.png",
        "mask": Path("masks") / f"{name}.png",
        "overlay": Path("overlays") / f"{name}.png",
    }
    _write_png(out_dir / files["heatmap"], with_colorbar(heatmap(probs)))
    _write_png(out_dir / files["mask"], mask.astype(np.uint8) * 255)
    _write_png(out_dir / files["overlay"], overlay(image, mask))
    if save_probs:
        files["probs"] = Path("probs") / f"{name}.npy"
        np.save(out_dir / files["probs"], probs.astype(np.float32))
    return {k: v.as_posix() for k, v in files.items()}


def write_result(
    res: ImageResult, image: np.ndarray, probs: np.ndarray, out: Path, name: str, threshold: float, save: bool
) -> ImageResult:
    """:func:`write_outputs` into ``res``; a file that cannot be written skips this image with the reason."""
    try:
        res.__dict__.update(write_outputs(image, probs, out, name, threshold, save))
    except OSError as exc:
        res.status, res.reason = "skipped", f"cannot write outputs: {exc}"
    return res


def write_summary(
    summary: PredictionSummary, out: Path, threshold: float, model_info: dict[str, Any] | None = None
) -> tuple[Path, Path]:
    """``summary.json`` (settings + one record per file) and ``summary.csv`` (one row per file)."""
    from deeploc.inference.export import deeploc_version

    rows = [{k: v for k, v in asdict(r).items() if k != "explicit"} for r in summary.results]
    payload = {
        "deeploc_version": deeploc_version(),
        "model": model_info,
        "threshold": threshold,
        "mask_convention": "255 = manipulated (prob > threshold), 0 = real",
        "image_score": IMAGE_SCORE,
        "resize_policy": RESIZE_POLICY,
        "counts": {"predicted": len(summary.predicted), "skipped": len(summary.skipped)},
        "images": rows,
    }
    json_path = out / "summary.json"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    csv_path = out / "summary.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row[k] is None else row[k]) for k in CSV_FIELDS})
    return json_path, csv_path
