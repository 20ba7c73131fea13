"""The steps of a training run that single runs (:mod:`deeploc.training.run`) and multi-head jobs
(:mod:`deeploc.multihead.job`) share: building the model, data module, callbacks and trainer; finding, locking and
reusing the run directory.

Run directories are derived from the overrides (:mod:`deeploc.runs.naming`), so re-running a command finds its earlier
work: a finished run is skipped (``if_finished=eval`` re-tests its best checkpoint, ``retrain`` starts over in
place) and an interrupted one resumes from ``checkpoints/last.ckpt``. One process at a time works in a run directory:
it holds ``<run>/.lock`` (``fcntl.flock``, released by the kernel when the process ends, however it ends); a second
command on the same directory is refused, naming the first one's pid.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from deeploc.errors import ConfigError
from deeploc.metrics import (
    check_conventions,
    optimized_metrics,
    recorded_convention,
)
from deeploc.runs.naming import changed_inputs
from deeploc.runs.rundir import RunDir
from deeploc.training import cluster
from deeploc.training.callbacks import BestValidation
from deeploc.training.loggers import build_loggers

log = logging.getLogger("deeploc.training.run")


def run_directory(cfg: DictConfig) -> RunDir:
    """This job's run directory (Hydra's output dir)."""
    return RunDir(Path(HydraConfig.get().runtime.output_dir))


def is_debug_pass(cfg: DictConfig) -> bool:
    """Whether ``cfg`` is a ``trainer.fast_dev_run`` pass (``debug=fdr``): nothing of it is kept."""
    return bool(cfg.trainer.get("fast_dev_run"))


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draw from torch's CPU generator seeded with ``seed`` alone, and leave the global generator as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_model(cfg: DictConfig, encoder: Any = None) -> Any:
    """The LightningModule: ``conf/encoder`` (or ``encoder``, shared by the heads of a multi-head job) and
    ``conf/decoder`` instantiated by Hydra (``_target_``), handed to ``conf/model``. The decoder node is a factory
    (``_partial_: true``) completed with the encoder's maps. Its initial weights depend on ``seed`` only
    (:func:`seeded`), so a decoder starts from the same weights in a single run and as a head of a multi-head job."""
    encoder = instantiate(cfg.encoder) if encoder is None else encoder
    decoder = instantiate(cfg.decoder)
    with seeded(cfg.seed):
        return instantiate(cfg.model, encoder=encoder, decoder=decoder)


def build_datamodule(cfg: DictConfig) -> Any:
    """The data module, its data generated if configured, indexed and validated (bad files fail here)."""
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The configured callbacks (``conf/callbacks``) plus the best-validation tracker."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks.append(BestValidation(optimized_metrics()))
    return callbacks


def build_trainer(
    cfg: DictConfig, callbacks: list[L.Callback] | None = None, loggers: list[Any] | None = None
) -> L.Trainer:
    """The Lightning Trainer with the configured callbacks and loggers (or those given), plus deeploc.training.cluster's
    requeue-on-signal callback and the cluster environment a SLURM / submitit job needs (docs/cluster.md), writing
    checkpoints atomically in their own folder (deeploc.runs.checkpoint_io)."""
    from deeploc.runs.checkpoint_io import with_atomic_checkpoints

    callbacks = build_callbacks(cfg) if callbacks is None else callbacks
    loggers = build_loggers(cfg.get("logger")) if loggers is None else loggers
    extras = cluster.trainer_extras(cfg.trainer, callbacks)
    extras["plugins"] = with_atomic_checkpoints(extras.get("plugins", []))
    try:
        trainer = instantiate(cfg.trainer, logger=loggers or False, **extras)
    except InstantiationException as exc:
        # Lightning's own checks of its arguments (precision, strategy, accelerator, devices available).
        if isinstance(exc.__cause__, (MisconfigurationException, ValueError)):
            raise ConfigError(f"Lightning refused the trainer settings (trainer.*): {exc.__cause__}") from exc
        raise
    cluster.check_launch(trainer)
    return trainer


def resume_path(cfg: DictConfig, run: RunDir) -> str | None:
    """The checkpoint an interrupted run continues from, if any (``resume=false`` ignores it): the most advanced of
    ``checkpoints/last.ckpt`` and the requeue / HPC checkpoints written when a cluster job was signalled."""
    newest = run.resume_checkpoint() if cfg.resume else None
    return None if newest is None else str(newest)


def run_lock(run: RunDir) -> contextlib.AbstractContextManager[Any]:
    """The exclusive lock of a run directory (a second process on it is refused, naming the holder)."""
    from deeploc.locks import exclusive_or_fail

    return exclusive_or_fail(
        run.lock_file,
        f"run directory {run.path}",
        fix="wait for it to finish, or stop it; the same command then resumes the run",
    )


def reuse_decision(run: RunDir, cfg: DictConfig) -> str:
    """What this launch does with the run directory: ``"skip"`` a finished run (logged), ``"eval"`` (re-test a
    finished run's best checkpoint) or ``"train"`` (start, resume, or start over a finished run whose results were
    removed for ``if_finished=retrain``)."""
    if not run.finished:
        return "train"
    if cfg.if_finished == "skip":
        previous = run.read_metrics()
        log.info("run %s already finished; skipping (if_finished=eval re-tests, =retrain starts over)", run.path)
        asked = check_conventions(cfg.metrics.get("conventions") or cfg.metrics.convention)
        recorded = tuple(previous.get("conventions") or [recorded_convention(previous, str(run.metrics_file))])
        if recorded != asked:
            log.warning(
                "its scores were computed in metric conventions %s, not %s as asked; they are left as they are: "
                "if_finished=eval re-tests its best checkpoint in %s (or rescore its saved predictions: "
                "deeploc-eval RUN --conventions ...)",
                list(recorded),
                list(asked),
                list(asked),
            )
        return "skip"
    if cfg.if_finished == "retrain":
        # Only a finished run starts over; an interrupted (e.g. requeued) retrain resumes like any other run.
        shutil.rmtree(run.checkpoints, ignore_errors=True)
        for stale in run.path.glob("hpc_ckpt_*.ckpt"):
            stale.unlink()
        run.metrics_file.unlink(missing_ok=True)
        return "train"
    return "eval"


def write_resolved_config(run: RunDir, cfg: DictConfig) -> None:
    """``<run>/config_resolved.yaml``: the run's config with every interpolation resolved."""
    run.path.mkdir(parents=True, exist_ok=True)
    run.resolved_config.write_text(OmegaConf.to_yaml(cfg, resolve=True))


def check_run_inputs(run: RunDir, cfg: DictConfig) -> None:
    """Refuse to continue or skip a run whose directory was made with another EXISTING dataset or checkpoint.

    Run names keep only the last two components of a path (so a moved dataset keeps its runs): two folders with the
    same last components would share a run directory. A run directory without results or checkpoints holds nothing
    to reuse and is never refused.
    """
    earlier = run.resolved_config
    if not earlier.is_file() or not (run.metrics_file.exists() or run.resume_candidates()):
        return
    moved, conflicts = changed_inputs(OmegaConf.load(earlier), cfg)
    for line in moved:
        log.info("the run's input was moved (%s): continuing the run", line)
    if conflicts:
        raise ConfigError(
            f"run directory {run.path} holds a run made with {'; '.join(conflicts)}: both folders exist and have "
            "the same last two path components, so they share a run name. Rename one of them, or give this command "
            "its own directory: hydra.run.dir=/path/to/new/run (in a sweep: hydra.sweep.dir=...)"
        )


@contextlib.contextmanager
def foreign_checkpoint_refused(run: RunDir, checkpoint: str | Path | None) -> Iterator[None]:
    """Name the checkpoint file and how to start over when Lightning loads one this config did not train
    (:class:`deeploc.training.module.IncompatibleCheckpointError`, raised without the file's path)."""
    from deeploc.training.components import IncompatibleCheckpointError

    try:
        yield
    except IncompatibleCheckpointError as exc:
        raise IncompatibleCheckpointError(
            f"{checkpoint}: {exc} To start this run over with the current settings instead, delete {run.checkpoints} "
            "(and metrics.json) and run the same command again, or give it a new folder: hydra.run.dir=/path/to/new/run"
        ) from None
