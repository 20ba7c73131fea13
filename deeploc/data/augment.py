"""Optional training augmentations (DeCLIP's: colour jitter, JPEG compression, Gaussian blur), all off by default.

Config (every key optional; a bare number for a section is its probability)::

    augment:
      color_jitter: {p: 0.0, brightness: 0.3, contrast: 0.3, saturation: 0.3, hue: 0.3}
      jpeg: {p: 0.0, quality: [30, 100]}          # JPEG quality drawn uniformly in the range
      blur: {p: 0.0, sigma: [0.4, 2.0], kernel: 5}  # Gaussian blur, odd kernel size (0 = from sigma)

Default strengths are DeCLIP's (ColorJitter(0.3, 0.3, 0.3, 0.3); JPEG quality 30-100; 5x5 blur, sigma 0.4-2.0),
applied in DeCLIP's order (jitter, JPEG, blur). DeCLIP applies an enabled augmentation to every image (p = 1).
All three are photometric (albumentations ImageOnlyTransform): the mask is never touched. No geometric op is
offered (the protocol uses no flips); any future one must be given the mask so that it follows exactly.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations otherwise makes an HTTP call at import

from collections.abc import Mapping, Sequence
from typing import Any

import albumentations as A

__all__ = ["AUGMENT_DEFAULTS", "build_augmentations"]

AUGMENT_DEFAULTS: dict[str, dict[str, Any]] = {
    "color_jitter": {"p": 0.0, "brightness": 0.3, "contrast": 0.3, "saturation": 0.3, "hue": 0.3},
    "jpeg": {"p": 0.0, "quality": [30, 100]},
    "blur": {"p": 0.0, "sigma": [0.4, 2.0], "kernel": 5},
}


def _pair(value: Any, name: str) -> tuple[float, float]:
    if isinstance(value, (int, float)):
        return float(value), float(value)
    if isinstance(value, Sequence) and len(value) == 2:
        lo, hi = float(value[0]), float(value[1])
        if lo > hi:
            raise ValueError(f"augment: {name} range {list(value)} has min > max")
        return lo, hi
    raise ValueError(f"augment: {name} must be a number or a [min, max] pair, got {value!r}")


def _resolve(cfg: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Merge ``cfg`` over the defaults, rejecting unknown sections and keys."""
    out = {k: dict(v) for k, v in AUGMENT_DEFAULTS.items()}
    for section, value in (cfg or {}).items():
        if section not in out:
            raise ValueError(f"augment: unknown section {section!r}; known: {sorted(out)}")
        if value is None:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = {"p": value}
        if not isinstance(value, Mapping):
            raise ValueError(f"augment.{section} must be a mapping or a probability, got {value!r}")
        for key, v in value.items():
            if key not in out[section]:
                raise ValueError(f"augment.{section}: unknown key {key!r}; known: {sorted(out[section])}")
            out[section][key] = v
        p = float(out[section]["p"])
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"augment.{section}.p must be in [0, 1], got {p}")
    return out


def build_augmentations(cfg: Mapping[str, Any] | None, seed: int | None = None) -> A.Compose | None:
    """An albumentations pipeline for ``cfg``, or None when every augmentation is off (the default).

    Call it as ``pipeline(image=HxWx3 uint8, mask=HxW uint8)``; the returned mask equals the input mask.
    """
    c = _resolve(cfg)
    ops: list[A.BasicTransform] = []
    cj = c["color_jitter"]
    if float(cj["p"]) > 0:
        ops.append(
            A.ColorJitter(
                brightness=float(cj["brightness"]),
                contrast=float(cj["contrast"]),
                saturation=float(cj["saturation"]),
                hue=float(cj["hue"]),
                p=float(cj["p"]),
            )
        )
    jp = c["jpeg"]
    if float(jp["p"]) > 0:
        lo, hi = _pair(jp["quality"], "jpeg.quality")
        if not 1 <= lo <= hi <= 100:
            raise ValueError(f"augment.jpeg.quality must lie in [1, 100], got {jp['quality']}")
        ops.append(A.ImageCompression(compression_type="jpeg", quality_range=(int(lo), int(hi)), p=float(jp["p"])))
    bl = c["blur"]
    if float(bl["p"]) > 0:
        lo, hi = _pair(bl["sigma"], "blur.sigma")
        kernel = int(bl["kernel"])
        if kernel != 0 and (kernel < 3 or kernel % 2 == 0):
            raise ValueError(f"augment.blur.kernel must be 0 or an odd size >= 3, got {kernel}")
        ops.append(A.GaussianBlur(blur_limit=(kernel, kernel), sigma_limit=(lo, hi), p=float(bl["p"])))
    if not ops:
        return None
    return A.Compose(ops, seed=seed)
