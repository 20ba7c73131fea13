"""The one list of metrics and the one list of metric conventions.

A metric is a :class:`MetricSpec` registered with :func:`register_metric`; every table, log, metrics.json key and
CSV column reads its metric list from :func:`metric_specs`, so a new metric is one decorated function (in a module
of this package, found without an import list, or in any module imported before scoring; docs/extending.md).
A convention decides how the metrics treat the cases the field disagrees on (thin regions, empty masks, ties);
the conventions and their meaning are in :mod:`deeploc.metrics.scores`'s docstring and docs/evaluation.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from deeploc.errors import ConfigError
from deeploc.registry import Registry

#: Every metric convention, by name, with what it follows (the rules: :mod:`deeploc.metrics.scores`).
CONVENTION_SOURCES = {
    "study": "DeCLIP's metric code (bit-ml/DeCLIP utils/utils.py), which the study reused: the default",
    "trufor": "TruFor's metrics.py as published (grip-unina/TruFor): border band, max with the inverted map",
    "benco": "IMDL-BenCo 0.1.45's evaluators (PixelF1, PixelIOU, PixelAUC): all pixels, empty masks score 0",
}
CONVENTIONS = tuple(CONVENTION_SOURCES)
DEFAULT_CONVENTION = "study"


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
    #: Thresholds chosen on the validation split for this convention, by metric name (``f1_val``, ``iou_val``).
    chosen: Mapping[str, float] = field(default_factory=dict)
    #: Work shared by the conventions scoring the same chunk (sorted pixels): see :func:`shared`.
    cache: dict[str, Any] = field(default_factory=dict)

    def shared(self, key: str, make: Callable[[], Any]) -> Any:
        """``make()`` computed once per chunk of images, whichever convention asks first."""
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]


@dataclass(frozen=True)
class MetricSpec:
    """One reported metric: its key (metrics.json, W&B, CSV), its column label, and its per-image score function
    (``ScoreInputs -> B`` values in percent; NaN = undefined for that image, left out of the mean)."""

    name: str
    label: str
    description: str
    score: Callable[[ScoreInputs], torch.Tensor]
    #: The conventions that define this metric (None: all of them, e.g. a plug-in metric).
    conventions: tuple[str, ...] | None = None
    #: Pooled over the set instead of averaged over images: ``score`` then returns ``B x 2`` (numerator,
    #: denominator) per image and the set's value is ``100 * sum(numerators) / sum(denominators)``.
    pooled: bool = False
    #: The table column's name before ``[convention]`` (default: ``label``), e.g. ``F1@0.5``.
    column: str | None = None
    #: ``"max"`` when higher is better, else ``"min"`` (best validation values, ``optimized_metric``).
    direction: str = "max"

    def defined_in(self, convention: str) -> bool:
        """Whether ``convention`` defines this metric."""
        return self.conventions is None or convention in self.conventions


METRICS: Registry[MetricSpec] = Registry("metric", "deeploc.metrics", "deeploc.metrics")


def register_metric(
    name: str,
    label: str,
    description: str,
    conventions: tuple[str, ...] | None = None,
    pooled: bool = False,
    column: str | None = None,
    direction: str = "max",
) -> Callable[[Callable], Callable]:
    """Decorator: report ``score`` (``ScoreInputs -> B`` per-image values) as metric ``name`` everywhere (module
    logs, metrics.json, deeploc-eval, reports, console tables), in ``conventions`` (default: every one; the score
    reads ``ScoreInputs.convention``). ``direction``: ``"max"`` when higher is better, else ``"min"``. A module in
    this package registers by existing; one outside it by being imported (``plugins: [module]`` in deeploc-train /
    -extract, ``--import module`` on the other commands)."""
    if direction not in ("max", "min"):
        raise ValueError(f"metric {name!r}: direction={direction!r} must be 'max' or 'min'")

    def add(score: Callable[[ScoreInputs], torch.Tensor]) -> Callable[[ScoreInputs], torch.Tensor]:
        METRICS.add(name, MetricSpec(name, label, description, score, conventions, pooled, column, direction))
        return score

    return add


def metric_specs() -> list[MetricSpec]:
    """Every metric in report order: the study's four first, then those of other modules and entry points."""
    return [spec for _, spec in METRICS.items()]


def metric_names() -> tuple[str, ...]:
    """The keys of :func:`metric_specs` (``iou``, ``f1_fixed``, ``f1_best``, ``ap``, ...)."""
    return tuple(spec.name for spec in metric_specs())


def convention_specs(convention: str) -> list[MetricSpec]:
    """The metrics ``convention`` defines, in report order."""
    return [spec for spec in metric_specs() if spec.defined_in(convention)]


def column_label(name: str, convention: str) -> str:
    """The table column of metric ``name`` in ``convention``: ``F1@0.5[trufor]``, ``F1 oracle[study]``."""
    spec = dict(METRICS.items()).get(name)
    return f"{(spec.column or spec.label) if spec is not None else name}[{convention}]"


def metric_label(name: str) -> str:
    """The column label of metric ``name`` (its key when no metric of that name is registered)."""
    spec = dict(METRICS.items()).get(name)
    return spec.label if spec is not None else name


def check_convention(convention: str) -> str:
    """``convention`` if it is one of :data:`CONVENTIONS`, else a ConfigError listing the choices."""
    if convention not in CONVENTIONS:
        choices = "; ".join(f"{name}: {source}" for name, source in CONVENTION_SOURCES.items())
        raise ConfigError(
            f"metric convention {convention!r} is unknown: choose among {list(CONVENTIONS)} (metrics.conventions="
            f"[study,trufor,benco], deeploc-eval --conventions study benco). {choices}"
        )
    return convention


def check_conventions(conventions: str | Sequence[str]) -> tuple[str, ...]:
    """A non-empty tuple of known, distinct conventions (a single name is a one-element list); the first is the
    primary one, whose scores fill metrics.json's ``test`` block."""
    names = (conventions,) if isinstance(conventions, str) else tuple(str(c) for c in conventions)
    if not names:
        raise ConfigError(f"metrics.conventions is empty: name at least one of {list(CONVENTIONS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"metrics.conventions={list(names)} names a convention twice")
    return tuple(check_convention(name) for name in names)


def recorded_convention(record: Mapping[str, Any], source: str) -> str:
    """The (first) convention a metrics.json / eval.json object (read from file ``source``) was computed with; one
    without (deeploc 0.1) is refused."""
    if "convention" not in record:
        raise ConfigError(
            f"{source} records no metric convention (written by deeploc 0.1, which is not read any more): "
            "train the run again with this deeploc (deeploc-train with the same overrides and if_finished=retrain)"
        )
    return str(record["convention"])
