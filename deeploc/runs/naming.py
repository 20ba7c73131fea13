"""Names of run directories and evaluation folders: readable, stable, and different for different runs or data.

Run directories (``outputs/runs/<name>``; sweep jobs ``outputs/sweeps/<sweep_name>/<name>``) are named after the
command-line overrides that change what is trained or measured (``conf/hydra/default.yaml`` lists the keys that do
not), so re-running a command finds its earlier work. :func:`run_name`:

* the keys that tell sweep jobs apart come first (:data:`LEADING_KEYS`), then the others in key order;
* a path is replaced by its last component and a digest of its last two components (``data.root=/data/dolos/
  wacv_data`` -> ``data.root=wacv_data-<8 hex>``): a dataset or checkpoint moved elsewhere keeps its runs, a folder of
  the same name in another parent folder gets other runs. A run made with another folder that still exists and
  has the same last two components is refused at start (:func:`changed_inputs`);
* a list value ``[a,b]`` is written ``a+b``; other values longer than :data:`LONG_VALUE` characters keep their
  start and get a digest of the whole value;
* names are shell-safe: characters other than letters, digits and ``_.,=+-`` become ``_`` (no brackets, quotes,
  spaces or ``~``); a name longer than :data:`MAX_NAME` is cut and ends with a digest of the whole name, so it stays
  short enough to read, type and tab-complete.

The full overrides are in ``<run>/.hydra/overrides.yaml`` (written by Hydra for every job). Directories named by
deeploc 0.1 (Hydra's ``override_dirname``) are not looked for.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# The keys that distinguish the jobs of deeploc's sweeps, in the order they lead a name (a debug run says so first;
# a name cut at MAX_NAME keeps them).
LEADING_KEYS = ("debug", "subset_index", "subset", "arch", "heads", "decoder", "feature", "seed")
LONG_VALUE = 32
MAX_NAME = 100
_UNSAFE = re.compile(r"[^A-Za-z0-9_.,=+\-]")
# Settings whose paths identify what a run trains and tests on (refused when a reused run had another folder).
INPUT_KEYS = ("data.root", "encoder.checkpoint")


def digest(text: str, length: int = 8) -> str:
    """A short hex digest of ``text`` (stable across processes and machines)."""
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def safe(text: str) -> str:
    """``text`` with every character that is unsafe in a file name replaced by ``_``."""
    return _UNSAFE.sub("_", text)


def is_path(value: str) -> bool:
    """Whether an override value names a file or folder (contains a path separator or starts with ``~``)."""
    return "/" in value or value.startswith("~")


def path_parts(value: str) -> tuple[str, ...]:
    """The components of a path made absolute against the current folder (``~`` expanded), root excluded."""
    return Path(os.path.abspath(os.path.expanduser(value))).parts[1:]


def short_value(value: str) -> str:
    """How an override value appears in a run name (paths and long values shortened, see the module docstring)."""
    bare = value.strip("'\"")
    if bare.startswith("[") and bare.endswith("]"):
        bare = "+".join(item.strip().strip("'\"") for item in bare[1:-1].split(",") if item.strip())
    if is_path(bare):
        parts = path_parts(bare)
        return f"{parts[-1] if parts else 'root'}-{digest('/'.join(parts[-2:]))}"
    if len(bare) > LONG_VALUE:
        return f"{bare[:16]}-{digest(bare)}"
    return bare


def run_name(overrides: Iterable[str], exclude: Iterable[str] = ()) -> str:
    """A run directory name for a job's override lines (Hydra's ``hydra.overrides.task``), without ``exclude`` keys."""
    excluded = set(exclude)
    items = []
    for line in overrides:
        key, sep, value = str(line).partition("=")
        if override_key(key) in excluded:
            continue
        items.append((override_key(key), key + sep + (short_value(value) if sep else "")))
    if not items:
        return "default"
    rank = {key: i for i, key in enumerate(LEADING_KEYS)}
    items.sort(key=lambda item: (rank.get(item[0], len(rank)), item[0], item[1]))
    name = safe(",".join(text for _, text in items))
    if len(name) > MAX_NAME:
        name = f"{name[: MAX_NAME - 11]}-{digest(name, 10)}"
    return name


def eval_dir_name(root: str | os.PathLike[str], split: str, subsets: Sequence[str], convention: str = "study") -> str:
    """``deeploc-eval``'s output folder name: data folder name, split, metric convention, and a digest of the
    resolved data folder and the subsets, so that evaluations of different data (e.g. two copies named
    ``wacv_data``) or in another convention never share a folder."""
    resolved = Path(root).expanduser().resolve()
    identity = "\n".join([str(resolved), split, *sorted(subsets)])
    return safe(f"{resolved.name}-{split}-{convention}-{digest(identity)}")


def changed_inputs(previous: Any, current: Any, keys: Sequence[str] = INPUT_KEYS) -> tuple[list[str], list[str]]:
    """Compare the input paths of a run directory's earlier config with this command's (both resolved configs).

    Returns ``(moved, conflicts)``: lines for paths that changed because the earlier folder no longer exists (a
    moved dataset or checkpoint: the run continues), and for paths that differ while both exist (another dataset
    or checkpoint whose last two path components are the same: the run must not be reused).
    """
    from omegaconf import OmegaConf

    moved, conflicts = [], []
    for key in keys:
        before, now = (OmegaConf.select(cfg, key, default=None) for cfg in (previous, current))
        if before == now or before is None or now is None:
            continue
        old, new = (Path(os.path.abspath(os.path.expanduser(str(p)))) for p in (before, now))
        if not old.exists():
            moved.append(f"{key}: {old} -> {new}")
        elif not (new.exists() and os.path.samefile(old, new)):
            conflicts.append(f"{key}={old} (the run's) and {key}={new} (this command's)")
    return moved, conflicts


def override_key(line: str) -> str:
    """The config key (or group) an override line sets: ``+decoder.depth=8`` -> ``decoder.depth``; ``~arch`` ->
    ``arch``; ``a@pkg=b`` -> ``a``."""
    return line.split("=", 1)[0].lstrip("+~").split("@", 1)[0]
