"""The torchmetrics aggregate of the per-image scores (:class:`LocalizationMetrics`).

Means over unique images. Per-image scores and dataset indices are "cat" states, so DDP gathers them
all; ``compute`` keeps the first occurrence of each index, which drops the duplicates that
``DistributedSampler`` pads the last shards with. Without indices every updated row counts (under DDP
the padded duplicates then count twice: pass indices).
"""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from deeploc.data.regions import binarise_masks
from deeploc.metrics.pixels import resize_probs
from deeploc.metrics.registry import DEFAULT_CONVENTION, check_convention, metric_names
from deeploc.metrics.scores import FLAG_NAMES, batch_scores


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
        for name in (*self.names, *FLAG_NAMES):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        # Dataset index per row, -1 = unknown (always counted).
        self.add_state("sample_index", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, masks: torch.Tensor, indices: torch.Tensor | None = None) -> None:
        """Score a batch: logits ``Bx1xhxw`` (any size), masks ``Bx1xHxW``/``BxHxW`` at native size."""
        gt = binarise_masks(masks.detach())
        with torch.no_grad():
            probs = resize_probs(logits, gt.shape[-2:])
            scores = batch_scores(probs, gt.to(probs.device), self.threshold, self.convention)
        b = probs.shape[0]
        if indices is None:
            idx = torch.full((b,), -1, dtype=torch.long, device=probs.device)
        else:
            idx = torch.as_tensor(indices).to(device=probs.device, dtype=torch.long).reshape(-1)
            if idx.numel() != b:
                raise ValueError(f"got {idx.numel()} indices for a batch of {b}")
            if bool((idx < 0).any()):
                raise ValueError("dataset indices must be >= 0")
        for name in (*self.names, *FLAG_NAMES):
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
        values = {name: dim_zero_cat(getattr(self, name))[keep][order] for name in (*self.names, *FLAG_NAMES)}
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
