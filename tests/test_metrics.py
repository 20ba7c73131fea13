"""Tests of deeploc.metrics against an independent, straightforward numpy/scipy/sklearn implementation."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from scipy import ndimage
from sklearn.metrics import average_precision_score
from torch.utils.data import DistributedSampler
from torchmetrics.functional.classification import binary_average_precision

from deeploc.cli.evaluate import main as eval_main
from deeploc.config import CONF_DIR
from deeploc.io import write_json_atomic
from deeploc.metrics import LocalizationMetrics, image_scores, resize_probs
from deeploc.runs.rundir import RunDir
from deeploc.training.module import LocalizationModule
from deeploc.training.steps import build_model
from tests.e2e import run_cli, train_args

SCORE_KEYS = ("iou", "f1_fixed", "f1_best", "ap")


# --------------------------------------------------------------------------------------------------
# Independent reference of the study's formulas: one image at a time, brute force over thresholds, sklearn AP.
# (TruFor's and BenCo's references: tests/test_metric_conventions.py.)
# --------------------------------------------------------------------------------------------------
def _window_extreme(gt: np.ndarray, size: int, pad_value: float, reduce) -> np.ndarray:
    """min/max of every size x size window, pixels outside the image = `pad_value` (one shifted copy per offset)."""
    r = size // 2
    padded = np.pad(gt.astype(np.float64), r, constant_values=pad_value)
    h, w = gt.shape
    out = padded[:h, :w].copy()
    for dy in range(size):
        for dx in range(size):
            out = reduce(out, padded[dy : dy + h, dx : dx + w])
    return out


def ref_scores_study(prob: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """DeCLIP's formulas (bit-ml/DeCLIP utils/utils.py, as protocol.md describes them), one image, brute force."""
    gt = mask > 0.5
    pred = prob > threshold
    inter = np.logical_and(pred, gt).sum()
    union = np.logical_or(pred, gt).sum()
    iou = 100.0 * (inter + 1e-8) / (union + 1e-8)

    # Erosion pads with +inf (DeCLIP's min_filter), dilation with 0 (its max_filter's F.pad).
    pos = _window_extreme(gt, 15, np.inf, np.minimum) > 0.5
    neg = ~(_window_extreme(gt, 11, 0.0, np.maximum) > 0.5)
    kept = pos | neg

    def f1_of(p: np.ndarray) -> float:
        tp = np.logical_and(p, pos).sum()
        fp = np.logical_and(p, neg).sum()
        fn = np.logical_and(~p, pos).sum()
        return 100.0 * (2 * tp + 1e-32) / max(2 * tp + fn + fp, 1e-32)

    f1_fixed = f1_of(pred)
    # Every distinct kept score but the largest is a threshold; with a single one the sweep is empty and
    # F1_best is F1_fixed (DeCLIP's torch.max of an empty tensor raises and records NaN: docs/decisions.md).
    sweep = [f1_of(prob > t) for t in np.unique(prob[kept])[:-1]]
    ap = 100.0 * average_precision_score(gt.ravel(), prob.ravel()) if gt.any() else 0.0  # torchmetrics' 0
    return {"iou": iou, "f1_fixed": f1_fixed, "f1_best": max([*sweep, f1_fixed]), "ap": ap}


def ref_bilinear(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Half-pixel-centre bilinear resize (align_corners=False), written from the definition."""

    def axis(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, wy = axis(out_h, x.shape[0])
    x0, x1, wx = axis(out_w, x.shape[1])
    top = x[y0][:, x0] * (1 - wx) + x[y0][:, x1] * wx
    bottom = x[y1][:, x0] * (1 - wx) + x[y1][:, x1] * wx
    return top * (1 - wy)[:, None] + bottom * wy[:, None]


def random_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    kind = rng.integers(0, 6)
    mask = np.zeros((h, w), dtype=np.float32)
    if kind == 0:
        return mask  # empty
    if kind == 1:
        mask[rng.integers(0, h), rng.integers(0, w)] = 1.0  # one pixel
        return mask
    if kind == 2:  # thin stroke: nothing survives the erosion
        r = rng.integers(0, h)
        mask[r : r + 3, :] = 1.0
        return mask
    for _ in range(rng.integers(1, 4)):  # rectangles, often touching the border
        y0, x0 = rng.integers(-5, h - 2), rng.integers(-5, w - 2)
        y1, x1 = y0 + rng.integers(4, h + 1), x0 + rng.integers(4, w + 1)
        mask[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = 1.0
    if kind == 5:  # soft values around 0.5 exercise the > 0.5 binarisation
        mask *= rng.choice([0.4, 0.6, 1.0], size=mask.shape).astype(np.float32)
    return mask


def random_prob(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    kind = rng.integers(0, 4)
    if kind == 0:
        prob = rng.random(mask.shape)
    elif kind == 1:  # informative but noisy
        prob = np.clip(0.6 * (mask > 0.5) + 0.5 * rng.random(mask.shape) - 0.05, 0, 1)
    elif kind == 2:  # few distinct values: many ties
        prob = np.round(rng.random(mask.shape) * 8) / 8
    else:  # coarse informative map with ties
        prob = np.round((0.5 * (mask > 0.5) + 0.6 * rng.random(mask.shape)) * 10) / 10
    return np.clip(prob, 0, 1).astype(np.float32)


def subset(scores: dict[str, float], keys: tuple[str, ...] = SCORE_KEYS) -> dict[str, float]:
    return {k: scores[k] for k in keys}


def assert_scores_close(got: dict[str, float], want: dict[str, float], context: str = "") -> None:
    for key in SCORE_KEYS:
        g, w = got[key], want[key]
        if math.isnan(w):
            assert math.isnan(g), f"{context} {key}: got {g}, want NaN"
        else:
            assert g == pytest.approx(w, abs=1e-6), f"{context} {key}: got {g}, want {w}"


def trufor_scores(prob: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    return image_scores(torch.from_numpy(prob), torch.from_numpy(mask), threshold, convention="trufor")


def benco_scores(prob: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    return image_scores(torch.from_numpy(prob), torch.from_numpy(mask), threshold, convention="benco")


def study_scores(prob: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    return image_scores(torch.from_numpy(prob), torch.from_numpy(mask), threshold, convention="study")


# --------------------------------------------------------------------------------------------------
# image_scores
# --------------------------------------------------------------------------------------------------
def test_ap_matches_torchmetrics_binary_average_precision() -> None:
    rng = np.random.default_rng(7)
    for _ in range(10):
        mask = np.zeros((32, 40), dtype=np.float32)
        mask[rng.integers(0, 16) :, rng.integers(0, 20) :] = 1.0
        prob = random_prob(rng, mask)
        want = 100.0 * float(
            binary_average_precision(torch.from_numpy(prob).flatten(), torch.from_numpy(mask > 0.5).flatten())
        )
        assert study_scores(prob, mask)["ap"] == pytest.approx(want, abs=1e-4)


def test_empty_mask_in_each_convention() -> None:
    empty = np.zeros((32, 32), np.float32)
    quiet = np.full((32, 32), 0.1, np.float32)
    # study: empty/empty scores 100 (AP: torchmetrics' 0, averaged in); pixel AUC undefined (one class): NaN.
    s = study_scores(quiet, empty)
    assert subset(s) == {"iou": 100.0, "f1_fixed": 100.0, "f1_best": 100.0, "ap": 0.0} and math.isnan(s["auc"])
    # trufor: sklearn's 1x1 confusion matrix makes F1@0.5 NaN (left out); the sweep gives 0 (map and inverse).
    t = trufor_scores(quiet, empty)
    assert math.isnan(t["f1_fixed"]) and t["f1_best"] == 0.0 and set(t) == {"f1_fixed", "f1_best"}
    # benco: 0 for everything, averaged in (BenCo #46).
    b = benco_scores(quiet, empty)
    assert (b["iou"], b["f1_fixed"], b["auc"]) == (0.0, 0.0, 0.0)
    noisy = quiet.copy()
    noisy[:4, :5] = 0.9  # false positives: every convention scores ~0
    assert study_scores(noisy, empty)["iou"] == pytest.approx(0.0, abs=1e-6)
    assert trufor_scores(noisy, empty) == {"f1_fixed": 0.0, "f1_best": 0.0}  # 2x2 confusion matrix now
    assert benco_scores(noisy, empty)["f1_fixed"] == 0.0


def test_full_mask_in_each_convention() -> None:
    mask = np.ones((24, 24), np.float32)
    hi, lo = np.full((24, 24), 0.9, np.float32), np.full((24, 24), 0.2, np.float32)
    # The border does not erode, so every pixel is an F1 positive; there are no negatives.
    assert subset(study_scores(hi, mask)) == pytest.approx(dict.fromkeys(SCORE_KEYS, 100.0))
    assert math.isnan(study_scores(hi, mask)["auc"])  # no negative pixel: AUC undefined
    # TruFor's inverted map: predicting nothing on an all-manipulated image scores 100 (F1 of 1 - map).
    assert math.isnan(trufor_scores(hi, mask)["f1_fixed"]) and trufor_scores(hi, mask)["f1_best"] == 100.0
    assert trufor_scores(lo, mask) == {"f1_fixed": 100.0, "f1_best": 100.0}
    b = benco_scores(hi, mask)
    assert b["iou"] == pytest.approx(100.0) and b["f1_fixed"] == pytest.approx(100.0) and math.isnan(b["auc"])


def test_one_pixel_region_in_each_convention() -> None:
    mask = np.zeros((32, 32), np.float32)
    mask[10, 20] = 1.0
    prob = np.full((32, 32), 0.1, np.float32)
    prob[10, 20] = 0.9
    s = study_scores(prob, mask)
    assert s["iou"] == pytest.approx(100.0) and s["ap"] == pytest.approx(100.0) and s["auc"] == 100.0
    assert s["f1_fixed"] == 100.0 and s["f1_best"] == 100.0  # nothing survives the erosion: DeCLIP's 0/0 = 100
    t = trufor_scores(prob, mask)
    assert math.isnan(t["f1_fixed"]) and t["f1_best"] == 0.0  # no kept positive: TruFor's NaN / 0
    assert benco_scores(prob, mask)["f1_fixed"] == pytest.approx(100.0)  # every pixel counts in BenCo


def test_region_touching_the_border_is_not_eroded_from_that_side() -> None:
    # A full-height strip, columns 0..9: 15x15 erosion keeps columns 0..2 (c + 7 <= 9) on every row,
    # 11x11 dilation reaches column 14, so negatives are columns 15..39.
    mask = np.zeros((40, 40), np.float32)
    mask[:, :10] = 1.0
    prob = np.full((40, 40), 0.1, np.float32)
    prob[:, :2] = 0.9  # TP = 80, FN = 40 (column 2), FP = 0 -> F1 = 160 / 200
    s = study_scores(prob, mask)
    assert s["f1_fixed"] == pytest.approx(80.0)
    assert s["f1_best"] == pytest.approx(80.0)
    # With a zero border the strip (10 < 15 wide) would vanish and F1 would be 0.
    prob[:, 2] = 0.6
    prob[:, 20] = 0.7  # false positives among the negatives: 40 at 0.5
    s = study_scores(prob, mask)
    assert s["f1_fixed"] == pytest.approx(100.0 * 240 / (240 + 40))
    # Sweep: t=0.1 gives 240/280, t=0.6 160/240, t=0.7 160/200, t=0.9 0 -> best 240/280.
    assert s["f1_best"] == pytest.approx(100.0 * 240 / 280)
    # Corner square 10x10: 3x3 positives survive.
    corner = np.zeros((40, 40), np.float32)
    corner[:10, :10] = 1.0
    cprob = np.full((40, 40), 0.1, np.float32)
    cprob[:3, :3] = 0.9
    assert study_scores(cprob, corner)["f1_fixed"] == pytest.approx(100.0)
    cprob[3, 3] = 0.9  # an ignored boundary pixel: no change
    assert study_scores(cprob, corner)["f1_fixed"] == pytest.approx(100.0)
    cprob[30, 30] = 0.9  # a negative: FP = 1 -> 18 / 19
    assert study_scores(cprob, corner)["f1_fixed"] == pytest.approx(100.0 * 18 / 19)


def test_all_equal_probabilities() -> None:
    mask = np.zeros((40, 40), np.float32)
    mask[5:30, 5:25] = 1.0
    n_pos_gt = 25 * 20
    pos = int(ndimage.minimum_filter(mask > 0.5, size=15).sum())  # 11 x 6
    neg = int((~ndimage.maximum_filter(mask > 0.5, size=11)).sum())
    assert pos == 11 * 6
    hi = study_scores(np.full((40, 40), 0.7, np.float32), mask)
    assert hi["iou"] == pytest.approx(100.0 * n_pos_gt / 1600)
    assert hi["f1_fixed"] == pytest.approx(100.0 * 2 * pos / (2 * pos + neg))
    assert hi["f1_best"] == pytest.approx(hi["f1_fixed"])  # the only sweep point predicts nothing
    assert hi["ap"] == pytest.approx(100.0 * n_pos_gt / 1600)  # one tie group: precision = prevalence
    lo = study_scores(np.full((40, 40), 0.3, np.float32), mask)
    assert lo["f1_fixed"] == pytest.approx(0.0, abs=1e-20) and lo["f1_best"] == lo["f1_fixed"]
    assert lo["ap"] == pytest.approx(hi["ap"])


def test_perfect_prediction_scores_100() -> None:
    rng = np.random.default_rng(3)
    for _ in range(5):
        mask = np.zeros((48, 48), np.float32)
        y, x = rng.integers(0, 30, size=2)
        mask[y : y + 18, x : x + 18] = 1.0
        for prob in (mask.copy(), np.where(mask > 0.5, 0.97, 0.02).astype(np.float32)):
            for score in (study_scores, trufor_scores, benco_scores):
                s = score(prob, mask)
                assert s == pytest.approx(dict.fromkeys(s, 100.0)), score.__name__


def test_sweep_does_not_split_ties() -> None:
    # Positives and a negative share one value: no threshold separates them.
    mask = np.zeros((40, 40), np.float32)
    mask[:20, :] = 1.0  # positives: rows 0..12, negatives: rows 25..39
    prob = np.full((40, 40), 0.1, np.float32)
    prob[:13, :] = 0.4
    prob[39, :] = 0.4  # 40 negatives tied with the 520 positives
    s = study_scores(prob, mask)
    assert s["f1_fixed"] == pytest.approx(0.0, abs=1e-20)
    assert s["f1_best"] == pytest.approx(100.0 * 1040 / (1040 + 40))  # at t = 0.1
    assert subset(s) == pytest.approx(ref_scores_study(prob, mask))


def test_image_scores_checks_shapes() -> None:
    with pytest.raises(ValueError):
        image_scores(torch.rand(8, 8), torch.zeros(16, 16))


# --------------------------------------------------------------------------------------------------
# convention="study" (the default): DeCLIP's formulas
# --------------------------------------------------------------------------------------------------
def study_case(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A random (prob, mask) pair, with the regimes where the conventions differ made frequent."""
    kind = rng.integers(0, 5)
    mask = np.ones((h, w), np.float32) if kind == 0 else random_mask(rng, h, w)  # kind 0: all positive
    prob = random_prob(rng, mask)
    if kind == 1:  # a single distinct score
        prob = np.full((h, w), rng.choice([0.2, 0.5, 0.8]), np.float32)
    elif kind == 2:  # predicts the mask itself (a thin region then has nothing kept predicted positive)
        prob = np.where(mask > 0.5, 0.9, 0.1).astype(np.float32)
        if rng.random() < 0.3:
            prob[rng.integers(0, h), rng.integers(0, w)] = 0.7  # sometimes one stray pixel
    return prob, mask


def test_study_matches_an_independent_implementation_of_declips_formulas() -> None:
    rng = np.random.default_rng(2024)
    sizes = [(48, 48), (40, 56), (17, 23), (8, 8), (64, 31), (30, 30)]
    seen = dict.fromkeys(("ties", "single", "empty", "thin", "full", "border", "thin_100"), 0)
    for case in range(100):
        h, w = sizes[case % len(sizes)]
        prob, mask = study_case(rng, h, w)
        threshold = 0.5 if case % 4 else float(rng.choice([0.3, 0.7]))
        want = ref_scores_study(prob, mask, threshold)
        got = study_scores(prob, mask, threshold)
        assert_scores_close(got, want, f"case {case}")
        gt = mask > 0.5
        has_positive = bool(ndimage.minimum_filter(gt, size=15, mode="nearest").any())
        seen["ties"] += len(np.unique(prob)) < prob.size // 2
        seen["single"] += len(np.unique(prob)) == 1
        seen["empty"] += not gt.any()
        seen["thin"] += gt.any() and not has_positive
        seen["full"] += gt.all()
        seen["border"] += has_positive and bool(gt[0].any() or gt[-1].any() or gt[:, 0].any() or gt[:, -1].any())
        seen["thin_100"] += not has_positive and want["f1_best"] == 100.0
    # The random cases do cover every regime the brief names.
    assert min(seen.values()) >= 4, seen


def test_study_no_positive_after_erosion_scores_100_without_false_positive() -> None:
    # A 3-pixel stroke (rows 10..12): nothing survives the 15x15 erosion; its 11x11 dilation covers rows 5..17.
    mask = np.zeros((40, 40), np.float32)
    mask[10:13, :] = 1.0
    prob = np.where(mask > 0.5, 0.9, 0.1).astype(np.float32)
    s = study_scores(prob, mask)
    # Kept pixels are all negatives at 0.1: nothing kept is predicted, 0/0 -> (0 + 1e-32) / 1e-32 = 100.
    assert subset(s) == pytest.approx({"iou": 100.0, "f1_fixed": 100.0, "f1_best": 100.0, "ap": 100.0})
    assert trufor_scores(prob, mask)["f1_best"] == 0.0  # TruFor's 0
    prob[30, 30] = 0.7  # one false positive among the negatives
    s = study_scores(prob, mask)
    assert s["f1_fixed"] == pytest.approx(0.0, abs=1e-20) and s["f1_best"] == pytest.approx(0.0, abs=1e-20)


def test_study_empty_mask() -> None:
    empty = np.zeros((32, 32), np.float32)
    s = study_scores(np.full((32, 32), 0.1, np.float32), empty)
    assert subset(s) == {"iou": 100.0, "f1_fixed": 100.0, "f1_best": 100.0, "ap": 0.0}  # AP: torchmetrics' 0
    low = (np.random.default_rng(0).random((32, 32)) * 0.4).astype(np.float32)
    s = study_scores(low, empty)
    # Every sweep threshold below the largest predicts some negative (~0); F1_fixed predicts nothing (100).
    assert s["f1_fixed"] == 100.0 and s["f1_best"] == 100.0
    prob = np.full((32, 32), 0.1, np.float32)
    prob[:4, :5] = 0.9
    s = study_scores(prob, empty)
    assert s["iou"] == pytest.approx(0.0, abs=1e-6)
    assert s["f1_fixed"] == pytest.approx(0.0, abs=1e-20) and s["f1_best"] == pytest.approx(0.0, abs=1e-20)
    want_ap = float(binary_average_precision(torch.from_numpy(prob).flatten(), torch.zeros(32 * 32, dtype=torch.long)))
    assert s["ap"] == 100.0 * want_ap == 0.0


def test_study_single_distinct_score_uses_the_fixed_threshold() -> None:
    mask = np.zeros((40, 40), np.float32)
    mask[5:30, 5:25] = 1.0
    pos = 11 * 6  # survivors of the 15x15 erosion of a 25x20 rectangle
    neg = int((~ndimage.maximum_filter(mask > 0.5, size=11)).sum())
    # One distinct kept score: the sweep (which excludes the largest) is empty, F1_best = F1_fixed.
    hi = study_scores(np.full((40, 40), 0.7, np.float32), mask)
    assert hi["f1_fixed"] == pytest.approx(100.0 * 2 * pos / (2 * pos + neg))
    assert hi["f1_best"] == hi["f1_fixed"]
    lo = study_scores(np.full((40, 40), 0.3, np.float32), mask)
    assert lo["f1_fixed"] == pytest.approx(0.0, abs=1e-20) and lo["f1_best"] == lo["f1_fixed"]


def test_study_full_mask() -> None:
    mask = np.ones((24, 24), np.float32)
    hi = study_scores(np.full((24, 24), 0.9, np.float32), mask)
    assert subset(hi) == pytest.approx({"iou": 100.0, "f1_fixed": 100.0, "f1_best": 100.0, "ap": 100.0})
    lo = study_scores(np.full((24, 24), 0.2, np.float32), mask)
    assert lo["f1_fixed"] == pytest.approx(0.0, abs=1e-20) and lo["f1_best"] == pytest.approx(0.0, abs=1e-20)
    assert lo["ap"] == pytest.approx(100.0)


@pytest.mark.parametrize("convention", ["study", "trufor"])
def test_border_regions_and_ties_score_alike_in_both_conventions(convention: str) -> None:
    score = study_scores if convention == "study" else trufor_scores
    # Columns 0..9 touch the border: columns 0..2 survive the erosion (not eroded from the border side).
    mask = np.zeros((40, 40), np.float32)
    mask[:, :10] = 1.0
    prob = np.full((40, 40), 0.1, np.float32)
    prob[:, :2] = 0.9
    prob[:, 2] = 0.6
    prob[:, 20] = 0.7
    s = score(prob, mask)
    assert s["f1_fixed"] == pytest.approx(100.0 * 240 / (240 + 40))
    assert s["f1_best"] == pytest.approx(100.0 * 240 / 280)  # at t = 0.1
    # Positives tied with negatives at 0.4: no threshold splits them.
    mask = np.zeros((40, 40), np.float32)
    mask[:20, :] = 1.0
    prob = np.full((40, 40), 0.1, np.float32)
    prob[:13, :] = 0.4
    prob[39, :] = 0.4
    assert score(prob, mask)["f1_best"] == pytest.approx(100.0 * 1040 / (1040 + 40))


def test_default_convention_is_study_and_unknown_ones_name_the_config_key() -> None:
    mask = np.zeros((32, 32), np.float32)
    prob = np.full((32, 32), 0.1, np.float32)
    assert image_scores(torch.from_numpy(prob), torch.from_numpy(mask)) == pytest.approx(
        study_scores(prob, mask), nan_ok=True
    )
    assert LocalizationMetrics().convention == "study"
    for build in (
        lambda: image_scores(torch.from_numpy(prob), torch.from_numpy(mask), convention="declip"),
        lambda: LocalizationMetrics(convention="declip"),
    ):
        with pytest.raises(ValueError, match=r"convention 'declip' is unknown: choose among.*study.*trufor.*benco"):
            build()


# --------------------------------------------------------------------------------------------------
# resize_probs and LocalizationMetrics
# --------------------------------------------------------------------------------------------------
def test_resize_probs_matches_numpy_bilinear() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 1, 16, 12) * 3
    for size in [(40, 36), (16, 12), (7, 5)]:
        got = resize_probs(logits, size)
        assert got.shape == (3, *size)
        for i in range(3):
            want = ref_bilinear(torch.sigmoid(logits[i, 0]).double().numpy(), *size)
            np.testing.assert_allclose(got[i].numpy(), want, atol=1e-6)


def _batch_data(rng: np.random.Generator, n: int, logit_hw: tuple[int, int], mask_hw: tuple[int, int]):
    masks = np.zeros((n, 1, *mask_hw), np.float32)  # sample 0 stays empty (AP undefined)
    for i in range(1, n):
        while not (masks[i] > 0.5).any():
            masks[i, 0] = random_mask(rng, *mask_hw)
    logits = (rng.normal(size=(n, 1, *logit_hw)) * 2).astype(np.float32)
    # Make every other sample informative: the mask, area-downsampled to the logit grid.
    small = torch.nn.functional.interpolate(torch.from_numpy(masks), size=logit_hw, mode="area").numpy()
    logits[1::2] += 6 * (small[1::2] - 0.5)
    return torch.from_numpy(logits), torch.from_numpy(masks)


def _manual_means(logits: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    probs = resize_probs(logits, masks.shape[-2:]).numpy()
    rows = [ref_scores_study(p, m[0]) for p, m in zip(probs, masks.numpy())]
    out = {k: float(np.mean([r[k] for r in rows])) for k in SCORE_KEYS}
    out["n_images"] = float(len(rows))
    out["n_ap_undefined"] = float(sum(not (m > 0.5).any() for m in masks.numpy()))
    return out


def _as_floats(result: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in result.items()}


def test_metric_equals_mean_of_per_image_scores_at_other_resolution() -> None:
    rng = np.random.default_rng(11)
    logits, masks = _batch_data(rng, 10, (16, 16), (48, 40))
    metric = LocalizationMetrics()
    for s in range(0, 10, 4):  # uneven batches
        metric.update(logits[s : s + 4], masks[s : s + 4], torch.arange(s, min(s + 4, 10)))
    got = _as_floats(metric.compute())
    want = _manual_means(logits, masks)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-5), key
    assert got["n_ap_undefined"] >= 1
    masks_np = masks.numpy()[:, 0] > 0.5
    assert got["n_f1_no_positive"] == sum(not ndimage.minimum_filter(m, size=15).any() for m in masks_np)
    # BxHxW masks and no indices give the same numbers.
    metric2 = LocalizationMetrics()
    metric2.update(logits, masks[:, 0])
    assert _as_floats(metric2.compute()) == pytest.approx(got, nan_ok=True)


def test_metric_study_averages_torchmetrics_zero_for_empty_masks() -> None:
    rng = np.random.default_rng(13)
    logits, masks = _batch_data(rng, 10, (16, 16), (48, 40))  # sample 0: empty mask
    masks[3, 0] = 0.0
    masks[3, 0, 10:13] = 1.0  # a thin region: no positive after erosion
    study, benco = LocalizationMetrics(), LocalizationMetrics(convention="benco")
    for s in range(0, 10, 4):
        for metric in (study, benco):
            metric.update(logits[s : s + 4], masks[s : s + 4], torch.arange(s, min(s + 4, 10)))
    got = _as_floats(study.compute())
    probs = resize_probs(logits, masks.shape[-2:]).numpy()
    rows = [ref_scores_study(p, m[0]) for p, m in zip(probs, masks.numpy())]
    for key in SCORE_KEYS:
        assert got[key] == pytest.approx(float(np.mean([r[key] for r in rows])), abs=1e-5), key
    # The undefined cases are still counted, whatever the convention.
    want_counts = _as_floats(benco.compute())
    assert got["n_ap_undefined"] == want_counts["n_ap_undefined"] == 1.0
    assert got["n_f1_no_positive"] == want_counts["n_f1_no_positive"] >= 2.0


def test_metric_deduplicates_by_index() -> None:
    rng = np.random.default_rng(5)
    logits, masks = _batch_data(rng, 6, (24, 24), (24, 24))
    unique = LocalizationMetrics()
    unique.update(logits, masks, torch.arange(6))
    want = _as_floats(unique.compute())

    dup = [0, 1, 2, 3, 4, 5, 4, 5, 5]  # samples 4 and 5 repeated, as sampler padding would
    deduped = LocalizationMetrics()
    deduped.update(logits[dup[:5]], masks[dup[:5]], torch.tensor(dup[:5]))
    deduped.update(logits[dup[5:]], masks[dup[5:]], torch.tensor(dup[5:]))
    assert _as_floats(deduped.compute()) == pytest.approx(want)

    counted = LocalizationMetrics()  # without indices every row counts
    counted.update(logits[dup], masks[dup])
    got = _as_floats(counted.compute())
    assert got["n_images"] == 9.0
    assert got["iou"] != pytest.approx(want["iou"])  # the duplicates do change the mean


def test_metric_rejects_bad_indices_and_handles_no_data() -> None:
    metric = LocalizationMetrics()
    with pytest.raises(ValueError):
        metric.update(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8), torch.tensor([0]))
    with pytest.raises(ValueError):
        metric.update(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8), torch.tensor([0, -1]))
    with pytest.warns(UserWarning):  # torchmetrics warns that compute ran before update
        out = LocalizationMetrics().compute()
    assert out["n_images"] == 0 and math.isnan(float(out["iou"]))


# --------------------------------------------------------------------------------------------------
# metrics.json: strict JSON
# --------------------------------------------------------------------------------------------------
def _refuse_constant(name: str) -> None:
    raise AssertionError(f"non-standard JSON constant {name} written")


def test_metrics_json_is_strict_json_with_undefined_scores_as_null(tmp_path: Path) -> None:
    metric = LocalizationMetrics()
    metric.update(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8), torch.arange(2))  # empty masks: AUC NaN
    scores = {key: float(value) for key, value in metric.compute().items()}
    assert math.isnan(scores["auc"])
    payload = {"convention": "study", "test": {"a": scores}, "other": [math.inf, -math.inf, (1.5, math.nan)]}
    path = write_json_atomic(tmp_path / "metrics.json", payload)
    text = path.read_text()
    data = json.loads(text, parse_constant=_refuse_constant)
    assert data["test"]["a"]["auc"] is None and data["test"]["a"]["n_ap_undefined"] == 2
    assert data["test"]["a"]["iou"] == scores["iou"]
    assert data["other"] == [None, None, [1.5, None]]
    # A value JSON cannot hold fails, leaving the previous file and no temporary file behind.
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert path.read_text() == text
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_metrics_json_written_by_older_versions_with_bare_nan_is_still_read(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text('{"status": "finished", "test": {"a": {"ap": NaN}}}')
    assert math.isnan(RunDir(tmp_path).read_metrics()["test"]["a"]["ap"])


# --------------------------------------------------------------------------------------------------
# Real DDP: two gloo processes whose shards overlap in DistributedSampler's padded sample.
# --------------------------------------------------------------------------------------------------
N_DDP = 7  # odd: DistributedSampler pads rank 1's shard with sample 0


def _ddp_worker(rank: int, world: int, tmp: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        logits, masks = torch.load(f"{tmp}/data.pt")
        shard = list(DistributedSampler(range(N_DDP), num_replicas=world, rank=rank, shuffle=False))
        with_idx, without_idx = LocalizationMetrics(), LocalizationMetrics()
        for s in range(0, len(shard), 3):
            idx = torch.tensor(shard[s : s + 3])
            with_idx.update(logits[idx], masks[idx], idx)
            without_idx.update(logits[idx], masks[idx])
        result = {"dedup": _as_floats(with_idx.compute()), "plain": _as_floats(without_idx.compute())}
        result["shard"] = shard
        torch.save(result, f"{tmp}/result{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ~8 s; default suite: test_scaleout.py::test_ddp_evaluation_equals_single_process
def test_ddp_sync_equals_single_process(tmp_path: Path) -> None:
    rng = np.random.default_rng(21)
    logits, masks = _batch_data(rng, N_DDP, (16, 16), (32, 32))
    torch.save((logits, masks), tmp_path / "data.pt")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)

    single = LocalizationMetrics()
    single.update(logits, masks, torch.arange(N_DDP))
    want = _as_floats(single.compute())
    assert want["n_images"] == N_DDP

    results = [torch.load(tmp_path / f"result{r}.pt") for r in range(2)]
    shards = [r["shard"] for r in results]
    assert len(set(shards[0]) & set(shards[1])) == 1  # the padded sample is on both ranks
    for r in results:
        assert r["dedup"] == pytest.approx(want, abs=1e-9)
        # Without indices the padded duplicate is counted twice: the test can tell the difference.
        assert r["plain"]["n_images"] == N_DDP + 1
        assert r["plain"]["iou"] != pytest.approx(want["iou"])


# --------------------------------------------------------------------------------------------------
# metrics.convention: config, LightningModule, training run, deeploc-eval
# --------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:SAM2 encoder .* RANDOM weights")
def test_metrics_conventions_typed_on_the_command_line_reach_the_module() -> None:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        default = compose("train", overrides=["encoder=micro"])
        alias = compose("train", overrides=["encoder=micro", "metrics.convention=trufor"])
        several = compose("train", overrides=["encoder=micro", "metrics.conventions=[benco,study,trufor]"])
    assert default.metrics.convention == "study" and default.metrics.conventions is None
    for cfg, want in ((default, ("study",)), (alias, ("trufor",)), (several, ("benco", "study", "trufor"))):
        model = build_model(cfg)
        assert model.conventions == want
        assert model.val_metrics.convention == "study"  # model selection follows the study's protocol
    with pytest.raises(ValueError, match=r"convention 'declip' is unknown: choose among"):
        LocalizationModule(
            encoder=instantiate(default.encoder), decoder=instantiate(default.decoder), metric_convention="declip"
        )


def test_unknown_metrics_convention_is_refused_before_any_work(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(
        "deeploc.cli.train",
        ["encoder=micro", "metrics.conventions=[study,declip]", f"hydra.run.dir={run_dir}"],
        tmp_path,
        check=False,
    )
    assert proc.returncode != 0
    assert (
        "metrics.conventions=['study', 'declip'] must be null or a list of distinct conventions among study, "
        in proc.stderr
    )
    assert not (run_dir / "config_resolved.yaml").exists() and not (tmp_path / "outputs").exists()


def test_conventions_are_measured_recorded_rescored_and_reproduced_by_eval(
    shared_workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    args = train_args(shared_workdir, "trainer.max_epochs=1", "overlays=0", "logger=csv", f"hydra.run.dir={run_dir}")
    run_cli(
        "deeploc.cli.train", [*args, "metrics.conventions=[trufor,study,benco]", "eval.save_predictions=true"], tmp_path
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["convention"] == "trufor" and metrics["conventions"] == ["trufor", "study", "benco"]
    assert metrics["test"] == metrics["scores"]["trufor"]  # the primary convention fills the old block
    chosen = metrics["thresholds"]["chosen"]
    assert set(chosen) == {"study", "trufor", "benco"} and set(chosen["benco"]) == {"f1_val", "iou_val"}
    ckpt = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["deeploc"]["val_thresholds"] == chosen  # the best epoch's thresholds reached the test
    for subset, scores in metrics["scores"]["study"].items():
        assert set(scores) >= {"iou", "f1_fixed", "f1_best", "ap", "auc", "ciou", "f1_val", "iou_val"}
        with open(run_dir / "scores" / f"{subset}.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert len(rows) == scores["n_images"] and rows[0]["name"]
        assert float(np.mean([float(r["iou[study]"]) for r in rows])) == pytest.approx(scores["iou"], abs=1e-9)

    # Rescoring the saved maps in any convention, with no model, equals test-time scoring exactly.
    out = tmp_path / "rescored"
    assert eval_main([str(run_dir), "--conventions", "benco", "study", "trufor", "--out", str(out)]) == 0
    assert "rescored the saved predictions" in capsys.readouterr().out
    rescored = json.loads((out / "eval.json").read_text())
    assert rescored["scores"] == metrics["scores"] and rescored["convention"] == "benco"
    for subset in metrics["test"]:
        with open(run_dir / "scores" / f"{subset}.csv") as a, open(out / "scores" / f"{subset}.csv") as b:
            test_rows, rescored_rows = list(csv.DictReader(a)), list(csv.DictReader(b))
        assert [dict(sorted(r.items())) for r in test_rows] == [dict(sorted(r.items())) for r in rescored_rows]

    # deeploc-eval with the model reproduces the run's numbers in the convention it is asked for.
    out = tmp_path / "eval-study"
    features = str(shared_workdir / "features")
    subsets = list(metrics["test"])  # naming the data runs the model instead of rescoring
    assert eval_main([str(run_dir), "--subsets", *subsets, "--out", str(out), "--features-dir", features,
                      "--convention", "study"]) == 0  # fmt: skip
    assert "F1@0.5[study]" in capsys.readouterr().out
    evaluated = json.loads((out / "eval.json").read_text())
    assert evaluated["convention"] == "study"
    with open(out / "eval.csv", newline="") as handle:
        assert {row["convention"] for row in csv.DictReader(handle)} == {"study"}
    for subset, scores in metrics["scores"]["study"].items():
        for key, value in scores.items():
            assert evaluated["test"][subset][key] == pytest.approx(value, abs=1e-6), (subset, key)

    # A finished run of deeploc 0.1 (no "convention") is refused with the fix, never relabelled.
    for key in ("convention", "conventions"):
        del metrics[key]
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    proc = run_cli("deeploc.cli.train", args, tmp_path, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "records no metric convention" in proc.stderr and "if_finished=retrain" in proc.stderr
    assert "convention" not in json.loads((run_dir / "metrics.json").read_text())


def test_rescoring_a_run_without_saved_predictions_says_how_to_keep_them(tmp_path: Path, capsys) -> None:
    (tmp_path / "metrics.json").write_text("{}")
    assert eval_main([str(tmp_path), "--rescore"]) == 1
    err = capsys.readouterr().err
    assert "holds no saved predictions" in err and "eval.save_predictions=true" in err and "--save-predictions" in err
