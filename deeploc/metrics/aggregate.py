"""The torchmetrics aggregate of the per-image scores (:class:`LocalizationMetrics`).

Means over unique images. Per-image scores and dataset indices are "cat" states, so DDP gathers them
all; ``compute`` keeps the first occurrence of each index, which drops the duplicates that
``DistributedSampler`` pads the last shards with. Without indices every updated row counts (under DDP
the padded duplicates then count twice: pass indices).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from deeploc.data.regions import binarise_masks
from deeploc.metrics.pixels import resize_probs
from deeploc.metrics.registry import DEFAULT_CONVENTION, check_conventions
from deeploc.metrics.scores import FLAG_NAMES, batch_scores, reported_specs
from deeploc.metrics.thresholds import choose_thresholds, grid_tensor


def _synced(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``method`` on the states of every process (torchmetrics syncs ``compute`` only): under DDP each rank
    holds its share of the images, and the per-image rows, thresholds and kept maps are the whole set's."""

    @functools.wraps(method)
    def run(self: Metric, *args: Any, **kwargs: Any) -> Any:
        if self._is_synced:  # inside compute(), or another synced call
            return method(self, *args, **kwargs)
        with self.sync_context():
            return method(self, *args, **kwargs)

    return run


class LocalizationMetrics(Metric):
    """Mean per-image scores over unique images in one or several conventions, DDP-safe (module docstring).

    ``compute`` returns the first (primary) convention's scores: one per metric it reports (percent),
    ``n_images`` and the counts of the undefined cases (``n_ap_undefined``: empty masks; ``n_f1_no_positive``:
    no F1 positive left after erosion); :meth:`compute_all` returns them for every convention. Counts are float
    tensors so that Lightning can log them without a dtype warning.

    Args:
        threshold: the fixed pixel threshold (0.5).
        convention, conventions: one convention, or several (the first is the primary one); default ``study``.
        chosen: ``{convention: {"f1_val": t, "iou_val": t}}``, thresholds chosen on the validation split.
        choose: count every threshold of the validation grid, for :meth:`chosen_thresholds`.
        keep_predictions: keep every image's probabilities and mask, for :meth:`predictions`.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        threshold: float = 0.5,
        convention: str | None = None,
        conventions: Sequence[str] | None = None,
        chosen: Mapping[str, Mapping[str, float]] | None = None,
        choose: bool = False,
        keep_predictions: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.threshold = float(threshold)
        self.conventions = check_conventions(
            conventions if conventions is not None else (convention or DEFAULT_CONVENTION)
        )
        self.convention = self.conventions[0]
        self.chosen = {c: dict(t) for c, t in (chosen or {}).items() if c in self.conventions and t}
        self.specs = {c: reported_specs(c, self.chosen.get(c)) for c in self.conventions}
        self.names = tuple(spec.name for spec in self.specs[self.convention])
        for state in (*self._score_states(), *FLAG_NAMES, "sample_index"):
            self.add_state(state, default=[], dist_reduce_fx="cat")  # sample_index: dataset index, -1 = unknown
        self.choose = choose
        if choose:
            self.add_state("grid_counts", default=[], dist_reduce_fx="cat")
            self.add_state("grid_totals", default=[], dist_reduce_fx="cat")
        self.keep_predictions = keep_predictions
        if keep_predictions:  # flattened per image (sizes may differ), with each image's size
            for state in ("pred_probs", "pred_masks", "pred_shapes"):
                self.add_state(state, default=[], dist_reduce_fx="cat")

    def _score_states(self) -> list[str]:
        return [score_state(c, spec.name) for c in self.conventions for spec in self.specs[c]]

    def update(self, logits: torch.Tensor, masks: torch.Tensor, indices: torch.Tensor | None = None) -> None:
        """Score a batch: logits ``Bx1xhxw`` (any size), masks ``Bx1xHxW``/``BxHxW`` at native size."""
        gt = binarise_masks(masks.detach())
        with torch.no_grad():
            probs = resize_probs(logits, gt.shape[-2:])
        self.update_probabilities(probs, gt.to(probs.device), indices)

    @torch.no_grad()
    def update_probabilities(self, probs: torch.Tensor, gt: torch.Tensor, indices: torch.Tensor | None = None) -> None:
        """Score ``BxHxW`` probabilities already at the masks' size (bool ``gt``): what :meth:`update` scores, and
        what rescoring saved predictions feeds in."""
        scored = batch_scores(
            probs, gt, self.threshold, self.conventions, self.chosen, grid_tensor(probs.device) if self.choose else None
        )
        b = probs.shape[0]
        if indices is None:
            idx = torch.full((b,), -1, dtype=torch.long, device=probs.device)
        else:
            idx = torch.as_tensor(indices).to(device=probs.device, dtype=torch.long).reshape(-1)
            if idx.numel() != b:
                raise ValueError(f"got {idx.numel()} indices for a batch of {b}")
            if bool((idx < 0).any()):
                raise ValueError("dataset indices must be >= 0")
        for c in self.conventions:
            for spec in self.specs[c]:
                getattr(self, score_state(c, spec.name)).append(scored.scores[c][spec.name])
        for name in FLAG_NAMES:
            getattr(self, name).append(scored.flags[name])
        self.sample_index.append(idx)
        if self.choose:
            self.grid_counts.append(scored.grid)
            self.grid_totals.append(scored.totals)
        if self.keep_predictions:
            self.pred_probs.append(probs.reshape(-1).float())
            self.pred_masks.append(gt.reshape(-1).to(torch.uint8))
            self.pred_shapes.append(torch.tensor([list(gt.shape[-2:])] * b, dtype=torch.long, device=probs.device))

    def _unique(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Rows kept (first occurrence of each index) and their order by index; None before any update."""
        if isinstance(self.sample_index, list) and not self.sample_index:
            return None
        index = dim_zero_cat(self.sample_index)
        keep = _first_occurrences(index)
        # Sum in sample order, so means are bit-identical whichever process scored which image.
        return keep, torch.argsort(index[keep], stable=True)

    def _values(self, state: str, unique: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        keep, order = unique
        return dim_zero_cat(getattr(self, state))[keep][order]

    def compute(self) -> dict[str, torch.Tensor]:
        """The primary convention's means over unique images (first occurrence of each index kept)."""
        return self.compute_all()[self.convention]

    @_synced
    def compute_all(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{convention: {metric: mean, n_images, n_ap_undefined, n_f1_no_positive}}`` for every convention."""
        unique = self._unique()
        count_dtype = torch.get_default_dtype()
        if unique is None:
            nan = torch.tensor(float("nan"), device=self.device)
            zero = torch.tensor(0.0, device=self.device)
            counts = {"n_images": zero, "n_ap_undefined": zero, "n_f1_no_positive": zero}
            return {c: {**{s.name: nan for s in self.specs[c]}, **counts} for c in self.conventions}
        keep = unique[0]
        flags = {name: self._values(name, unique) for name in FLAG_NAMES}
        counts = {
            "n_images": torch.tensor(float(keep.sum()), dtype=count_dtype, device=keep.device),
            "n_ap_undefined": flags["ap_undefined"].sum().to(count_dtype),
            "n_f1_no_positive": flags["f1_no_positive"].sum().to(count_dtype),
        }
        results = {}
        for c in self.conventions:
            means = {}
            for spec in self.specs[c]:
                values = self._values(score_state(c, spec.name), unique)
                # NaN marks an image where a score is undefined in the convention: left out of the mean.
                means[spec.name] = pooled_mean(values) if spec.pooled else values.nanmean()
            results[c] = {**means, **counts}
        return results

    @_synced
    def per_image(self) -> dict[str, torch.Tensor]:
        """Every unique image's scores in index order: ``index``, then ``<metric>[<convention>]`` columns (a pooled
        metric gives two, ``<metric>_num`` and ``<metric>_den``, whose sums make the set's value)."""
        unique = self._unique()
        if unique is None:
            return {}
        columns = {"index": self._values("sample_index", unique)}
        for c in self.conventions:
            for spec in self.specs[c]:
                values = self._values(score_state(c, spec.name), unique)
                if spec.pooled:
                    columns[f"{spec.name}_num[{c}]"], columns[f"{spec.name}_den[{c}]"] = values[:, 0], values[:, 1]
                else:
                    columns[f"{spec.name}[{c}]"] = values
        return columns

    @_synced
    def chosen_thresholds(self, conventions: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
        """Per convention (default: this metric's), the grid thresholds with the best mean F1 and IoU over the
        unique images seen (:func:`deeploc.metrics.thresholds.choose_thresholds`); needs ``choose=True``."""
        unique = self._unique()
        if not self.choose or unique is None:
            return {}
        grid, totals = self._values("grid_counts", unique), self._values("grid_totals", unique)
        return choose_thresholds(grid, totals, self.conventions if conventions is None else conventions)

    @_synced
    def predictions(self) -> dict[str, Any]:
        """The kept probabilities and masks of every unique image in index order: ``index``, ``shapes`` (N x 2),
        ``probs`` and ``masks`` (lists of HxW tensors); needs ``keep_predictions=True``."""
        unique = self._unique()
        if not self.keep_predictions or unique is None:
            return {
                "index": torch.zeros(0, dtype=torch.long),
                "shapes": torch.zeros(0, 2, dtype=torch.long),
                "probs": [],
                "masks": [],
            }
        keep, order = unique
        shapes = dim_zero_cat(self.pred_shapes)
        sizes = (shapes[:, 0] * shapes[:, 1]).tolist()
        probs = torch.split(dim_zero_cat(self.pred_probs), sizes)
        masks = torch.split(dim_zero_cat(self.pred_masks), sizes)
        rows = keep.nonzero().reshape(-1)[order].tolist()
        return {
            "index": self._values("sample_index", unique),
            "shapes": shapes[keep][order],
            "probs": [probs[r].reshape(*shapes[r].tolist()) for r in rows],
            "masks": [masks[r].reshape(*shapes[r].tolist()).bool() for r in rows],
        }


def score_state(convention: str, name: str) -> str:
    """The metric state holding ``name``'s per-image values in ``convention``."""
    return f"{convention}__{name}"


def pooled_mean(values: torch.Tensor) -> torch.Tensor:
    """``100 * sum(numerators) / sum(denominators)`` of ``N x 2`` per-image parts; NaN when the denominator is 0."""
    num, den = values.sum(0)
    return 100.0 * num / den if bool(den > 0) else torch.tensor(float("nan"), dtype=values.dtype, device=values.device)


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
