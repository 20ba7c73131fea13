"""A run directory: where its checkpoints and results live, and whether it has finished."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory (Hydra's output dir of a train job)."""

    path: Path

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints / "best.ckpt"

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
        from deeploc.models.encoder import file_digest

        return {
            path.relative_to(self.path).as_posix(): f"sha256:{file_digest(path)}"
            for path in (self.best_checkpoint, self.last_checkpoint)
            if path.is_file()
        }

    def write_metrics(self, metrics: dict[str, Any]) -> Path:
        """Write metrics.json atomically (a reader never sees half a file)."""
        return write_json_atomic(self.metrics_file, metrics)


def write_json_atomic(path: Path, payload: Any) -> Path:
    """Write JSON through a temporary file in the same folder and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=False)
        handle.write("\n")
    os.replace(tmp, path)
    return path
