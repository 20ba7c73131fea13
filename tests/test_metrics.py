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
# Independent reference: one image at a time, brute force over thresholds, scipy filters, sklearn AP.
# --------------------------------------------------------------------------------------------------
def ref_scores(prob: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    gt = mask > 0.5
    pred = prob > threshold
    inter = np.logical_and(pred, gt).sum()
    union = np.logical_or(pred, gt).sum()
    iou = 100.0 * (inter + 1e-8) / (union + 1e-8)

    # TruFor's extractGTs: scipy filters in their default 'reflect' mode.
    pos = ndimage.minimum_filter(gt, size=15)
    neg = np.logical_not(ndimage.maximum_filter(gt, size=11))

    def f1_of(p: np.ndarray) -> float:
        tp = np.logical_and(p, pos).sum()
        fp = np.logical_and(p, neg).sum()
        fn = np.logical_and(~p, pos).sum()
        den = 2 * tp + fp + fn
        return 100.0 * 2 * tp / den if den > 0 else 0.0

    f1_fixed = f1_of(pred)
    thresholds = np.unique(prob[pos | neg])
    sweep = max((f1_of(prob > t) for t in thresholds), default=0.0)
    ap = 100.0 * average_precision_score(gt.ravel(), prob.ravel()) if gt.any() else math.nan
    return {"iou": iou, "f1_fixed": f1_fixed, "f1_best": max(sweep, f1_fixed), "ap": ap}


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


def assert_scores_close(got: dict[str, float], want: dict[str, float], context: str = "") -> None:
    for key in SCORE_KEYS:
        g, w = got[key], want[key]
        if math.isnan(w):
            assert math.isnan(g), f"{context} {key}: got {g}, want NaN"
        else:
            assert g == pytest.approx(w, abs=1e-6), f"{context} {key}: got {g}, want {w}"


def trufor_scores(prob: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    return image_scores(torch.from_numpy(prob), torch.from_numpy(mask), threshold, convention="trufor")


def study_scores(prob: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    return image_scores(torch.from_numpy(prob), torch.from_numpy(mask), threshold, convention="study")


# --------------------------------------------------------------------------------------------------
# image_scores
# --------------------------------------------------------------------------------------------------
def test_image_scores_match_reference_on_random_cases() -> None:
    rng = np.random.default_rng(1234)
    sizes = [(48, 48), (40, 56), (17, 23), (8, 8), (64, 31)]
    n_ties = n_no_positive = n_empty = 0
    for case in range(60):
        h, w = sizes[case % len(sizes)]
        mask = random_mask(rng, h, w)
        prob = random_prob(rng, mask)
        threshold = 0.5 if case % 4 else float(rng.choice([0.3, 0.7]))
        want = ref_scores(prob, mask, threshold)
        assert_scores_close(trufor_scores(prob, mask, threshold), want, f"case {case}")
        n_ties += len(np.unique(prob)) < prob.size // 2
        n_empty += math.isnan(want["ap"])
        n_no_positive += not ndimage.minimum_filter(mask > 0.5, size=15).any()
    # The random cases do cover the interesting regimes.
    assert n_ties > 10 and n_empty > 3 and n_no_positive > 10


def test_ap_matches_torchmetrics_binary_average_precision() -> None:
    rng = np.random.default_rng(7)
    for _ in range(10):
        mask = np.zeros((32, 40), dtype=np.float32)
        mask[rng.integers(0, 16) :, rng.integers(0, 20) :] = 1.0
        prob = random_prob(rng, mask)
        want = 100.0 * float(
            binary_average_precision(torch.from_numpy(prob).flatten(), torch.from_numpy(mask > 0.5).flatten())
        )
        assert trufor_scores(prob, mask)["ap"] == pytest.approx(want, abs=1e-4)


def test_empty_mask_empty_prediction() -> None:
    s = trufor_scores(np.full((32, 32), 0.1, np.float32), np.zeros((32, 32), np.float32))
    assert s["iou"] == 100.0
    assert s["f1_fixed"] == 0.0 and s["f1_best"] == 0.0  # no positives: TruFor's 0
    assert math.isnan(s["ap"])


def test_empty_mask_with_false_positives() -> None:
    prob = np.zeros((32, 32), np.float32)
    prob[:4, :5] = 0.9
    s = trufor_scores(prob, np.zeros((32, 32), np.float32))
    assert s["iou"] == pytest.approx(0.0, abs=1e-6)
    assert s["f1_fixed"] == 0.0 and s["f1_best"] == 0.0
    assert math.isnan(s["ap"])


def test_full_mask() -> None:
    mask = np.ones((24, 24), np.float32)
    # The border does not erode, so every pixel is a positive; there are no negatives.
    hi = trufor_scores(np.full((24, 24), 0.9, np.float32), mask)
    assert hi == pytest.approx({"iou": 100.0, "f1_fixed": 100.0, "f1_best": 100.0, "ap": 100.0})
    lo = trufor_scores(np.full((24, 24), 0.2, np.float32), mask)
    assert lo["iou"] == pytest.approx(0.0, abs=1e-6)
    assert lo["f1_fixed"] == 0.0 and lo["f1_best"] == 0.0  # the sweep never predicts "everything"
    assert lo["ap"] == pytest.approx(100.0)  # all pixels are positive: precision 1 at any threshold


def test_one_pixel_region() -> None:
    mask = np.zeros((32, 32), np.float32)
    mask[10, 20] = 1.0
    prob = np.full((32, 32), 0.1, np.float32)
    prob[10, 20] = 0.9
    s = trufor_scores(prob, mask)
    assert s["iou"] == pytest.approx(100.0)
    assert s["ap"] == pytest.approx(100.0)
    assert s["f1_fixed"] == 0.0 and s["f1_best"] == 0.0  # nothing survives the 15x15 erosion


def test_region_touching_the_border_is_not_eroded_from_that_side() -> None:
    # A full-height strip, columns 0..9: 15x15 erosion keeps columns 0..2 (c + 7 <= 9) on every row,
    # 11x11 dilation reaches column 14, so negatives are columns 15..39.
    mask = np.zeros((40, 40), np.float32)
    mask[:, :10] = 1.0
    prob = np.full((40, 40), 0.1, np.float32)
    prob[:, :2] = 0.9  # TP = 80, FN = 40 (column 2), FP = 0 -> F1 = 160 / 200
    s = trufor_scores(prob, mask)
    assert s["f1_fixed"] == pytest.approx(80.0)
    assert s["f1_best"] == pytest.approx(80.0)
    # With a zero border the strip (10 < 15 wide) would vanish and F1 would be 0.
    prob[:, 2] = 0.6
    prob[:, 20] = 0.7  # false positives among the negatives: 40 at 0.5
    s = trufor_scores(prob, mask)
    assert s["f1_fixed"] == pytest.approx(100.0 * 240 / (240 + 40))
    # Sweep: t=0.1 gives 240/280, t=0.6 160/240, t=0.7 160/200, t=0.9 0 -> best 240/280.
    assert s["f1_best"] == pytest.approx(100.0 * 240 / 280)
    # Corner square 10x10: 3x3 positives survive.
    corner = np.zeros((40, 40), np.float32)
    corner[:10, :10] = 1.0
    cprob = np.full((40, 40), 0.1, np.float32)
    cprob[:3, :3] = 0.9
    assert trufor_scores(cprob, corner)["f1_fixed"] == pytest.approx(100.0)
    cprob[3, 3] = 0.9  # an ignored boundary pixel: no change
    assert trufor_scores(cprob, corner)["f1_fixed"] == pytest.approx(100.0)
    cprob[30, 30] = 0.9  # a negative: FP = 1 -> 18 / 19
    assert trufor_scores(cprob, corner)["f1_fixed"] == pytest.approx(100.0 * 18 / 19)


def test_all_equal_probabilities() -> None:
    mask = np.zeros((40, 40), np.float32)
    mask[5:30, 5:25] = 1.0
    n_pos_gt = 25 * 20
    pos = int(ndimage.minimum_filter(mask > 0.5, size=15).sum())  # 11 x 6
    neg = int((~ndimage.maximum_filter(mask > 0.5, size=11)).sum())
    assert pos == 11 * 6
    hi = trufor_scores(np.full((40, 40), 0.7, np.float32), mask)
    assert hi["iou"] == pytest.approx(100.0 * n_pos_gt / 1600)
    assert hi["f1_fixed"] == pytest.approx(100.0 * 2 * pos / (2 * pos + neg))
    assert hi["f1_best"] == pytest.approx(hi["f1_fixed"])  # the only sweep point predicts nothing
    assert hi["ap"] == pytest.approx(100.0 * n_pos_gt / 1600)  # one tie group: precision = prevalence
    lo = trufor_scores(np.full((40, 40), 0.3, np.float32), mask)
    assert lo["f1_fixed"] == 0.0 and lo["f1_best"] == 0.0
    assert lo["ap"] == pytest.approx(hi["ap"])


def test_perfect_prediction_scores_100() -> None:
    rng = np.random.default_rng(3)
    for _ in range(5):
        mask = np.zeros((48, 48), np.float32)
        y, x = rng.integers(0, 30, size=2)
        mask[y : y + 18, x : x + 18] = 1.0
        for prob in (mask.copy(), np.where(mask > 0.5, 0.97, 0.02).astype(np.float32)):
            assert trufor_scores(prob, mask) == pytest.approx(dict.fromkeys(SCORE_KEYS, 100.0))


def test_sweep_does_not_split_ties() -> None:
    # Positives and a negative share one value: no threshold separates them.
    mask = np.zeros((40, 40), np.float32)
    mask[:20, :] = 1.0  # positives: rows 0..12, negatives: rows 25..39
    prob = np.full((40, 40), 0.1, np.float32)
    prob[:13, :] = 0.4
    prob[39, :] = 0.4  # 40 negatives tied with the 520 positives
    s = trufor_scores(prob, mask)
    assert s["f1_fixed"] == 0.0
    assert s["f1_best"] == pytest.approx(100.0 * 1040 / (1040 + 40))  # at t = 0.1
    assert s == pytest.approx(ref_scores(prob, mask))


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
    seen = dict.fromkeys(("ties", "single", "empty", "thin", "full", "border", "thin_100", "differs"), 0)
    for case in range(100):
        h, w = sizes[case % len(sizes)]
        prob, mask = study_case(rng, h, w)
        threshold = 0.5 if case % 4 else float(rng.choice([0.3, 0.7]))
        want = ref_scores_study(prob, mask, threshold)
        got = study_scores(prob, mask, threshold)
        assert_scores_close(got, want, f"case {case}")
        gt = mask > 0.5
        has_positive = bool(ndimage.minimum_filter(gt, size=15, mode="nearest").any())
        trufor = trufor_scores(prob, mask, threshold)
        if gt.any() and has_positive:  # the conventions only differ in the undefined cases
            assert_scores_close(got, trufor, f"case {case} (study vs trufor)")
        seen["ties"] += len(np.unique(prob)) < prob.size // 2
        seen["single"] += len(np.unique(prob)) == 1
        seen["empty"] += not gt.any()
        seen["thin"] += gt.any() and not has_positive
        seen["full"] += gt.all()
        seen["border"] += has_positive and bool(gt[0].any() or gt[-1].any() or gt[:, 0].any() or gt[:, -1].any())
        seen["thin_100"] += not has_positive and want["f1_best"] == 100.0
        seen["differs"] += any(
            abs(got[k] - trufor[k]) > 1 for k in ("f1_fixed", "f1_best") if not math.isnan(trufor[k])
        )
    # The random cases do cover every regime the brief names, and the conventions really differ on some.
    assert min(seen.values()) >= 4, seen


def test_study_no_positive_after_erosion_scores_100_without_false_positive() -> None:
    # A 3-pixel stroke (rows 10..12): nothing survives the 15x15 erosion; its 11x11 dilation covers rows 5..17.
    mask = np.zeros((40, 40), np.float32)
    mask[10:13, :] = 1.0
    prob = np.where(mask > 0.5, 0.9, 0.1).astype(np.float32)
    s = study_scores(prob, mask)
    # Kept pixels are all negatives at 0.1: nothing kept is predicted, 0/0 -> (0 + 1e-32) / 1e-32 = 100.
    assert s == pytest.approx({"iou": 100.0, "f1_fixed": 100.0, "f1_best": 100.0, "ap": 100.0})
    assert trufor_scores(prob, mask)["f1_best"] == 0.0  # TruFor's 0
    prob[30, 30] = 0.7  # one false positive among the negatives
    s = study_scores(prob, mask)
    assert s["f1_fixed"] == pytest.approx(0.0, abs=1e-20) and s["f1_best"] == pytest.approx(0.0, abs=1e-20)


def test_study_empty_mask() -> None:
    empty = np.zeros((32, 32), np.float32)
    s = study_scores(np.full((32, 32), 0.1, np.float32), empty)
    assert s == {"iou": 100.0, "f1_fixed": 100.0, "f1_best": 100.0, "ap": 0.0}  # AP: torchmetrics' 0
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
    assert hi == pytest.approx({"iou": 100.0, "f1_fixed": 100.0, "f1_best": 100.0, "ap": 100.0})
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
    assert image_scores(torch.from_numpy(prob), torch.from_numpy(mask)) == study_scores(prob, mask)
    assert LocalizationMetrics().convention == "study"
    for build in (
        lambda: image_scores(torch.from_numpy(prob), torch.from_numpy(mask), convention="declip"),
        lambda: LocalizationMetrics(convention="declip"),
    ):
        with pytest.raises(ValueError, match=r"metrics\.convention='declip'.*study.*trufor"):
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
    rows = [ref_scores(p, m[0]) for p, m in zip(probs, masks.numpy())]
    out = {k: float(np.mean([r[k] for r in rows])) for k in ("iou", "f1_fixed", "f1_best")}
    out["ap"] = float(np.nanmean([r["ap"] for r in rows]))
    out["n_images"] = float(len(rows))
    out["n_ap_undefined"] = float(sum(math.isnan(r["ap"]) for r in rows))
    return out


def _as_floats(result: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in result.items()}


def test_metric_equals_mean_of_per_image_scores_at_other_resolution() -> None:
    rng = np.random.default_rng(11)
    logits, masks = _batch_data(rng, 10, (16, 16), (48, 40))
    metric = LocalizationMetrics(convention="trufor")
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
    metric2 = LocalizationMetrics(convention="trufor")
    metric2.update(logits, masks[:, 0])
    assert _as_floats(metric2.compute()) == pytest.approx(got, nan_ok=True)


def test_metric_study_averages_torchmetrics_zero_for_empty_masks() -> None:
    rng = np.random.default_rng(13)
    logits, masks = _batch_data(rng, 10, (16, 16), (48, 40))  # sample 0: empty mask
    masks[3, 0] = 0.0
    masks[3, 0, 10:13] = 1.0  # a thin region: no positive after erosion
    study, trufor = LocalizationMetrics(), LocalizationMetrics(convention="trufor")
    for s in range(0, 10, 4):
        for metric in (study, trufor):
            metric.update(logits[s : s + 4], masks[s : s + 4], torch.arange(s, min(s + 4, 10)))
    got = _as_floats(study.compute())
    probs = resize_probs(logits, masks.shape[-2:]).numpy()
    rows = [ref_scores_study(p, m[0]) for p, m in zip(probs, masks.numpy())]
    for key in SCORE_KEYS:
        assert got[key] == pytest.approx(float(np.mean([r[key] for r in rows])), abs=1e-5), key
    # The undefined cases are still counted, whatever the convention.
    want_counts = _as_floats(trufor.compute())
    assert got["n_ap_undefined"] == want_counts["n_ap_undefined"] == 1.0
    assert got["n_f1_no_positive"] == want_counts["n_f1_no_positive"] >= 2.0
    n = got["n_images"]
    assert got["ap"] == pytest.approx(want_counts["ap"] * (n - got["n_ap_undefined"]) / n)


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
    metric = LocalizationMetrics(convention="trufor")
    metric.update(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8), torch.arange(2))  # empty masks: AP NaN
    scores = {key: float(value) for key, value in metric.compute().items()}
    assert math.isnan(scores["ap"])
    payload = {"convention": "trufor", "test": {"a": scores}, "other": [math.inf, -math.inf, (1.5, math.nan)]}
    path = write_json_atomic(tmp_path / "metrics.json", payload)
    text = path.read_text()
    data = json.loads(text, parse_constant=_refuse_constant)
    assert data["test"]["a"]["ap"] is None and data["test"]["a"]["n_ap_undefined"] == 2
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
def test_metrics_convention_typed_on_the_command_line_reaches_the_module() -> None:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        default = compose("train", overrides=["encoder=micro"])
        trufor = compose("train", overrides=["encoder=micro", "metrics.convention=trufor"])
    assert default.metrics.convention == "study"
    for cfg, want in ((default, "study"), (trufor, "trufor")):
        model = build_model(cfg)
        assert model.hparams.metric_convention == want and type(model.hparams.metric_convention) is str
        assert model.val_metrics.convention == want
    with pytest.raises(ValueError, match=r"metrics\.convention='declip'"):
        LocalizationModule(
            encoder=instantiate(default.encoder), decoder=instantiate(default.decoder), metric_convention="declip"
        )


def test_unknown_metrics_convention_is_refused_before_any_work(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(
        "deeploc.cli.train",
        ["encoder=micro", "metrics.convention=declip", f"hydra.run.dir={run_dir}"],
        tmp_path,
        check=False,
    )
    assert proc.returncode != 0
    assert "metrics.convention='declip' must be study" in proc.stderr
    assert not (run_dir / "config_resolved.yaml").exists() and not (tmp_path / "outputs").exists()


def test_convention_chosen_for_training_is_measured_recorded_and_reproduced_by_eval(
    shared_workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    args = train_args(shared_workdir, "trainer.max_epochs=1", "overlays=0", "logger=csv", f"hydra.run.dir={run_dir}")
    run_cli("deeploc.cli.train", [*args, "metrics.convention=trufor"], tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["convention"] == "trufor"
    ckpt = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["metric_convention"] == "trufor"

    # deeploc-eval measures either convention on the same model and records which one it used.
    evaluated = {}
    for convention in ("trufor", "study"):
        out = tmp_path / f"eval-{convention}"
        features = str(shared_workdir / "features")
        assert eval_main([str(run_dir), "--out", str(out), "--features-dir", features, "--convention", convention]) == 0
        assert f"convention {convention}" in capsys.readouterr().out
        data = json.loads((out / "eval.json").read_text())
        assert data["convention"] == convention
        with open(out / "eval.csv", newline="") as handle:
            assert {row["convention"] for row in csv.DictReader(handle)} == {convention}
        evaluated[convention] = data["test"]
    for subset, scores in metrics["test"].items():
        trufor, study = evaluated["trufor"][subset], evaluated["study"][subset]
        for key in SCORE_KEYS:  # eval reproduces the training run's own numbers
            assert trufor[key] == pytest.approx(scores[key], abs=1e-6), (subset, key)
        assert study["iou"] == trufor["iou"]
        n, n_empty = study["n_images"], study["n_ap_undefined"]
        assert n_empty == trufor["n_ap_undefined"] and study["n_f1_no_positive"] == trufor["n_f1_no_positive"]
        if n_empty < n:
            assert study["ap"] == pytest.approx(trufor["ap"] * (n - n_empty) / n, abs=1e-6)
        if study["n_f1_no_positive"] == 0:
            assert study["f1_best"] == pytest.approx(trufor["f1_best"], abs=1e-6)

    # A finished run from deeploc <= 0.1 (no "convention": trufor) is skipped with a warning, never relabelled.
    del metrics["convention"]
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    proc = run_cli("deeploc.cli.train", args, tmp_path)
    log = proc.stdout + proc.stderr
    assert "already finished; skipping" in log
    assert "metrics.convention=trufor" in log and "if_finished=eval" in log
    assert "convention" not in json.loads((run_dir / "metrics.json").read_text())
