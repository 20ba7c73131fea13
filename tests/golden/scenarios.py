"""The golden scenarios: tiny real jobs through deeploc's command-line entry points, and what each one records.

Every scenario runs the real CLI in a subprocess (``python -m <module>``, :data:`ENTRY`) on the tiny generated data
of tests/e2e.py with the ``micro`` SAM2 encoder (``clip_micro`` for the CLIP scenario), random weights. All of them
share one data root and one feature cache (the cache's content is the same whatever order the scenarios fill it in:
each image's maps do not depend on which other images or maps are computed with it).

What a scenario records (:func:`run_record`, :func:`eval_record`), as a flat ``{key: value}`` dict per part:

* ``numbers``: every number of metrics.json (but its ``config`` summary and file digests), of the per-epoch CSV log
  (``csv/metrics.csv``), of eval.json / detection.json / robustness.json and of image_scores.csv (per image);
  exact floats (JSON's repr round-trips exactly);
* ``checkpoints``: per checkpoint, the sha256 of its state dict (tensor names, dtypes, shapes and raw bytes, sorted
  by name; not the file's bytes, which hold paths and timestamps) and its epoch and global step;
* ``overlays``: per overlay PNG, the sha256 of its decoded pixel array (kept apart: overlays may be redesigned on
  purpose, and then only their golden test is re-recorded).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import platform
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from tests.e2e import TINY_DATA, run_cli

# The console entry points, by role -> the module `python -m` runs. THE one place to change when they move.
ENTRY = {
    "train": "deeploc.cli.train",
    "eval": "deeploc.cli.evaluate",
}

GOLDEN_FILE = Path(__file__).with_name("golden.json")

# Every training scenario: 2 epochs, CSV logs only, one overlay per test subset, the feature cache (not features=auto,
# whose choice depends on the free disk: streamed maps are not rounded to fp16 and would give other numbers).
COMMON = ("trainer.max_epochs=2", "logger=csv", "overlays=1", "features=cache")
HEADS = ("conv4", "fusion", "linear")
CLIP = ("encoder=clip_micro", "encoder.image_size=112", "decoder=conv4", "feature=layer20")
PERTURB = ("jpeg=90", "resize=0.5")


# ----------------------------------------------------------------------------------------------------- digests
def state_dict_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors of a state dict, sorted by name: name, dtype, shape, raw bytes."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def pixels_digest(path: Path) -> str:
    """sha256 of an image's decoded pixels (shape, dtype, bytes): the PNG file's metadata and compression do not count."""
    with Image.open(path) as image:
        array = np.asarray(image)
    return hashlib.sha256(f"{array.shape}|{array.dtype}|".encode() + array.tobytes()).hexdigest()


# ----------------------------------------------------------------------------------------------------- numbers
def numbers_of(value: Any, prefix: str, skip: tuple[str, ...] = ()) -> dict[str, float]:
    """Every number in a JSON value, by its key path (``prefix/key/key...``); top-level keys in ``skip`` left out."""
    found: dict[str, float] = {}
    if isinstance(value, bool):
        return found
    if isinstance(value, int | float):
        found[prefix] = float(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            if key not in skip:
                found.update(numbers_of(item, f"{prefix}/{key}"))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found.update(numbers_of(item, f"{prefix}[{index}]"))
    return found


def csv_numbers(path: Path, prefix: str, row_key: Callable[[dict[str, str]], str], skip: tuple[str, ...]) -> dict:
    """Every numeric cell of a CSV file as ``prefix/<row_key(row)>/<column>`` (columns in ``skip`` left out)."""
    found: dict[str, float] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            for column, cell in row.items():
                if column in skip or cell in ("", None):
                    continue
                key = f"{prefix}/{row_key(row)}/{column}"
                assert key not in found, f"{path}: two values for {key}"
                found[key] = float(cell)
    return found


# ----------------------------------------------------------------------------------------------------- records
def run_record(run: Path) -> dict[str, dict[str, Any]]:
    """What a finished training run directory holds that its training determined."""
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "finished", run
    numbers = numbers_of(metrics, "metrics.json", skip=("config", "checkpoint_sha256"))
    # Lightning's CSV log: one row per logging call; the columns of one epoch never repeat across its rows.
    numbers |= csv_numbers(
        run / "csv" / "metrics.csv", "csv/metrics.csv", lambda row: f"epoch={row['epoch']}", ("epoch", "step")
    )
    checkpoints: dict[str, Any] = {}
    for path in sorted((run / "checkpoints").glob("*.ckpt")):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        checkpoints[f"{path.name}/state_dict"] = state_dict_digest(checkpoint["state_dict"])
        checkpoints[f"{path.name}/epoch"] = checkpoint["epoch"]
        checkpoints[f"{path.name}/global_step"] = checkpoint["global_step"]
    overlays = {str(p.relative_to(run)): pixels_digest(p) for p in sorted(run.glob("overlays/*/*.png"))}
    assert checkpoints and overlays, f"{run}: no checkpoint or no overlay"
    return {"numbers": numbers, "checkpoints": checkpoints, "overlays": overlays}


def eval_record(out: Path) -> dict[str, dict[str, Any]]:
    """The numbers of a deeploc-eval output folder (its JSON files and per-image scores)."""
    numbers: dict[str, float] = {}
    for name in ("eval.json", "detection.json", "robustness.json"):
        if (out / name).is_file():
            numbers |= numbers_of(json.loads((out / name).read_text()), name)
    if (out / "image_scores.csv").is_file():
        numbers |= csv_numbers(
            out / "image_scores.csv",
            "image_scores.csv",
            lambda row: f"{row['subset']}/{row['split']}/{row['name']}",
            ("subset", "split", "name"),
        )
    return {"numbers": numbers, "checkpoints": {}, "overlays": {}}


def merge(records: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Several runs' records as one scenario record, each key prefixed by its run's label."""
    merged: dict[str, dict[str, Any]] = {"numbers": {}, "checkpoints": {}, "overlays": {}}
    for label, record in records.items():
        for part, values in record.items():
            merged[part].update({f"{label}/{key}": value for key, value in values.items()})
    return merged


# --------------------------------------------------------------------------------------------------- scenarios
@dataclass
class Context:
    """One recording session: the shared data root and feature cache, one working folder per scenario, and
    what the finished scenarios left (run directories other scenarios use: the eval scenario's model)."""

    root: Path
    runs: dict[str, Path] = field(default_factory=dict)

    @property
    def data(self) -> Path:
        return self.root / "shared" / "data"

    @property
    def features(self) -> Path:
        return self.root / "shared" / "features"

    def workdir(self, scenario: str) -> Path:
        folder = self.root / scenario
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def tiny(self, *overrides: str, encoder: bool = True) -> list[str]:
        """The shared tiny data and cache (tests/e2e.py's TINY_DATA; without its encoder=micro for other encoders)."""
        data = [arg for arg in TINY_DATA if encoder or not arg.startswith("encoder=")]
        return [f"data.root={self.data}", f"features.dir={self.features}", *data, *overrides]


def _single(ctx: Context, name: str, *overrides: str, encoder: bool = True) -> dict[str, dict[str, Any]]:
    """One ``deeploc-train`` run in its own run directory."""
    run = ctx.workdir(name) / "run"
    run_cli(ENTRY["train"], ctx.tiny(*COMMON, *overrides, f"hydra.run.dir={run}", encoder=encoder), run.parent)
    ctx.runs[name] = run
    return run_record(run)


def _finished_runs(sweep: Path) -> list[Path]:
    return sorted(p.parent for p in sweep.glob("*/metrics.json"))


def conv4_high_res_feats_1(ctx: Context) -> dict:
    return _single(ctx, "conv4_high_res_feats_1", "arch=conv4_high_res_feats_1")


def conv12_image_embed(ctx: Context) -> dict:
    return _single(ctx, "conv12_image_embed", "arch=conv12_image_embed")


def fusion(ctx: Context) -> dict:
    """The fusion decoder on every map of the encoder (``feature`` is not read)."""
    return _single(ctx, "fusion", "decoder=fusion")


def linear(ctx: Context) -> dict:
    """The linear probe on the map ``feature`` names."""
    return _single(ctx, "linear", "decoder=linear", "feature=high_res_feats_0")


def multihead(ctx: Context) -> dict:
    """``deeploc-train -m heads=[conv4,fusion,linear]``: each head's run directory (tests/test_multihead.py's
    tiny form: image_embed, split=in_domain)."""
    work = ctx.workdir("multihead")
    heads = f"heads=[{','.join(HEADS)}]"
    run_cli(ENTRY["train"], ["-m", *ctx.tiny(*COMMON, heads, "feature=image_embed", "split=in_domain")], work)
    (summary,) = (work / "outputs" / "sweeps" / "train").glob("*/heads.json")  # the job's: its heads' run dirs
    heads = json.loads(summary.read_text())["heads"]
    assert list(heads) == list(HEADS), f"heads: {list(heads)}"
    return merge({name: run_record(Path(head["run"])) for name, head in heads.items()})


def clip(ctx: Context) -> dict:
    """CONV-4 on layer 20 of ``clip_micro`` at 112 px (tests/test_clip_e2e.py's overrides)."""
    return _single(ctx, "clip", *CLIP, encoder=False)


def optuna(ctx: Context) -> dict:
    """One trial of ``deeploc-train -m hparams_search=optuna`` (the seeded sampler's first proposal, 1 epoch);
    the trial's run and the values of best_trial.yaml (the paths in it left out)."""
    work = ctx.workdir("optuna")
    tiny = [arg for arg in ctx.tiny() if not arg.startswith("data.batch_size=")]  # the search samples it
    args = ["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=1", *tiny]
    args += ["trainer.max_epochs=1", "logger=csv", "overlays=1", "features=cache"]
    run_cli(ENTRY["train"], args, work)
    sweep = work / "outputs" / "sweeps" / "optuna"
    (run,) = _finished_runs(sweep)
    best = yaml.safe_load((sweep / "best_trial.yaml").read_text())
    record = merge({"trial": run_record(run)})
    record["numbers"] |= numbers_of(best, "best_trial.yaml", skip=("run_dir", "command", "overrides"))
    # The trial's overrides (the sampled settings among them) are recorded too, without the paths.
    record["settings"] = {
        "best_trial.yaml/direction": best["direction"],
        "best_trial.yaml/overrides": ",".join(
            line for line in best["overrides"] if not line.startswith(("data.root=", "features.dir="))
        ),
    }
    return record


def evaluation(ctx: Context) -> dict:
    """``deeploc-eval --real --perturb jpeg=90 resize=0.5`` on the CONV-4 run (the encoder on the fly)."""
    run = ctx.runs["conv4_high_res_feats_1"]
    out = ctx.workdir("eval") / "out"
    args = [str(run), "--real", "--perturb", *PERTURB, "--device", "cpu", "--batch-size", "8", "--out", str(out)]
    run_cli(ENTRY["eval"], args, out.parent)
    return eval_record(out)


@dataclass(frozen=True)
class Scenario:
    name: str
    record: Callable[[Context], dict]
    needs: tuple[str, ...] = ()
    slow: bool = False  # left out of the default test suite (pytest -m "" runs it)


# Every scenario is in the default suite: all eight take about 65 s on an idle 2-core machine (6-10 s each). Should
# that grow, mark the costlier ones slow, but keep both CONV-N runs, the multi-head job and the CLIP run.


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("conv4_high_res_feats_1", conv4_high_res_feats_1),
        Scenario("conv12_image_embed", conv12_image_embed),
        Scenario("fusion", fusion),
        Scenario("linear", linear),
        Scenario("multihead", multihead),
        Scenario("clip", clip),
        Scenario("optuna", optuna),
        Scenario("eval", evaluation, needs=("conv4_high_res_feats_1",)),
    )
}


class Session:
    """Runs scenarios on demand, each at most once, the ones it needs first; keeps their records and timings."""

    def __init__(self, root: Path) -> None:
        self.context = Context(root)
        self.records: dict[str, dict] = {}
        self.seconds: dict[str, float] = {}  # wall time
        self.cpu_seconds: dict[str, float] = {}  # CPU time of the subprocesses (user + system)

        self.failed: dict[str, BaseException] = {}

    def record(self, name: str) -> dict:
        if name in self.failed:  # a failed scenario is not run again for the next test that asks for it
            raise RuntimeError(f"scenario {name!r} failed earlier in this session") from self.failed[name]
        if name not in self.records:
            try:
                for needed in SCENARIOS[name].needs:
                    self.record(needed)
                start, cpu = time.perf_counter(), _children_cpu()
                self.records[name] = SCENARIOS[name].record(self.context)
            except BaseException as exc:
                self.failed[name] = exc
                raise
            self.seconds[name] = time.perf_counter() - start
            self.cpu_seconds[name] = _children_cpu() - cpu
        return self.records[name]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def environment() -> dict[str, str]:
    """Where the numbers were recorded: bit-identical numbers are expected on the same machine type and libraries."""
    import lightning

    cpu = next(
        (line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), platform.processor()
    )
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "numpy": np.__version__,
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": str(torch.get_num_threads()),
    }


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def same(a: Any, b: Any) -> bool:
    """Exact equality; floats by their bits (NaN equals NaN, -0.0 differs from 0.0)."""
    if isinstance(a, float) and isinstance(b, float):
        return a.hex() == b.hex() or (math.isnan(a) and math.isnan(b))
    return a == b
