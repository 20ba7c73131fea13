"""The built-in perturbations: JPEG recompression (with and without chroma subsampling), resizing, Gaussian blur and
Gaussian noise (OpenCV)."""

from __future__ import annotations

import cv2
import numpy as np

from deeploc.evaluation.perturbations import register_perturbation


def _jpeg(image: np.ndarray, quality: float, sampling: int) -> np.ndarray:
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality), cv2.IMWRITE_JPEG_SAMPLING_FACTOR, sampling]
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params)
    if not ok:  # pragma: no cover - OpenCV fails only on invalid arrays, which apply() refuses
        raise RuntimeError("OpenCV could not encode the image as JPEG")
    return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _quality(q: float) -> bool:
    return q == int(q) and 1 <= q <= 100


@register_perturbation(
    "jpeg",
    "JPEG quality",
    "re-encoded as JPEG at this quality (OpenCV's libjpeg, no chroma subsampling: 4:4:4), decoded back; quality "
    "100 is then almost lossless, so the strength varies quantisation alone",
    valid=_quality,
    valid_text="a JPEG quality is an integer from 1 to 100",
    higher_is_milder=True,
)
def jpeg(image: np.ndarray, quality: float, rng: np.random.Generator) -> np.ndarray:
    return _jpeg(image, quality, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444)


@register_perturbation(
    "jpeg420",
    "JPEG quality (4:2:0)",
    "re-encoded as JPEG at this quality with 4:2:0 chroma subsampling (what cameras and social networks usually "
    "write; colour detail is halved in each direction at any quality), decoded back",
    valid=_quality,
    valid_text="a JPEG quality is an integer from 1 to 100",
    higher_is_milder=True,
)
def jpeg420(image: np.ndarray, quality: float, rng: np.random.Generator) -> np.ndarray:
    return _jpeg(image, quality, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420)


@register_perturbation(
    "resize",
    "scale factor",
    "resized by this factor (each side rounded, at least 1 px): area interpolation when shrinking, bilinear when "
    "enlarging; the model then sees the resized image and its map is scored at the original mask's size",
    valid=lambda s: 0 < s <= 4 and s != 1,
    valid_text="a scale factor is in (0, 4] and not 1 (0.5 halves each side)",
    higher_is_milder=True,
)
def resize(image: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    height, width = image.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


@register_perturbation(
    "blur",
    "Gaussian blur sigma (px)",
    "Gaussian blur with this standard deviation in pixels (OpenCV picks the kernel size, reflected borders)",
    valid=lambda s: 0 < s <= 50,
    valid_text="a blur sigma is in (0, 50] pixels",
)
def blur(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


@register_perturbation(
    "noise",
    "Gaussian noise std",
    "additive Gaussian noise of this standard deviation in [0, 1] intensity units (0.01 = 2.55 grey levels), "
    "independent per pixel and channel, seeded per image, rounded and clipped to 0-255",
    valid=lambda s: 0 < s <= 1,
    valid_text="a noise standard deviation is in (0, 1] (intensity units: 0.01 = 2.55 grey levels)",
)
def noise(image: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    noisy = image.astype(np.float64) + rng.normal(0.0, 255.0 * std, image.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
