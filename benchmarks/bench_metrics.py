#!/usr/bin/env python
"""What the metric conventions cost (CPU by default; the numbers in benchmarks/README.md "bench_metrics.py").

1. Scoring cost per image of each convention (study, trufor, benco, and the three together) at 256x256 and
   1024x1024 masks: ``LocalizationMetrics.update_probabilities`` on maps already at the mask's size.
2. The test step with three conventions vs one: the study's best configuration (conv20 decoder on SAM2's
   image_embed at a 1024 input: 256x64x64 maps -> 256x256 logits, 256x256 masks) from cached features, i.e. without
   the encoder, the case where scoring weighs most. Must stay <= 2x.
3. Saved predictions (``eval.save_predictions``): bytes per 1000 images at 256x256 for each ``prediction_dtype``.

    python benchmarks/bench_metrics.py            # ~3 minutes on 2 cores
    python benchmarks/bench_metrics.py --quick    # smoke test, ~30 s
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import feature_shape, load_average, new_decoder, sync, table

from deeploc.metrics import CONVENTIONS, LocalizationMetrics
from deeploc.metrics.store import PREDICTION_DTYPES, save_predictions

ALL = tuple(CONVENTIONS)


def maps(n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` probability maps and bool masks of ``size``: rectangles, maps smooth like a decoder's (low-res logits
    carrying the mask, upsampled bilinearly), untied scores."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for k in range(n):
        y, x = (int(v) for v in torch.randint(0, size // 2, (2,), generator=g))
        h, w = (int(v) for v in torch.randint(size // 8, size // 2, (2,), generator=g))
        masks[k, y : y + h, x : x + w] = True
    low = size // 4
    small = F.interpolate(masks[:, None].float(), size=(low, low), mode="area")
    logits = 3 * torch.randn(n, 1, low, low, generator=g) + 6 * (small - 0.5)
    probs = torch.sigmoid(F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False))[:, 0]
    return probs, masks


def scoring_ms_per_image(
    conventions: tuple[str, ...], probs: torch.Tensor, masks: torch.Tensor, batch: int, repeats: int
) -> float:
    times = []
    for _ in range(repeats):
        metric = LocalizationMetrics(conventions=conventions, chosen={c: {"f1_val": 0.4, "iou_val": 0.4} for c in ALL})
        start = time.perf_counter()
        for s in range(0, probs.shape[0], batch):
            metric.update_probabilities(
                probs[s : s + batch], masks[s : s + batch], torch.arange(s, min(s + batch, probs.shape[0]))
            )
        metric.compute_all()
        times.append((time.perf_counter() - start) / probs.shape[0])
    return 1000 * statistics.median(times)


def test_step_ms_per_image(
    conventions: tuple[str, ...], n_batches: int, batch: int, repeats: int, keep: bool = False
) -> float:
    """The test step on cached maps: decoder forward + scoring, as LocalizationModule.test_step runs it."""
    device = torch.device("cpu")
    decoder = new_decoder("image_embed", 20).eval()
    c, h, w = feature_shape("image_embed", 1024)
    g = torch.Generator().manual_seed(1)
    features = [torch.randn(batch, c, h, w, generator=g) for _ in range(n_batches)]
    masks = [maps(batch, 256, seed=k)[1][:, None].float() for k in range(n_batches)]
    times = []
    with torch.no_grad():
        decoder({"image_embed": features[0]})  # warm-up
        for _ in range(repeats):
            metric = LocalizationMetrics(conventions=conventions, keep_predictions=keep)
            start = time.perf_counter()
            for k in range(n_batches):
                logits = decoder({"image_embed": features[k]})
                metric.update(logits, masks[k], torch.arange(k * batch, (k + 1) * batch))
            metric.compute_all()
            sync(device)
            times.append((time.perf_counter() - start) / (n_batches * batch))
    return 1000 * statistics.median(times)


def prediction_bytes_per_1000(n: int) -> dict[str, float]:
    probs, masks = maps(n, 256, seed=7)
    metric = LocalizationMetrics(keep_predictions=True)
    metric.update_probabilities(probs, masks, torch.arange(n))
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in PREDICTION_DTYPES:
            path = save_predictions(Path(tmp) / f"{dtype}.npz", metric.predictions(), dtype)
            sizes[dtype] = path.stat().st_size / n * 1000
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and repeats (smoke test)")
    args = parser.parse_args(argv)
    n256, n1024, repeats = (8, 2, 1) if args.quick else (32, 4, 3)
    print(f"CPU, {torch.get_num_threads()} threads; torch {torch.__version__}; load average {load_average()}")

    print("\n## Scoring cost per image (ms), maps already at the mask's size\n")
    data = {256: maps(n256, 256), 1024: maps(n1024, 1024)}
    scoring_ms_per_image(ALL, data[256][0][:2], data[256][1][:2], batch=2, repeats=1)  # warm-up
    rows = []
    for conventions in [(c,) for c in ALL] + [ALL]:
        rows.append([" + ".join(conventions)] + [
            scoring_ms_per_image(conventions, *data[size], batch=8 if size == 256 else 2, repeats=repeats)
            for size in (256, 1024)
        ])  # fmt: skip
    print(table(["conventions", "256x256 ms/img", "1024x1024 ms/img"], rows))

    print("\n## Test step (conv20 on image_embed @1024 from cached maps, 256x256 masks), ms per image\n")
    n_batches = 2 if args.quick else 4
    one = test_step_ms_per_image(("study",), n_batches, 8, repeats)
    three = test_step_ms_per_image(ALL, n_batches, 8, repeats)
    kept = test_step_ms_per_image(ALL, n_batches, 8, repeats, keep=True)
    print(table(
        ["test step", "ms/img", "vs study alone"],
        [["study", one, 1.0], ["study + trufor + benco", three, three / one],
         ["study + trufor + benco, save_predictions", kept, kept / one]],
    ))  # fmt: skip

    print("\n## Saved predictions at 256x256 (compressed .npz, masks included), per 1000 images\n")
    sizes = prediction_bytes_per_1000(16 if args.quick else 64)
    print(table(["prediction_dtype", "MB per 1000 images", "rescoring"],
                [[d, sizes[d] / 1e6, "bit-identical" if d == "float32" else "approximate"] for d in PREDICTION_DTYPES]))  # fmt: skip
    if three / one > 2:
        print(f"\nFAIL: three conventions slow the test step {three / one:.2f}x (> 2x)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
