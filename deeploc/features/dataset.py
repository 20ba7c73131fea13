"""The dataset a training or evaluation run reads from the feature cache: cached maps and masks, never images."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch.utils.data import Dataset

from deeploc.data.datasets import mask_tensor, sample_target
from deeploc.features.entry import read_entry

if TYPE_CHECKING:
    from deeploc.data.layout import Sample


class CachedFeatureDataset(Dataset):
    """Cached feature maps plus masks; each item reads one memory-mapped entry per map (checked, see
    :mod:`deeploc.features.entry`) and the mask, never the image.

    Args:
        samples: the samples, in dataset order.
        entries: per map name, (entry paths, content hashes, shape) aligned with ``samples``.
    """

    def __init__(self, samples: list[Sample], entries: Mapping[str, tuple[list[str], list[str], tuple]]) -> None:
        self.samples = samples
        self.entries = dict(entries)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        features = {
            name: read_entry(paths[index], keys[index], shape) for name, (paths, keys, shape) in self.entries.items()
        }
        return {
            "features": features,
            "mask": mask_tensor(sample_target(sample)),
            "name": sample.name,
            "subset": sample.subset,
            "index": index,
        }
