"""Pixel-level building blocks of the per-image scores: probabilities at the mask's size, F1 from counts, the
threshold sweep over an image's own scores, exact average precision. Batched over rows of ``B x N`` flattened
pixels; the conventions that decide the undefined cases are described in :mod:`deeploc.metrics.scores`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

F1_EPS = 1e-32  # DeCLIP's compute_f1: numerator + eps over max(denominator, eps)
# Bound the working set of the batched sort/cumsum (elements per chunk of images).
MAX_CHUNK_ELEMENTS = 1 << 23


def acc_dtype(device: torch.device) -> torch.dtype:
    """Accumulation dtype: float64 for exact-looking ratios, except where the backend lacks it."""
    return torch.float32 if device.type == "mps" else torch.float64


def resize_probs(logits: torch.Tensor, size: tuple[int, int] | Sequence[int]) -> torch.Tensor:
    """Sigmoid, then bilinear resize (``align_corners=False``) to ``size``: ``Bx1xhxw -> BxHxW``.

    ``Bxhxw`` logits are accepted too. Computed in float32 so half-precision logits do not lose ties.
    """
    if logits.ndim == 3:
        logits = logits.unsqueeze(1)
    if logits.ndim != 4 or logits.shape[1] != 1:
        raise ValueError(f"expected logits of shape Bx1xhxw, got {tuple(logits.shape)}")
    size = (int(size[0]), int(size[1]))
    probs = torch.sigmoid(logits.detach().float())
    if tuple(probs.shape[-2:]) != size:
        # Sigmoid before resizing, as the protocol says (resizing logits would give other values).
        probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
    return probs[:, 0]


def f1_percent(
    tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor, dtype: torch.dtype, convention: str
) -> torch.Tensor:
    """F1 in percent from integer counts; 0/0 is 100 (``study``) or 0 (``trufor``), see :mod:`.scores`."""
    den = 2 * tp + fp + fn
    if convention == "study":
        return 100.0 * (((2 * tp).to(dtype) + F1_EPS) / den.to(dtype).clamp(min=F1_EPS))
    # Integer counts: clamping only changes the 0/0 case (to 0/1).
    return 100.0 * ((2 * tp).to(dtype) / den.clamp(min=1).to(dtype))


def last_of_ties(sorted_values: torch.Tensor) -> torch.Tensor:
    """True at the last position of each run of equal values along dim 1 (one per distinct threshold)."""
    last = torch.ones_like(sorted_values, dtype=torch.bool)
    last[:, :-1] = sorted_values[:, 1:] != sorted_values[:, :-1]
    return last


@dataclass(frozen=True)
class KeptSweep:
    """Every row's kept pixels (F1 positives and negatives) sorted ascending, ignored pixels last (as +inf), with
    the counts of the threshold ``t`` = the value at each position (predicted manipulated: value > t)."""

    sorted_v: torch.Tensor
    kept: torch.Tensor  # bool, in sorted order
    tp: torch.Tensor
    fp: torch.Tensor
    fn: torch.Tensor
    tn: torch.Tensor
    run_end: torch.Tensor  # last position of each run of equal values: the real operating points


def kept_sweep(v: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> KeptSweep:
    """The threshold sweep over the distinct values of the kept pixels of each row of ``BxN``."""
    # Ignored pixels go to +inf: they sort last and never create a threshold below a real one; the +inf
    # group's counts equal those of the largest real threshold (nothing predicted), which TruFor includes.
    kept = pos | neg
    keyed = v.masked_fill(~kept, float("inf"))
    sorted_v, order = keyed.sort(dim=1)
    fn = pos.gather(1, order).cumsum(1)  # positives with value <= t are predicted negative
    tn = neg.gather(1, order).cumsum(1)
    tp = pos.sum(1, keepdim=True) - fn
    fp = neg.sum(1, keepdim=True) - tn
    return KeptSweep(sorted_v, kept.gather(1, order), tp, fp, fn, tn, last_of_ties(sorted_v))


def best_f1_sweep(sweep: KeptSweep, dtype: torch.dtype, convention: str) -> torch.Tensor:
    """Best F1 (``study`` or the previous ``trufor`` formula, no inversion) over the sweep's operating points;
    -inf if there is none."""
    f1 = f1_percent(sweep.tp, sweep.fp, sweep.fn, dtype, convention)
    # Only the end of a tie run is a real operating point (a threshold cannot split equal values).
    valid = sweep.run_end.clone()
    if convention == "study":
        # DeCLIP excludes the largest kept value: a position counts only if a larger kept value follows it.
        valid[:, :-1] &= sweep.kept[:, 1:]
        valid[:, -1] = False
    return f1.masked_fill(~valid, float("-inf")).amax(1)


def sort_descending(v: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's values sorted descending, and the ground truth in that order (AP and AUC share it)."""
    sorted_v, order = v.sort(dim=1, descending=True)
    return sorted_v, gt.gather(1, order)


def average_precision(
    v: torch.Tensor, gt: torch.Tensor, dtype: torch.dtype, presorted: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """Exact binary AP in percent per row of ``BxN`` (torchmetrics/sklearn step formula); NaN without positives.
    ``presorted``: :func:`sort_descending` of ``v, gt`` when it is computed already."""
    sorted_v, target = presorted if presorted is not None else sort_descending(v, gt)
    tps = target.cumsum(1)
    n = v.shape[1]
    # AP = sum_k (R_k - R_{k-1}) P_k = (1/P) * sum over positive pixels of the precision at the end of
    # their tie group. End of the group of position i = first tie-run end at or after i (reverse cummin).
    positions = torch.arange(n, device=v.device).expand_as(tps)
    ends = torch.where(last_of_ties(sorted_v), positions, n)
    ends = ends.flip(1).cummin(1).values.flip(1)
    precision = tps.gather(1, ends).to(dtype) / (ends + 1).to(dtype)
    n_pos = tps[:, -1]
    ap = 100.0 * ((precision * target).sum(1) / n_pos.clamp(min=1).to(dtype))
    return torch.where(n_pos > 0, ap, torch.full_like(ap, float("nan")))


def roc_auc(sorted_v: torch.Tensor, target: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Exact ROC AUC in percent per row (sklearn's ``roc_auc_score``: ties form one operating point), from
    :func:`sort_descending`'s output; NaN for a row without positives or without negatives."""
    tps = target.cumsum(1)
    fps = (~target).cumsum(1)
    n = tps.shape[1]
    # Trapezoids between consecutive operating points (the ends of tie runs), from (0, 0): twice the area in
    # integer counts, exact, then one division by 2 P N.
    positions = torch.arange(n, device=tps.device).expand_as(tps)
    first = torch.ones_like(target)
    first[:, 1:] = sorted_v[:, 1:] != sorted_v[:, :-1]
    previous_end = torch.where(first, positions, 0).cummax(1).values - 1  # end of the run before this one
    has_previous = previous_end >= 0
    tps_prev = torch.where(has_previous, tps.gather(1, previous_end.clamp(min=0)), 0)
    fps_prev = torch.where(has_previous, fps.gather(1, previous_end.clamp(min=0)), 0)
    twice_area = ((fps - fps_prev) * (tps + tps_prev)).masked_fill(~last_of_ties(sorted_v), 0).sum(1)
    n_pos, n_neg = tps[:, -1], fps[:, -1]
    auc = 100.0 * (twice_area.to(dtype) / (2 * n_pos * n_neg).clamp(min=1).to(dtype))
    return torch.where((n_pos > 0) & (n_neg > 0), auc, torch.full_like(auc, float("nan")))


def grid_counts(
    v: torch.Tensor, gt: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, grid: torch.Tensor
) -> torch.Tensor:
    """``B x T x 4`` counts at every threshold of the ascending ``grid`` (predicted: value > t): kept positives
    predicted, kept negatives predicted, ground-truth pixels predicted, pixels predicted. One pass (histograms)."""
    b, t = v.shape[0], grid.numel()
    # bucket = how many grid thresholds lie below the value: predicted at threshold k iff bucket > k.
    bucket = torch.bucketize(v.contiguous(), grid.to(v.dtype), right=False)
    out = torch.zeros(b, 4, t + 1, dtype=torch.long, device=v.device)
    for column, members in enumerate((pos, neg, gt, None)):
        weights = torch.ones_like(bucket) if members is None else members.long()
        out[:, column].scatter_add_(1, bucket, weights)
    # Suffix sums over buckets k+1..T give the counts predicted at threshold k.
    above = out.flip(2).cumsum(2).flip(2)[:, :, 1:]
    return above.transpose(1, 2).contiguous()
