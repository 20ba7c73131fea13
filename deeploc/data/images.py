"""Decoding image and mask files, and encoding PNGs: OpenCV (``cv2.imdecode``) everywhere in deeploc.

:func:`read_rgb` and :func:`read_mask` are the two readers the datasets use, and validation
(:mod:`deeploc.data.validate`) decodes with :func:`read_rgb_or_reason`, so it checks exactly what training reads.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from deeploc.data.errors import DatasetError
from deeploc.data.masks import DEFAULT_POLARITY, binarize, to_dolos

__all__ = ["encode_png", "image_size", "read_mask", "read_rgb", "read_rgb_or_reason"]


def _decode(path: Path) -> np.ndarray | None:
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError:
        return None
    if data.size == 0:
        return None
    return cv2.imdecode(data, cv2.IMREAD_UNCHANGED)


def _as_rgb_uint8(arr: np.ndarray) -> np.ndarray | str:
    """Convert a cv2-decoded array (BGR / BGRA / gray, 8 or 16 bit) to HxWx3 uint8 RGB, or return a reason."""
    if arr.dtype == np.uint16:
        arr = np.round(arr.astype(np.float32) / 257.0).astype(np.uint8)
    elif arr.dtype != np.uint8:
        return f"unsupported pixel type {arr.dtype}"
    if arr.ndim == 2:
        return cv2.cvtColor(arr, cv2.COLOR_GRAY2RGB)
    if arr.ndim == 3 and arr.shape[2] == 1:
        return cv2.cvtColor(arr[..., 0], cv2.COLOR_GRAY2RGB)
    if arr.ndim == 3 and arr.shape[2] == 3:
        return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    if arr.ndim == 3 and arr.shape[2] == 4:
        return cv2.cvtColor(arr, cv2.COLOR_BGRA2RGB)
    return f"unsupported shape {arr.shape} (not gray, RGB or RGBA)"


def read_rgb_or_reason(path: Path) -> np.ndarray | str:
    """An image file as HxWx3 uint8 RGB, or the reason it cannot be read (validation collects reasons)."""
    arr = _decode(path)
    if arr is None:
        if not path.exists():
            return "file is missing"
        return "cannot be decoded as an image (corrupt, truncated, empty or not an image file)"
    return _as_rgb_uint8(arr)


def read_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image as HxWx3 uint8 RGB; raise :class:`DatasetError` naming the file if it cannot be read."""
    return _read(path, "image")


def read_mask(
    path: str | os.PathLike[str], polarity: str = DEFAULT_POLARITY, threshold: int | None = None
) -> np.ndarray:
    """Read a mask as HxW uint8 in the Dolos convention (255 = real, else manipulated) whatever ``polarity`` it is
    drawn in (binarised first with ``threshold``, see :mod:`deeploc.data.masks`): channel 0 in RGB order
    (``mask[..., 0]``); validation checks that the other channels agree."""
    return np.ascontiguousarray(to_dolos(binarize(_read(path, "mask")[..., 0], threshold), polarity))


def _read(path: str | os.PathLike[str], kind: str) -> np.ndarray:
    """:func:`read_rgb_or_reason`, the reason raised as a :class:`DatasetError` naming the ``kind`` of file."""
    out = read_rgb_or_reason(Path(path))
    if isinstance(out, str):
        raise DatasetError(f"{kind} {Path(path)}: {out}")
    return out


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(height, width)`` of an image file, from its header when Pillow reads it (else by decoding it)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
            return height, width
    except Exception:  # not readable by Pillow: OpenCV decides (and names the file when it cannot)
        return read_rgb(path).shape[:2]


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 array in OpenCV's channel order (BGR, or gray)."""
    ok, buf = cv2.imencode(".png", array)
    if not ok:  # pragma: no cover - OpenCV always encodes a valid uint8 array
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()
