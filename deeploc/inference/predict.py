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

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deeploc.inference.inputs import DEFAULT_MAX_PIXELS, DecodedInputs, InputFile, collect_inputs
from deeploc.inference.outputs import ImageResult, PredictionSummary, output_names, write_result, write_summary
from deeploc.metrics import image_score

__all__ = ["predict_images", "predict_paths", "to_tensor"]

log = logging.getLogger(__name__)


def to_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``H x W x 3`` uint8 array -> ``3 x H x W`` float in [0, 1]; float ``3 x H x W`` tensors pass through."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a 3 x H x W tensor, got {tuple(image.shape)}")
        return image.float()
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 array, got {image.shape} {image.dtype}")
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(255)


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
    device = next(model.decoder.parameters()).device
    square = torch.cat([model.encoder.resize(t.to(device)[None]) for t in tensors])
    yield from model.predict_probabilities(square, [tuple(t.shape[-2:]) for t in tensors])


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _scores(probs: torch.Tensor, threshold: float) -> dict[str, float]:
    return {
        "manipulated_fraction": float((probs > threshold).float().mean()),
        "max_score": float(probs.max()),
        "mean_score": float(probs.mean()),
        "image_score": image_score(probs),
    }


def predict_paths(
    model: Any,
    inputs: Sequence[str | os.PathLike[str]] | list[InputFile],
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
    if inputs and isinstance(inputs[0], InputFile):
        items = list(inputs)  # type: ignore[arg-type]
    else:
        items = collect_inputs(inputs, recursive=recursive, exclude=out)  # type: ignore[arg-type]
    for sub in ("heatmaps", "masks", "overlays") + (("probs",) if save_probs else ()):
        (out / sub).mkdir(parents=True, exist_ok=True)
    names = output_names([item.path for item in items])
    results: list[ImageResult] = [ImageResult(image=str(item.path), explicit=item.explicit) for item in items]
    loader = torch.utils.data.DataLoader(
        DecodedInputs(items, max_pixels),
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
                        writer.submit(write_result, res, im, probs.cpu().numpy(), out, name, threshold, save_probs)
                    )
            bar.update(len(batch))
            pending = _drain(pending, keep=4)
        _drain(pending, keep=0)
    bar.close()
    summary = PredictionSummary(results)
    summary.json_path, summary.csv_path = write_summary(summary, out, threshold, model_info)
    return summary


def _drain(pending: list[Future[Any]], keep: int) -> list[Future[Any]]:
    """Wait for all but the newest ``keep`` output writers (bounds the images held in memory)."""
    while len(pending) > keep:
        pending.pop(0).result()
    return pending
