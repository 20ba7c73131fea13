"""Per-image localization metrics (IoU, F1_fixed, F1_best, AP) and their torchmetrics aggregate.

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
    ``computeF1``), as deeploc 0.1 did. A metrics.json / eval.json without ``"convention"`` (deeploc 0.1) is refused.

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

Aggregation (``LocalizationMetrics``)
    Means over unique images. Per-image scores and dataset indices are "cat" states, so DDP gathers them
    all; ``compute`` keeps the first occurrence of each index, which drops the duplicates that
    ``DistributedSampler`` pads the last shards with. Without indices every updated row counts (under DDP
    the padded duplicates then count twice: pass indices).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from deeploc.data.regions import DILATE_SIZE, ERODE_SIZE, binarise_masks, f1_positive_count, f1_split
from deeploc.errors import ConfigError
from deeploc.registry import Registry

__all__ = [
    "CONVENTIONS",
    "DEFAULT_CONVENTION",
    "DILATE_SIZE",
    "ERODE_SIZE",
    "IMAGE_SCORE",
    "METRICS",
    "TOP_FRACTION",
    "LocalizationMetrics",
    "MetricSpec",
    "ScoreInputs",
    "average_precision",
    "check_convention",
    "f1_positive_count",
    "image_score",
    "image_scores",
    "metric_label",
    "metric_names",
    "metric_specs",
    "optimized_metrics",
    "recorded_convention",
    "register_metric",
    "resize_probs",
]

CONVENTIONS = ("study", "trufor")
DEFAULT_CONVENTION = "study"
TOP_FRACTION = 0.01
IMAGE_SCORE = "mean of the top 1% of the per-pixel manipulation probabilities (at least one pixel)"
# Validation metrics a sweeper can optimise (the LightningModule logs them every epoch) and what "best" means for each.
_F1_EPS = 1e-32  # DeCLIP's compute_f1: numerator + eps over max(denominator, eps)

# 0/1 flags of the undefined cases, kept per image next to the scores and counted by ``compute``.
_FLAG_NAMES = ("f1_no_positive", "ap_undefined")


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
    direction: str = "max"  # "max" or "min": which way is better (best validation value, sweepers)


METRICS: Registry[MetricSpec] = Registry("metric", "deeploc.metrics", "deeploc.metrics")


def register_metric(name: str, label: str, description: str, direction: str = "max") -> Callable[[Callable], Callable]:
    """Decorator: report ``score`` (``ScoreInputs -> B`` per-image values) as metric ``name`` everywhere (module
    logs, metrics.json, deeploc-eval, reports, console tables, best validation values, ``optimized_metric``).
    ``direction``: ``"max"`` when higher is better, else ``"min"``. A module in this package registers by existing;
    one outside it by being imported (``plugins: [module]`` in deeploc-train / -extract, ``--import module``)."""
    if direction not in ("max", "min"):
        raise ValueError(f"metric {name!r}: direction={direction!r} must be 'max' or 'min'")

    def add(score: Callable[[ScoreInputs], torch.Tensor]) -> Callable[[ScoreInputs], torch.Tensor]:
        METRICS.add(name, MetricSpec(name, label, description, score, direction))
        return score

    return add


def metric_specs() -> list[MetricSpec]:
    """Every metric in report order: the study's four first, then those of other modules and entry points."""
    return [spec for _, spec in METRICS.items()]


def optimized_metrics() -> dict[str, str]:
    """Every value a run can optimize, with its direction: ``val/<name>`` of each registered metric, and
    ``val/loss`` (``"min"``)."""
    return {**{f"val/{spec.name}": spec.direction for spec in metric_specs()}, "val/loss": "min"}


def metric_names() -> tuple[str, ...]:
    """The keys of :func:`metric_specs` (``iou``, ``f1_fixed``, ``f1_best``, ``ap``, ...)."""
    return tuple(spec.name for spec in metric_specs())


def metric_label(name: str) -> str:
    """The column label of metric ``name`` (its key when no metric of that name is registered)."""
    spec = dict(METRICS.items()).get(name)
    return spec.label if spec is not None else name


def check_convention(convention: str) -> str:
    """``convention`` if it is one of :data:`CONVENTIONS`, else a ValueError naming the config key and the fix."""
    if convention not in CONVENTIONS:
        raise ConfigError(
            f"metrics.convention={convention!r} is not one of {CONVENTIONS}: pass metrics.convention=study "
            "(DeCLIP's formulas, the study's numbers; the default) or metrics.convention=trufor (TruFor's, "
            "deeploc <= 0.1)"
        )
    return convention


def recorded_convention(record: Mapping[str, Any], source: str) -> str:
    """The convention a metrics.json / eval.json object (read from file ``source``) was computed with; one without
    (deeploc 0.1) is refused."""
    if "convention" not in record:
        raise ConfigError(
            f"{source} records no metric convention (written by deeploc 0.1, which is not read any more): "
            "train the run again with this deeploc (deeploc-train with the same overrides and if_finished=retrain)"
        )
    return str(record["convention"])


# Bound the working set of the batched sort/cumsum (elements per chunk of images).
_MAX_CHUNK_ELEMENTS = 1 << 23


def _acc_dtype(device: torch.device) -> torch.dtype:
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


def _f1(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor, dtype: torch.dtype, convention: str) -> torch.Tensor:
    """F1 in percent from integer counts; 0/0 is 100 (``study``) or 0 (``trufor``), see the module docstring."""
    den = 2 * tp + fp + fn
    if convention == "study":
        return 100.0 * (((2 * tp).to(dtype) + _F1_EPS) / den.to(dtype).clamp(min=_F1_EPS))
    # Integer counts: clamping only changes the 0/0 case (to 0/1).
    return 100.0 * ((2 * tp).to(dtype) / den.clamp(min=1).to(dtype))


def _last_of_ties(sorted_values: torch.Tensor) -> torch.Tensor:
    """True at the last position of each run of equal values along dim 1 (one per distinct threshold)."""
    last = torch.ones_like(sorted_values, dtype=torch.bool)
    last[:, :-1] = sorted_values[:, 1:] != sorted_values[:, :-1]
    return last


def _best_f1_sweep(
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
    f1 = _f1(tp, fp, fn, dtype, convention)
    # Only the end of a tie run is a real operating point (a threshold cannot split equal values).
    valid = _last_of_ties(sorted_v)
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
    ends = torch.where(_last_of_ties(sorted_v), positions, n)
    ends = ends.flip(1).cummin(1).values.flip(1)
    precision = tps.gather(1, ends).to(dtype) / (ends + 1).to(dtype)
    n_pos = tps[:, -1]
    ap = 100.0 * ((precision * target).sum(1) / n_pos.clamp(min=1).to(dtype))
    return torch.where(n_pos > 0, ap, torch.full_like(ap, float("nan")))


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
    return _f1(tp, (pred & x.f1_negative).sum(1), x.f1_positive.sum(1) - tp, x.dtype, x.convention)


@register_metric("f1_best", "F1_best", "max(best F1 over the image's own thresholds, F1_fixed)")
def _f1_best(x: ScoreInputs) -> torch.Tensor:
    sweep = _best_f1_sweep(x.probs, x.f1_positive, x.f1_negative, x.dtype, x.convention)
    return torch.maximum(sweep, _f1_fixed(x))  # an empty sweep (-inf) leaves F1_fixed


@register_metric("ap", "AP", "binary average precision over the image's pixels")
def _ap(x: ScoreInputs) -> torch.Tensor:
    ap = average_precision(x.probs, x.gt, x.dtype)
    if x.convention == "study":
        ap = ap.masked_fill(~x.gt.any(1), 0.0)  # torchmetrics' value for an empty mask, averaged in by DeCLIP
    return ap


def _batch_scores(probs: torch.Tensor, gt: torch.Tensor, threshold: float, convention: str) -> dict[str, torch.Tensor]:
    """Per-image scores of every registered metric, and the undefined-case flags, for ``BxHxW`` probabilities and
    bool ground truth of the same size (1-D tensors)."""
    if probs.shape != gt.shape:
        raise ValueError(f"probabilities {tuple(probs.shape)} and masks {tuple(gt.shape)} differ in size")
    dtype = _acc_dtype(probs.device)
    b = probs.shape[0]
    pos_img, neg_img = f1_split(gt)
    v, g = probs.reshape(b, -1), gt.reshape(b, -1)
    pos, neg = pos_img.reshape(b, -1), neg_img.reshape(b, -1)
    specs = metric_specs()
    parts: dict[str, list[torch.Tensor]] = {spec.name: [] for spec in specs}
    # Some scores sort every pixel: chunk the batch so huge masks do not blow up memory.
    step = max(1, _MAX_CHUNK_ELEMENTS // max(1, v.shape[1]))
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
    scores = _batch_scores(prob.detach().unsqueeze(0), gt, threshold, convention)
    return {name: float(scores[name][0]) for name in metric_names()}


class LocalizationMetrics(Metric):
    """Mean per-image IoU / F1_fixed / F1_best / AP over unique images, DDP-safe (see module docstring).

    ``compute`` returns ``iou``, ``f1_fixed``, ``f1_best``, ``ap`` (percent), ``n_images`` and the counts of
    the undefined cases, in either ``convention``: ``n_ap_undefined`` (empty masks: AP 0 averaged in for
    ``study``, left out for ``trufor``) and ``n_f1_no_positive`` (no positive left after erosion).
    Counts are float tensors so that Lightning can log them without a dtype warning.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, threshold: float = 0.5, convention: str = DEFAULT_CONVENTION, **kwargs) -> None:
        super().__init__(**kwargs)
        self.threshold = float(threshold)
        self.convention = check_convention(convention)
        self.names = metric_names()
        for name in (*self.names, *_FLAG_NAMES):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        # Dataset index per row, -1 = unknown (always counted).
        self.add_state("sample_index", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, masks: torch.Tensor, indices: torch.Tensor | None = None) -> None:
        """Score a batch: logits ``Bx1xhxw`` (any size), masks ``Bx1xHxW``/``BxHxW`` at native size."""
        gt = binarise_masks(masks.detach())
        with torch.no_grad():
            probs = resize_probs(logits, gt.shape[-2:])
            scores = _batch_scores(probs, gt.to(probs.device), self.threshold, self.convention)
        b = probs.shape[0]
        if indices is None:
            idx = torch.full((b,), -1, dtype=torch.long, device=probs.device)
        else:
            idx = torch.as_tensor(indices).to(device=probs.device, dtype=torch.long).reshape(-1)
            if idx.numel() != b:
                raise ValueError(f"got {idx.numel()} indices for a batch of {b}")
            if bool((idx < 0).any()):
                raise ValueError("dataset indices must be >= 0")
        for name in (*self.names, *_FLAG_NAMES):
            getattr(self, name).append(scores[name])
        self.sample_index.append(idx)

    def compute(self) -> dict[str, torch.Tensor]:
        """Means over unique images (first occurrence of each index kept)."""
        if isinstance(self.sample_index, list) and not self.sample_index:
            nan = torch.tensor(float("nan"), device=self.device)
            zero = torch.tensor(0.0, device=self.device)
            return {**dict.fromkeys(self.names, nan), "n_images": zero, "n_ap_undefined": zero,
                    "n_f1_no_positive": zero}  # fmt: skip
        index = dim_zero_cat(self.sample_index)
        keep = _first_occurrences(index)
        # Sum in sample order, so means are bit-identical whichever process scored which image.
        order = torch.argsort(index[keep], stable=True)
        values = {name: dim_zero_cat(getattr(self, name))[keep][order] for name in (*self.names, *_FLAG_NAMES)}
        count_dtype = torch.get_default_dtype()
        return {
            # NaN marks an image where a score is undefined (trufor's AP of an empty mask): left out of the mean.
            **{name: values[name].nanmean() for name in self.names},
            "n_images": torch.tensor(float(keep.sum()), dtype=count_dtype, device=index.device),
            "n_ap_undefined": values["ap_undefined"].sum().to(count_dtype),
            "n_f1_no_positive": values["f1_no_positive"].sum().to(count_dtype),
        }


def _first_occurrences(index: torch.Tensor) -> torch.Tensor:
    """Bool mask keeping rows with index -1 and the first row of every index >= 0."""
    keep = index < 0
    known = ~keep
    if bool(known.any()):
        ids = index[known]
        uniq, inverse = torch.unique(ids, return_inverse=True)
        order = torch.arange(ids.numel(), device=ids.device)
        first = torch.full((uniq.numel(),), ids.numel(), dtype=torch.long, device=ids.device)
        first = first.scatter_reduce(0, inverse, order, reduce="amin")
        chosen = torch.zeros_like(ids, dtype=torch.bool)
        chosen[first] = True
        keep[known] = chosen
    return keep


def image_score(probs: torch.Tensor | Any, top_fraction: float = TOP_FRACTION) -> float:
    """Mean of the top ``top_fraction`` of the probabilities (at least one value): the image-level score that
    detection and deeploc-predict use."""
    flat = torch.as_tensor(probs).reshape(-1).float()
    k = max(1, math.ceil(top_fraction * flat.numel()))
    return float(flat.topk(k).values.mean())
