"""Pieces the benchmarks share: the generated data, deeploc-train jobs as users launch them (timed, in their own
process), the bare decoder step, FLOP counts, markdown tables."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent
NATIVE = 256  # Dolos images are 256 x 256
SUBSETS = ("inpaint-telea", "copy-move", "blur-noise", "splice-jpeg")  # conf/data/synthetic.yaml
# The study's five configurations (conf/experiment/paper_table.yaml): arch, decoder depth, map.
CONFIGS: tuple[tuple[str, int, str], ...] = (
    ("conv4_image_embed", 4, "image_embed"),
    ("conv12_image_embed", 12, "image_embed"),
    ("conv20_image_embed", 20, "image_embed"),
    ("conv20_high_res_feats_0", 20, "high_res_feats_0"),
    ("conv20_high_res_feats_1", 20, "high_res_feats_1"),
)
TIMER = "+callbacks.bench_timer._target_=timing.PhaseTimer"


@dataclass
class Data:
    """A generated Dolos-format dataset: ``n_train`` / ``n_valid`` / ``n_test`` images per subset."""

    root: Path
    n_train: int
    n_valid: int
    n_test: int

    def overrides(self) -> list[str]:
        return [
            "data=synthetic",
            f"data.root={self.root}",
            f"data.synthetic.n_train={self.n_train}",
            f"data.synthetic.n_valid={self.n_valid}",
            f"data.synthetic.n_test={self.n_test}",
            f"data.synthetic.size={NATIVE}",
        ]

    def params(self) -> dict[str, int]:
        return {"n_train": self.n_train, "n_valid": self.n_valid, "n_test": self.n_test, "size": NATIVE, "seed": 0}

    def prepare(self) -> None:
        """Generate the images now, outside every timing."""
        from deeploc.data.sources import build_source

        build_source("generated", root=str(self.root), **self.params()).prepare()

    def plan(self) -> Any:
        """The cross split of subset 0 (what ``subset_index=0`` trains and tests on)."""
        from deeploc.data.datamodule import LocalizationDataModule

        module = LocalizationDataModule(
            str(self.root), list(SUBSETS), {"mode": "cross", "subset": SUBSETS[0]}, synthetic=self.params()
        )
        module.setup("fit")
        return module.plan


@dataclass
class Job:
    """A finished ``deeploc-train`` command: its wall time and what its runs' PhaseTimer recorded."""

    name: str
    command: list[str]
    wall_s: float
    timings: dict[str, dict[str, Any]] = field(default_factory=dict)  # run or job folder -> bench_timing.json


def run_train(name: str, outputs: Path, overrides: Sequence[str], env: dict[str, str] | None = None) -> Job:
    """``deeploc-train <overrides>`` in its own process, as a user runs it (outputs under ``outputs``), timed from
    launch to exit; the PhaseTimer's record of every run (or multi-head job) folder it wrote."""
    outputs.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "deeploc.cli.train", *overrides, TIMER, "logger=csv"]
    environ = {
        **os.environ,
        "DEEPLOC_OUTPUTS": str(outputs),
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(BENCHMARKS)]),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "NO_ALBUMENTATIONS_UPDATE": "1",
        **(env or {}),
    }
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=outputs, env=environ, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    (outputs / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"{name}: deeploc-train failed ({proc.returncode}), see {outputs / f'{name}.log'}:\n"
                           f"{proc.stderr[-3000:]}")  # fmt: skip
    timings = {str(p.parent): json.loads(p.read_text()) for p in outputs.rglob("bench_timing.json")}
    return Job(name, ["deeploc-train", *overrides], wall, timings)


def train_images_per_s(timing: dict[str, Any]) -> float:
    """Training-loop images/s of a run: the median over epochs after the first (which warms caches and kernels)."""
    epochs = timing["epochs"][1:] or timing["epochs"]
    return statistics.median(e["train_images"] / e["train_s"] for e in epochs)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def new_decoder(feature: str, depth: int) -> torch.nn.Module:
    from deeploc.models.decoders import build_decoder
    from deeploc.models.encoders.sam2 import FEATURE_SPECS

    torch.manual_seed(0)
    return build_decoder("conv", FEATURE_SPECS, 4.0, inputs=feature, depth=depth)


def feature_shape(feature: str, image_size: int) -> tuple[int, int, int]:
    """(C, h, w) of a SAM2 map at a square input of ``image_size``."""
    from deeploc.models.encoders.sam2 import FEATURE_SPECS

    spec = FEATURE_SPECS[feature]
    return (spec.channels, image_size // int(spec.stride), image_size // int(spec.stride))


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
        target = F.interpolate(mask, size=logits.shape[-2:], mode="bilinear", align_corners=False, antialias=True)
        loss = F.binary_cross_entropy_with_logits(logits.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def bare_step_images_per_s(
    feature: str, depth: int, image_size: int, batch: int, device: torch.device, steps: int,
    bf16: bool = False, channels_last: bool = False,
) -> float:  # fmt: skip
    """Images/s of the bare decoder training step on fp16 features already in memory (no loading, no logging)."""
    step = make_step(new_decoder(feature, depth), device, bf16, channels_last)
    features = torch.randn(batch, *feature_shape(feature, image_size), device=device).half()
    mask = (torch.rand(batch, 1, NATIVE, NATIVE, device=device) > 0.5).float()
    for _ in range(2):
        step(features, mask)
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step(features, mask)
    sync(device)
    return steps * batch / (time.perf_counter() - started)


def decoder_train_flops(feature: str, depth: int, image_size: int) -> float:
    """FLOPs of one training step (forward + backward) per image, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        decoder = new_decoder(feature, depth)
        x = torch.empty(2, *feature_shape(feature, image_size))
        target = torch.empty(2, 1, image_size // 4, image_size // 4)
    with FlopCounterMode(display=False) as counter:
        F.binary_cross_entropy_with_logits(decoder(x), target).backward()
    return counter.get_total_flops() / 2


def encoder_flops(config: str, image_size: int, device: str = "cpu") -> float:
    """FLOPs of one image through the frozen SAM2 encoder (all three maps), counted on one real forward pass (sam2's
    Hiera reads tensor values while it is built, so it cannot be built on the meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    from deeploc.models.encoders.sam2 import SAM2Encoder

    encoder = SAM2Encoder(config, random_init=True, image_size=image_size, bf16=False).to(device).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        encoder(torch.rand(1, 3, image_size, image_size, device=device))
    return float(counter.get_total_flops())


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


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())
