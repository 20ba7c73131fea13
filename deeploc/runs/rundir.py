"""A run directory: where its checkpoints and results live, and whether it has finished."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deeploc.io import file_digest, write_json_atomic

METRICS_FILE = "metrics.json"
RESOLVED_CONFIG = "config_resolved.yaml"
LOCK_FILE = ".lock"
CHECKPOINTS = "checkpoints"
OVERLAYS = "overlays"
EVAL = "eval"
# In the folder of a multi-head job (deeploc.multihead): its heads and their run directories. Such a folder is no run.
HEADS_FILE = "heads.json"
# Written when a cluster job is signalled before its time limit (deeploc.training.cluster.RequeueOnSignal).
REQUEUE_CHECKPOINT = "requeue.ckpt"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory (Hydra's output dir of a train job)."""

    path: Path

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def lock_file(self) -> Path:
        """The run's lock (held by the one process working in it)."""
        return self.path / LOCK_FILE

    @property
    def resolved_config(self) -> Path:
        """The run's config with every interpolation resolved (rewritten by each launch in the directory)."""
        return self.path / RESOLVED_CONFIG

    @property
    def hydra_config(self) -> Path:
        """Hydra's record of the job's composed config (``.hydra/config.yaml``)."""
        return self.path / ".hydra" / "config.yaml"

    @property
    def heads_file(self) -> Path:
        """The list of heads in the folder of a multi-head job."""
        return self.path / HEADS_FILE

    @property
    def overlays(self) -> Path:
        return self.path / OVERLAYS

    def overlay_dir(self, subset: str) -> Path:
        """Where the rendered test predictions of ``subset`` go."""
        return self.overlays / subset

    @property
    def eval_root(self) -> Path:
        """The folder holding every deeploc-eval result of the run (one sub-folder per data and convention)."""
        return self.path / EVAL

    @staticmethod
    def of_checkpoint(ckpt_path: Path) -> Path | None:
        """The run directory of ``<run>/checkpoints/x.ckpt``, when that is where the checkpoint lives."""
        parent = Path(ckpt_path).resolve().parent
        return parent.parent if parent.name == CHECKPOINTS else None

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints / "best.ckpt"

    @property
    def export_file(self) -> Path:
        """Where deeploc-export writes the run's decoder by default."""
        return self.path / "decoder.safetensors"

    def eval_dir(self, root: str | os.PathLike[str], split: str, subsets: list[str], convention: str) -> Path:
        """Where deeploc-eval writes its results for this data, split, subsets and metric convention."""
        from deeploc.runs.naming import eval_dir_name

        return self.eval_root / eval_dir_name(root, split, subsets, convention)

    def model_checkpoint(self) -> Path | None:
        """The checkpoint that stands for the trained model: metrics.json's best, else best.ckpt, else last.ckpt."""
        best = (self.read_metrics() or {}).get("best_checkpoint")
        candidates = [self.path / best] if best else []
        return next((c for c in [*candidates, self.best_checkpoint, self.last_checkpoint] if c.is_file()), None)

    def model_checkpoint_after_training(self) -> Path:
        """The checkpoint a run is tested with once trained: ``best.ckpt``, else ``last.ckpt``."""
        return self.best_checkpoint if self.best_checkpoint.exists() else self.last_checkpoint

    def resume_candidates(self) -> list[Path]:
        """Checkpoints a run may resume from: ``checkpoints/last.ckpt``, ``checkpoints/requeue.ckpt`` and
        Lightning's ``hpc_ckpt_<n>.ckpt`` (in ``checkpoints/`` or the run directory, where Lightning's own SLURM
        requeue puts them)."""
        found = [self.last_checkpoint, self.checkpoints / REQUEUE_CHECKPOINT]
        found += sorted(self.checkpoints.glob("hpc_ckpt_*.ckpt")) + sorted(self.path.glob("hpc_ckpt_*.ckpt"))
        return [p for p in found if p.is_file()]

    def resume_checkpoint(self) -> Path | None:
        """The most advanced readable checkpoint of :meth:`resume_candidates`: highest ``global_step``; on equal
        steps the later file (``last.ckpt`` written after the epoch's validation beats a requeue checkpoint taken
        at that epoch's last batch). None when there is none."""
        best: tuple[tuple[int, int], Path] | None = None
        for path in self.resume_candidates():
            key = _progress(path)
            if key is not None and (best is None or key > best[0]):
                best = (key, path)
        return None if best is None else best[1]

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    def read_metrics(self) -> dict[str, Any] | None:
        """The run's metrics.json, or None when it has none (or it is unreadable)."""
        try:
            return json.loads(self.metrics_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    @property
    def finished(self) -> bool:
        metrics = self.read_metrics()
        return bool(metrics and metrics.get("status") == "finished")

    def checkpoint_digests(self) -> dict[str, str]:
        """``sha256:<hex>`` of the best and last checkpoints, keyed by their path in the run (for metrics.json):
        a later tool that loads the run's checkpoint can tell that it is still the one the run finished with."""
        return {
            path.relative_to(self.path).as_posix(): f"sha256:{file_digest(path)}"
            for path in (self.best_checkpoint, self.last_checkpoint)
            if path.is_file()
        }

    def write_metrics(self, metrics: dict[str, Any]) -> Path:
        """Write metrics.json atomically (a reader never sees half a file)."""
        return write_json_atomic(self.metrics_file, metrics)


def _progress(path: Path) -> tuple[int, int] | None:
    """(global_step, mtime_ns) of a checkpoint, or None when it cannot be read (e.g. killed while written)."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        step = int(ckpt.get("global_step", -1))
        del ckpt
        return step, path.stat().st_mtime_ns
    except Exception as exc:  # any unreadable file is skipped, with the reason
        log.warning("ignoring unreadable checkpoint %s: %s", path, exc)
        return None
