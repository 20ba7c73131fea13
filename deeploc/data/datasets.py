"""One (image, mask) sample as tensors, read with the same OpenCV readers that validation uses."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from deeploc.data.errors import DatasetError
from deeploc.data.images import image_size, read_mask, read_rgb
from deeploc.data.masks import DEFAULT_POLARITY
from deeploc.data.samples import Sample

__all__ = ["ImageMaskDataset", "image_tensor", "mask_tensor", "read_target", "sample_target"]


def read_target(path: Any, polarity: str = DEFAULT_POLARITY, threshold: int | None = None) -> np.ndarray:
    """A mask file as ``H x W`` uint8, 1 = manipulated (Dolos: ``mask_png[..., 0] != 255``; see ``read_mask``)."""
    return (read_mask(path, polarity, threshold) != 255).astype(np.uint8)


def sample_target(sample: Sample, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A sample's ``H x W`` 0/1 mask; a real image's is all zeros, of ``shape`` (its image's, read if not given)."""
    if sample.mask is None:
        return np.zeros(shape[:2] if shape is not None else image_size(sample.image), np.uint8)
    return read_target(sample.mask, sample.mask_polarity, sample.mask_threshold)


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """``H x W x 3`` uint8 RGB -> float32 ``3 x H x W`` in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)


def mask_tensor(mask: np.ndarray) -> torch.Tensor:
    """``H x W`` 0/1 mask -> float32 ``1 x H x W``."""
    return torch.from_numpy(np.ascontiguousarray(mask)).float().unsqueeze(0)


class ImageMaskDataset(Dataset):
    """Items are dicts: ``image`` float32 3xHxW in [0, 1] RGB; ``mask`` float32 1xHxW, 1 = manipulated
    (read in the sample's ``mask_polarity``; all zeros for a real image); ``name``, ``subset`` (str) and ``index`` (int, position in ``samples``).

    ``transform`` is an albumentations-style callable ``transform(image=HxWx3 uint8, mask=HxW uint8) -> dict``
    (see :mod:`deeploc.data.augment`); the mask it receives is 0/1. ``match_sizes=False`` lets an image have another
    size than its mask (robustness: a resized image is scored against its original mask; no transform then).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable[..., dict[str, Any]] | None = None,
        match_sizes: bool = True,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.match_sizes = match_sizes

    def __len__(self) -> int:
        return len(self.samples)

    def reseed(self, seed: int) -> None:
        """Reseed the transform's random state (called per worker / epoch by the datamodule)."""
        set_seed = getattr(self.transform, "set_random_seed", None)
        if callable(set_seed):
            set_seed(int(seed) % (2**32))

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.samples[index]
        image = read_rgb(s.image)
        mask = sample_target(s, image.shape)
        if self.match_sizes and image.shape[:2] != mask.shape:
            raise DatasetError(
                f"mask {s.mask} is {mask.shape[1]}x{mask.shape[0]} but its image {s.image} is "
                f"{image.shape[1]}x{image.shape[0]} (WxH); run deeploc-check on the dataset"
            )
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return {
            "image": image_tensor(image),
            "mask": mask_tensor(mask),
            "name": s.name,
            "subset": s.subset,
            "index": int(index),
        }
