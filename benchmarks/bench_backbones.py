"""Frozen-from-cache vs frozen-streamed vs LoRA vs full fine-tuning, per training step, and the k-NN probe's time.

    python benchmarks/bench_backbones.py                 # DINOv2 ViT-S/14 (random weights) at 224, batch 8, CPU
    python benchmarks/bench_backbones.py --quick         # smoke test: a 4-block, 64-wide ViT

One training step of the real LocalizationModule (its optimizer from ``configure_optimizers``, BCE on the decoder's
logits, backward, Adam step), the same CONV-4 decoder on the same map and batch in every mode:

* ``cache``: the frozen encoder's maps are already in memory (float16, as the feature cache stores them);
* ``stream``: the frozen encoder runs on the batch (no graph), then the decoder step;
* ``lora``: ``encoder.adapt=lora`` (rank 8 on every block's qkv and proj): forward and backward through the encoder;
* ``full``: ``encoder.adapt=full``: every encoder weight trains (Adam state for all of them).

Each mode runs in its own process (so its peak RSS is its own): 2 warm-up steps, then the median of ``--steps``.
The probe: a bank of ``--bank`` patches from the encoder's maps of generated training images, then the test phase
(encoder + exact k-NN + metrics) on ``--test-images`` images, reported per 1000 test images.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import peak_rss_kib

MODES = ("cache", "stream", "lora", "full")


def encoder_options(args: argparse.Namespace) -> dict[str, Any]:
    kwargs = {"depth": 4, "embed_dim": 64, "num_heads": 2} if args.quick else {}
    return {
        "kind": "timm",
        "model": args.model,
        "layers": [args.layer if not args.quick else 3],
        "image_size": args.image_size,
        "random_init": True,
        "model_kwargs": kwargs,
    }


def batch(args: argparse.Namespace, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    size = args.image_size
    masks = torch.zeros(args.batch, 1, size, size)
    for mask in masks:
        top, left = torch.randint(0, size // 2, (2,), generator=generator).tolist()
        mask[:, top : top + size // 3, left : left + size // 3] = 1
    return {"image": torch.rand(args.batch, 3, size, size, generator=generator), "mask": masks}


def one_mode(args: argparse.Namespace) -> dict[str, Any]:
    """Build, then time ``--steps`` training steps of one mode (in this process)."""
    from deeploc.models.decoders import build_decoder
    from deeploc.models.encoders import build_encoder
    from deeploc.training.module import LocalizationModule

    torch.manual_seed(0)
    adapt = args.mode if args.mode in ("lora", "full") else "frozen"
    encoder = build_encoder(**encoder_options(args), adapt=adapt)
    name = next(iter(encoder.feature_specs))
    decoder = build_decoder("conv", encoder.feature_specs, encoder.target_stride, inputs=name, depth=4)
    model = LocalizationModule(encoder=encoder, decoder=decoder).to(args.device)
    optimizer = model.configure_optimizers()
    data = {k: v.to(args.device) for k, v in batch(args).items()}
    if args.mode == "cache":
        with torch.no_grad():
            data = {"features": {k: v.half() for k, v in encoder(data["image"], names=(name,)).items()},
                    "mask": data["mask"]}  # fmt: skip
    rss_built = peak_rss_kib()
    model.train()
    times = []
    for step in range(args.steps + 2):
        start = time.perf_counter()
        logits = model(model.served_maps(data))
        target = F.interpolate(data["mask"], size=logits.shape[-2:], mode="bilinear", antialias=True)
        optimizer.zero_grad()
        F.binary_cross_entropy_with_logits(logits, target).backward()
        optimizer.step()
        if args.device != "cpu":
            torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - start)
    trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    return {
        "mode": args.mode,
        "step_s": statistics.median(times),
        "peak_rss_mib": peak_rss_kib() / 1024,
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if args.device != "cpu" else None,
        "rss_after_build_mib": rss_built / 1024,
        "trainable_params": trainable,
        "encoder": encoder.describe(),
        "map": name,
    }


def probe(args: argparse.Namespace) -> dict[str, Any]:
    """Bank from generated training images, then the timed test phase (encoder + k-NN + metrics)."""
    from deeploc.evaluation.knn_probe import ProbeSettings, build_banks, probe_scores
    from deeploc.models.encoders import build_encoder

    encoder = build_encoder(**encoder_options(args)).to(args.device)
    settings = ProbeSettings(k=10, bank_size=args.bank)
    cells = (args.image_size // 14) ** 2
    n_train = -(-args.bank // cells)  # enough images to fill the bank
    train = [batch(args, seed) for seed in range(-(-n_train // args.batch))]
    start = time.perf_counter()
    banks = build_banks(train, encoder, tuple(encoder.feature_specs), len(train) * args.batch, settings, args.device)
    bank_s = time.perf_counter() - start
    test = [
        {**batch(args, 1000 + i), "index": torch.arange(args.batch) + i * args.batch}
        for i in range(-(-args.test_images // args.batch))
    ]
    n_test = len(test) * args.batch
    start = time.perf_counter()
    with torch.no_grad():
        for b in test:
            encoder(b["image"].to(args.device))
    encoder_s = time.perf_counter() - start
    start = time.perf_counter()
    probe_scores(test, encoder, banks, settings, args.device)
    test_s = time.perf_counter() - start
    return {
        "bank_patches": len(next(iter(banks.values()))),
        "train_images": len(train) * args.batch,
        "bank_s": bank_s,
        "test_images": n_test,
        "test_s_per_1000": 1000 * test_s / n_test,
        "encoder_s_per_1000": 1000 * encoder_s / n_test,
        "knn_and_metrics_s_per_1000": 1000 * (test_s - encoder_s) / n_test,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch14_dinov2")
    parser.add_argument("--layer", type=int, default=11)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--bank", type=int, default=65_536)
    parser.add_argument("--test-images", type=int, default=64)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the encoder then runs in bf16 autocast)")
    parser.add_argument("--mode", choices=(*MODES, "probe"), help=argparse.SUPPRESS)  # one measurement, internal
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.quick:
        args.bank, args.test_images, args.steps = min(args.bank, 4096), min(args.test_images, 16), min(args.steps, 2)
    if args.mode:
        print(json.dumps(one_mode(args) if args.mode != "probe" else probe(args)))
        return
    forwarded = [a for a in sys.argv[1:] if not a.startswith("--json") and a != str(args.json)]
    rows = {}
    for mode in (*MODES, "probe"):
        proc = subprocess.run([sys.executable, __file__, *forwarded, "--mode", mode], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
        rows[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    threads = torch.get_num_threads()
    first = rows["cache"]
    where = f"CPU, {threads} threads" if args.device == "cpu" else torch.cuda.get_device_name()
    print(
        f"{where}; torch {torch.__version__}; encoder {first['encoder']} (random weights), map "
        f"{first['map']}; CONV-4 decoder; batch {args.batch}; median of {args.steps} steps after 2 warm-up steps\n"
    )
    print(
        "| mode | s / step | vs cache | vs stream | trainable params | peak RSS MiB | RSS after build MiB | peak GPU MiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode in MODES:
        r = rows[mode]
        gpu = "-" if r["peak_gpu_mib"] is None else f"{r['peak_gpu_mib']:.0f}"
        print(f"| {mode} | {r['step_s']:.3f} | {r['step_s'] / rows['cache']['step_s']:.1f} | "
              f"{r['step_s'] / rows['stream']['step_s']:.2f} | {r['trainable_params']:,} | {r['peak_rss_mib']:.0f} | "
              f"{r['rss_after_build_mib']:.0f} | {gpu} |")  # fmt: skip
    p = rows["probe"]
    print(f"\nk-NN probe: bank {p['bank_patches']:,} patches from {p['train_images']} images in {p['bank_s']:.1f} s; "
          f"test {p['test_s_per_1000']:.1f} s per 1000 images (encoder {p['encoder_s_per_1000']:.1f} s, k-NN + "
          f"metrics {p['knn_and_metrics_s_per_1000']:.1f} s), measured on {p['test_images']} images")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
