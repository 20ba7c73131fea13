"""Per-image localization metrics (IoU, F1_fixed, F1_best, AP) in each metric convention.

Every score is computed per image and then averaged over images; pixels are never pooled across
images. Scores are percentages (0-100). The definitions follow protocol.md ("Metrics"). Two conventions
differ only in the undefined cases (an image with no F1 positive left after erosion, an empty mask, a
single distinct score); ``convention`` selects one (config ``metrics.convention``, recorded as
``"convention"`` in metrics.json and eval.json):

``study`` (default)
    DeCLIP's metric code (bit-ml/DeCLIP ``utils/utils.py``), which the poster reused and whose numbers the
    study reports; read for its facts and re-implemented here.
``trufor``
    TruFor's metric code (grip-unina/TruFor ``metrics.py``: ``extractGTs``, ``computeMetricsContinue``,
    ``computeF1``); deeploc <= 0.1 used it, so a metrics.json without ``"convention"`` is ``trufor``.

Prediction and ground truth (both conventions)
    * ``prob = sigmoid(logits)`` (in float32, also for half-precision logits), then resized bilinearly
      (``align_corners=False``, no antialiasing) to the mask's native size. For upsampling (the study's case,
      decoder output <= mask size) this equals torchvision's ``resize`` used by DeCLIP; the two differ only
      when downsampling, where torchvision antialiases.
    * Ground truth: ``mask > 0.5`` (bool masks are used as they are).
    * A pixel is predicted manipulated iff ``prob > threshold`` (strict), threshold 0.5 by default.

IoU (both conventions)
    ``100 * (inter + 1e-8) / (union + 1e-8)``; an empty prediction on an empty mask scores 100, an
    empty prediction on a non-empty mask (or the reverse) scores ~0.

F1 (boundary pixels ignored)
    * Positives: ground-truth pixels that survive a 15x15 square erosion. Negatives: pixels outside the
      11x11 square dilation of the ground truth. All other pixels (a band around the mask boundary) are
      ignored; the rest are the *kept* pixels. Pixels outside the image never take part in the min/max: a
      region touching the image border is not eroded from the border side (DeCLIP pads the erosion with
      +inf; TruFor's ``scipy.ndimage.minimum_filter`` in ``reflect`` mode and ``cv2.erode`` do the same).
    * F1 over the kept pixels, in percent:
        - ``study``: ``(2 TP + 1e-32) / max(2 TP + FP + FN, 1e-32)``. With no positive left and nothing
          kept predicted positive it is 0/0 -> 100; with TP = 0 otherwise ~0 (1e-32 / count).
        - ``trufor``: ``2 TP / (2 TP + FP + FN)``, and 0 when the denominator is 0.
    * F1_fixed: at ``threshold`` (0.5).
    * Threshold sweep: the distinct scores ``t`` of the kept pixels, each predicting ``prob > t``; only
      the end of a run of equal scores is an operating point (a threshold cannot split ties).
        - ``study``: the largest distinct score (nothing predicted) is excluded, as in DeCLIP. With a
          single distinct kept score the sweep is empty and F1_best = F1_fixed (DeCLIP's code then takes
          ``torch.max`` of an empty tensor, records NaN, and its dataset mean becomes NaN).
        - ``trufor``: the largest is included (nothing predicted, F1 = 0); a threshold below the minimum
          (everything predicted) is not, as in TruFor.
    * F1_best = max(best F1 of the sweep, F1_fixed) (DeCLIP's / the poster's rule, protocol.md).
    * No polarity inversion: TruFor's ``computeLocalizationMetrics`` takes ``max(F1, F1 of the inverted
      map)``; DeCLIP, the poster and protocol.md do not, and it would reward predicting the complement.
    * No positive pixel after erosion (empty mask, or every region thinner than 15 px): ``study`` scores
      100 at a threshold that predicts no kept pixel and ~0 at any other, ``trufor`` scores 0. The image
      stays in the F1 means either way; ``compute`` reports how many such images there are as
      ``n_f1_no_positive``. TruFor's fixed-threshold F1 also becomes NaN when sklearn's confusion matrix
      collapses to 1x1 (a single class among labels and predictions); that artefact is not reproduced.

AP
    Binary average precision over the image's pixels with torchmetrics ``binary_average_precision``
    semantics (thresholds=None, exact; equal to sklearn's ``average_precision_score``):
    ``sum_k (R_k - R_{k-1}) P_k`` over the distinct probabilities in descending order. ``prob`` must already
    be probabilities (torchmetrics would apply a sigmoid to values outside [0, 1]; we do not).
    An image whose mask has no manipulated pixel has undefined AP, counted in ``n_ap_undefined``:
    ``study`` scores it 0 (torchmetrics' value, averaged in as DeCLIP does); ``trufor`` makes it NaN and
    leaves it out of the AP mean. So ``ap_study = ap_trufor * (n_images - n_ap_undefined) / n_images``.
"""

from __future__ import annotations

import torch

from deeploc.data.regions import binarise_masks, f1_split
from deeploc.metrics.pixels import MAX_CHUNK_ELEMENTS, acc_dtype, average_precision, best_f1_sweep, f1_percent
from deeploc.metrics.registry import (
    DEFAULT_CONVENTION,
    ScoreInputs,
    check_convention,
    metric_names,
    metric_specs,
    register_metric,
)

# 0/1 flags of the undefined cases, kept per image next to the scores and counted by ``LocalizationMetrics``.
FLAG_NAMES = ("f1_no_positive", "ap_undefined")


@register_metric("iou", "IoU", "intersection over union of prob > threshold and the mask; empty/empty = 100")
def _iou(x: ScoreInputs) -> torch.Tensor:
    pred = x.probs > x.threshold
    inter = (pred & x.gt).sum(1).to(x.dtype)
    union = (pred | x.gt).sum(1).to(x.dtype)
    return 100.0 * ((inter + 1e-8) / (union + 1e-8))


@register_metric("f1_fixed", "F1_fixed", "F1 at the threshold over the pixels away from the mask boundary")
def _f1_fixed(x: ScoreInputs) -> torch.Tensor:
    pred = x.probs > x.threshold
    tp = (pred & x.f1_positive).sum(1)
    return f1_percent(tp, (pred & x.f1_negative).sum(1), x.f1_positive.sum(1) - tp, x.dtype, x.convention)


@register_metric("f1_best", "F1_best", "max(best F1 over the image's own thresholds, F1_fixed)")
def _f1_best(x: ScoreInputs) -> torch.Tensor:
    sweep = best_f1_sweep(x.probs, x.f1_positive, x.f1_negative, x.dtype, x.convention)
    return torch.maximum(sweep, _f1_fixed(x))  # an empty sweep (-inf) leaves F1_fixed


@register_metric("ap", "AP", "binary average precision over the image's pixels")
def _ap(x: ScoreInputs) -> torch.Tensor:
    ap = average_precision(x.probs, x.gt, x.dtype)
    if x.convention == "study":
        ap = ap.masked_fill(~x.gt.any(1), 0.0)  # torchmetrics' value for an empty mask, averaged in by DeCLIP
    return ap


def batch_scores(probs: torch.Tensor, gt: torch.Tensor, threshold: float, convention: str) -> dict[str, torch.Tensor]:
    """Per-image scores of every registered metric, and the undefined-case flags, for ``BxHxW`` probabilities and
    bool ground truth of the same size (1-D tensors)."""
    if probs.shape != gt.shape:
        raise ValueError(f"probabilities {tuple(probs.shape)} and masks {tuple(gt.shape)} differ in size")
    dtype = acc_dtype(probs.device)
    b = probs.shape[0]
    pos_img, neg_img = f1_split(gt)
    v, g = probs.reshape(b, -1), gt.reshape(b, -1)
    pos, neg = pos_img.reshape(b, -1), neg_img.reshape(b, -1)
    specs = metric_specs()
    parts: dict[str, list[torch.Tensor]] = {spec.name: [] for spec in specs}
    # Some scores sort every pixel: chunk the batch so huge masks do not blow up memory.
    step = max(1, MAX_CHUNK_ELEMENTS // max(1, v.shape[1]))
    for s in range(0, b, step):
        sl = slice(s, s + step)
        inputs = ScoreInputs(v[sl], g[sl], pos[sl], neg[sl], threshold, convention, dtype)
        for spec in specs:
            parts[spec.name].append(spec.score(inputs).to(dtype))
    scores = {name: torch.cat(values) for name, values in parts.items()}
    scores["f1_no_positive"] = (pos.sum(1) == 0).to(dtype)
    scores["ap_undefined"] = (~g.any(1)).to(dtype)
    return scores


@torch.no_grad()
def image_scores(
    prob: torch.Tensor, mask: torch.Tensor, threshold: float = 0.5, convention: str = DEFAULT_CONVENTION
) -> dict[str, float]:
    """Scores of one image in percent, one per registered metric: ``{"iou", "f1_fixed", "f1_best", "ap", ...}``.

    ``prob``: HxW probabilities in [0, 1], already at the mask's size; ``mask``: HxW, > 0.5 = manipulated.
    ``convention``: ``study`` or ``trufor`` (module docstring); an empty mask's AP is 0 or NaN respectively.
    """
    check_convention(convention)
    if prob.ndim != 2 or prob.shape != mask.shape:
        raise ValueError(f"expected two HxW tensors of one size, got {tuple(prob.shape)} and {tuple(mask.shape)}")
    gt = binarise_masks(mask.unsqueeze(0)).to(prob.device)
    scores = batch_scores(prob.detach().unsqueeze(0), gt, threshold, convention)
    return {name: float(scores[name][0]) for name in metric_names()}
