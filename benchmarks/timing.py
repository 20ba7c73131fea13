"""A Lightning callback the benchmarks add to ``deeploc-train`` jobs (``+callbacks.bench_timer._target_=timing.
PhaseTimer`` with ``benchmarks/`` on PYTHONPATH): when each epoch's training loop, validation and the test ran, and the
process's peak RSS, written to ``<trainer.default_root_dir>/bench_timing.json`` (the run's, or a multi-head job's,
folder). It changes nothing in the job; the product code knows nothing of it."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L


def peak_rss_kib() -> int:
    """The process's peak resident set size (``VmHWM``), KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


class PhaseTimer(L.Callback):
    """Per epoch: seconds of the training loop (first batch fetched to last optimiser step, i.e. epoch start to
    validation start) and of validation; seconds of the test; train images per epoch; peak RSS at the end."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []
        self.test_s: float | None = None
        self._t: dict[str, float] = {}

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t["epoch"] = time.perf_counter()

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t["val"] = time.perf_counter()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or "epoch" not in self._t:
            return
        now = time.perf_counter()
        self.epochs.append(
            {
                "train_s": self._t["val"] - self._t["epoch"],
                "val_s": now - self._t["val"],
                "train_images": len(trainer.datamodule.plan.train),
            }
        )

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t["test"] = time.perf_counter()

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.test_s = time.perf_counter() - self._t["test"]
        self._write(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer)

    def _write(self, trainer: L.Trainer) -> None:
        record: dict[str, Any] = {"epochs": self.epochs, "test_s": self.test_s, "peak_rss_kib": peak_rss_kib()}
        (Path(trainer.default_root_dir) / "bench_timing.json").write_text(json.dumps(record, indent=1))
