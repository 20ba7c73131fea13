"""Localize manipulations in arbitrary images with a trained decoder: heatmaps, masks, overlays and a summary.

Resize policy: the SAM2 encoder takes a square ``image_size`` input, so every image is resized as a whole
(bilinear, antialiased; aspect ratio not kept) to ``image_size x image_size`` exactly as training, the study and
``SAM2ImagePredictor`` do, and the decoder's stride-4 probabilities are resized back bilinearly to the image's
native ``H x W``. Every output is therefore at the image's native resolution whatever its size or aspect ratio.

Image-level score: the mean of the top 1% of the native-resolution probabilities (at least one pixel). It is
high when some region is confidently manipulated, whatever its share of the image, and unlike the maximum it is
not decided by one pixel.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from deeploc.data.errors import DatasetError
from deeploc.data.images import read_rgb
from deeploc.data.samples import IMAGE_EXTENSIONS
from deeploc.errors import DeeplocError
from deeploc.metrics import IMAGE_SCORE, TOP_FRACTION, image_score
from deeploc.visualize import heatmap, overlay, with_colorbar

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_SCORE",
    "TOP_FRACTION",
    "ImageResult",
    "InputError",
    "PredictionSummary",
    "collect_inputs",
    "image_score",
    "load_image",
    "predict_images",
    "predict_paths",
]

log = logging.getLogger(__name__)

RESIZE_POLICY = (
    "whole image resized (bilinear, antialiased, aspect ratio not kept) to the encoder's square input; "
    "probabilities resized back bilinearly to the native size"
)
DEFAULT_MAX_PIXELS = 50_000_000
CSV_FIELDS = (
    "image",
    "status",
    "width",
    "height",
    "manipulated_fraction",
    "max_score",
    "mean_score",
    "image_score",
    "heatmap",
    "mask",
    "overlay",
    "probs",
    "reason",
)


class InputError(DeeplocError, ValueError):
    """Inputs that cannot be predicted on at all (a missing path, a glob that matches nothing, a bad image)."""


@dataclass
class ImageResult:
    """One input file: its scores and output files, or why it was skipped."""

    image: str
    status: str = "ok"  # "ok" | "skipped"
    width: int | None = None
    height: int | None = None
    manipulated_fraction: float | None = None
    max_score: float | None = None
    mean_score: float | None = None
    image_score: float | None = None
    heatmap: str | None = None
    mask: str | None = None
    overlay: str | None = None
    probs: str | None = None
    reason: str | None = None
    explicit: bool = field(default=False, repr=False)


@dataclass
class PredictionSummary:
    """All results of one run, and where the summary files were written."""

    results: list[ImageResult]
    json_path: Path | None = None
    csv_path: Path | None = None

    @property
    def predicted(self) -> list[ImageResult]:
        return [r for r in self.results if r.status == "ok"]

    @property
    def skipped(self) -> list[ImageResult]:
        return [r for r in self.results if r.status != "ok"]


# ----------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class _Input:
    path: Path
    explicit: bool  # named on the command line (a failure makes the run fail), not found in a folder or glob


def collect_inputs(
    inputs: Sequence[str | os.PathLike[str]], recursive: bool = False, exclude: Path | None = None
) -> list[_Input]:
    """Expand files, folders (their files, sorted; subfolders with ``recursive``) and glob patterns.

    A path that does not exist and matches no glob is an :class:`InputError`; so is a folder or glob without
    any file. Files found in folders and globs are all returned (non-images are reported later, not dropped).
    """
    found: list[_Input] = []
    seen: set[Path] = set()
    excluded = exclude.resolve() if exclude is not None else None

    def add(path: Path, explicit: bool) -> None:
        key = path.resolve()
        if key in seen or (excluded is not None and (key == excluded or excluded in key.parents)):
            return
        seen.add(key)
        found.append(_Input(path, explicit))

    for raw in inputs:
        path = Path(raw).expanduser()
        if path.is_file():
            add(path, True)
        elif path.is_dir():
            pattern = "**/*" if recursive else "*"
            files = sorted(p for p in path.glob(pattern) if p.is_file() and not _hidden(p.relative_to(path)))
            if not files:
                raise InputError(
                    f"folder {path} holds no files" + ("" if recursive else " (use --recursive for subfolders)")
                )
            for file in files:
                add(file, False)
        elif glob.has_magic(str(raw)):
            files = sorted(
                Path(p) for p in glob.glob(os.path.expanduser(str(raw)), recursive=True) if Path(p).is_file()
            )
            if not files:
                raise InputError(f"no file matches {raw!r}")
            for file in files:
                add(file, False)
        else:
            raise InputError(f"{path} does not exist (expected an image, a folder or a glob pattern)")
    if not found:
        raise InputError("no input files")
    return found


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def load_image(path: Path, max_pixels: int | None = DEFAULT_MAX_PIXELS, explicit: bool = True) -> np.ndarray:
    """``H x W x 3`` uint8 RGB of an image file, or :class:`InputError` with the reason it cannot be used.

    Grayscale is replicated to RGB, an alpha channel is dropped (the colour channels are what was manipulated),
    16-bit images are scaled to 8 bits: the conversions training applies (``deeploc.data.images.read_rgb``).
    """
    if not explicit and path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise InputError(f"not an image file (extension {path.suffix or 'none'!r}; images: {sorted(IMAGE_EXTENSIONS)})")
    if max_pixels is not None:
        size = _header_size(path)
        if size is not None and size[0] * size[1] > max_pixels:
            raise InputError(_too_large(size, max_pixels))
    try:
        image = read_rgb(path)
    except DatasetError as exc:
        raise InputError(str(exc).removeprefix(f"image {path}: ")) from None
    height, width = image.shape[:2]
    if max_pixels is not None and height * width > max_pixels:
        raise InputError(_too_large((width, height), max_pixels))
    return image


def _too_large(size: tuple[int, int], max_pixels: int) -> str:
    return (
        f"image is {size[0]}x{size[1]} ({size[0] * size[1] / 1e6:.1f} megapixels), over the limit of "
        f"{max_pixels / 1e6:.1f} megapixels (raise it with --max-pixels)"
    )


def _header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file header without decoding the pixels, when Pillow can read it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.size
    except Image.DecompressionBombError:
        return (1 << 16, 1 << 16)  # far over any sensible limit; the caller refuses it by size
    except Exception:
        return None  # not readable by Pillow: OpenCV decides


# ---------------------------------------------------------------------------------------------- inference


def to_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``H x W x 3`` uint8 array -> ``3 x H x W`` float in [0, 1]; float ``3 x H x W`` tensors pass through."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a 3 x H x W tensor, got {tuple(image.shape)}")
        return image.float()
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 array, got {image.shape} {image.dtype}")
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(255)


def _model_device(model: Any) -> torch.device:
    return next(model.decoder.parameters()).device


def predict_images(model: Any, images: Iterable[np.ndarray | torch.Tensor], batch_size: int = 8) -> list[torch.Tensor]:
    """Per-pixel manipulation probabilities (``H x W`` float32, on CPU) for images of any size.

    ``images`` are ``H x W x 3`` uint8 RGB arrays or ``3 x H x W`` float tensors in [0, 1]. Each is resized
    whole to the encoder's square input, batched, and its probabilities are resized back to its own size;
    for a batch of one this is exactly ``model.predict_probabilities`` on the image.
    """
    model.eval()
    out: list[torch.Tensor] = []
    for batch in _batches(list(images), batch_size):
        out += [p.cpu() for p in _predict_batch(model, [to_tensor(im) for im in batch])]
    return out


def _predict_batch(model: Any, tensors: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    device = _model_device(model)
    square = torch.cat([model.encoder.resize(t.to(device)[None]) for t in tensors])
    yield from model.predict_probabilities(square, [tuple(t.shape[-2:]) for t in tensors])


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ----------------------------------------------------------------------------------------------- outputs


def output_names(paths: Sequence[Path]) -> list[str]:
    """Unique output names: the file stem; ``stem-ext`` for stems shared by several inputs; then ``-2``, ``-3``."""
    stems: dict[str, int] = {}
    for path in paths:
        stems[path.stem] = stems.get(path.stem, 0) + 1
    names: list[str] = []
    used: set[str] = set()
    for path in paths:
        name = path.stem if stems[path.stem] == 1 else f"{path.stem}-{path.suffix.lstrip('.').lower() or 'file'}"
        unique, n = name, 2
        while unique in used:
            unique, n = f"{name}-{n}", n + 1
        used.add(unique)
        names.append(unique)
    return names


def _write_png(path: Path, rgb_or_gray: np.ndarray) -> None:
    array = rgb_or_gray if rgb_or_gray.ndim == 2 else cv2.cvtColor(rgb_or_gray, cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".png", array)
    if not ok:  # pragma: no cover - cv2 failure on a valid uint8 array
        raise OSError(f"cannot encode {path}")
    data.tofile(str(path))


def _write_outputs(
    image: np.ndarray, probs: np.ndarray, out_dir: Path, name: str, threshold: float, save_probs: bool
) -> dict[str, str]:
    mask = probs > threshold  # strict, as deeploc.metrics
    files = {
        "heatmap": Path("heatmaps") / f"{name}.png",
        "mask": Path("masks") / f"{name}.png",
        "overlay": Path("overlays") / f"{name}.png",
    }
    _write_png(out_dir / files["heatmap"], with_colorbar(heatmap(probs)))
    _write_png(out_dir / files["mask"], mask.astype(np.uint8) * 255)
    _write_png(out_dir / files["overlay"], overlay(image, mask))
    if save_probs:
        files["probs"] = Path("probs") / f"{name}.npy"
        np.save(out_dir / files["probs"], probs.astype(np.float32))
    return {k: v.as_posix() for k, v in files.items()}


def _scores(probs: torch.Tensor, threshold: float) -> dict[str, float]:
    return {
        "manipulated_fraction": float((probs > threshold).float().mean()),
        "max_score": float(probs.max()),
        "mean_score": float(probs.mean()),
        "image_score": image_score(probs),
    }


class _Decoded(torch.utils.data.Dataset):
    """Decodes images in DataLoader workers; a failure is returned as its reason, never raised."""

    def __init__(self, inputs: list[_Input], max_pixels: int | None) -> None:
        self.inputs = inputs
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | None, str | None]:
        item = self.inputs[index]
        try:
            return index, load_image(item.path, self.max_pixels, explicit=item.explicit), None
        except InputError as exc:
            return index, None, str(exc)
        except Exception as exc:  # any decoder crash is this file's problem, not the batch's
            return index, None, f"cannot be read: {type(exc).__name__}: {exc}"


def predict_paths(
    model: Any,
    inputs: Sequence[str | os.PathLike[str]] | list[_Input],
    out_dir: str | os.PathLike[str],
    *,
    threshold: float = 0.5,
    batch_size: int = 8,
    save_probs: bool = False,
    workers: int = 0,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    recursive: bool = False,
    progress: bool = True,
    model_info: dict[str, Any] | None = None,
) -> PredictionSummary:
    """Predict on image files, folders or globs; write heatmaps, masks, overlays and summary.{json,csv}.

    Unreadable, non-image or too large files are skipped and listed in the summary with their reason; the run
    goes on. Outputs: ``<out>/heatmaps/<name>.png`` (inferno colour map of the probabilities at the image's size,
    its colour bar appended on the right),
    ``<out>/masks/<name>.png`` (8-bit, 255 = manipulated, 0 = real; ``prob > threshold``),
    ``<out>/overlays/<name>.png`` (the image with the manipulated region tinted red and outlined), and with
    ``save_probs`` ``<out>/probs/<name>.npy`` (float32 ``H x W``). All at the input image's size (heatmaps: plus the bar).
    """
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    out = Path(out_dir)
    if inputs and isinstance(inputs[0], _Input):
        items = list(inputs)  # type: ignore[arg-type]
    else:
        items = collect_inputs(inputs, recursive=recursive, exclude=out)  # type: ignore[arg-type]
    for sub in ("heatmaps", "masks", "overlays") + (("probs",) if save_probs else ()):
        (out / sub).mkdir(parents=True, exist_ok=True)
    names = output_names([item.path for item in items])
    results: list[ImageResult] = [ImageResult(image=str(item.path), explicit=item.explicit) for item in items]
    loader = torch.utils.data.DataLoader(
        _Decoded(items, max_pixels),
        batch_size=max(1, batch_size),
        num_workers=max(0, workers),
        collate_fn=list,
    )
    model.eval()
    bar = tqdm(total=len(items), unit="img", desc="predict", disable=not progress)
    pending: list[Future[Any]] = []
    with ThreadPoolExecutor(max_workers=2) as writer, logging_redirect_tqdm():
        for batch in loader:
            good = [(i, im) for i, im, reason in batch if im is not None]
            for i, _, reason in batch:
                if reason is not None:
                    results[i].status, results[i].reason = "skipped", reason
                    log.warning("skipped %s: %s", results[i].image, reason)
            if good:
                tensors = [to_tensor(im) for _, im in good]
                for (i, im), probs in zip(good, _predict_batch(model, tensors)):
                    res = results[i]
                    res.height, res.width = im.shape[:2]
                    res.__dict__.update(_scores(probs, threshold))
                    name = names[i]
                    pending.append(
                        writer.submit(_finish, res, im, probs.cpu().numpy(), out, name, threshold, save_probs)
                    )
            bar.update(len(batch))
            pending = _drain(pending, keep=4)
        _drain(pending, keep=0)
    bar.close()
    summary = PredictionSummary(results)
    summary.json_path, summary.csv_path = write_summary(summary, out, threshold, model_info)
    return summary


def _finish(
    res: ImageResult, image: np.ndarray, probs: np.ndarray, out: Path, name: str, threshold: float, save: bool
) -> ImageResult:
    try:
        res.__dict__.update(_write_outputs(image, probs, out, name, threshold, save))
    except OSError as exc:
        res.status, res.reason = "skipped", f"cannot write outputs: {exc}"
    return res


def _drain(pending: list[Future[Any]], keep: int) -> list[Future[Any]]:
    """Wait for all but the newest ``keep`` output writers (bounds the images held in memory)."""
    while len(pending) > keep:
        pending.pop(0).result()
    return pending


def write_summary(
    summary: PredictionSummary, out: Path, threshold: float, model_info: dict[str, Any] | None = None
) -> tuple[Path, Path]:
    """``summary.json`` (settings + one record per file) and ``summary.csv`` (one row per file)."""
    from deeploc.inference.export import deeploc_version

    rows = [{k: v for k, v in asdict(r).items() if k != "explicit"} for r in summary.results]
    payload = {
        "deeploc_version": deeploc_version(),
        "model": model_info,
        "threshold": threshold,
        "mask_convention": "255 = manipulated (prob > threshold), 0 = real",
        "image_score": IMAGE_SCORE,
        "resize_policy": RESIZE_POLICY,
        "counts": {"predicted": len(summary.predicted), "skipped": len(summary.skipped)},
        "images": rows,
    }
    json_path = out / "summary.json"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    csv_path = out / "summary.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row[k] is None else row[k]) for k in CSV_FIELDS})
    return json_path, csv_path
