"""Pixel-level building blocks of the per-image scores: probabilities at the mask's size, F1 from counts, the
threshold sweep over an image's own scores, exact average precision. Batched over rows of ``B x N`` flattened
pixels; the conventions that decide the undefined cases are described in :mod:`deeploc.metrics.scores`."""

from __future__ import annotations

from collections.abc import Sequence

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


def best_f1_sweep(
    v: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, dtype: torch.dtype, convention: str
) -> torch.Tensor:
    """Best F1 over thresholds = distinct values among kept pixels (``BxN`` flattened); -inf if there is none."""
    # Ignored pixels go to +inf: they sort last and never create a threshold below a real one; the +inf
    # group's counts equal those of the largest real threshold (nothing predicted), which TruFor includes.
    kept = pos | neg
    keyed = v.masked_fill(~kept, float("inf"))
    sorted_v, order = keyed.sort(dim=1)
    fn = pos.gather(1, order).cumsum(1)  # positives with value <= t are predicted negative
    tn = neg.gather(1, order).cumsum(1)
    tp = pos.sum(1, keepdim=True) - fn
    fp = neg.sum(1, keepdim=True) - tn
    f1 = f1_percent(tp, fp, fn, dtype, convention)
    # Only the end of a tie run is a real operating point (a threshold cannot split equal values).
    valid = last_of_ties(sorted_v)
    if convention == "study":
        # DeCLIP excludes the largest kept value: a position counts only if a larger kept value follows it.
        valid[:, :-1] &= kept.gather(1, order)[:, 1:]
        valid[:, -1] = False
    return f1.masked_fill(~valid, float("-inf")).amax(1)


def average_precision(v: torch.Tensor, gt: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Exact binary AP in percent per row of ``BxN`` (torchmetrics/sklearn step formula); NaN without positives."""
    sorted_v, order = v.sort(dim=1, descending=True)
    target = gt.gather(1, order)
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
