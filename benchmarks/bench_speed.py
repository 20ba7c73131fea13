#!/usr/bin/env python
"""Speed of the study's results table as users run it: ``deeploc-train`` jobs timed end to end (process start to
exit), against the study's pipeline, on the same generated images, seeds and epochs, in one run.

Pipelines, each in its own output and feature-cache folder (none reuses another's work), all on training subset 0
(the paper table's 20 jobs -> 5 here) and tested on the four subsets:

  study      the study's code path as published: each of the five configurations is its own run, and every epoch
             of every run hands every image (numpy HxWx3 uint8) to SAM2ImagePredictor.set_image_batch (fp32) and
             trains the decoder on predictor._features; validation and test images through the predictor too. Every
             epoch is the same work, so --baseline-epochs (1) epoch(s) plus the test are timed per configuration and
             the epochs scaled to --epochs. Model building and process start are not counted (to its advantage).
  none       (--with-none) the same in deeploc-train: -m experiment=paper_table features=none (5 jobs).
  cache      deeploc-train -m experiment=paper_table subset_index=0 features=cache (5 jobs; each fills its map).
  mh-cache   deeploc-train -m experiment=paper_table_multihead subset_index=0 features=cache (1 job, five heads,
             one extraction of the three maps).
  mh-stream  deeploc-train -m experiment=paper_table_multihead subset_index=0 features=stream (1 job, five heads;
             the encoder runs on every batch, once for all heads).

Also measured: the training loop inside deeploc-train (images/s of the cached conv20 image_embed job's epochs, and
of the multi-head job's) against the bare decoder step on features already in memory, and the peak RSS of a cached
multi-head job at N and 4N images (micro encoder, one epoch: memory depends on the maps' sizes, not the encoder).

    python benchmarks/bench_speed.py --images 16          # CPU, Hiera-S random weights at 512 (the issue's setup)
    python benchmarks/bench_speed.py --quick              # smoke test: micro encoder, tiny sizes, ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore", message="SAM2 encoder .* RANDOM weights")

from bench_common import (  # noqa: E402
    CONFIGS,
    Data,
    Job,
    bare_step_images_per_s,
    decoder_train_flops,
    encoder_flops,
    load_average,
    make_step,
    new_decoder,
    run_train,
    table,
    train_images_per_s,
)

from deeploc.data.datasets import ImageMaskDataset  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="sam2.1_hiera_s", help="SAM2 config, random weights (default sam2.1_hiera_s)")
    p.add_argument("--image-size", type=int, default=512, help="encoder input size (default 512)")
    p.add_argument("--images", type=int, default=16, help="training images; valid and test per subset: a quarter")
    p.add_argument("--epochs", type=int, default=5, help="epochs of every run (default 5)")
    p.add_argument("--baseline-epochs", type=int, default=1, help="study pipeline epochs timed per configuration")
    p.add_argument("--batch-size", type=int, default=8, help="batch size (default 8)")
    p.add_argument("--bare-steps", type=int, default=10, help="timed steps of each bare decoder step (default 10)")
    p.add_argument("--rss-images", type=int, default=32, help="N of the peak-RSS runs (N and 4N; default 32)")
    p.add_argument("--with-none", action="store_true", help="also time -m experiment=paper_table features=none")
    p.add_argument("--work-dir", default=None, help="where data, runs and caches go (default: a temporary folder)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--quick", action="store_true", help="smoke test: micro encoder at 256, 8 images, 2 epochs")
    args = p.parse_args(argv)
    if args.quick:
        args.config, args.image_size, args.images, args.epochs = "sam2.1_hiera_micro", 256, 8, 2
        args.bare_steps, args.rss_images = 2, 8
    return args


# ---------------------------------------------------------------------------------------- the study's pipeline


class NumpyImages(Dataset):
    """What the study's loop hands the predictor: the image as HxWx3 uint8 numpy, plus the mask tensor."""

    def __init__(self, samples: Sequence[Any]) -> None:
        self.items = ImageMaskDataset(list(samples))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[np.ndarray, torch.Tensor]:
        item = self.items[i]
        image = (item["image"] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # exact: image = uint8 / 255
        return image, item["mask"]


def _numpy_collate(batch: list[tuple[np.ndarray, torch.Tensor]]) -> tuple[list[np.ndarray], torch.Tensor]:
    return [image for image, _ in batch], torch.stack([mask for _, mask in batch])


def make_predictor(config: str, image_size: int) -> Any:
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    from deeploc.models.encoders.sam2 import SAM2Encoder

    encoder = SAM2Encoder(config, random_init=True, image_size=image_size)
    predictor = SAM2ImagePredictor(encoder.model)
    s = image_size
    predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]  # hard-coded for 1024
    return predictor


def predictor_feature(predictor: Any, feature: str) -> torch.Tensor:
    feats = predictor._features
    return feats["image_embed"] if feature == "image_embed" else feats["high_res_feats"][int(feature[-1])]


def study_pipeline(args: argparse.Namespace, plan: Any) -> dict[str, dict[str, float]]:
    """Per configuration: seconds of --baseline-epochs epochs (train + validation through the predictor) and of the
    test (every test subset through the predictor)."""
    device = torch.device("cpu")
    predictor = make_predictor(args.config, args.image_size)
    predictor.set_image_batch([np.zeros((256, 256, 3), np.uint8)] * args.batch_size)  # first-call overheads out
    out = {}

    def batches(samples: Sequence[Any], shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        data = NumpyImages(samples)
        return DataLoader(data, args.batch_size, shuffle=shuffle, generator=generator, collate_fn=_numpy_collate)

    for arch, depth, feature in CONFIGS:
        decoder = new_decoder(feature, depth)
        step = make_step(decoder, device, bf16=False, channels_last=False)
        started = time.perf_counter()
        for _ in range(args.baseline_epochs):
            for images, mask in batches(plan.train, shuffle=True):
                predictor.set_image_batch(images)
                step(predictor_feature(predictor, feature), mask)
            decoder.eval()
            with torch.no_grad():
                for images, _ in batches(plan.valid, shuffle=False):
                    predictor.set_image_batch(images)
                    decoder(predictor_feature(predictor, feature).float())
            decoder.train()
        epochs_s = time.perf_counter() - started
        started = time.perf_counter()
        decoder.eval()
        with torch.no_grad():
            for samples in plan.test.values():
                for images, _ in batches(samples, shuffle=False):
                    predictor.set_image_batch(images)
                    decoder(predictor_feature(predictor, feature).float())
        out[arch] = {"epoch_s": epochs_s / args.baseline_epochs, "test_s": time.perf_counter() - started}
        print(f"  study pipeline {arch}: {out[arch]['epoch_s']:.1f} s per epoch, test {out[arch]['test_s']:.1f} s",
              flush=True)  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------------------ main


def common_overrides(args: argparse.Namespace, data: Data, work: Path, name: str) -> list[str]:
    return [
        *data.overrides(),
        f"data.batch_size={args.batch_size}",
        "data.num_workers=0",
        "encoder=hiera_s",
        f"encoder.config={args.config}",
        "encoder.checkpoint=null",
        "encoder.random_init=true",
        f"encoder.image_size={args.image_size}",
        f"trainer.max_epochs={args.epochs}",
        "trainer.accelerator=cpu",
        f"features.dir={work / name / 'features'}",
    ]


def run_pipelines(args: argparse.Namespace, data: Data, work: Path) -> dict[str, Job]:
    table_jobs = ["-m", "experiment=paper_table", "subset_index=0"]
    multihead = ["-m", "experiment=paper_table_multihead", "subset_index=0"]
    plans = {
        "cache": [*table_jobs, "features=cache"],
        "mh-cache": [*multihead, "features=cache"],
        "mh-stream": [*multihead, "features=stream"],
    }
    if args.with_none:
        plans = {"none": [*table_jobs, "features=none"], **plans}
    jobs = {}
    for name, launch in plans.items():
        jobs[name] = run_train(name, work / name, [*launch, *common_overrides(args, data, work, name)])
        print(f"  {name}: {' '.join(jobs[name].command[:5])} ... {jobs[name].wall_s:.0f} s", flush=True)
    return jobs


def peak_rss(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Peak RSS of a cached multi-head job (micro encoder, one epoch) at N and 4N training images."""
    rows = []
    for n in (args.rss_images, 4 * args.rss_images):
        data = Data(work / "rss-data", n, max(1, n // 4), max(1, n // 4))
        data.prepare()
        name = f"rss-{n}"
        overrides = [
            "-m", "experiment=paper_table_multihead", "subset_index=0", "features=cache", *data.overrides(),
            f"data.batch_size={args.batch_size}", "data.num_workers=0", "encoder=micro", f"encoder.image_size={args.image_size}",
            "trainer.max_epochs=1", "overlays=0", f"features.dir={work / name / 'features'}",
        ]  # fmt: skip
        job = run_train(name, work / name, overrides)
        (timing,) = job.timings.values()
        cache = sum(f.stat().st_size for f in (work / name / "features").rglob("*.f16"))
        rows.append({"train_images": n, "cache_bytes": cache, "peak_rss_kib": timing["peak_rss_kib"]})
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="deeploc-bench-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        return _run(args, work, started)


def _run(args: argparse.Namespace, work: Path, started: float) -> dict[str, Any]:
    from deeploc.features.entry import format_bytes

    torch.set_num_threads(torch.get_num_threads())
    n_valid = n_test = max(1, args.images // 4)
    data = Data(work / "data", args.images, n_valid, n_test)
    print(f"# deeploc speed benchmark: the paper table as users run it\n\ncommand: python {' '.join(sys.argv)}")
    print(
        f"CPU, {torch.get_num_threads()} threads; torch {torch.__version__}; encoder {args.config} (random weights) "
        f"@ {args.image_size}; {args.images} train / {n_valid} valid / 4 x {n_test} test images {256}x{256}; "
        f"batch {args.batch_size}; {args.epochs} epochs; training subset 0; load average at start: {load_average()}\n",
        flush=True,
    )
    data.prepare()
    plan = data.plan()
    print("## Timing\n", flush=True)
    study = study_pipeline(args, plan)
    jobs = run_pipelines(args, data, work)
    study_s = sum(args.epochs * r["epoch_s"] + r["test_s"] for r in study.values())

    # Bare decoder steps and the training loops inside deeploc-train.
    device = torch.device("cpu")
    bare = {
        arch: bare_step_images_per_s(feature, depth, args.image_size, args.batch_size, device, args.bare_steps)
        for arch, depth, feature in CONFIGS
    }
    cached = {Path(folder).name: timing for folder, timing in jobs["cache"].timings.items()}
    (conv20,) = [t for name, t in cached.items() if "arch=conv20_image_embed" in name]
    (mh,) = jobs["mh-cache"].timings.values()
    all_heads_bare = 1 / sum(1 / ips for ips in bare.values())
    loop_rows = [
        ["conv20 image_embed (experiment=paper_table)", train_images_per_s(conv20), bare["conv20_image_embed"]],
        ["five heads (experiment=paper_table_multihead)", train_images_per_s(mh), all_heads_bare],
    ]
    for row in loop_rows:
        row.append(f"{100 * row[1] / row[2]:.0f}%")

    rows = [["study pipeline (predictor every epoch, every run; fp32)", study_s, 1.0]]
    rows += [
        [" ".join(job.command[1:4]) + f" {job.command[4]}", job.wall_s, study_s / job.wall_s] for job in jobs.values()
    ]
    print(f"\n## The paper table's five configurations, {args.epochs} epochs (one training subset)\n")
    print(table(["pipeline", "wall s", "speed-up vs study"], rows))
    if "none" in jobs:
        print(
            f"\nvs deeploc-train features=none (the study's pipeline in the product): mh-stream "
            f"{jobs['none'].wall_s / jobs['mh-stream'].wall_s:.2f}x, mh-cache {jobs['none'].wall_s / jobs['mh-cache'].wall_s:.2f}x"
        )
    print("\n## Training loop inside deeploc-train vs the bare decoder step (cached fp16 maps, images/s)\n")
    print(table(["training loop", "deeploc-train img/s", "bare step img/s", "share"], loop_rows))

    flops_rows = [
        [arch, decoder_train_flops(feature, depth, args.image_size) / 1e9, bare[arch]]
        for arch, depth, feature in CONFIGS
    ]
    enc = encoder_flops(args.config, args.image_size)
    print(f"\n## Bare decoder steps (batch {args.batch_size}, features in memory); encoder {enc / 1e9:.0f} GFLOP/img\n")
    print(table(["configuration", "train GFLOP/img", "img/s"], [[*r, r[1] * r[2] / 1e3] for r in flops_rows]))

    rss = peak_rss(args, work)
    print("\n## Peak RSS of a cached multi-head job (micro encoder, one epoch, subprocess per size)\n")
    print(table(
        ["train images", "feature cache", "peak RSS MiB"],
        [[r["train_images"], format_bytes(r["cache_bytes"]), r["peak_rss_kib"] / 1024] for r in rss],
    ))  # fmt: skip
    print(f"\npeak RSS 4N / N: {rss[1]['peak_rss_kib'] / rss[0]['peak_rss_kib']:.3f} (target <= 1.10)")
    print(
        f"\ntotal benchmark wall time: {time.perf_counter() - started:.0f} s; load average at the end: {load_average()}"
    )
    results = {
        "args": vars(args),
        "study": study,
        "study_s": study_s,
        "jobs": {
            name: {"command": job.command, "wall_s": job.wall_s, "timings": job.timings} for name, job in jobs.items()
        },
        "bare_img_s": bare,
        "training_loop": {row[0]: {"img_s": row[1], "bare_img_s": row[2]} for row in loop_rows},
        "rss": rss,
        "median_epoch_s": {
            name: statistics.median(e["train_s"] + e["val_s"] for t in job.timings.values() for e in t["epochs"])
            for name, job in jobs.items()
        },
    }
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
