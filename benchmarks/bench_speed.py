#!/usr/bin/env python
"""Speed of the study's five-configuration grid: the published pipeline vs deeploc's feature store.

Baseline (the study's code path): every epoch of every decoder configuration, images are read, turned into numpy
HxWx3 uint8 and passed to ``SAM2ImagePredictor.set_image_batch`` (fp32, per-image transforms), and the decoder
trains on ``predictor._features``. One decoder configuration per run.

deeploc: the three feature maps are computed ONCE with ``SAM2Encoder`` into ``FeatureStore``s (one encoder
pass for all three, ``extract_features``) and every decoder trains from the memory-mapped fp16 cache.

Both sides use the same images, the same SAM2 weights, the same decoders (``ConvDecoder``), seeds, batch size and
training step (Adam 1e-3, BCEWithLogits against the mask resized bilinearly to the logits), in one process on one
machine. Tables are printed as markdown. Run by hand (not a test)::

    python benchmarks/bench_speed.py --quick                       # smoke test, < 2 minutes on 2 CPU cores
    python benchmarks/bench_speed.py --images 32                   # CPU: hiera_s random weights @512
    python benchmarks/bench_speed.py --device cuda --peak-tflops 989   # GPU: @1024, bf16 + channels_last decoders

Every baseline epoch does identical work (nothing is cached), so by default the baseline is timed for
``--baseline-epochs 1`` epoch per configuration and scaled to ``--epochs``; the deeploc side is always timed in full.
Peak RSS of cached training is measured in fresh subprocesses as VmHWM (/proc/self/status); ``ru_maxrss`` is printed
too but on Linux a child inherits its parent's high-water mark across fork+exec, so it is not clean here.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
warnings.filterwarnings("ignore", message="SAM2 encoder .* RANDOM weights")
warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from deeploc.data.datasets import ImageMaskDataset  # noqa: E402
from deeploc.data.layout import Sample  # noqa: E402
from deeploc.features.store import FeatureStore, extract_features, format_bytes  # noqa: E402
from deeploc.models.decoders import Decoder, build_decoder  # noqa: E402
from deeploc.models.encoders.sam2 import FEATURE_SPECS, SAM2Encoder  # noqa: E402

# The study's five configurations: (label, feature, depth).
CONFIGS: tuple[tuple[str, str, int], ...] = (
    ("conv4", "image_embed", 4),
    ("conv12", "image_embed", 12),
    ("conv20", "image_embed", 20),
    ("conv20", "high_res_feats_0", 20),
    ("conv20", "high_res_feats_1", 20),
)
FEATURE_NAMES = ("image_embed", "high_res_feats_0", "high_res_feats_1")
NATIVE = 256  # Dolos images are 256x256
RSS_FEATURE = "high_res_feats_0"  # the largest map: the one whose caching would hurt RAM most
RSS_ENCODER = "sam2.1_hiera_micro"  # memory depends on map sizes and counts, not on the encoder that made them


# ---------------------------------------------------------------------------------------------------- helpers


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="sam2.1_hiera_s", help="SAM2 config (random weights unless --checkpoint)")
    p.add_argument("--checkpoint", default=None, help="official SAM2 checkpoint (default: random weights, seed 0)")
    p.add_argument("--image-size", type=int, default=None, help="encoder input size (default 512 cpu / 1024 cuda)")
    p.add_argument("--images", type=int, default=None, help="training images (default 32 cpu / 512 cuda)")
    p.add_argument("--epochs", type=int, default=5, help="epochs of the grid (default 5)")
    p.add_argument("--baseline-epochs", type=int, default=1, help="baseline epochs actually timed (default 1)")
    p.add_argument("--extract-rounds", type=int, default=2, help="alternated extraction timing rounds (default 2)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default 8 cpu / 32 cuda)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 0 cpu / 8 cuda)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="deeploc decoders under bf16 autocast (default: on for cuda)")  # fmt: skip
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="deeploc decoders channels_last (default: on for cuda)")  # fmt: skip
    p.add_argument("--compute-steps", type=int, default=None, help="timed steps of compute-only decoder training (features already on the device; default 20 cuda / 0 cpu)")  # fmt: skip
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak TFLOP/s for the %% of peak column")
    p.add_argument("--rss-images", type=int, default=None, help="N of the RSS measurement (N and 4N; default 64)")
    p.add_argument("--work-dir", default=None, help="where images and caches go (default: a temporary folder)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--quick", action="store_true", help="tiny sizes: smoke-test the script")
    p.add_argument("--rss-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    if args.quick:
        args.images = args.images or 4
        args.image_size = args.image_size or 256
        args.epochs = min(args.epochs, 2)
        args.batch_size = args.batch_size or 2
        args.rss_images = args.rss_images or 8
        args.extract_rounds = 1
        args.compute_steps = 2 if args.compute_steps is None else args.compute_steps
    args.image_size = args.image_size or (1024 if cuda else 512)
    args.images = args.images or (512 if cuda else 32)
    args.batch_size = args.batch_size or (32 if cuda else 8)
    args.workers = (8 if cuda else 0) if args.workers is None else args.workers
    args.bf16 = cuda if args.bf16 is None else args.bf16
    args.channels_last = cuda if args.channels_last is None else args.channels_last
    args.compute_steps = (20 if cuda else 0) if args.compute_steps is None else args.compute_steps
    args.rss_images = args.rss_images or 64
    args.baseline_epochs = max(1, min(args.baseline_epochs, args.epochs))
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def peak_rss_kib() -> int:
    """This process's peak resident set (VmHWM), KiB."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0])


def make_images(root: Path, n: int, seed: int) -> list[Sample]:
    """n Dolos-like 256x256 PNG images (smooth colour fields + texture) with a 3-channel mask each."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    samples = []
    yy, xx = np.mgrid[:NATIVE, :NATIVE]
    for i in range(n):
        low = rng.random((8, 8, 3)).astype(np.float32)
        image = np.asarray(
            Image.fromarray((low * 255).astype(np.uint8)).resize((NATIVE, NATIVE), Image.Resampling.BICUBIC),
            np.float32,
        )
        image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
        cy, cx, ry, rx = rng.integers(64, 192), rng.integers(64, 192), rng.integers(16, 64), rng.integers(16, 64)
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        mask = np.where(inside[..., None], 0, 255).astype(np.uint8).repeat(3, axis=2)
        name = f"{i:06d}"
        for kind, array in (("images", image), ("masks", mask)):
            path = root / kind / f"{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path)
        samples.append(Sample(root / "images" / f"{name}.png", root / "masks" / f"{name}.png", "bench", "train", name))
    return samples


# ------------------------------------------------------------------------------------------- FLOP counting


def decoder_train_flops(feature: str, depth: int, image_size: int) -> float:
    """FLOPs of one training step (forward + backward) per image, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        decoder = build_decoder("conv", FEATURE_SPECS, 4.0, inputs=feature, depth=depth)
        x = torch.empty(2, *feature_shape(feature, image_size))
        target = torch.empty(2, 1, image_size // 4, image_size // 4)
    with FlopCounterMode(display=False) as counter:
        F.binary_cross_entropy_with_logits(decoder(x), target).backward()
    return counter.get_total_flops() / 2


def encoder_flops(encoder: SAM2Encoder) -> float:
    """FLOPs of one image through the frozen encoder (all three maps), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(encoder).to("meta")
    with FlopCounterMode(display=False) as counter:
        meta(torch.empty(1, 3, encoder.image_size, encoder.image_size, device="meta"))
    return float(counter.get_total_flops())


# ------------------------------------------------------------------------------------------- training steps


def make_step(
    decoder: torch.nn.Module, device: torch.device, bf16: bool, channels_last: bool
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One optimisation step of ``decoder``: Adam 1e-3, BCEWithLogits against the mask resized to the logits."""
    decoder.to(device).train()
    if channels_last:
        decoder.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-3)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def step(features: torch.Tensor, mask: torch.Tensor) -> None:
        features = features.to(device, non_blocking=True).float()
        if channels_last:
            features = features.contiguous(memory_format=torch.channels_last)
        mask = mask.to(device, non_blocking=True)
        with autocast:
            logits = decoder(features)
        target = F.interpolate(mask, size=logits.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.binary_cross_entropy_with_logits(logits.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def feature_shape(feature: str, image_size: int) -> tuple[int, int, int]:
    """(C, h, w) of a SAM2 map at a square input of ``image_size``."""
    spec = FEATURE_SPECS[feature]
    return (spec.channels, image_size // int(spec.stride), image_size // int(spec.stride))


def new_decoder(feature: str, depth: int) -> Decoder:
    torch.manual_seed(0)
    return build_decoder("conv", FEATURE_SPECS, 4.0, inputs=feature, depth=depth)


class NumpyImages(Dataset):
    """What the study's loop hands the predictor: the image as HxWx3 uint8 numpy, plus the mask tensor."""

    def __init__(self, samples: Sequence[Sample]) -> None:
        self.items = ImageMaskDataset(samples)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[np.ndarray, torch.Tensor]:
        item = self.items[i]
        image = (item["image"] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # exact: image = uint8 / 255
        return image, item["mask"]


def _numpy_collate(batch: list[tuple[np.ndarray, torch.Tensor]]) -> tuple[list[np.ndarray], torch.Tensor]:
    return [image for image, _ in batch], torch.stack([mask for _, mask in batch])


def loader(dataset: Dataset, args: argparse.Namespace, collate: Any = None, shuffle: bool = True) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    return DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=args.workers,
        pin_memory=torch.device(args.device).type == "cuda",
        persistent_workers=args.workers > 0,
        collate_fn=collate,
    )


def make_predictor(encoder: SAM2Encoder) -> Any:
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    predictor = SAM2ImagePredictor(encoder.model)
    s = encoder.image_size
    predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]  # hard-coded for 1024
    return predictor


def predictor_feature(predictor: Any, feature: str) -> torch.Tensor:
    feats = predictor._features
    return feats["image_embed"] if feature == "image_embed" else feats["high_res_feats"][int(feature[-1])]


# ------------------------------------------------------------------------------------------------ sections


def bench_extraction(
    args: argparse.Namespace, encoder: SAM2Encoder, samples: list[Sample], work: Path
) -> tuple[dict[str, Any], list[FeatureStore]]:
    """Seconds for one pass of the predictor loop and for deeploc's extraction (reading, hashing, writing included),
    alternated for ``--extract-rounds`` rounds (each deeploc round into a fresh cache); the best round of each
    side counts. Returns the timings and the stores of the last round."""
    device = torch.device(args.device)
    predictor = make_predictor(encoder)
    warm = [np.zeros((NATIVE, NATIVE, 3), np.uint8)] * min(args.batch_size, len(samples))
    predictor.set_image_batch(warm)  # first-call overheads out of both timings
    encoder(torch.zeros(len(warm), 3, NATIVE, NATIVE, device=device), names=FEATURE_NAMES)
    sync(device)
    rounds: dict[str, list[float]] = {"predictor": [], "deeploc": []}
    stores: list[FeatureStore] = []
    for r in range(args.extract_rounds):
        t0 = time.perf_counter()
        for images, _ in loader(NumpyImages(samples), args, _numpy_collate, shuffle=False):
            predictor.set_image_batch(images)
        sync(device)
        rounds["predictor"].append(time.perf_counter() - t0)
        stores = [FeatureStore.for_encoder(work / f"cache-{r}", encoder, f) for f in FEATURE_NAMES]
        t0 = time.perf_counter()
        counts = extract_features(stores, samples, encoder, args.batch_size, device, args.workers, progress=False)
        sync(device)
        rounds["deeploc"].append(time.perf_counter() - t0)
        assert all(c == len(samples) for c in counts.values()), counts
    result = {"predictor_s": min(rounds["predictor"]), "deeploc_s": min(rounds["deeploc"]), "rounds": rounds}
    return result, stores


def train_from_store(
    args: argparse.Namespace, store: FeatureStore, samples: list[Sample], feature: str, depth: int, epochs: int
) -> float:
    device = torch.device(args.device)
    step = make_step(new_decoder(feature, depth), device, args.bf16, args.channels_last)
    batches = loader(store.dataset(samples), args)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(epochs):
        for batch in batches:
            step(batch["features"][feature], batch["mask"])
    sync(device)
    return time.perf_counter() - t0


def train_baseline(
    args: argparse.Namespace, predictor: Any, samples: list[Sample], feature: str, depth: int, epochs: int
) -> float:
    """The study's loop: set_image_batch on numpy images every step, fp32 decoder training on _features."""
    device = torch.device(args.device)
    step = make_step(new_decoder(feature, depth), device, bf16=False, channels_last=False)
    batches = loader(NumpyImages(samples), args, _numpy_collate)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(epochs):
        for images, mask in batches:
            predictor.set_image_batch(images)
            step(predictor_feature(predictor, feature), mask)
    sync(device)
    return time.perf_counter() - t0


def train_compute_only(
    args: argparse.Namespace, feature: str, depth: int, steps: int, bf16: bool, channels_last: bool, warmup: int = 3
) -> float:
    """Images/s of decoder training with the features already on the device (no data loading); with steps=0 it
    only warms kernels and autotuning up for this configuration."""
    device = torch.device(args.device)
    step = make_step(new_decoder(feature, depth), device, bf16, channels_last)
    features = torch.randn(args.batch_size, *feature_shape(feature, args.image_size), device=device).half()
    mask = (torch.rand(args.batch_size, 1, NATIVE, NATIVE, device=device) > 0.5).float()
    for _ in range(warmup):
        step(features, mask)
    sync(device)
    if not steps:
        return 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        step(features, mask)
    sync(device)
    return steps * args.batch_size / (time.perf_counter() - t0)


def bench_rss(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Peak RSS of one epoch of cached training (conv4 on the largest map) at N and 4N images, in subprocesses."""
    n = args.rss_images
    samples = make_images(work / "rss-data", 4 * n, seed=1)
    encoder = SAM2Encoder(RSS_ENCODER, random_init=True, image_size=args.image_size).to(args.device)
    store = FeatureStore.for_encoder(work / "rss-cache", encoder, RSS_FEATURE)
    store.extract(samples, encoder, args.batch_size, args.device, args.workers, progress=False)
    listing = work / "rss-listing.json"
    listing.write_text(json.dumps([[str(s.image), str(s.mask), s.name] for s in samples]))
    results = []
    for count in (n, 4 * n):
        spec = {
            "root": str(work / "rss-cache"),
            "identity": encoder.cache_identity(),
            "shape": list(encoder.feature_shape(RSS_FEATURE)),
            "listing": str(listing),
            "n": count,
            "batch_size": args.batch_size,
            "device": args.device,
            "image_size": args.image_size,
        }
        out = subprocess.run(
            [sys.executable, __file__, "--rss-worker", json.dumps(spec)], capture_output=True, text=True, check=False
        )
        if out.returncode:
            raise RuntimeError(f"RSS worker failed:\n{out.stderr[-3000:]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["cache_bytes"] = count * store.nbytes_per_image
        results.append(row)
    return results


def rss_worker(spec_json: str) -> None:
    """Subprocess: train CONV-4 on the cached largest map for one epoch; print peak RSS as JSON."""
    spec = json.loads(spec_json)
    rows = json.loads(Path(spec["listing"]).read_text())[: spec["n"]]
    samples = [Sample(Path(i), Path(m), "bench", "train", name) for i, m, name in rows]
    store = FeatureStore(spec["root"], spec["identity"], RSS_FEATURE, spec["shape"])
    device = torch.device(spec["device"])
    step = make_step(new_decoder(RSS_FEATURE, 4), device, bf16=False, channels_last=False)
    batches = DataLoader(store.dataset(samples), batch_size=spec["batch_size"], shuffle=True)
    iterator = iter(batches)
    first = next(iterator)
    step(first["features"][RSS_FEATURE], first["mask"])  # imports, allocator and kernels warm before the baseline
    before = peak_rss_kib()
    t0 = time.perf_counter()
    for batch in iterator:
        step(batch["features"][RSS_FEATURE], batch["mask"])
    sync(device)
    print(
        json.dumps(
            {
                "n": len(samples),
                "seconds": time.perf_counter() - t0,
                "vmhwm_before_kib": before,
                "vmhwm_kib": peak_rss_kib(),
                "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            }
        )
    )


# ---------------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.rss_worker:
        rss_worker(args.rss_worker)
        return {}
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="deeploc-bench-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        return _run(args, device, work, started)


def _run(args: argparse.Namespace, device: torch.device, work: Path, started: float) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# deeploc speed benchmark\n\ncommand: python {' '.join(sys.argv)}")
    print(
        f"device: {name}; torch {torch.__version__}; encoder {args.config} "
        f"({'checkpoint ' + args.checkpoint if args.checkpoint else 'random weights'}) @ {args.image_size}; "
        f"{args.images} images {NATIVE}x{NATIVE}; batch {args.batch_size}; {args.epochs} epochs; "
        f"workers {args.workers}; deeploc decoders: bf16={args.bf16} channels_last={args.channels_last}; "
        f"baseline: fp32 (as published); load average at start: {_load()}\n",
        flush=True,
    )
    samples = make_images(work / "data", args.images, seed=0)
    encoder = SAM2Encoder(
        args.config, checkpoint=args.checkpoint, random_init=args.checkpoint is None, image_size=args.image_size
    ).to(device)
    # FLOPs (meta device: no computation)
    enc_flops = encoder_flops(encoder)
    dec_flops = {(f, d): decoder_train_flops(f, d, args.image_size) for _, f, d in CONFIGS}

    # 1. extraction
    ext, stores = bench_extraction(args, encoder, samples, work)
    by_feature = {s.feature: s for s in stores}
    n = len(samples)
    ext_rows = [
        ["SAM2ImagePredictor.set_image_batch loop (fp32)", ext["predictor_s"], n / ext["predictor_s"],
         enc_flops * n / ext["predictor_s"] / 1e12],
        [f"deeploc extract_features -> FeatureStore{' (bf16 autocast)' if device.type == 'cuda' else ''}",
         ext["deeploc_s"], n / ext["deeploc_s"], enc_flops * n / ext["deeploc_s"] / 1e12],
    ]  # fmt: skip
    print(
        f"## Feature extraction ({n} images, all three maps, encoder {enc_flops / 1e9:.0f} GFLOP/img; "
        f"best of {args.extract_rounds} alternated rounds)\n"
    )
    print(table(["pipeline", "seconds", "images/s", "TFLOP/s"], ext_rows))
    print(f"\nextraction speed deeploc / predictor: {ext['predictor_s'] / ext['deeploc_s']:.2f}x")
    print("rounds (s): " + "; ".join(f"{k} {', '.join(f'{t:.1f}' for t in v)}" for k, v in ext["rounds"].items()))
    print("cache on disk: " + "; ".join(f"{s.feature} {format_bytes(s.nbytes_per_image * n)}" for s in stores) + "\n")

    # 2. the grid, one configuration at a time: deeploc from the cache, then the baseline (adjacent, so that
    #    machine noise hits both alike); kernels of both precisions warmed up first, untimed.
    predictor = make_predictor(encoder)
    deeploc_train, baseline, compute = {}, {}, {}
    for label, feature, depth in CONFIGS:
        key = (label, feature)
        warm = 3 if device.type == "cuda" else 1
        train_compute_only(args, feature, depth, 0, args.bf16, args.channels_last, warmup=warm)
        if (args.bf16, args.channels_last) != (False, False):
            train_compute_only(args, feature, depth, 0, False, False, warmup=warm)
        deeploc_train[key] = train_from_store(args, by_feature[feature], samples, feature, depth, args.epochs)
        baseline[key] = train_baseline(args, predictor, samples, feature, depth, args.baseline_epochs)
        if args.compute_steps:
            compute[key] = train_compute_only(args, feature, depth, args.compute_steps, args.bf16, args.channels_last)
        print(
            f"  {label} {feature}: deeploc {args.epochs} epochs from the cache {deeploc_train[key]:.1f} s; "
            f"baseline {args.baseline_epochs} epoch(s) {baseline[key]:.1f} s",
            flush=True,
        )

    peak = args.peak_tflops
    headers = ["decoder", "feature", "train GFLOP/img", "deeploc img/s (from store)", "TFLOP/s"]
    if peak:
        headers.append("% of peak")
    if compute:
        headers += ["compute-only img/s", "compute-only TFLOP/s"] + (["% of peak "] if peak else [])
    headers += ["baseline img/s (predictor + decoder)"]
    rows = []
    for label, feature, depth in CONFIGS:
        flops = dec_flops[(feature, depth)]
        ips = n * args.epochs / deeploc_train[(label, feature)]
        row: list[Any] = [label, feature, flops / 1e9, ips, ips * flops / 1e12]
        if peak:
            row.append(100 * ips * flops / 1e12 / peak)
        if compute:
            cps = compute[(label, feature)]
            row += [cps, cps * flops / 1e12] + ([100 * cps * flops / 1e12 / peak] if peak else [])
        row.append(n * args.baseline_epochs / baseline[(label, feature)])
        rows.append(row)
    print(f"\n## Decoder training, images/s per configuration ({n} images, batch {args.batch_size})\n")
    print(table(headers, rows))

    scale = args.epochs / args.baseline_epochs
    base_grid = sum(baseline.values()) * scale
    train_grid = sum(deeploc_train.values())
    deeploc_grid = ext["deeploc_s"] + train_grid
    note = "" if scale == 1 else f" (timed {args.baseline_epochs} epoch/config, x{scale:g})"
    grid_rows = [
        [f"baseline: predictor every step, fp32{note}", base_grid, base_grid / 5],
        ["deeploc: extract once + train from the cache", deeploc_grid, deeploc_grid / 5],
        ["  of which extraction", ext["deeploc_s"], ""],
        ["  of which decoder training", train_grid, ""],
    ]
    print(f"\n## Five-configuration grid, {args.epochs} epochs x {n} images\n")
    print(table(["pipeline", "wall s", "s per config"], grid_rows))
    print(f"\ngrid speed-up deeploc vs baseline: {base_grid / deeploc_grid:.2f}x\n", flush=True)

    # 4. RSS
    rss = bench_rss(args, work)
    rss_rows = [
        [r["n"], format_bytes(r["cache_bytes"]), r["vmhwm_kib"] / 1024, (r["vmhwm_kib"] - r["vmhwm_before_kib"]) / 1024,
         r["ru_maxrss_kib"] / 1024]
        for r in rss
    ]  # fmt: skip
    print(
        f"## Peak RSS of cached training (CONV-4 on {RSS_FEATURE} @{args.image_size}, one epoch, batch "
        f"{args.batch_size}, subprocess per size; maps from {RSS_ENCODER}: memory depends on map size, not encoder)\n"
    )
    print(
        table(["images", "cache size", "peak RSS MiB (VmHWM)", "growth during epoch MiB", "ru_maxrss MiB*"], rss_rows)
    )
    ratio = rss[1]["vmhwm_kib"] / rss[0]["vmhwm_kib"]
    print(f"\npeak RSS 4N / N: {ratio:.3f} (target <= 1.10)")
    print("* ru_maxrss includes the parent's high-water mark (Linux carries it over fork+exec): not a clean measure.")
    print(f"\ntotal benchmark wall time: {time.perf_counter() - started:.0f} s; load average at the end: {_load()}")

    results = {
        "args": vars(args),
        "device": name,
        "encoder_gflop_per_image": enc_flops / 1e9,
        "extraction": ext,
        "deeploc_train_s": {f"{k[0]}/{k[1]}": v for k, v in deeploc_train.items()},
        "compute_only_img_s": {f"{k[0]}/{k[1]}": v for k, v in compute.items()},
        "baseline_s": {f"{k[0]}/{k[1]}": v for k, v in baseline.items()},
        "grid": {"baseline_s": base_grid, "deeploc_s": deeploc_grid, "speedup": base_grid / deeploc_grid},
        "rss": rss,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
