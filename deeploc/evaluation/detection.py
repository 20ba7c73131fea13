"""Real images: how often a localizer flags pristine pixels and images (false alarms), and how well the map's
image-level score tells real from manipulated images (detection).

False alarms (real test images, pixel threshold :data:`~deeploc.evaluation.scoring.THRESHOLD` = 0.5, strict as the metrics)
    * ``false_alarm_pixels``: the share of a real image's pixels with probability > 0.5, averaged over images (%);
    * ``false_alarm_images``: the share of real images with at least one such pixel (%).

Detection (real vs each fake subset, test split; fake = the positive class)
    From two image scores of the probability map at native size: ``top`` (the mean of its top 1%, as
    deeploc-predict's ``image_score``) and ``max`` (its largest value). ``auc`` (ROC AUC) and ``ap`` (average
    precision over all real and fake test images; fake share = ``n_fake / (n_real + n_fake)``) need no threshold;
    both are exact in float64 and equal sklearn's ``roc_auc_score`` / ``average_precision_score`` (tested). ``balanced_accuracy`` = (TPR + TNR) / 2 at ONE threshold per image score,
    chosen on the VALID split: the midpoint between consecutive distinct valid scores that maximises the balanced
    accuracy of the valid real images against the valid images of every evaluated fake subset pooled (ties: the
    lowest such threshold); an image is called fake when its score is > the threshold.

Where this differs from Dolos' own detection protocol (bit-ml/dolos ``methods/patch_forensics/evaluate.py``,
``evaluate_detection``): Dolos reports AP only, for its weakly supervised models, on real CelebA-HQ test vs
repaint-p2 test images; it draws ``min(n_real, n_fake)`` images of each class at random (``random.seed(1337)``),
five times, and prints the mean AP +- 2 std; its Patches model's image score is the mean of the fake-probability
map (Grad-CAM and Attention use their classifier's output). deeploc scores every test image once (no
subsampling, so AP depends on the fake share, which the tables print), every fake subset, two map scores (top 1%
and max; the mean of the map is not used: it mostly measures the manipulated area), and adds AUC and balanced
accuracy at a valid-chosen threshold.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deeploc.evaluation.scoring import THRESHOLD, ImageScores
from deeploc.io import write_json_atomic
from deeploc.metrics import IMAGE_SCORE

SCORES: dict[str, str] = {
    "top": IMAGE_SCORE + " (deeploc-predict's image_score)",
    "max": "maximum of the per-pixel manipulation probabilities",
}
DETECTION_KEYS = ("auc", "ap", "balanced_accuracy")
FALSE_ALARM_KEYS = ("false_alarm_pixels", "false_alarm_images")


def roc_auc(real: torch.Tensor, fake: torch.Tensor) -> float:
    """ROC AUC in percent of fake (positive) vs real scores: P(fake > real) + P(fake == real) / 2 (Mann-Whitney, in
    float64; the area under sklearn's ROC curve, ties included)."""
    _require_both(real, fake)
    r, f = np.sort(real.double().numpy()), fake.double().numpy()
    below, up_to = np.searchsorted(r, f, side="left"), np.searchsorted(r, f, side="right")
    return 100.0 * float((below + 0.5 * (up_to - below)).sum() / (len(r) * len(f)))


def average_precision(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Average precision in percent of fake (positive) vs real scores: the pixel metrics' exact AP (sklearn's step
    formula over the distinct scores), here over images."""
    from deeploc.metrics import average_precision

    _require_both(real, fake)
    scores = torch.cat([real, fake]).double()[None]
    labels = torch.cat([torch.zeros(len(real), dtype=torch.bool), torch.ones(len(fake), dtype=torch.bool)])[None]
    return float(average_precision(scores, labels, torch.float64)[0])


def balanced_accuracy(real: torch.Tensor, fake: torch.Tensor, threshold: float) -> float:
    """(TPR + TNR) / 2 in percent, an image called fake when its score is > ``threshold``."""
    _require_both(real, fake)
    return 50.0 * (float((fake > threshold).double().mean()) + float((real <= threshold).double().mean()))


def choose_threshold(real: torch.Tensor, fake: torch.Tensor) -> float:
    """The threshold with the best balanced accuracy on these scores (module docstring): a midpoint between
    consecutive distinct scores (the largest score when all are equal); ties go to the lowest threshold."""
    _require_both(real, fake)
    values = np.unique(torch.cat([real, fake]).double().numpy())
    candidates = (values[:-1] + values[1:]) / 2 if len(values) > 1 else values
    real_sorted, fake_sorted = np.sort(real.double().numpy()), np.sort(fake.double().numpy())
    tnr = np.searchsorted(real_sorted, candidates, side="right") / len(real_sorted)
    tpr = 1.0 - np.searchsorted(fake_sorted, candidates, side="right") / len(fake_sorted)
    return float(candidates[int(np.argmax(tpr + tnr))])  # argmax: the first (lowest) of equal maxima


def _require_both(real: torch.Tensor, fake: torch.Tensor) -> None:
    if len(real) == 0 or len(fake) == 0:
        raise ValueError(f"detection needs real and fake images, got {len(real)} real and {len(fake)} fake")


def false_alarms(real: ImageScores) -> dict[str, float]:
    """The false-alarm rates of real images (module docstring), in percent, with their count."""
    return {
        "false_alarm_pixels": 100.0 * float(real.flagged.mean()),
        "false_alarm_images": 100.0 * float((real.flagged > 0).double().mean()),
        "n_real": float(len(real.names)),
    }


@dataclass(frozen=True)
class Detection:
    """Everything ``deeploc-eval --real`` measures, ready to write (:func:`write_detection`)."""

    real: dict[str, float]  # false_alarm_pixels, false_alarm_images (%), n_real
    subsets: dict[str, dict[str, dict[str, float | None]]]  # subset -> score kind -> auc, ap, balanced_accuracy, ...
    thresholds: dict[str, float | None]  # score kind -> the valid-chosen threshold (None: no valid split used)
    threshold_note: str  # how the thresholds were chosen, or why there are none


def detect(
    real_test: ImageScores,
    fake_test: Mapping[str, ImageScores],
    real_valid: ImageScores | None = None,
    fake_valid: Sequence[ImageScores] = (),
) -> Detection:
    """False alarms on ``real_test`` and detection of each fake test subset against it; balanced accuracies at
    thresholds chosen on ``real_valid`` vs the pooled ``fake_valid`` (None: none reported)."""
    thresholds: dict[str, float | None] = dict.fromkeys(SCORES)
    if real_valid is not None and fake_valid:
        for kind in SCORES:
            pooled = torch.cat([f.score(kind) for f in fake_valid])
            thresholds[kind] = choose_threshold(real_valid.score(kind), pooled)
        note = (
            f"threshold per image score chosen on the valid split ({len(real_valid.names)} real vs "
            f"{sum(len(f.names) for f in fake_valid)} fake images of the evaluated subsets pooled)"
        )
    else:
        note = "no valid split used (--threshold-split none): no balanced accuracy"
    subsets: dict[str, dict[str, dict[str, float | None]]] = {}
    for name, fake in fake_test.items():
        subsets[name] = {}
        for kind in SCORES:
            r, f = real_test.score(kind), fake.score(kind)
            t = thresholds[kind]
            subsets[name][kind] = {
                "auc": roc_auc(r, f),
                "ap": average_precision(r, f),
                "balanced_accuracy": None if t is None else balanced_accuracy(r, f, t),
                "threshold": t,
                "n_real": float(len(r)),
                "n_fake": float(len(f)),
            }
    return Detection(false_alarms(real_test), subsets, thresholds, note)


def write_detection(out_dir: Path, detection: Detection, context: dict[str, Any]) -> list[Path]:
    """``detection.json`` (context, definitions, every number), ``detection.csv`` (one row per fake subset and image
    score) and ``detection.md``; every table names the pixel threshold and how the image threshold was chosen."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        **context,
        "pixel_threshold": THRESHOLD,
        "image_scores": SCORES,
        "thresholds": detection.thresholds,
        "threshold_note": detection.threshold_note,
        "real": detection.real,
        "test": detection.subsets,
    }
    json_path = write_json_atomic(out_dir / "detection.json", payload)
    csv_path = out_dir / "detection.csv"
    header = ["subset", "split", "image_score", *DETECTION_KEYS, "threshold", "n_real", "n_fake", "pixel_threshold"]
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*header, *FALSE_ALARM_KEYS])
        for name, kinds in detection.subsets.items():
            for kind, row in kinds.items():
                values = [_cell(row[k], 4) for k in (*DETECTION_KEYS, "threshold")]
                counts = [f"{row['n_real']:.0f}", f"{row['n_fake']:.0f}", THRESHOLD]
                alarms = [_cell(detection.real[k], 4) for k in FALSE_ALARM_KEYS]
                writer.writerow([name, context["split"], kind, *values, *counts, *alarms])
    md_path = out_dir / "detection.md"
    md_path.write_text(detection_markdown(detection, context) + "\n", encoding="utf-8")
    return [json_path, csv_path, md_path]


def detection_markdown(detection: Detection, context: Mapping[str, Any]) -> str:
    """The false-alarm line and the detection table (percent), with their thresholds and definitions."""
    real = detection.real
    lines = [
        f"False alarms on {real['n_real']:.0f} real {context['split']} images (pixel threshold {THRESHOLD}): "
        f"{real['false_alarm_pixels']:.2f}% of pixels flagged on average, {real['false_alarm_images']:.2f}% of images "
        "with a flagged pixel.",
        "",
        "| subset | n real / fake | "
        + " | ".join(f"{k} ({kind})" for kind in SCORES for k in ("AUC", "AP", "bal. acc."))
        + " |",
        "|---|---|" + "---|" * (3 * len(SCORES)),
    ]
    for name, kinds in detection.subsets.items():
        first = next(iter(kinds.values()))
        cells = [_cell(kinds[kind][k], 2) or "—" for kind in SCORES for k in DETECTION_KEYS]
        lines.append(f"| {name} | {first['n_real']:.0f} / {first['n_fake']:.0f} | " + " | ".join(cells) + " |")
    thresholds = ", ".join(f"{k} > {_cell(t, 4) or '—'}" for k, t in detection.thresholds.items())
    lines += [
        "",
        f"Image scores: top = {SCORES['top']}; max = {SCORES['max']}. Fake = positive class. Balanced accuracy at "
        f"{thresholds} ({detection.threshold_note}).",
    ]
    return "\n".join(lines)


def _cell(value: float | None, digits: int) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def write_image_scores(path: Path, images: Mapping[str, ImageScores], split: str) -> Path:
    """One row per image: its subset (``real`` for pristine images), split, name and image-level values (0-1)."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["subset", "split", "name", "top", "max", "flagged_fraction"])
        for subset, scores in images.items():
            for i, name in enumerate(scores.names):
                values = (scores.top[i], scores.max[i], scores.flagged[i])
                writer.writerow([subset, split, name, *(repr(float(v)) for v in values)])  # exact: ties stay ties
    return path
