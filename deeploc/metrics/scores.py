"""Per-image localization scores in each metric convention, and the registered built-in metrics.

Every score is computed per image (percent, 0-100) and then averaged over images, except cIoU, which pools the
set's pixels. Prediction: ``prob = sigmoid(logits)`` in float32, resized bilinearly (``align_corners=False``) to
the mask's native size (:func:`deeploc.metrics.pixels.resize_probs`); ground truth: ``mask > 0.5``; a pixel is
predicted manipulated iff ``prob > threshold`` (0.5). The conventions (config ``metrics.conventions``, the first
one also ``metrics.convention``; recorded in metrics.json and eval.json) decide what the field disagrees on:

``study`` (default): DeCLIP's metric code (bit-ml/DeCLIP ``utils/utils.py``), which the study reused.
    IoU ``100 (inter + 1e-8) / (union + 1e-8)`` (empty/empty = 100). F1 over the *kept* pixels (positives survive
    a 15x15 erosion, negatives lie outside an 11x11 dilation; data/regions.py): ``(2TP + 1e-32) / max(2TP + FP
    + FN, 1e-32)`` (no positive left and none predicted: 100). F1 oracle = max(best F1 over the image's own
    distinct kept scores, the largest excluded; F1@0.5). AP: torchmetrics' binary AP, 0 for an empty mask,
    averaged in.
``trufor``: TruFor's ``metrics.py`` as published (``extractGTs``, ``computeMetricsContinue``, ``computeMetrics_th``,
    ``computeF1``, ``computeLocalizationMetrics``). F1 over the kept pixels, ``max(F1 of the map, F1 of 1 - map)``
    (the inverted map: TruFor's ``f1i``); F1@0.5 is NaN, and left out of the mean as TruFor's ``np.nanmean``
    does, when labels and predictions of the kept pixels hold a single class between them (sklearn's 1x1
    confusion matrix); F1 oracle = the best of both over every distinct kept score (the largest included, not
    maxed with F1@0.5), computed in float32 as TruFor does. TruFor defines no IoU, AP or AUC.
``benco``: IMDL-BenCo 0.1.45's evaluators (``PixelF1``, ``PixelIOU``, ``PixelAUC`` in mode ``origin``, no
    ``shape_mask``). Every pixel counts (no border band). F1 ``2PR / (P + R + 1e-8)`` with ``P = TP / (TP + FP +
    1e-8)``, ``R = TP / (TP + FN + 1e-8)``; IoU ``inter / (union + 1e-8)``; both in float32 and 0 for an empty
    mask, averaged in (BenCo #46). Pixel AUC per image, 0 for a mask with no manipulated pixel; ties form one
    operating point here (BenCo's argsort splits them arbitrarily, so the two agree exactly on untied scores).

Metrics new in deeploc, where a convention defines their ingredients: pixel AUC per image (``study``: sklearn's
``roc_auc_score``, undefined = NaN and left out, i.e. the mask holds one class only; ``benco``: as above); cIoU
(``100 * sum inter / sum union`` over the set, at 0.5; ``study`` and ``benco``); F1 and IoU at the threshold chosen
on the validation split (``f1_val``, ``iou_val``: :mod:`deeploc.metrics.thresholds`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from deeploc.data.regions import binarise_masks, f1_split
from deeploc.metrics.pixels import (
    MAX_CHUNK_ELEMENTS,
    KeptSweep,
    acc_dtype,
    average_precision,
    best_f1_sweep,
    grid_counts,
    kept_sweep,
    roc_auc,
    sort_descending,
)
from deeploc.metrics.registry import (
    DEFAULT_CONVENTION,
    MetricSpec,
    ScoreInputs,
    check_convention,
    convention_specs,
    register_metric,
)
from deeploc.metrics.rules import Counts, counts_at, f1_rule, iou_rule, trufor_f1

# 0/1 flags of the undefined cases, kept per image next to the scores and counted by ``LocalizationMetrics``.
FLAG_NAMES = ("f1_no_positive", "ap_undefined")
# Metrics scored at the threshold chosen on the validation split (reported only when one was chosen).
CHOSEN_METRICS = ("f1_val", "iou_val")


def _counts(x: ScoreInputs, threshold: float) -> Counts:
    return x.shared(f"counts@{threshold!r}", lambda: counts_at(x.probs, x.gt, x.f1_positive, x.f1_negative, threshold))


def _sweep(x: ScoreInputs) -> KeptSweep:
    return x.shared("kept_sweep", lambda: kept_sweep(x.probs, x.f1_positive, x.f1_negative))


def _descending(x: ScoreInputs) -> tuple[torch.Tensor, torch.Tensor]:
    return x.shared("descending", lambda: sort_descending(x.probs, x.gt))


def _chosen(x: ScoreInputs, name: str) -> float | None:
    return x.chosen.get(name)


@register_metric(
    "iou", "IoU", "intersection over union of prob > threshold and the mask", ("study", "benco"), column="IoU@0.5"
)
def _iou(x: ScoreInputs) -> torch.Tensor:
    return iou_rule(x.convention, _counts(x, x.threshold), x.dtype)


@register_metric("f1_fixed", "F1_fixed", "F1 at the threshold", ("study", "trufor", "benco"), column="F1@0.5")
def _f1_fixed(x: ScoreInputs) -> torch.Tensor:
    return f1_rule(x.convention, _counts(x, x.threshold), x.dtype)


@register_metric(
    "f1_best",
    "F1_best",
    "oracle: the best F1 over the image's own thresholds (chosen with its ground truth)",
    ("study", "trufor"),
    column="F1 oracle",
)
def _f1_best(x: ScoreInputs) -> torch.Tensor:
    sweep = _sweep(x)
    if x.convention == "study":
        return torch.maximum(best_f1_sweep(sweep, x.dtype, "study"), _f1_fixed(x))  # empty sweep (-inf): F1_fixed
    # TruFor: every tie-run end (the largest included), map and inverse, in float32; no kept pixel: NaN.
    f1 = trufor_f1(sweep.tp, sweep.fp, sweep.fn, sweep.tn, torch.float32)
    best = f1.masked_fill(~sweep.run_end, float("-inf")).amax(1)
    return best.masked_fill(~sweep.kept.any(1), float("nan"))


@register_metric("ap", "AP", "binary average precision over the image's pixels", ("study",))
def _ap(x: ScoreInputs) -> torch.Tensor:
    ap = average_precision(x.probs, x.gt, x.dtype, presorted=_descending(x))
    return ap.masked_fill(~x.gt.any(1), 0.0)  # torchmetrics' value for an empty mask, averaged in by DeCLIP


@register_metric("auc", "AUC", "pixel ROC AUC per image", ("study", "benco"), column="pixel AUC")
def _auc(x: ScoreInputs) -> torch.Tensor:
    auc = roc_auc(*_descending(x), x.dtype)
    if x.convention == "benco":
        auc = auc.masked_fill(~x.gt.any(1), 0.0)  # PixelAUC returns 0.0 for an all-negative mask
    return auc


@register_metric(
    "ciou", "cIoU", "pooled IoU over the set: sum of intersections / sum of unions", ("study", "benco"), True,
    column="cIoU@0.5",
)  # fmt: skip
def _ciou(x: ScoreInputs) -> torch.Tensor:
    c = _counts(x, x.threshold)
    return torch.stack([c.inter, c.pred + c.gt - c.inter], 1).to(x.dtype)


@register_metric(
    "f1_val", "F1_val", "F1 at the threshold chosen on the validation split", ("study", "trufor", "benco"),
    column="F1@val",
)  # fmt: skip
def _f1_val(x: ScoreInputs) -> torch.Tensor:
    return _at_chosen(x, "f1_val", f1_rule)


@register_metric(
    "iou_val", "IoU_val", "IoU at the threshold chosen on the validation split", ("study", "benco"),
    column="IoU@val",
)  # fmt: skip
def _iou_val(x: ScoreInputs) -> torch.Tensor:
    return _at_chosen(x, "iou_val", iou_rule)


def _at_chosen(x: ScoreInputs, name: str, rule: Callable[..., torch.Tensor]) -> torch.Tensor:
    """``rule`` (F1 or IoU of the convention) at the validation-chosen threshold of metric ``name``; NaN (undefined,
    left out of the mean) when none was chosen."""
    t = _chosen(x, name)
    if t is None:
        return torch.full(x.probs.shape[:1], float("nan"), dtype=x.dtype, device=x.probs.device)
    return rule(x.convention, _counts(x, t), x.dtype)


def reported_specs(convention: str, chosen: Mapping[str, float] | None = None) -> list[MetricSpec]:
    """The metrics reported in ``convention``: those it defines, without the validation-threshold ones when no
    threshold was chosen (``chosen``: this convention's chosen thresholds)."""
    chosen = chosen or {}
    return [s for s in convention_specs(convention) if s.name not in CHOSEN_METRICS or s.name in chosen]


def optimized_metrics() -> dict[str, str]:
    """Every value a run can optimize, with its direction: ``val/<name>`` of each metric validation logs (in the
    default convention, whose thresholds validation does not choose from itself) and ``val/loss`` (``"min"``)."""
    return {**{f"val/{s.name}": s.direction for s in reported_specs(DEFAULT_CONVENTION)}, "val/loss": "min"}


@dataclass
class BatchScores:
    """Per-image scores of a batch: ``scores[convention][metric]`` (``B``, or ``B x 2`` for pooled metrics), the
    undefined-case flags, and (for the validation threshold) the grid counts ``B x T x 4`` and totals ``B x 3``."""

    scores: dict[str, dict[str, torch.Tensor]]
    flags: dict[str, torch.Tensor]
    grid: torch.Tensor | None = None
    totals: torch.Tensor | None = None


def batch_scores(
    probs: torch.Tensor,
    gt: torch.Tensor,
    threshold: float,
    conventions: Sequence[str],
    chosen: Mapping[str, Mapping[str, float]] | None = None,
    grid: torch.Tensor | None = None,
) -> BatchScores:
    """Scores of every metric of every convention for ``BxHxW`` probabilities and bool ground truth of the same
    size. ``chosen[convention]``: its validation thresholds; ``grid``: also count every grid threshold."""
    if probs.shape != gt.shape:
        raise ValueError(f"probabilities {tuple(probs.shape)} and masks {tuple(gt.shape)} differ in size")
    dtype = acc_dtype(probs.device)
    chosen = chosen or {}
    b = probs.shape[0]
    pos_img, neg_img = f1_split(gt)
    v, g = probs.reshape(b, -1), gt.reshape(b, -1)
    pos, neg = pos_img.reshape(b, -1), neg_img.reshape(b, -1)
    specs = {c: reported_specs(c, chosen.get(c)) for c in conventions}
    parts: dict[str, dict[str, list[torch.Tensor]]] = {c: {s.name: [] for s in specs[c]} for c in conventions}
    grids: list[torch.Tensor] = []
    # Some scores sort every pixel: chunk the batch so huge masks do not blow up memory.
    step = max(1, MAX_CHUNK_ELEMENTS // max(1, v.shape[1]))
    for s in range(0, b, step):
        sl = slice(s, s + step)
        cache: dict = {}  # sorts and counts shared by the conventions
        for convention in conventions:
            inputs = ScoreInputs(
                v[sl], g[sl], pos[sl], neg[sl], threshold, convention, dtype, chosen.get(convention, {}), cache
            )
            for spec in specs[convention]:
                parts[convention][spec.name].append(spec.score(inputs).to(dtype))
        if grid is not None:
            grids.append(grid_counts(v[sl], g[sl], pos[sl], neg[sl], grid))
    scores = {c: {name: torch.cat(values) for name, values in named.items()} for c, named in parts.items()}
    flags = {"f1_no_positive": (pos.sum(1) == 0).to(dtype), "ap_undefined": (~g.any(1)).to(dtype)}
    totals = torch.stack([pos.sum(1), neg.sum(1), g.sum(1)], 1) if grid is not None else None
    return BatchScores(scores, flags, torch.cat(grids) if grids else None, totals)


@torch.no_grad()
def image_scores(
    prob: torch.Tensor,
    mask: torch.Tensor,
    threshold: float = 0.5,
    convention: str = DEFAULT_CONVENTION,
    chosen: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Scores of one image in percent, one per metric ``convention`` reports (``{"iou", "f1_fixed", ...}`` for
    ``study``); a pooled metric (cIoU) gives the image's own ratio. ``prob``: HxW probabilities in [0, 1] at the
    mask's size; ``mask``: HxW, > 0.5 = manipulated; ``chosen``: validation thresholds (``f1_val``, ...)."""
    check_convention(convention)
    if prob.ndim != 2 or prob.shape != mask.shape:
        raise ValueError(f"expected two HxW tensors of one size, got {tuple(prob.shape)} and {tuple(mask.shape)}")
    gt = binarise_masks(mask.unsqueeze(0)).to(prob.device)
    chosen_by = {convention: dict(chosen or {})}
    scores = batch_scores(prob.detach().unsqueeze(0), gt, threshold, (convention,), chosen_by).scores[convention]
    out = {}
    for spec in reported_specs(convention, chosen):
        value = scores[spec.name][0]
        out[spec.name] = float(100.0 * value[0] / value[1]) if spec.pooled else float(value)
    return out
