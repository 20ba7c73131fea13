"""Files that let a test be re-read and re-scored without the model: every image's scores (CSV) and, when kept, every
image's probability map and mask (``.npz``). :func:`rescore` scores saved maps in any convention exactly as the test
did (the per-image scores depend on nothing else; means are summed in dataset order).

Layout, in a run directory or a deeploc-eval output folder: ``scores/<subset>.csv`` and ``predictions/<subset>.npz``.
An ``.npz`` holds ``index`` (N dataset positions), ``names`` (N), ``shapes`` (N x 2), ``probs`` (every map
flattened and concatenated, in ``dtype``), ``masks`` (the masks likewise, as ``np.packbits``), ``dtype``.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deeploc.errors import DeeplocError
from deeploc.io import atomic_file
from deeploc.metrics.aggregate import LocalizationMetrics

PREDICTION_DTYPES = ("float32", "float16", "uint8")
SCORES_DIR = "scores"
PREDICTIONS_DIR = "predictions"
RESCORE_BATCH = 64


class PredictionsError(DeeplocError):
    """Saved predictions are missing or unreadable."""


def write_per_image(path: Path, columns: Mapping[str, torch.Tensor], names: Sequence[str] | None = None) -> Path:
    """One CSV row per image: ``index``, ``name`` (when known), then every ``<metric>[<convention>]`` column."""
    path.parent.mkdir(parents=True, exist_ok=True)
    index = columns["index"].tolist()
    keys = [k for k in columns if k != "index"]
    with atomic_file(path, "w") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "name", *keys])
        for row, i in enumerate(index):
            name = names[i] if names is not None and 0 <= i < len(names) else ""
            writer.writerow([i, name, *(repr(float(columns[k][row])) for k in keys)])
    return path


def save_predictions(
    path: Path, predictions: Mapping[str, Any], dtype: str = "float32", names: Sequence[str] | None = None
) -> Path:
    """Write :meth:`LocalizationMetrics.predictions` to ``path`` (compressed ``.npz``); ``dtype`` float32 keeps the
    maps exactly, float16 and uint8 (``round(255 p)``) are 2x and 4x smaller and rescore approximately."""
    if dtype not in PREDICTION_DTYPES:
        raise PredictionsError(f"eval.prediction_dtype={dtype!r} is not one of {PREDICTION_DTYPES}")
    probs = [p.detach().cpu().reshape(-1) for p in predictions["probs"]]
    flat = torch.cat(probs).numpy() if probs else np.zeros(0, np.float32)
    flat = np.round(flat * 255).astype(np.uint8) if dtype == "uint8" else flat.astype(dtype)
    masks = [m.detach().cpu().reshape(-1).numpy() for m in predictions["masks"]]
    index = predictions["index"].cpu().numpy()
    image_names = np.array([names[i] if names is not None and 0 <= i < len(names) else "" for i in index.tolist()])
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "wb") as handle:
        np.savez_compressed(
            handle,
            index=index,
            names=image_names,
            shapes=predictions["shapes"].cpu().numpy(),
            probs=flat,
            masks=np.packbits(np.concatenate(masks) if masks else np.zeros(0, bool)),
            dtype=np.array(dtype),
        )
    return path


def load_predictions(path: Path) -> dict[str, Any]:
    """The maps and masks of a :func:`save_predictions` file: ``index``, ``names``, ``probs`` and ``masks`` (lists of
    HxW float32 / bool tensors), ``dtype``."""
    try:
        data = np.load(path, allow_pickle=False)
        shapes = data["shapes"]
        sizes = (shapes[:, 0] * shapes[:, 1]).astype(np.int64)
        flat, dtype = data["probs"], str(data["dtype"])
        probs = flat.astype(np.float32) / np.float32(255) if dtype == "uint8" else flat.astype(np.float32)
        masks = np.unpackbits(data["masks"], count=int(sizes.sum())).astype(bool)
        index, names = data["index"], data["names"]
    except (OSError, KeyError, ValueError) as exc:
        raise PredictionsError(f"{path}: not a deeploc predictions file ({exc}); re-test to write it again") from None
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    out_probs, out_masks = [], []
    for k, (h, w) in enumerate(shapes.tolist()):
        out_probs.append(torch.from_numpy(probs[bounds[k] : bounds[k + 1]].reshape(h, w).copy()))
        out_masks.append(torch.from_numpy(masks[bounds[k] : bounds[k + 1]].reshape(h, w).copy()))
    return {
        "index": torch.from_numpy(index),
        "names": names.tolist(),
        "probs": out_probs,
        "masks": out_masks,
        "dtype": dtype,
    }


def rescore(
    predictions: Mapping[str, Any],
    conventions: Sequence[str],
    chosen: Mapping[str, Mapping[str, float]] | None = None,
    threshold: float = 0.5,
) -> LocalizationMetrics:
    """A :class:`LocalizationMetrics` in ``conventions`` filled with saved maps (images of one size batched together):
    its ``compute_all`` and ``per_image`` are the test's, bit for bit, when the maps were saved as float32."""
    metric = LocalizationMetrics(threshold=threshold, conventions=conventions, chosen=chosen)
    by_size: dict[tuple[int, int], list[int]] = {}
    for k, prob in enumerate(predictions["probs"]):
        by_size.setdefault(tuple(prob.shape), []).append(k)
    for rows in by_size.values():
        for s in range(0, len(rows), RESCORE_BATCH):
            batch = rows[s : s + RESCORE_BATCH]
            metric.update_probabilities(
                torch.stack([predictions["probs"][k] for k in batch]),
                torch.stack([predictions["masks"][k] for k in batch]),
                predictions["index"][batch],
            )
    return metric


def predictions_files(folder: Path) -> dict[str, Path]:
    """``{subset: path}`` of the predictions saved in a run directory or eval folder (empty when none)."""
    return {p.stem: p for p in sorted((folder / PREDICTIONS_DIR).glob("*.npz"))}
