"""Evaluate a trained decoder on any list of subsets and splits, without retraining.

Scores are the study's (per image, then averaged): the same :class:`LocalizationMetrics` the training run uses,
in the metric conventions asked for (``study`` by default; ``trufor``, ``benco``) at the pixel threshold 0.5 and at
the model's validation-chosen thresholds, which the outputs record. Each pass also keeps every image's image-level scores (:class:`ImageScores`), from which
:mod:`deeploc.evaluation` measures false alarms and detection on real images.
Features come from the feature store when a cache folder is given, so the frozen encoder never runs twice on
the same image across evaluations.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from deeploc.data.datasets import ImageMaskDataset
from deeploc.data.images import image_size
from deeploc.data.masks import MaskRules
from deeploc.data.samples import Sample
from deeploc.data.sources import DataSource
from deeploc.data.validate import validate_samples
from deeploc.io import write_json_atomic
from deeploc.metrics import DEFAULT_CONVENTION, LocalizationMetrics, check_conventions, metric_names, resize_probs

log = logging.getLogger(__name__)

UNDEFINED_KEYS = ("n_ap_undefined", "n_f1_no_positive")  # counts of the cases the convention decides
# Pixel threshold of every evaluation table: a pixel is predicted manipulated when its probability is > 0.5.
THRESHOLD = 0.5


def index_for_eval(
    source: DataSource,
    subsets: Sequence[str],
    split: str = "test",
    validate: bool = True,
    rules: MaskRules | None = None,
) -> dict[str, list[Sample]]:
    """Samples of ``split`` for each subset of a data source (masks read in its polarity), validated with the mask
    ``rules`` (bad files and inverted or empty masks fail naming themselves). Images of several sizes are fine:
    evaluation batches each size apart (:func:`size_batches`)."""
    source.prepare()
    samples = source.samples(list(subsets), splits=(split,))
    if validate:
        validate_samples(samples, rules=rules, batches={})
    return {name: [s for s in samples if s.subset == name] for name in subsets}


def index_real(source: DataSource, split: str = "test", validate: bool = True) -> list[Sample]:
    """The source's pristine images of ``split``, decoded and size-checked once when ``validate``."""
    source.prepare()
    samples = source.real_samples(split)
    if validate:
        validate_samples(samples, batches={})
    return samples


def size_batches(samples: Sequence[Sample], batch_size: int) -> list[list[int]]:
    """Dataset positions in batches of at most ``batch_size`` images of one size (the mask's, else the image's),
    in dataset order within a size: masks are scored at their own size, so only equal sizes stack."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(samples):
        by_size.setdefault(image_size(s.mask if s.mask is not None else s.image), []).append(i)
    return [group[k : k + batch_size] for group in by_size.values() for k in range(0, len(group), batch_size)]


def _datasets(
    model: Any, by_subset: dict[str, list[Sample]], feature_dir: str | None, batch_size: int, match_sizes: bool
) -> dict[str, Any]:
    if feature_dir is None:
        return {name: ImageMaskDataset(samples, match_sizes=match_sizes) for name, samples in by_subset.items()}
    from deeploc.features.extraction import FeatureCache

    cache = FeatureCache(feature_dir, model.encoder, model.decoder.inputs)
    every = [s for samples in by_subset.values() for s in samples]
    cache.extract(every, model.encoder, batch_size=batch_size, device=model.device)
    return {name: cache.dataset(samples) for name, samples in by_subset.items()}


def score_keys() -> tuple[str, ...]:
    """The columns of eval.csv: every registered metric, then the number of images."""
    return (*metric_names(), "n_images")


@dataclass(frozen=True)
class ImageScores:
    """Image-level values of every image of a subset, in dataset order (float64 tensors on the CPU).

    ``top``: the mean of the top 1% of the probabilities (deeploc-predict's image score); ``max``: the largest
    probability; ``flagged``: the share of pixels with probability > :data:`THRESHOLD` (0-1). Probabilities are
    at the mask's (real images: the image's) native size, as the metrics and deeploc-predict compute them.
    """

    names: list[str]
    top: torch.Tensor
    max: torch.Tensor
    flagged: torch.Tensor

    def score(self, kind: str) -> torch.Tensor:
        """The image score ``kind`` (``top`` or ``max``)."""
        return {"top": self.top, "max": self.max}[kind]


@dataclass(frozen=True)
class SubsetScores:
    """One subset's localization metrics in the primary convention (None for real images, which have nothing to
    localize) and image scores; ``by_convention``: every convention's metrics; ``per_image``: every image's scores
    (:meth:`LocalizationMetrics.per_image`); ``predictions``: its maps when kept."""

    metrics: dict[str, float] | None
    images: ImageScores
    by_convention: dict[str, dict[str, float]] = field(default_factory=dict)
    per_image: dict[str, torch.Tensor] = field(default_factory=dict)
    predictions: dict[str, Any] | None = None


@torch.no_grad()
def score_subsets(
    model: Any,
    by_subset: dict[str, list[Sample]],
    batch_size: int = 32,
    num_workers: int = 0,
    feature_dir: str | None = None,
    convention: str | Sequence[str] = DEFAULT_CONVENTION,
    localize: bool = True,
    match_sizes: bool = True,
    keep_predictions: bool = False,
) -> dict[str, SubsetScores]:
    """One pass of ``model`` (a LocalizationModule) over each subset: its mean per-image metrics in ``convention``
    (one or several, the first primary) at :data:`THRESHOLD` and at the model's validation-chosen thresholds (when
    ``localize``), and every image's :class:`ImageScores`, at the masks' size. ``match_sizes=False`` accepts images
    of another size than their masks (perturbed, resized copies); ``keep_predictions`` keeps every map."""
    from deeploc.metrics import image_score

    conventions = check_conventions(convention)
    chosen = getattr(model, "val_thresholds", None) or {}
    model.eval()
    results: dict[str, SubsetScores] = {}
    for name, dataset in _datasets(model, by_subset, feature_dir, batch_size, match_sizes).items():
        samples = by_subset[name]
        metric = LocalizationMetrics(
            threshold=THRESHOLD, conventions=conventions, chosen=chosen, keep_predictions=keep_predictions
        ).to(model.device)
        values: dict[str, list[float]] = {
            "top": [0.0] * len(samples),
            "max": [0.0] * len(samples),
            "flagged": [0.0] * len(samples),
        }
        loader = DataLoader(dataset, batch_sampler=size_batches(samples, batch_size), num_workers=num_workers)
        for batch in tqdm(loader, desc=f"eval {name}", unit="batch"):
            batch = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            logits = model(model.features(batch))
            if localize:
                metric.update(logits, batch["mask"], batch["index"])
            probs = resize_probs(logits, batch["mask"].shape[-2:])
            for i, prob in zip(batch["index"].tolist(), probs):
                values["top"][i], values["max"][i] = image_score(prob), float(prob.max())
                values["flagged"][i] = float((prob > THRESHOLD).double().mean())
        every = {c: {k: float(v) for k, v in d.items()} for c, d in metric.compute_all().items()} if localize else {}
        scores = every.get(conventions[0])
        images = ImageScores(
            [s.name for s in samples],
            *(torch.tensor(values[k], dtype=torch.float64) for k in ("top", "max", "flagged")),
        )
        per_image = {k: v.cpu() for k, v in metric.per_image().items()} if localize else {}
        kept = metric.predictions() if localize and keep_predictions else None
        results[name] = SubsetScores(scores, images, every, per_image, kept)
        if scores is not None:
            log.info("%s: %s", name, ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
    return results


def evaluate(
    model: Any,
    by_subset: dict[str, list[Sample]],
    batch_size: int = 32,
    num_workers: int = 0,
    feature_dir: str | None = None,
    convention: str = DEFAULT_CONVENTION,
    match_sizes: bool = True,
) -> dict[str, dict[str, float]]:
    """Mean per-image scores of ``model`` (a LocalizationModule in eval mode) for each subset, in ``convention``
    (``match_sizes``: as :func:`score_subsets`)."""
    scored = score_subsets(model, by_subset, batch_size, num_workers, feature_dir, convention, match_sizes=match_sizes)
    return {name: result.metrics for name, result in scored.items()}  # type: ignore[misc]


def write_results(
    out_dir: Path,
    results: dict[str, dict[str, float]],
    context: dict[str, Any],
    scores: dict[str, dict[str, dict[str, float]]] | None = None,
) -> tuple[Path, Path]:
    """``eval.json`` (context + per-subset scores) and ``eval.csv`` (one row per subset and convention).

    ``results``: the primary convention's scores per subset (eval.json's ``test``); ``scores``: ``{convention:
    {subset: scores}}`` of every convention (eval.json's ``scores``; default: ``results`` in ``context``'s
    convention). ``context`` holds at least ``split`` and ``convention``; the CSV repeats the split, the
    convention and the pixel threshold on every row, and leaves a metric the convention does not define empty.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    scores = scores or {context["convention"]: results}
    payload = {**context, "threshold": THRESHOLD, "test": results, "conventions": list(scores), "scores": scores}
    json_path = write_json_atomic(out_dir / "eval.json", payload)
    csv_path = out_dir / "eval.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["subset", "split", "convention", "threshold", *score_keys(), *UNDEFINED_KEYS])
        for convention, by_subset in scores.items():
            for name, values in by_subset.items():
                writer.writerow(
                    [
                        name,
                        context["split"],
                        convention,
                        THRESHOLD,
                        *(f"{values[k]:.4f}" if k in values else "" for k in score_keys()),
                        *(f"{values[k]:.0f}" for k in UNDEFINED_KEYS),
                    ]
                )
    return json_path, csv_path
