"""Localization metrics: the registry of metrics and conventions (:mod:`.registry`), per-image scores in each
convention (:mod:`.scores`, built on :mod:`.pixels`), their DDP-exact mean (:mod:`.aggregate`) and the image-level
score (:mod:`.image_level`).

Another metric is one module in this package (found without an import list) with a
``@register_metric(name, label, description)`` function ``ScoreInputs -> per-image values``; see docs/extending.md.
"""

from deeploc.data.regions import DILATE_SIZE, ERODE_SIZE, f1_positive_count
from deeploc.metrics.aggregate import LocalizationMetrics
from deeploc.metrics.image_level import IMAGE_SCORE, TOP_FRACTION, image_score
from deeploc.metrics.pixels import average_precision, resize_probs
from deeploc.metrics.registry import (
    CONVENTION_SOURCES,
    CONVENTIONS,
    DEFAULT_CONVENTION,
    METRICS,
    MetricSpec,
    ScoreInputs,
    check_convention,
    check_conventions,
    column_label,
    convention_specs,
    metric_label,
    metric_names,
    metric_specs,
    recorded_convention,
    register_metric,
)
from deeploc.metrics.scores import image_scores, optimized_metrics, reported_specs
from deeploc.metrics.thresholds import GRID, choose_thresholds

__all__ = [
    "CONVENTIONS",
    "CONVENTION_SOURCES",
    "DEFAULT_CONVENTION",
    "DILATE_SIZE",
    "ERODE_SIZE",
    "GRID",
    "IMAGE_SCORE",
    "METRICS",
    "TOP_FRACTION",
    "LocalizationMetrics",
    "MetricSpec",
    "ScoreInputs",
    "average_precision",
    "check_convention",
    "check_conventions",
    "choose_thresholds",
    "column_label",
    "convention_specs",
    "f1_positive_count",
    "image_score",
    "image_scores",
    "metric_label",
    "metric_names",
    "metric_specs",
    "optimized_metrics",
    "recorded_convention",
    "register_metric",
    "reported_specs",
    "resize_probs",
]
