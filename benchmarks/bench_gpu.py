#!/usr/bin/env python
"""The GPU check of the multi-head path (run through ``benchmarks/gpu_check.sh``): how fast one GPU trains the study's
five configurations on streamed SAM2 maps, and what that projects for the full Dolos paper table.

Measured, each side by side in this one process on the same device:

1. extraction: the frozen encoder (bf16 autocast) on batches of images at the input size, all three maps;
2. the bare multi-head step: one encoder pass + the five decoders' training steps (bf16 autocast, channels_last),
   features never leave the device: the ceiling of ``features=stream``;
3. the product path: ``deeploc-train experiment=paper_table_multihead subset_index=0 features=stream trainer=gpu`` on
   generated Dolos-format data, timed per epoch inside the job (training loop, validation, test);
4. the projection of the full paper table (4 jobs x (9,000 train + 900 valid) x epochs + 4 x 3,600 test images)
   from the product path's measured images/s, and the disk it needs (stream: none beyond the dataset).

    bash benchmarks/gpu_check.sh                       # on the GPU machine, < 8 minutes on one H200
    python benchmarks/bench_gpu.py --device cpu --quick   # the same code path on the CPU (smoke test, ~2 min)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore", message="SAM2 encoder .* RANDOM weights")

from bench_common import (  # noqa: E402
    CONFIGS,
    Data,
    decoder_train_flops,
    encoder_flops,
    make_step,
    new_decoder,
    run_train,
    sync,
    table,
    train_images_per_s,
)

# The full study (shared/reference/protocol.md): per training subset 9,000 train / 900 valid / 900 test images of
# each of the four subsets; 20 epochs; one multi-head job per training subset.
DOLOS = {"jobs": 4, "train": 9000, "valid": 900, "test": 4 * 900, "epochs": 20}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke test)")
    p.add_argument("--config", default="sam2.1_hiera_s", help="SAM2 config, random weights (speed only)")
    p.add_argument("--image-size", type=int, default=1024, help="encoder input size (default 1024, the study's)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size of every part (default 32)")
    p.add_argument("--steps", type=int, default=20, help="timed batches of extraction and of the bare step")
    p.add_argument("--train-images", type=int, default=512, help="training images of the deeploc-train job")
    p.add_argument("--epochs", type=int, default=2, help="epochs of the deeploc-train job (the first warms up)")
    p.add_argument("--workers", type=int, default=8, help="data.num_workers of the deeploc-train job")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100/H200: 989)")
    p.add_argument("--work-dir", default=None, help="where data and runs go (default: a temporary folder)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--quick", action="store_true", help="micro encoder at 256, tiny sizes (CPU smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.config, args.image_size, args.batch_size, args.steps = "sam2.1_hiera_micro", 256, 4, 2
        args.train_images, args.epochs, args.workers = 8, 2, 0
    return args


def extraction(args: argparse.Namespace, encoder: Any, device: torch.device) -> float:
    """Images/s of the frozen encoder (all three maps) on batches already on the device."""
    images = torch.rand(args.batch_size, 3, 256, 256, device=device)
    with torch.no_grad():
        for _ in range(2):
            encoder(images)
        sync(device)
        started = time.perf_counter()
        for _ in range(args.steps):
            encoder(images)
        sync(device)
    return args.steps * args.batch_size / (time.perf_counter() - started)


def multihead_step(args: argparse.Namespace, encoder: Any, device: torch.device) -> float:
    """Images/s of one encoder pass + the five decoders' training steps on its maps (all on the device)."""
    bf16 = device.type == "cuda"
    steps = {
        arch: (feature, make_step(new_decoder(feature, depth), device, bf16, bf16)) for arch, depth, feature in CONFIGS
    }
    images = torch.rand(args.batch_size, 3, 256, 256, device=device)
    mask = (torch.rand(args.batch_size, 1, 256, 256, device=device) > 0.5).float()

    def one() -> None:
        with torch.no_grad():
            maps = encoder(images)
        for feature, step in steps.values():
            step(maps[feature], mask)

    for _ in range(2):
        one()
    sync(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        one()
    sync(device)
    return args.steps * args.batch_size / (time.perf_counter() - started)


def product_job(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The multi-head job as users launch it, streamed, timed inside the job by benchmarks/timing.py."""
    n_eval = max(1, args.train_images // 8)
    data = Data(work / "data", args.train_images, n_eval, n_eval)
    data.prepare()
    overrides = [
        "-m", "experiment=paper_table_multihead", "subset_index=0", "features=stream", *data.overrides(),
        f"data.batch_size={args.batch_size}", f"data.num_workers={args.workers}",
        "encoder=hiera_s", f"encoder.config={args.config}", "encoder.checkpoint=null", "encoder.random_init=true",
        f"encoder.image_size={args.image_size}", f"trainer.max_epochs={args.epochs}", "overlays=0",
        "trainer=gpu" if args.device == "cuda" else "trainer=cpu",
    ]  # fmt: skip
    job = run_train("mh-stream", work / "mh-stream", overrides)
    (timing,) = job.timings.values()
    epochs = timing["epochs"][1:] or timing["epochs"]
    val_s = sum(e["val_s"] for e in epochs) / len(epochs)
    return {
        "command": job.command,
        "wall_s": job.wall_s,
        "train_img_s": train_images_per_s(timing),
        "eval_img_s": n_eval / val_s,
        "test_img_s": 4 * n_eval / timing["test_s"] if timing["test_s"] else None,
        "timing": timing,
    }


def projection(train_img_s: float, eval_img_s: float) -> dict[str, float]:
    """Wall seconds of the full Dolos paper table as 4 streamed multi-head jobs at the measured speeds."""
    per_job = (
        DOLOS["epochs"] * (DOLOS["train"] / train_img_s + DOLOS["valid"] / eval_img_s) + DOLOS["test"] / eval_img_s
    )
    return {"per_job_s": per_job, "total_s": DOLOS["jobs"] * per_job}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu.py: no CUDA device here; run it on the GPU machine, or --device cpu --quick to try it")
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    started = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# deeploc GPU check\n\ncommand: python {' '.join(sys.argv)}\n{name}; torch {torch.__version__}; "
          f"{args.config} (random weights) @ {args.image_size}, bf16 {device.type == 'cuda'}; batch {args.batch_size}\n",
          flush=True)  # fmt: skip

    from deeploc.models.encoders.sam2 import SAM2Encoder

    encoder = SAM2Encoder(args.config, random_init=True, image_size=args.image_size).to(device).eval()
    enc_flops = encoder_flops(args.config, args.image_size, args.device)
    heads_flops = sum(decoder_train_flops(feature, depth, args.image_size) for _, depth, feature in CONFIGS)
    extract_ips = extraction(args, encoder, device)
    step_ips = multihead_step(args, encoder, device)
    del encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()

    with tempfile.TemporaryDirectory(prefix="deeploc-gpu-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        job = product_job(args, work)

    def tflops(ips: float, flops: float) -> float:
        return ips * flops / 1e12

    rows = [
        ["extraction (encoder, 3 maps)", extract_ips, tflops(extract_ips, enc_flops)],
        ["bare multi-head step (encoder + 5 heads)", step_ips, tflops(step_ips, enc_flops + heads_flops)],
        ["deeploc-train multi-head stream: training", job["train_img_s"], tflops(job["train_img_s"], enc_flops + heads_flops)],
        ["deeploc-train multi-head stream: validation", job["eval_img_s"], None],
    ]  # fmt: skip
    for row in rows:
        row.append(f"{100 * row[2] / args.peak_tflops:.1f}%" if row[2] is not None and device.type == "cuda" else "-")
    print(f"encoder {enc_flops / 1e9:.0f} GFLOP/img; five heads' training steps {heads_flops / 1e9:.0f} GFLOP/img\n")
    print(
        table(
            ["part", "images/s", "TFLOP/s", f"% of {args.peak_tflops:.0f}"],
            [[r[0], r[1], r[2] or "-", r[3]] for r in rows],
        )
    )
    print(f"\ntraining loop of deeploc-train / bare multi-head step: {100 * job['train_img_s'] / step_ips:.0f}%")
    print(
        f"deeploc-train job wall time: {job['wall_s']:.0f} s ({args.train_images} train images, {args.epochs} epochs)"
    )
    proj = projection(job["train_img_s"], job["eval_img_s"])
    print(
        f"\n## Projection: the full Dolos paper table ({DOLOS['jobs']} jobs x {DOLOS['epochs']} epochs x "
        f"({DOLOS['train']} train + {DOLOS['valid']} valid) + test {DOLOS['test']} per job), features=stream\n\n"
        f"per job {proj['per_job_s'] / 60:.1f} min; all four {proj['total_s'] / 60:.1f} min on one device "
        f"(goal < 30 min); disk: the dataset only (no feature cache; the cache would be 337 GiB)"
    )
    print(f"\ntotal wall time: {time.perf_counter() - started:.0f} s")
    results = {"args": vars(args), "device": name, "encoder_gflop": enc_flops / 1e9, "heads_gflop": heads_flops / 1e9,
               "extract_img_s": extract_ips, "bare_step_img_s": step_ips, "job": job, "projection": proj}  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
