"""A run directory: where its checkpoints and results live, and whether it has finished."""

from __future__ import annotations

import json
import math
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
    """Write strict JSON through a temporary file in the same folder and rename it into place.

    NaN and +-inf (an undefined score, e.g. trufor's AP when every mask is empty) become ``null``: JSON has no
    such numbers, and strict readers (jq, JavaScript, many JSON libraries) reject Python's bare ``NaN``. The
    counts of undefined cases next to the means say why a value is null. On any error nothing is replaced
    and no temporary file stays behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(_finite_or_null(payload), handle, indent=2, sort_keys=False, allow_nan=False)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _finite_or_null(value: Any) -> Any:
    """A copy of a JSON-like value with every non-finite float replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return value
