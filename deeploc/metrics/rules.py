"""Each convention's formulas from confusion counts: F1 and IoU at a threshold. One home for the formulas that the
fixed threshold (0.5), the validation-chosen threshold and the validation grid all use, so the three agree.

Counts are integers per image (``B``) or per image and threshold (``B x T``). F1 in ``study`` and ``trufor`` counts
the *kept* pixels only (F1 positives survive the 15x15 erosion, negatives lie outside the 11x11 dilation); ``benco``
counts every pixel. All results are percentages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deeploc.metrics.pixels import f1_percent

BENCO_EPS = 1e-8  # IMDL-BenCo's PixelF1 / PixelIOU: "+ 1e-8" in every denominator (float32 tensors)
TRUFOR_EPS = 1e-32  # TruFor's computeF1: 2 TP / max(2 TP + FN + FP, 1e-32)
IOU_EPS = 1e-8  # DeCLIP's IoU: (inter + 1e-8) / (union + 1e-8)


@dataclass(frozen=True)
class Counts:
    """Confusion counts at one threshold (predicted manipulated: probability > threshold)."""

    tp: torch.Tensor  # kept positives predicted
    fp: torch.Tensor  # kept negatives predicted
    fn: torch.Tensor  # kept positives not predicted
    tn: torch.Tensor  # kept negatives not predicted
    inter: torch.Tensor  # ground-truth pixels predicted (all pixels)
    pred: torch.Tensor  # pixels predicted (all pixels)
    gt: torch.Tensor  # ground-truth pixels (all pixels)


def counts_at(probs: torch.Tensor, gt: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, threshold: float) -> Counts:
    """The counts of each row of ``B x N`` at ``threshold``."""
    pred = probs > threshold
    tp = (pred & pos).sum(1)
    fp = (pred & neg).sum(1)
    return Counts(tp, fp, pos.sum(1) - tp, neg.sum(1) - fp, (pred & gt).sum(1), pred.sum(1), gt.sum(1))


def counts_from_grid(grid: torch.Tensor, totals: torch.Tensor) -> Counts:
    """Counts of ``B x T`` from :func:`deeploc.metrics.pixels.grid_counts` (``B x T x 4``) and each row's totals
    (``B x 3``: kept positives, kept negatives, ground-truth pixels)."""
    tp, fp, inter, pred = grid.unbind(2)
    n_pos, n_neg, n_gt = (column[:, None] for column in totals.unbind(1))
    return Counts(tp, fp, n_pos - tp, n_neg - fp, inter, pred, n_gt.expand_as(inter))


def trufor_f1(
    tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor, tn: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """TruFor's ``max(computeF1(FP, TP, FN, TN), computeF1(TN, FN, TP, FP))``: the F1 of the map and of its inverse
    (1 - map: the kept pixels not predicted become the predicted ones), in percent."""
    tp, fp, fn, tn = (c.to(dtype) for c in (tp, fp, fn, tn))
    f1 = 2 * tp / (2 * tp + fn + fp).clamp(min=TRUFOR_EPS)
    f1_inverse = 2 * fn / (2 * fn + tp + tn).clamp(min=TRUFOR_EPS)
    return 100.0 * torch.maximum(f1, f1_inverse).to(torch.float64)


def f1_rule(convention: str, c: Counts, dtype: torch.dtype) -> torch.Tensor:
    """F1 at a threshold in ``convention``, from its counts (NaN where the convention leaves the image out)."""
    if convention == "study":
        return f1_percent(c.tp, c.fp, c.fn, dtype, "study")
    if convention == "trufor":
        # computeMetrics_th: sklearn's confusion_matrix over the kept pixels collapses to 1x1 when labels and
        # predictions hold one class between them (or there is no kept pixel); indexing cm[1, 0] then fails and
        # the image's F1 is NaN, which TruFor's np.nanmean leaves out.
        has_one = (c.tp + c.fn + c.tp + c.fp) > 0  # a kept positive, or a kept pixel predicted
        has_zero = (c.fp + c.tn + c.fn + c.tn) > 0  # a kept negative, or a kept pixel not predicted
        f1 = trufor_f1(c.tp, c.fp, c.fn, c.tn, torch.float64)  # int64 counts: float64 arithmetic in TruFor
        return f1.masked_fill(~(has_one & has_zero), float("nan"))
    # benco: PixelF1 "origin" over every pixel, in float32 tensors as BenCo computes it.
    tp, fp, fn = (x.to(torch.float32) for x in (c.inter, c.pred - c.inter, c.gt - c.inter))
    precision = tp / (tp + fp + BENCO_EPS)
    recall = tp / (tp + fn + BENCO_EPS)
    return 100.0 * (2 * precision * recall / (precision + recall + BENCO_EPS)).to(torch.float64)


def iou_rule(convention: str, c: Counts, dtype: torch.dtype) -> torch.Tensor:
    """IoU at a threshold in ``convention`` (``study``: empty/empty = 100; ``benco``: empty/empty = 0)."""
    union = c.pred + c.gt - c.inter
    if convention == "benco":
        inter = c.inter.to(torch.float32)
        return 100.0 * (inter / (union.to(torch.float32) + BENCO_EPS)).to(torch.float64)
    return 100.0 * ((c.inter.to(dtype) + IOU_EPS) / (union.to(dtype) + IOU_EPS))
