"""A training-free first signal: k-nearest-neighbour labelling of patch features (``deeploc-probe``).

The idea of the Open Hummingbird dense evaluation, for forgery localization: every patch (cell) of an encoder map of
a training image is a memory-bank entry holding its feature and its *manipulated fraction* (the image's binarised
mask, area-averaged over the cell's pixels of the encoder input). A test patch is labelled with the mean manipulated
fraction of its ``k`` nearest bank entries (cosine similarity, exact, computed in torch in chunks of queries), the
patch grid of probabilities is upsampled bilinearly to the mask's size and scored with the protocol's metrics
(:class:`deeploc.metrics.LocalizationMetrics`), per test subset. No decoder is trained, so a table across maps,
layers and backbones comes in minutes.

Memory stays bounded: the bank keeps at most ``bank_size`` patches per map (default 65,536), drawn uniformly with a
fixed seed from the patches of every training image (an equal quota per image), stored as float16 unit vectors:
``bank_size x C x 2`` bytes per map (128 MiB for ViT-L's 1024 channels).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from deeploc.data.regions import binarise_masks
from deeploc.errors import ConfigError
from deeploc.metrics import LocalizationMetrics

__all__ = ["MemoryBank", "ProbeSettings", "build_banks", "knn_probabilities", "patch_targets", "probe_scores"]

# Probabilities are handed to the metrics as logits (they apply a sigmoid); clamped so 0 and 1 stay finite.
_EPS = 1e-6


@dataclass(frozen=True)
class ProbeSettings:
    """``k`` neighbours; at most ``bank_size`` bank patches per map; queries per similarity chunk; the seed of the
    patch subsampling; the metrics' threshold and convention."""

    k: int = 10
    bank_size: int = 65_536
    chunk: int = 4096
    seed: int = 0
    threshold: float = 0.5
    convention: str = "study"

    def __post_init__(self) -> None:
        for name in ("k", "bank_size", "chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"probe.{name}={value!r} must be a positive integer")


@dataclass
class MemoryBank:
    """Unit-norm patch features (``N x C`` float16) of one map and their manipulated fractions (``N``)."""

    features: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.numel())


def patch_targets(masks: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """The manipulated fraction of every cell of a ``grid`` (``h, w``) laid over each mask (``B x [1 x] H x W``,
    binarised as the metrics do): ``B x h x w`` in [0, 1] (area average)."""
    gt = binarise_masks(masks).float()
    if gt.ndim == 3:
        gt = gt[:, None]
    return F.interpolate(gt, size=tuple(grid), mode="area")[:, 0]


def _unit_rows(fmap: torch.Tensor) -> torch.Tensor:
    """``B x C x h x w`` -> ``(B*h*w) x C`` unit vectors (row-major cells, image after image)."""
    rows = fmap.float().permute(0, 2, 3, 1).reshape(-1, fmap.shape[1])
    return F.normalize(rows, dim=1)


def build_banks(
    batches: Iterable[Mapping[str, torch.Tensor]],
    encoder: Any,
    names: Sequence[str],
    n_images: int,
    settings: ProbeSettings,
    device: torch.device | str = "cpu",
) -> dict[str, MemoryBank]:
    """One bank per map ``names`` from the training ``batches`` (``image``, ``mask``) of ``n_images`` images."""
    quota = max(1, math.ceil(settings.bank_size / max(1, n_images)))
    generator = torch.Generator().manual_seed(settings.seed)
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in names}
    with torch.no_grad():
        for batch in batches:
            maps = encoder(batch["image"].to(device), names=names)
            for name, fmap in maps.items():
                cells = fmap.shape[-2] * fmap.shape[-1]
                rows, labels = _unit_rows(fmap).cpu(), patch_targets(batch["mask"], fmap.shape[-2:]).reshape(-1)
                for image in range(fmap.shape[0]):  # an equal random share of each image's cells
                    keep = torch.randperm(cells, generator=generator)[: min(quota, cells)] + image * cells
                    parts[name].append((rows[keep].half(), labels[keep].cpu()))
    banks = {}
    for name, chunks in parts.items():
        features = torch.cat([c[0] for c in chunks])[: settings.bank_size]
        banks[name] = MemoryBank(features, torch.cat([c[1] for c in chunks])[: settings.bank_size])
    return banks


def knn_probabilities(bank: MemoryBank, queries: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """Mean manipulated fraction of the ``k`` most cosine-similar bank entries of each query row (``M x C`` unit
    vectors): ``M`` values in [0, 1]. Exact: every bank entry is compared, ``chunk`` queries at a time."""
    keys = bank.features.to(queries.device, torch.float32)
    labels = bank.labels.to(queries.device)
    k = min(k, len(bank))
    out = []
    for start in range(0, queries.shape[0], chunk):
        similarity = queries[start : start + chunk] @ keys.T
        out.append(labels[similarity.topk(k, dim=1).indices].mean(dim=1))
    return torch.cat(out) if out else queries.new_zeros(0)


def probe_scores(
    batches: Iterable[Mapping[str, torch.Tensor]],
    encoder: Any,
    banks: Mapping[str, MemoryBank],
    settings: ProbeSettings,
    device: torch.device | str = "cpu",
) -> dict[str, dict[str, float]]:
    """Scores (percent, every registered metric, plus ``n_images``) of each bank's map on the test ``batches``
    (``image``, ``mask`` at native size, ``index``)."""
    metrics = {name: LocalizationMetrics(settings.threshold, settings.convention) for name in banks}
    with torch.no_grad():
        for batch in batches:
            maps = encoder(batch["image"].to(device), names=tuple(banks))
            for name, fmap in maps.items():
                probs = knn_probabilities(banks[name], _unit_rows(fmap), settings.k, settings.chunk)
                grid = probs.reshape(fmap.shape[0], 1, *fmap.shape[-2:]).cpu().clamp(_EPS, 1 - _EPS)
                metrics[name].update(torch.logit(grid), batch["mask"], batch.get("index"))
    results = {}
    for name, metric in metrics.items():
        scores = metric.compute()
        results[name] = {key: float(scores[key]) for key in (*metric.names, "n_images")}
    return results
