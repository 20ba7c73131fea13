"""Rescore a tested run (or a deeploc-eval folder) from its saved predictions, in any metric convention, with no
encoder, GPU or dataset images: the maps and masks saved by ``eval.save_predictions=true`` / ``--save-predictions``
(:mod:`deeploc.metrics.store`) are scored exactly as the test scored them."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deeploc.evaluation.scoring import write_results
from deeploc.metrics import check_conventions
from deeploc.metrics.store import (
    PREDICTIONS_DIR,
    SCORES_DIR,
    PredictionsError,
    load_predictions,
    predictions_files,
    rescore,
    save_predictions,
    write_per_image,
)
from deeploc.runs.rundir import METRICS_FILE

RECORDS = (METRICS_FILE, "eval.json")  # where a run directory / an eval folder records its chosen thresholds


@dataclass(frozen=True)
class Rescored:
    """Every convention's scores per subset, every subset's per-image scores and image names, and the record the
    predictions came with (its ``thresholds``, ``config`` ...)."""

    scores: dict[str, dict[str, dict[str, float]]]
    per_image: dict[str, dict[str, torch.Tensor]]
    names: dict[str, list[str]]
    record: dict[str, Any]


def how_to_keep(folder: Path) -> str:
    """The advice when ``folder`` holds no saved predictions."""
    return (
        f"{folder} holds no saved predictions ({folder}/predictions/<subset>.npz). Keep them when testing: "
        "deeploc-train <the run's overrides> if_finished=eval eval.save_predictions=true re-tests a finished run "
        "and keeps them; deeploc-eval MODEL --save-predictions keeps them for an evaluation. Without "
        "--rescore, deeploc-eval re-runs the model instead"
    )


def chosen_thresholds(record: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The validation-chosen thresholds a metrics.json / eval.json records (empty when it has none)."""
    return ((record.get("thresholds") or {}).get("chosen")) or {}


def read_record(folder: Path) -> dict[str, Any]:
    """The folder's metrics.json or eval.json (empty when it has neither)."""
    for name in RECORDS:
        path = folder / name
        if path.is_file():
            return json.loads(path.read_text())
    return {}


def rescore_folder(folder: Path, conventions: str | Sequence[str]) -> Rescored:
    """Scores of every subset saved in ``folder`` in ``conventions`` (the first primary), with the thresholds its
    record chose on the validation split; a PredictionsError saying how to keep them when there are none."""
    wanted = check_conventions(conventions)
    files = predictions_files(folder)
    if not files:
        raise PredictionsError(how_to_keep(folder))
    record = read_record(folder)
    chosen = chosen_thresholds(record)
    scores: dict[str, dict[str, dict[str, float]]] = {c: {} for c in wanted}
    per_image: dict[str, dict[str, torch.Tensor]] = {}
    names: dict[str, list[str]] = {}
    for subset, path in files.items():
        predictions = load_predictions(path)
        metric = rescore(predictions, wanted, chosen)
        for convention, values in metric.compute_all().items():
            scores[convention][subset] = {k: float(v) for k, v in values.items()}
        per_image[subset] = metric.per_image()
        by_index = dict(zip(predictions["index"].tolist(), predictions["names"]))
        names[subset] = [by_index.get(i, "") for i in range(max(by_index, default=-1) + 1)]
    return Rescored(scores, per_image, names, record)


def rescore_into(
    folder: Path, conventions: str | Sequence[str], out: Path
) -> tuple[Rescored, dict[str, dict[str, float]], list[Path]]:
    """:func:`rescore_folder`, written to ``out`` like an evaluation: eval.json (``rescored_from``), eval.csv and
    ``scores/<subset>.csv``. Returns the rescoring, the thresholds it used and the files written."""
    rescored = rescore_folder(folder, conventions)
    primary = check_conventions(conventions)[0]
    chosen = chosen_thresholds(rescored.record)
    context = {
        "model": str(folder),
        "rescored_from": str(folder / PREDICTIONS_DIR),
        "split": rescored.record.get("split", "test"),
        "convention": primary,
        "thresholds": {"split": "valid", "chosen": chosen},
    }
    written = list(write_results(out, rescored.scores[primary], context, rescored.scores))
    for subset, columns in rescored.per_image.items():
        written.append(write_per_image(out / SCORES_DIR / f"{subset}.csv", columns, rescored.names[subset]))
    return rescored, chosen, written


def write_image_files(out: Path, scored: Mapping[str, Any], dtype: str = "float32") -> list[Path]:
    """``<out>/scores/<subset>.csv`` (every image's scores) and ``<out>/predictions/<subset>.npz`` for the subsets
    whose maps were kept (:class:`deeploc.evaluation.scoring.SubsetScores` of each subset)."""
    written = []
    for name, result in scored.items():
        names = result.images.names
        written.append(write_per_image(out / SCORES_DIR / f"{name}.csv", result.per_image, names))
        if result.predictions is not None:
            written.append(save_predictions(out / PREDICTIONS_DIR / f"{name}.npz", result.predictions, dtype, names))
    return written


def recorded_thresholds(model: Path) -> dict[str, dict[str, float]]:
    """The thresholds chosen on the validation split that a run directory (its metrics.json) or a checkpoint
    records; none for an exported decoder."""
    if model.is_dir():
        return chosen_thresholds(read_record(model))
    if model.suffix == ".ckpt":
        checkpoint = torch.load(model, map_location="cpu", weights_only=True)
        return dict((checkpoint.get("deeploc") or {}).get("val_thresholds") or {})
    return {}
