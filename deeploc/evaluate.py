"""Evaluate a trained decoder on any list of subsets and splits, without retraining.

Scores are the study's (per image, then averaged): the same :class:`LocalizationMetrics` the training run uses,
in the metric convention asked for (``study`` by default, or ``trufor``), which the outputs record.
Features come from the feature store when a cache folder is given, so the frozen encoder never runs twice on
the same image across evaluations.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from deeploc.data.datasets import ImageMaskDataset
from deeploc.data.layout import Sample, validate_samples
from deeploc.data.masks import MaskRules
from deeploc.data.sources import DataSource
from deeploc.io import write_json_atomic
from deeploc.metrics import DEFAULT_CONVENTION, LocalizationMetrics, check_convention, metric_names

log = logging.getLogger(__name__)

UNDEFINED_KEYS = ("n_ap_undefined", "n_f1_no_positive")  # counts of the cases the convention decides


def index_for_eval(
    source: DataSource,
    subsets: Sequence[str],
    split: str = "test",
    validate: bool = True,
    rules: MaskRules | None = None,
) -> dict[str, list[Sample]]:
    """Samples of ``split`` for each subset of a data source (masks read in its polarity), validated with the mask
    ``rules`` (bad files and inverted or empty masks fail naming themselves)."""
    source.prepare()
    samples = source.samples(list(subsets), splits=(split,))
    if validate:
        validate_samples(samples, rules=rules)
    return {name: [s for s in samples if s.subset == name] for name in subsets}


def _datasets(
    model: Any, by_subset: dict[str, list[Sample]], feature_dir: str | None, batch_size: int
) -> dict[str, Any]:
    if feature_dir is None:
        return {name: ImageMaskDataset(samples) for name, samples in by_subset.items()}
    from deeploc.features.store import FeatureCache

    cache = FeatureCache(feature_dir, model.encoder, model.decoder.inputs)
    every = [s for samples in by_subset.values() for s in samples]
    cache.extract(every, model.encoder, batch_size=batch_size, device=model.device)
    return {name: cache.dataset(samples) for name, samples in by_subset.items()}


def score_keys() -> tuple[str, ...]:
    """The columns of eval.csv: every registered metric, then the number of images."""
    return (*metric_names(), "n_images")


@torch.no_grad()
def evaluate(
    model: Any,
    by_subset: dict[str, list[Sample]],
    batch_size: int = 32,
    num_workers: int = 0,
    feature_dir: str | None = None,
    convention: str = DEFAULT_CONVENTION,
) -> dict[str, dict[str, float]]:
    """Mean per-image scores of ``model`` (a LocalizationModule in eval mode) for each subset, in ``convention``."""
    check_convention(convention)
    model.eval()
    results: dict[str, dict[str, float]] = {}
    for name, dataset in _datasets(model, by_subset, feature_dir, batch_size).items():
        metric = LocalizationMetrics(convention=convention).to(model.device)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
        for batch in tqdm(loader, desc=f"eval {name}", unit="batch"):
            batch = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            metric.update(model(model.features(batch)), batch["mask"], batch["index"])
        results[name] = {key: float(value) for key, value in metric.compute().items()}
        log.info("%s: %s", name, ", ".join(f"{k} {results[name][k]:.2f}" for k in score_keys()))
    return results


def write_results(out_dir: Path, results: dict[str, dict[str, float]], context: dict[str, Any]) -> tuple[Path, Path]:
    """``eval.json`` (context + per-subset scores) and ``eval.csv`` (one row per subset).

    ``context`` holds at least ``split`` and ``convention``; both are repeated on every CSV row.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = write_json_atomic(out_dir / "eval.json", {**context, "test": results})
    csv_path = out_dir / "eval.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["subset", "split", "convention", *score_keys(), *UNDEFINED_KEYS])
        for name, scores in results.items():
            writer.writerow(
                [
                    name,
                    context["split"],
                    context["convention"],
                    *(f"{scores[k]:.4f}" for k in score_keys()),
                    *(f"{scores[k]:.0f}" for k in UNDEFINED_KEYS),
                ]
            )
    return json_path, csv_path
