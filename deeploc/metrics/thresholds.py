"""The pixel threshold chosen on the validation split (``f1_val``, ``iou_val``).

At every validation epoch the module counts, per image, the confusion at each threshold of :data:`GRID`
(0.01, 0.02, ..., 0.99); :func:`choose_thresholds` picks, per convention, the grid threshold with the best mean
over images of F1 (for ``f1_val``) and of IoU (for ``iou_val``), ties to the lowest. The thresholds of the epoch
whose checkpoint is kept (the best validation epoch) travel in that checkpoint, are used on the test split, and are
recorded in metrics.json (``thresholds``). Unlike the per-image oracle (F1 oracle), they never see the test masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from deeploc.metrics.registry import convention_specs
from deeploc.metrics.rules import counts_from_grid, f1_rule, iou_rule

GRID_STEPS = 100  # thresholds k / 100 for k = 1..99
GRID = torch.arange(1, GRID_STEPS, dtype=torch.float64) / GRID_STEPS


def grid_tensor(device: torch.device | str = "cpu") -> torch.Tensor:
    """:data:`GRID` as float32, the dtype of the probabilities it is compared with."""
    return GRID.to(device=device, dtype=torch.float32)


def choose_thresholds(
    grid: torch.Tensor, totals: torch.Tensor, conventions: Sequence[str]
) -> dict[str, dict[str, float]]:
    """``{convention: {"f1_val": t, "iou_val": t}}`` from validation grid counts (``N x T x 4``) and totals
    (``N x 3``) of N unique images; a metric the convention does not define, or one undefined on every image, gets
    no threshold."""
    counts = counts_from_grid(grid, totals)
    dtype = torch.float64
    chosen: dict[str, dict[str, float]] = {}
    for convention in conventions:
        defined = {spec.name for spec in convention_specs(convention)}
        rules = {"f1_val": f1_rule, "iou_val": iou_rule}
        picks = {}
        for name, rule in rules.items():
            if name not in defined:
                continue
            curve = rule(convention, counts, dtype).nanmean(0)  # mean over images at each threshold
            if bool(curve.isnan().all()):
                continue
            best = int(curve.nan_to_num(float("-inf")).argmax())  # first maximum: ties to the lowest threshold
            picks[name] = round(float(GRID[best]), 2)
        chosen[convention] = picks
    return chosen
