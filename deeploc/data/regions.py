"""The ground-truth regions the F1 metrics score: positives are the manipulated pixels that survive a 15x15
erosion, negatives the pixels outside an 11x11 dilation (TruFor's boundary rule, used by DeCLIP and the study).

Data validation counts the positives of every mask (thin masks have none), the metrics use the same split; both
read it from here, so the rule has one home below both layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ERODE_SIZE = 15  # TruFor's erodeKernSize: gt pixels surviving this erosion are the F1 positives
DILATE_SIZE = 11  # TruFor's dilateKernSize: pixels outside this dilation are the F1 negatives
GT_THRESHOLD = 0.5  # ground truth is mask > 0.5


def binarise_masks(masks: torch.Tensor) -> torch.Tensor:
    """``Bx1xHxW`` or ``BxHxW`` masks -> bool ``BxHxW`` (manipulated = value > 0.5)."""
    if masks.ndim == 4:
        if masks.shape[1] != 1:
            raise ValueError(f"expected masks Bx1xHxW or BxHxW, got {tuple(masks.shape)}")
        masks = masks[:, 0]
    if masks.ndim != 3:
        raise ValueError(f"expected masks Bx1xHxW or BxHxW, got {tuple(masks.shape)}")
    return masks if masks.dtype == torch.bool else masks > GT_THRESHOLD


def f1_split(gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TruFor's F1 positives (eroded gt) and negatives (outside dilated gt) for bool ``BxHxW`` gt.

    ``max_pool2d`` pads with -inf, so pixels outside the image never win the max (nor, negated, the min):
    regions touching the border are not eroded from the border side, like scipy's reflect mode / cv2.
    """
    g = gt.unsqueeze(1).float()
    eroded = -F.max_pool2d(-g, ERODE_SIZE, stride=1, padding=ERODE_SIZE // 2)
    dilated = F.max_pool2d(g, DILATE_SIZE, stride=1, padding=DILATE_SIZE // 2)
    return eroded[:, 0] > 0.5, dilated[:, 0] < 0.5


def f1_positive_count(masks: torch.Tensor) -> torch.Tensor:
    """How many F1 positives each mask has: ground-truth pixels that survive the ``ERODE_SIZE`` square erosion of
    :func:`f1_split` (0 = the image has no F1 positive: an empty mask, or every region thinner than ``ERODE_SIZE``).

    ``masks`` as :func:`the metrics` takes them (``Bx1xHxW`` or ``BxHxW``; bool, or manipulated > 0.5); returns
    int64 counts of shape ``B``. The erosion is ``f1_split``'s (pixels outside the image never erode; tested equal),
    computed with OpenCV because deeploc-check runs it on every mask of a dataset and ``cv2.erode`` is several
    hundred times faster than ``max_pool2d`` on the CPU.
    """
    import cv2  # the data layer's reader: imported here so that the metrics themselves do not depend on it
    import numpy as np

    kernel = np.ones((ERODE_SIZE, ERODE_SIZE), np.uint8)
    gt = binarise_masks(masks).cpu().numpy().astype(np.uint8)
    return torch.tensor([cv2.countNonZero(cv2.erode(m, kernel)) for m in gt], dtype=torch.int64)
