"""The one list of metrics and the one list of metric conventions.

A metric is a :class:`MetricSpec` registered with :func:`register_metric`; every table, log, metrics.json key and
CSV column reads its metric list from :func:`metric_specs`, so a new metric is one decorated function (in a module
of this package, found without an import list, or in any module imported before scoring; docs/extending.md).
A convention decides how the metrics treat the cases the field disagrees on (thin regions, empty masks, ties);
the conventions and their meaning are in :mod:`deeploc.metrics.scores`'s docstring and docs/evaluation.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from deeploc.errors import ConfigError
from deeploc.registry import Registry

CONVENTIONS = ("study", "trufor")
DEFAULT_CONVENTION = "study"
LEGACY_CONVENTION = "trufor"  # what a metrics.json / eval.json without "convention" was computed with
# Validation metrics a sweeper can optimise (the LightningModule logs them every epoch) and what "best" means for each.
OPTIMIZED_METRICS = {"val/iou": "max", "val/f1_fixed": "max", "val/f1_best": "max", "val/ap": "max", "val/loss": "min"}


@dataclass(frozen=True)
class ScoreInputs:
    """What a per-image score function receives, for a chunk of B images (pixels flattened, at the mask's size)."""

    probs: torch.Tensor  # B x N probabilities
    gt: torch.Tensor  # B x N bool, True = manipulated
    f1_positive: torch.Tensor  # B x N bool: ground-truth pixels that survive the ERODE_SIZE erosion
    f1_negative: torch.Tensor  # B x N bool: pixels outside the DILATE_SIZE dilation
    threshold: float
    convention: str
    dtype: torch.dtype  # accumulation dtype of ratios


@dataclass(frozen=True)
class MetricSpec:
    """One reported metric: its key (metrics.json, W&B, CSV), its column label, and its per-image score function
    (``ScoreInputs -> B`` values in percent; NaN = undefined for that image, left out of the mean)."""

    name: str
    label: str
    description: str
    score: Callable[[ScoreInputs], torch.Tensor]


METRICS: Registry[MetricSpec] = Registry("metric", "deeploc.metrics", "deeploc.metrics")


def register_metric(name: str, label: str, description: str) -> Callable[[Callable], Callable]:
    """Decorator: report ``score`` (``ScoreInputs -> B`` per-image values) as metric ``name`` everywhere (module
    logs, metrics.json, deeploc-eval, reports, console tables). A module in this package registers by existing."""

    def add(score: Callable[[ScoreInputs], torch.Tensor]) -> Callable[[ScoreInputs], torch.Tensor]:
        METRICS.add(name, MetricSpec(name, label, description, score))
        return score

    return add


def metric_specs() -> list[MetricSpec]:
    """Every metric in report order: the study's four first, then those of other modules and entry points."""
    return [spec for _, spec in METRICS.items()]


def metric_names() -> tuple[str, ...]:
    """The keys of :func:`metric_specs` (``iou``, ``f1_fixed``, ``f1_best``, ``ap``, ...)."""
    return tuple(spec.name for spec in metric_specs())


def metric_label(name: str) -> str:
    """The column label of metric ``name`` (its key when no metric of that name is registered)."""
    spec = dict(METRICS.items()).get(name)
    return spec.label if spec is not None else name


def check_convention(convention: str) -> str:
    """``convention`` if it is one of :data:`CONVENTIONS`, else a ConfigError naming the config key and the fix."""
    if convention not in CONVENTIONS:
        raise ConfigError(
            f"metrics.convention={convention!r} is not one of {CONVENTIONS}: pass metrics.convention=study "
            "(DeCLIP's formulas, the study's numbers; the default) or metrics.convention=trufor (TruFor's, "
            "deeploc <= 0.1)"
        )
    return convention


def recorded_convention(record: Mapping[str, Any]) -> str:
    """The convention a metrics.json / eval.json object was computed with (no key: deeploc <= 0.1, trufor)."""
    return str(record.get("convention", LEGACY_CONVENTION))
