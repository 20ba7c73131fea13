"""The generated dataset's pixels: procedural source images, manipulation regions, and the four local manipulations.

Every array depends only on (seed, stream, global index, size), so the same parameters give byte-identical files
(:mod:`deeploc.data.synthetic` writes them in the Dolos layout). The subsets are four visibly different *local*
manipulations of the same source image, applied inside the same mask for a given name:

- ``inpaint-telea``: the region is filled by OpenCV's Telea inpainting (smooth, noise-free fill).
- ``copy-move``: the region is replaced by a patch of the same image from elsewhere (same statistics, seams).
- ``blur-noise``: the region is blurred and resynthesised with noise of another strength.
- ``splice-jpeg``: the region comes from another image, colour-shifted and JPEG-requantised.
"""

from __future__ import annotations

import cv2
import numpy as np

from deeploc.data.images import encode_png

__all__ = [
    "SUBSETS",
    "SUBSET_DESCRIPTIONS",
    "encode_mask_png",
    "manipulated_images",
    "region",
    "texture",
    "unmanipulated_images",
]

SUBSETS: tuple[str, ...] = ("inpaint-telea", "copy-move", "blur-noise", "splice-jpeg")
SUBSET_DESCRIPTIONS: dict[str, str] = {
    "inpaint-telea": "region filled by OpenCV Telea inpainting",
    "copy-move": "region replaced by a patch from elsewhere in the same image",
    "blur-noise": "region blurred and resynthesised with different noise",
    "splice-jpeg": "region spliced from another image, colour-shifted and JPEG-requantised",
}

# Streams of the per-index random generators, so that each kind of image has its own sequence.
_STREAM_FAKE, _STREAM_P2, _STREAM_FFHQ = 0, 1, 2


def _smooth_field(rng: np.random.Generator, size: int, grid: int, channels: int) -> np.ndarray:
    """Low-frequency random field in [0, 1]: a grid x grid random array upsampled with cubic interpolation."""
    small = rng.random((grid, grid, channels), dtype=np.float32)
    field = cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)
    return field.reshape(size, size, channels)


def texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A structured procedural image, HxWx3 uint8 (BGR order, as OpenCV writes it)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    # Background: two-colour gradient along a random direction plus a low-frequency colour field.
    c0, c1 = rng.uniform(20, 235, 3).astype(np.float32), rng.uniform(20, 235, 3).astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    t = (np.cos(theta) * xx + np.sin(theta) * yy + 1.0) / 2.0
    img = c0 + (c1 - c0) * t[..., None]
    img += (_smooth_field(rng, size, int(rng.integers(3, 7)), 3) - 0.5) * rng.uniform(30, 90)
    # Gratings: oriented sinusoids with random frequency, phase, amplitude and colour.
    for _ in range(int(rng.integers(1, 4))):
        freq = rng.uniform(3, 24)
        ang = rng.uniform(0, np.pi)
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * freq * (np.cos(ang) * xx + np.sin(ang) * yy) + phase)
        colour = rng.uniform(-1, 1, 3).astype(np.float32) * rng.uniform(8, 35)
        img += wave[..., None] * colour
    img = np.clip(img, 0, 255).astype(np.uint8)
    # Blobs and edges: filled ellipses, polygon outlines and lines, anti-aliased.
    for _ in range(int(rng.integers(3, 9))):
        centre = (int(rng.integers(0, size)), int(rng.integers(0, size)))
        axes = (int(rng.integers(size // 32 + 1, size // 5)), int(rng.integers(size // 32 + 1, size // 5)))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1, cv2.LINE_AA)
    for _ in range(int(rng.integers(2, 7))):
        pts = rng.integers(0, size, (2, 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        thickness = int(rng.integers(1, max(2, size // 64) + 1))
        cv2.line(img, tuple(int(v) for v in pts[0]), tuple(int(v) for v in pts[1]), colour, thickness, cv2.LINE_AA)
    if rng.random() < 0.5:
        x0, y0 = (int(v) for v in rng.integers(0, size * 3 // 4, 2))
        w, h = (int(v) for v in rng.integers(size // 8, size // 3, 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        cv2.rectangle(img, (x0, y0), (x0 + w, y0 + h), colour, int(rng.integers(1, 4)), cv2.LINE_AA)
    # Sensor-like noise: what local manipulations disturb.
    noisy = img.astype(np.float32) + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(
        rng.uniform(2.0, 7.0)
    )
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def region(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random manipulation region (bool HxW, True = manipulated) covering 5-40% of the image.

    Ellipses, star-shaped polygons or thresholded smooth blobs (possibly several components); centres are
    uniform over the image, so regions regularly touch the border.
    """
    lo, hi = 0.05, 0.40
    target = float(rng.uniform(lo, hi))
    kind = int(rng.integers(0, 3))
    area = target * size * size
    for _ in range(12):
        m = np.zeros((size, size), np.uint8)
        centre = rng.uniform(0, size, 2)
        if kind == 0:
            ratio = rng.uniform(0.35, 1.0)
            a = np.sqrt(area / (np.pi * ratio))
            axes = (max(1, round(a)), max(1, round(a * ratio)))
            cv2.ellipse(m, (round(centre[0]), round(centre[1])), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        elif kind == 1:
            n = int(rng.integers(3, 10))
            angles = np.sort(rng.uniform(0, 2 * np.pi, n))
            radii = rng.uniform(0.45, 1.0, n)
            x, y = radii * np.cos(angles), radii * np.sin(angles)
            unit_area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
            if unit_area < 1e-3:
                continue
            scale = np.sqrt(area / unit_area)
            pts = np.stack([centre[0] + scale * x, centre[1] + scale * y], 1).round().astype(np.int32)
            cv2.fillPoly(m, [pts], 1)
        else:
            break
        frac = float(m.mean())
        if lo <= frac <= hi:
            return m.astype(bool)
    # Blob: threshold a smooth random field at the quantile that gives the target area exactly.
    field = _smooth_field(rng, size, int(rng.integers(3, 7)), 1)[..., 0]
    return field > np.quantile(field, 1.0 - target)


def _inpaint_telea(rng: np.random.Generator, src: np.ndarray, m: np.ndarray, m8: np.ndarray) -> np.ndarray:
    return cv2.inpaint(src, m8, float(rng.uniform(2, 4)), cv2.INPAINT_TELEA)


def _copy_move(rng: np.random.Generator, src: np.ndarray, m: np.ndarray, m8: np.ndarray) -> np.ndarray:
    size = src.shape[0]
    shift = rng.uniform(size / 4, size / 2, 2) * rng.choice([-1.0, 1.0], 2)
    warp = np.float32([[1, 0, shift[0]], [0, 1, shift[1]]])
    moved = cv2.warpAffine(src, warp, (size, size), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT_101)
    return np.where(m[..., None], moved, src)


def _blur_noise(rng: np.random.Generator, src: np.ndarray, m: np.ndarray, m8: np.ndarray) -> np.ndarray:
    blurred = cv2.GaussianBlur(src, (0, 0), float(rng.uniform(1.5, 3.5))).astype(np.float32)
    noisy = blurred + rng.standard_normal(src.shape, dtype=np.float32) * np.float32(rng.uniform(4.0, 12.0))
    out = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
    return np.where(m[..., None], out, src)


def _splice_jpeg(
    rng: np.random.Generator, src: np.ndarray, m: np.ndarray, m8: np.ndarray, donor: np.ndarray
) -> np.ndarray:
    gain = rng.uniform(0.8, 1.2, 3).astype(np.float32)
    offset = rng.uniform(-25, 25, 3).astype(np.float32)
    shifted = np.clip(np.round(donor.astype(np.float32) * gain + offset), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", shifted, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(30, 71))])
    if not ok:  # pragma: no cover - OpenCV always encodes a valid uint8 array
        raise RuntimeError("JPEG encoding failed")
    requantised = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    return np.where(m[..., None], requantised, src)


def manipulated_images(seed: int, index: int, size: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Source image, mask (bool) and the four manipulated images (by subset) for one global index."""
    rng = np.random.default_rng([seed, _STREAM_FAKE, index])
    src = texture(rng, size)
    m = region(rng, size)
    m8 = m.astype(np.uint8) * 255
    donor = texture(rng, size)
    out = {
        "inpaint-telea": _inpaint_telea(rng, src, m, m8),
        "copy-move": _copy_move(rng, src, m, m8),
        "blur-noise": _blur_noise(rng, src, m, m8),
        "splice-jpeg": _splice_jpeg(rng, src, m, m8, donor),
    }
    return src, m, out


def encode_mask_png(m: np.ndarray) -> bytes:
    """Dolos mask: 3-channel PNG, 0 (black) = manipulated, 255 (white) = real."""
    gray = np.where(m, 0, 255).astype(np.uint8)
    return encode_png(np.repeat(gray[..., None], 3, axis=2))


def unmanipulated_images(seed: int, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The fully synthetic (``p2``) and the second source's (``ffhq``) image of one index: folders without masks."""
    rng_p2, rng_ffhq = (np.random.default_rng([seed, stream, index]) for stream in (_STREAM_P2, _STREAM_FFHQ))
    return texture(rng_p2, size), texture(rng_ffhq, size)
