"""One ``deeploc-probe`` job: the k-NN probe (:mod:`.knn_probe`) of every map of the configured encoder on the
configured data and split, written as ``results.json`` and ``table.md`` in the job's folder, and the table of every
probe under ``${paths.output_dir}/probe`` refreshed (``probe/table.md``: backbones x maps x test subsets)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from deeploc.config import to_primitive
from deeploc.data.datasets import ImageMaskDataset
from deeploc.errors import ConfigError
from deeploc.evaluation.knn_probe import ProbeSettings, build_banks, probe_scores
from deeploc.io import atomic_write_bytes, write_json_atomic

__all__ = ["probe_table", "run_probe", "write_probe"]

log = logging.getLogger("deeploc.probe")
RESULTS = "results.json"
TABLE = "table.md"


def run_probe(cfg: DictConfig) -> dict[str, Any]:
    """The probe's record: encoder identity, settings, bank sizes, scores per map and test subset, timings."""
    from deeploc.training.run import build_datamodule

    options = dict(to_primitive(cfg.get("probe")) or {})
    maps = options.pop("maps", None)
    settings = ProbeSettings(**options, convention=str(cfg.metrics.convention))
    encoder = instantiate(cfg.encoder)
    if encoder.adapt != "frozen":
        raise ConfigError(f"encoder.adapt={encoder.adapt}: the k-NN probe is training-free; use encoder.adapt=frozen")
    names = tuple(maps) if maps else tuple(encoder.feature_specs)
    for name in names:
        encoder.spec(name)  # an unknown map: one line naming the encoder's maps
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder.to(device)
    plan = build_datamodule(cfg).plan
    started = time.perf_counter()
    banks = build_banks(_loader(cfg, plan.train), encoder, names, len(plan.train), settings, device)
    bank_seconds = time.perf_counter() - started
    results: dict[str, dict[str, Any]] = {name: {} for name in names}
    test_images, started = 0, time.perf_counter()
    for subset, samples in plan.test.items():
        test_images += len(samples)
        for name, scores in probe_scores(_loader(cfg, samples), encoder, banks, settings, device).items():
            results[name][subset] = scores
    test_seconds = time.perf_counter() - started
    return {
        "backbone": encoder.describe(),
        "encoder": encoder.identity(),
        "settings": asdict(settings),
        "bank_patches": {name: len(bank) for name, bank in banks.items()},
        "train_images": len(plan.train),
        "test_images": test_images,
        "seconds": {"bank": round(bank_seconds, 3), "test": round(test_seconds, 3)},
        "seconds_per_1000_test_images": round(1000 * test_seconds / max(1, test_images), 3),
        "results": results,
    }


def _loader(cfg: DictConfig, samples: Sequence[Any]) -> DataLoader:
    """Untransformed images and masks in file order (no augmentation: the bank holds the training data as it is)."""
    return DataLoader(
        ImageMaskDataset(list(samples)), batch_size=int(cfg.data.batch_size), num_workers=int(cfg.data.num_workers)
    )


def probe_table(records: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table: one row per backbone, map and test subset (scores in percent)."""
    lines = [
        "| backbone | map | test subset | IoU | F1 fixed | F1 best | AP | images | bank patches |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for record in records:
        for name, subsets in record["results"].items():
            for subset, s in subsets.items():
                values = " | ".join(_pct(s.get(key)) for key in ("iou", "f1_fixed", "f1_best", "ap"))
                lines.append(
                    f"| {record['backbone']} | {name} | {subset} | {values} | {int(s['n_images'])} | "
                    f"{record['bank_patches'][name]} |"
                )
    return "\n".join(lines) + "\n"


def _pct(value: Any) -> str:
    return "n/a" if value is None or value != value else f"{value:.2f}"


def write_probe(record: Mapping[str, Any], job_dir: Path, probe_root: Path) -> Path:
    """Write ``results.json`` and ``table.md`` into ``job_dir`` and refresh ``probe_root/table.md`` from every
    ``results.json`` below ``probe_root``; returns that table's path."""
    write_json_atomic(job_dir / RESULTS, dict(record))
    atomic_write_bytes(job_dir / TABLE, probe_table([record]).encode())
    records = []
    for path in sorted(probe_root.rglob(RESULTS)):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:  # another job writing, or a damaged file: say so, go on
            log.warning("skipping %s in the probe table: %s", path, exc)
    atomic_write_bytes(probe_root / TABLE, probe_table(records).encode())
    return probe_root / TABLE
