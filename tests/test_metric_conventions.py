"""Parity of the ``trufor`` and ``benco`` conventions with their peers' own code, on >= 1000 random and constructed
cases (empty masks, thin regions under the 15x15 erosion, all-positive masks, constant and tied scores, odd sizes).

The references below are straightforward re-implementations written from the peers' sources, read for their facts:
grip-unina/TruFor ``test_docker/metrics.py`` (``extractGTs``, ``computeMetricsContinue``, ``computeMetrics_th``,
``computeF1``, ``computeLocalizationMetrics``; numpy, scipy, sklearn as there) and IMDL-BenCo 0.1.45
``IMDLBenCo/evaluation/{F1,IOU,AUC}.py`` (``PixelF1``, ``PixelIOU``, ``PixelAUC``, mode ``origin``, no
``shape_mask``; torch float32 as there). BenCo's PixelAUC sorts with ``argsort`` and does not group ties, so its
value on tied scores depends on the sort order: exact parity is defined for untied scores only; on tied scores
deeploc's AUC is compared with sklearn's ``roc_auc_score`` (ties = one operating point) instead.
Run with ``-s`` to print the worst difference per metric (docs/evaluation.md records them).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import maximum_filter, minimum_filter
from sklearn.metrics import confusion_matrix, roc_auc_score

from deeploc.metrics import image_scores

N_CASES = 1200
SIZES = [(48, 48), (17, 23), (8, 8), (5, 7), (64, 31), (33, 65), (40, 40), (1, 9), (96, 80)]


# ----------------------------------------------------------------------------------------- TruFor's metrics.py
def trufor_reference(prob: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """(F1_best, F1_th) of one image as TruFor's computeLocalizationMetrics returns them (fractions, NaN on error)."""
    gt0 = np.logical_not(maximum_filter(gt, 11))  # extractGTs: scipy filters, default 'reflect' mode
    gt1 = minimum_filter(gt, 15)
    try:  # computeMetricsContinue + computeF1 on the map and its inverse
        values = prob.flatten().astype(np.float32)
        g0, g1 = gt0.flatten().astype(np.float32), gt1.flatten().astype(np.float32)
        inds = np.argsort(values)
        inds = inds[(g0[inds] + g1[inds]) > 0]
        vet_th, g0, g1 = values[inds], g0[inds], g1[inds]
        tn, fn = np.cumsum(g0), np.cumsum(g1)
        fp, tp = np.sum(g0) - tn, np.sum(g1) - fn
        msk = np.pad(vet_th[1:] > vet_th[:-1], (0, 1), mode="constant", constant_values=True)
        fp, tp, fn, tn = fp[msk], tp[msk], fn[msk], tn[msk]
        f1 = 2 * tp / np.maximum(2 * tp + fn + fp, 1e-32)
        f1i = 2 * fn / np.maximum(2 * fn + tp + tn, 1e-32)  # computeF1(TN, FN, TP, FP)
        best = max(np.max(f1), np.max(f1i))
    except (IndexError, ValueError):  # TruFor's bare except: no kept pixel (empty arrays) fails there
        best = np.nan
    try:  # computeMetrics_th at 0.5
        pred = (prob > 0.5).flatten().astype(np.uint8)
        g, k0, k1 = (x.flatten().astype(np.uint8) for x in (gt, gt0, gt1))
        keep = (k0 + k1) > 0
        cm = confusion_matrix(g[keep], pred[keep])
        tn, fn, fp, tp = cm[0, 0], cm[1, 0], cm[0, 1], cm[1, 1]
        f1 = 2 * tp / np.maximum(2 * tp + fn + fp, 1e-32)
        f1i = 2 * fn / np.maximum(2 * fn + tp + tn, 1e-32)
        fixed = max(f1, f1i)
    except (IndexError, ValueError):  # a 1x1 (or empty) confusion matrix
        fixed = np.nan
    return float(best), float(fixed)


# ------------------------------------------------------------------------------------ IMDL-BenCo's evaluators
def benco_reference(prob: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """PixelF1, PixelIOU and PixelAUC (mode origin, threshold 0.5) of one image, as BenCo 0.1.45 computes them."""
    predict = torch.from_numpy(prob.astype(np.float32))[None, None]
    mask = torch.from_numpy(gt.astype(np.float32))[None, None]
    hard = (predict > 0.5).float()
    tp = torch.sum(hard * mask, dim=(1, 2, 3))
    fp = torch.sum(hard * (1 - mask), dim=(1, 2, 3))
    fn = torch.sum((1 - hard) * mask, dim=(1, 2, 3))
    precision = tp / (tp + fp + 1e-8)
    recall = tp / (tp + fn + 1e-8)
    f1 = 2 * precision * recall / (precision + recall + 1e-8)
    flat_pred, flat_mask = hard.flatten(1), mask.flatten(1)
    inter = torch.sum(flat_pred * flat_mask, dim=1)
    union = torch.sum(flat_pred, dim=1) + torch.sum(flat_mask, dim=1) - inter
    iou = inter / (union + 1e-8)
    y_true, y_scores = mask.flatten(), predict.flatten()
    if torch.sum(y_true) == 0:
        auc = 0.0
    else:
        order = torch.argsort(y_scores, descending=True)
        y_sorted = y_true[order]
        n_pos = torch.sum(y_sorted).item()
        n_neg = len(y_sorted) - n_pos
        tpr = torch.cumsum(y_sorted, dim=0) / n_pos
        fpr = torch.cumsum(1 - y_sorted, dim=0) / n_neg
        auc = torch.trapz(tpr, fpr).item()
    return {"f1_fixed": float(f1), "iou": float(iou), "auc": float(auc)}


# -------------------------------------------------------------------------------------------------- the cases
def make_case(rng: np.random.Generator, case: int) -> tuple[np.ndarray, np.ndarray]:
    """A (probabilities, bool mask) pair; the regimes the conventions disagree on are made frequent."""
    h, w = SIZES[case % len(SIZES)]
    gt = np.zeros((h, w), bool)
    kind = case % 8
    if kind == 1:
        gt[:] = True  # all positive
    elif kind == 2:
        gt[rng.integers(0, h), rng.integers(0, w)] = True  # one pixel
    elif kind == 3:
        r = rng.integers(0, h)
        gt[r : r + rng.integers(1, 6), :] = True  # a thin stroke: nothing survives the 15x15 erosion
    elif kind >= 4:
        for _ in range(rng.integers(1, 4)):  # rectangles, often touching the border
            y0, x0 = rng.integers(-5, h), rng.integers(-5, w)
            gt[max(y0, 0) : max(y0 + rng.integers(2, h + 3), 0), max(x0, 0) : max(x0 + rng.integers(2, w + 3), 0)] = (
                True
            )
    score_kind = rng.integers(0, 5)
    if score_kind == 0:
        prob = rng.random((h, w))
    elif score_kind == 1:  # informative, untied
        prob = np.clip(0.55 * gt + 0.5 * rng.random((h, w)), 0, 1)
    elif score_kind == 2:  # few distinct values: ties
        prob = np.round(rng.random((h, w)) * 6) / 6
    elif score_kind == 3:  # constant
        prob = np.full((h, w), rng.choice([0.1, 0.5, 0.9]))
    else:  # the mask itself, sometimes inverted (TruFor's inversion then scores it as perfect)
        prob = np.where(gt, 0.9, 0.1) if rng.random() < 0.5 else np.where(gt, 0.1, 0.9)
    return prob.astype(np.float32), gt


def ours(prob: np.ndarray, gt: np.ndarray, convention: str) -> dict[str, float]:
    return image_scores(torch.from_numpy(prob), torch.from_numpy(gt), convention=convention)


def difference(got: float, want: float) -> float:
    """|got - want|, 0 when both are NaN, inf when only one is."""
    if math.isnan(got) or math.isnan(want):
        return 0.0 if math.isnan(got) and math.isnan(want) else math.inf
    return abs(got - want)


@pytest.mark.filterwarnings("ignore:A single label was found:UserWarning")  # TruFor's 1x1 confusion matrix
def test_trufor_and_benco_conventions_equal_their_peers_code_on_1200_cases() -> None:
    rng = np.random.default_rng(22)
    worst: dict[str, float] = {}
    seen = dict.fromkeys(("empty", "thin", "full", "constant", "tied", "odd", "trufor_nan", "untied_auc"), 0)

    def record(key: str, got: float, want: float) -> None:
        worst[key] = max(worst.get(key, 0.0), difference(got, want))

    for case in range(N_CASES):
        prob, gt = make_case(rng, case)
        best, fixed = trufor_reference(prob, gt)
        t = ours(prob, gt, "trufor")
        record("F1@0.5[trufor]", t["f1_fixed"], 100 * fixed)
        record("F1 oracle[trufor]", t["f1_best"], 100 * best)
        b, want = ours(prob, gt, "benco"), benco_reference(prob, gt)
        record("F1@0.5[benco]", b["f1_fixed"], 100 * want["f1_fixed"])
        record("IoU@0.5[benco]", b["iou"], 100 * want["iou"])
        tied = len(np.unique(prob)) < prob.size
        if not tied:
            record("pixel AUC[benco] (untied)", b["auc"], 100 * want["auc"])
            seen["untied_auc"] += gt.any() and not gt.all()
        elif gt.any() and not gt.all():  # tied: BenCo's value depends on the sort order; sklearn groups ties
            record("pixel AUC[benco] vs sklearn (tied)", b["auc"], 100 * roc_auc_score(gt.ravel(), prob.ravel()))
        if gt.any() and not gt.all():
            record(
                "pixel AUC[study] vs sklearn",
                ours(prob, gt, "study")["auc"],
                100 * roc_auc_score(gt.ravel(), prob.ravel()),
            )
        seen["empty"] += not gt.any()
        seen["thin"] += gt.any() and not minimum_filter(gt, 15).any()
        seen["full"] += gt.all()
        seen["constant"] += len(np.unique(prob)) == 1
        seen["tied"] += tied
        seen["odd"] += prob.shape[0] % 2 == 1 or prob.shape[1] % 2 == 1
        seen["trufor_nan"] += math.isnan(fixed)
    print("\nworst |deeploc - peer| per metric (percent points):")
    for key, value in worst.items():
        print(f"  {key}: {value:.3g}")
    assert min(seen.values()) >= 30, seen
    # TruFor's arithmetic (float32 sweep, float64 fixed) and BenCo's float32 F1 and IoU are reproduced exactly.
    for key in ("F1@0.5[trufor]", "F1 oracle[trufor]", "F1@0.5[benco]", "IoU@0.5[benco]"):
        assert worst[key] == 0.0, (key, worst[key])
    # AUC: deeploc's is exact (integer trapezoids), BenCo's float32 cumulative sums round.
    assert worst["pixel AUC[benco] (untied)"] < 1e-3
    assert worst["pixel AUC[benco] vs sklearn (tied)"] < 1e-9 and worst["pixel AUC[study] vs sklearn"] < 1e-9


# ------------------------------------------------------------------------- several conventions, rescoring, cIoU
def _flat(scores: dict) -> dict[str, str]:
    """Every value as its repr (NaN compares equal to NaN), for exact comparisons."""
    return {f"{c}.{k}": repr(float(v)) for c, d in scores.items() for k, v in d.items()}


def _batch(seed: int, n: int = 9, hw: tuple[int, int] = (40, 36)) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    masks = torch.zeros(n, 1, *hw)
    for k in range(1, n):  # image 0 keeps an empty mask, image 1 a thin stroke, the others rectangles
        y, x = rng.integers(0, hw[0] - 4), rng.integers(0, hw[1] - 4)
        masks[k, 0, y : y + (3 if k == 1 else rng.integers(16, 30)), x : x + rng.integers(16, 30)] = 1
    logits = torch.from_numpy(rng.normal(size=(n, 1, hw[0] // 2, hw[1] // 2)).astype(np.float32)) * 2
    return logits, masks


def test_rescoring_saved_predictions_equals_test_time_scores_in_every_convention(tmp_path) -> None:
    from deeploc.metrics import LocalizationMetrics
    from deeploc.metrics.store import load_predictions, rescore, save_predictions

    logits, masks = _batch(3)
    conventions = ("study", "trufor", "benco")
    chosen = {"study": {"f1_val": 0.3, "iou_val": 0.4}, "trufor": {"f1_val": 0.6}, "benco": {"f1_val": 0.2}}
    live = LocalizationMetrics(conventions=conventions, chosen=chosen, keep_predictions=True)
    for s in range(0, 9, 4):  # uneven batches, shuffled indices
        live.update(logits[s : s + 4], masks[s : s + 4], torch.arange(8, -1, -1)[s : s + 4])
    want, want_rows = live.compute_all(), live.per_image()
    for dtype in ("float32", "float16", "uint8"):
        path = save_predictions(
            tmp_path / f"{dtype}.npz", live.predictions(), dtype, names=[f"im{i}" for i in range(9)]
        )
        loaded = load_predictions(path)
        assert loaded["names"] == [f"im{i}" for i in range(9)]
        again = rescore(loaded, conventions, chosen)
        got, got_rows = again.compute_all(), again.per_image()
        if dtype == "float32":  # bit for bit, every convention, every metric, every image
            assert _flat(got) == _flat(want)
            for key, column in want_rows.items():
                assert torch.equal(column.nan_to_num(-1), got_rows[key].nan_to_num(-1)), key
        else:  # compact maps move the scores by a little
            for c in conventions:
                for key in ("f1_fixed",):
                    assert float(got[c][key]) == pytest.approx(float(want[c][key]), abs=2.0), (dtype, c, key)
    # One convention alone scores exactly as within a group (shared sorts change nothing).
    alone = LocalizationMetrics(convention="benco", chosen=chosen)
    alone.update(logits, masks, torch.arange(8, -1, -1))
    assert _flat({"benco": alone.compute()}) == _flat({"benco": want["benco"]})


def test_ciou_pools_the_set_and_per_image_scores_name_their_convention() -> None:
    from deeploc.metrics import LocalizationMetrics

    masks = torch.zeros(2, 1, 10, 10)
    masks[0, 0, :5] = 1  # 50 manipulated pixels, predicted exactly
    masks[1, 0, :1, :2] = 1  # 2 manipulated pixels, missed
    probs = masks.clone()
    probs[1] = 0
    metric = LocalizationMetrics(conventions=("study", "benco"))
    metric.update(torch.logit(probs.clamp(1e-4, 1 - 1e-4)), masks, torch.arange(2))
    scores = metric.compute_all()
    assert float(scores["study"]["ciou"]) == pytest.approx(100 * 50 / 52)  # pooled: large masks dominate
    assert float(scores["study"]["iou"]) == pytest.approx(50.0, abs=1e-6)  # per image: (100 + 0) / 2
    rows = metric.per_image()
    assert {"index", "iou[study]", "ciou_num[benco]", "ciou_den[benco]", "auc[benco]"} <= set(rows)
    assert "ap[benco]" not in rows and "f1_val[study]" not in rows  # not defined / no threshold chosen


def test_validation_threshold_is_the_grid_point_with_the_best_mean_score() -> None:
    from deeploc.metrics import LocalizationMetrics

    # Maps that are right at 0.3: manipulated pixels at 0.35, the others at 0.25.
    masks = torch.zeros(3, 1, 32, 32)
    masks[:, :, 4:24, 4:24] = 1
    probs = torch.where(masks > 0.5, 0.35, 0.25)
    metric = LocalizationMetrics(conventions=("study", "trufor", "benco"), choose=True)
    metric.update(torch.logit(probs), masks, torch.arange(3))
    chosen = metric.chosen_thresholds()
    assert chosen["study"] == {"f1_val": 0.25, "iou_val": 0.25}  # the lowest grid point that separates them
    assert chosen["benco"] == {"f1_val": 0.25, "iou_val": 0.25} and set(chosen["trufor"]) == {"f1_val"}
    scored = LocalizationMetrics(conventions=("study",), chosen=chosen)
    scored.update(torch.logit(probs), masks, torch.arange(3))
    result = scored.compute()
    assert float(result["f1_val"]) == pytest.approx(100.0) and float(result["iou_val"]) == pytest.approx(100.0)
    assert float(result["f1_fixed"]) < 1e-20  # at 0.5 nothing is predicted
