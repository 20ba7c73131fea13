"""A multi-head job (``deeploc-train heads=[...]``): train the heads on one stream of batches, test them, and write
each head's run directory exactly as its single run would.

* The job's folder holds its log, its lock, ``heads.json`` and, while it runs, its checkpoint of every head
  (``checkpoints/last.ckpt``, ``requeue.ckpt`` on a scheduler's signal), from which it resumes at an epoch boundary.
* A finished head is skipped (``if_finished`` as for its single run); a head whose run directory holds an unfinished
  single run's checkpoints starts over (the log says so). The job's folder and every head's are locked.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from deeploc.config import to_primitive
from deeploc.errors import ConfigError, DeeplocError, deeploc_error
from deeploc.io import write_json_atomic
from deeploc.multihead.callbacks import HeadCheckpoint, HeadLoggers, HeadsBook, JobRequeue
from deeploc.multihead.heads import Head, check_run_folders, compose_heads
from deeploc.multihead.module import MultiHeadModule
from deeploc.runs.checkpoint_io import checkpoint_step
from deeploc.runs.checkpoints import check_checkpoint_digest
from deeploc.runs.rundir import RunDir
from deeploc.training import steps
from deeploc.training.callbacks import EpochSummary, PredictionPanel
from deeploc.training.cluster import is_first_process
from deeploc.training.interrupts import stop_on_sigterm
from deeploc.training.loggers import build_loggers, continue_history
from deeploc.training.results import finish_runs, run_results
from deeploc.training.run import serve_features
from deeploc.training.test_maps import TestMaps

__all__ = ["train_heads"]

log = logging.getLogger("deeploc.multihead")


def train_heads(cfg: DictConfig) -> dict[str, Any]:
    """Train and test the heads of ``cfg.heads``; returns ``{"heads": {name: the head's metrics.json}}``."""

    if cfg.trainer.get("fast_dev_run"):
        raise ConfigError(
            "trainer.fast_dev_run debugs one run: drop heads and give the head to debug, e.g. "
            "deeploc-train arch=<head> trainer.fast_dev_run=1"
        )
    if cfg.trainer.get("gradient_clip_val"):
        raise ConfigError(
            "trainer.gradient_clip_val with heads: the clipping norm would mix the gradients of all heads, so no head "
            "would train as in its own run; train the heads one by one (deeploc-train -m arch=...) to clip gradients"
        )
    adapt = cfg.encoder.get("adapt", "frozen")
    if adapt != "frozen":  # the heads share one encoder pass: each head would need its own adapted encoder
        raise ConfigError(
            f"encoder.adapt={adapt}: a multi-head job shares one frozen encoder pass among its heads, so it cannot "
            "adapt the encoder; train adapted runs one by one (drop heads=, or set encoder.adapt=frozen)"
        )
    heads = compose_heads(cfg, HydraConfig.get())
    job = steps.run_directory(cfg)
    check_run_folders(heads, job.path)
    with contextlib.ExitStack() as locks:
        if is_first_process():  # the other DDP ranks belong to the same job
            for run in [job, *(head.run for head in heads)]:
                run.path.mkdir(parents=True, exist_ok=True)
                locks.enter_context(steps.run_lock(run))
        return _train_heads_in(job, cfg, heads)


def _train_heads_in(job: RunDir, cfg: DictConfig, heads: list[Head]) -> dict[str, Any]:

    previous = {head.name: head.run.read_metrics() for head in heads}
    decisions = {}
    for head in heads:
        steps.check_run_inputs(head.run, head.cfg)
        decisions[head.name] = steps.reuse_decision(head.run, head.cfg)
    active = [head for head in heads if decisions[head.name] != "skip"]
    _write_summary(job, heads, decisions)
    if not active:
        log.info("every head of this job has finished already; nothing to do")
        return {"heads": previous}
    training = [head for head in active if decisions[head.name] == "train"]
    log.info(
        "multi-head job: %d head(s) train together (%s)%s", len(training), ", ".join(h.name for h in training),
        "".join(f"; {h.name} is re-tested" for h in active if decisions[h.name] == "eval"),
    )  # fmt: skip

    L.seed_everything(cfg.seed, workers=True)
    modules = _build_heads(cfg, active)  # first: a head that cannot be built fails before any other work
    steps.write_resolved_config(job, cfg)
    for head in active:
        head.write_hydra_files()
        steps.write_resolved_config(head.run, head.cfg)
    datamodule = steps.build_datamodule(cfg)
    resume = _resume_point(cfg, job, training)
    loggers = {head.name: build_loggers(_logger_configs(head.cfg)) for head in active}
    step = checkpoint_step(resume) if resume else 0
    for head in training:  # earlier attempts' logs are kept up to the step training continues from
        continue_history(loggers[head.name], step)
    for head in active:
        for logger in loggers[head.name]:
            logger.log_hyperparams(to_primitive(head.cfg))
    try:
        return _fit_and_test(job, cfg, datamodule, active, training, modules, loggers, resume, previous)
    finally:
        _finish_loggers(loggers)


def _fit_and_test(
    job: RunDir,
    cfg: DictConfig,
    datamodule: Any,
    active: list[Head],
    training: list[Head],
    modules: dict[str, Any],
    loggers: dict[str, list[Any]],
    resume: str | None,
    previous: Mapping[str, Any],
) -> dict[str, Any]:

    fitted = MultiHeadModule({head.name: modules[head.name] for head in training}) if training else None
    callbacks = _callbacks(cfg, job, training, loggers)
    hparams = {head.name: modules[head.name].hparams_initial for head in active}
    trainer = steps.build_trainer(cfg, callbacks, [HeadLoggers(loggers, hparams)])
    tested = MultiHeadModule({head.name: modules[head.name] for head in active})
    features = serve_features(cfg, datamodule, tested.encoder, tested.maps)
    if fitted is not None:
        if resume:
            log.info("resuming the heads from %s", resume)
        with stop_on_sigterm(
            trainer, f"multi-head job {job.path}", f"the same command resumes it from {job.checkpoints}"
        ):
            trainer.fit(fitted, datamodule=datamodule, ckpt_path=resume)
        if trainer.interrupted:
            raise KeyboardInterrupt(f"training interrupted; re-run the same command to resume from {job.checkpoints}")
    best = {head.name: head.run.model_checkpoint_after_training() for head in active}
    for head in active:
        if head not in training:  # a finished run re-tested: its checkpoint must be the one it finished with
            check_checkpoint_digest(head.run.path, best[head.name])
        _load_weights(modules[head.name], best[head.name])
    tested.test_maps = TestMaps(cfg.overlays)  # the overlays' maps, kept as the test computes them
    trainer.test(tested, datamodule=datamodule, verbose=False)
    results = {
        head.name: run_results(
            head.cfg,
            datamodule,
            modules[head.name],
            head.run,
            best[head.name],
            features,
            previous[head.name],
            _training_summary(trainer, fitted, head.name) if head in training else None,
        )
        for head in active
    }
    if trainer.is_global_zero:
        models = [modules[head.name] for head in active]
        finish_runs(
            models, datamodule, [head.run for head in active], list(results.values()), cfg.overlays, tested.test_maps
        )
        shutil.rmtree(job.checkpoints, ignore_errors=True)  # every head is finished: nothing left to resume
        _write_summary(job, active, dict.fromkeys((h.name for h in active), "finished"))
    return {"heads": {**{k: v for k, v in previous.items() if v is not None}, **results}}


def _build_heads(cfg: DictConfig, heads: Sequence[Head]) -> dict[str, Any]:
    """Each head's LocalizationModule, built as its single run builds it, on one shared encoder."""

    encoder = instantiate(cfg.encoder)
    modules = {}
    for head in heads:
        try:
            modules[head.name] = steps.build_model(head.cfg, encoder=encoder)
        except Exception as exc:  # e.g. a decoder reading a map this encoder does not have: say which head
            cause = deeploc_error(exc)
            if not isinstance(cause, DeeplocError):
                raise
            raise type(cause)(f"head {head.name}: {cause}") from None
    return modules


def _resume_point(cfg: DictConfig, job: RunDir, training: Sequence[Head]) -> str | None:
    """The job checkpoint the heads continue from, if any. Without one, heads whose run directories hold an
    unfinished run's checkpoints start over (the job cannot continue another run's epochs with the others)."""
    names = [head.name for head in training]
    found = job.resume_checkpoint() if cfg.resume and training else None
    if found is not None:
        meta = torch.load(found, map_location="cpu", weights_only=True, mmap=True).get("deeploc") or {}
        if meta.get("heads") == names:
            return str(found)
        log.warning(
            "the job checkpoint %s holds heads %s, this job trains %s: the heads start over", found, meta.get("heads"),
            names,
        )  # fmt: skip
    for head in training:
        if head.run.resume_candidates():
            log.warning(
                "head %s: %s holds checkpoints of an unfinished run; the job trains the head from the start with the "
                "others (deeploc-train %s would continue that run instead)",
                head.name, head.run.path, " ".join(head.overrides),
            )  # fmt: skip
            shutil.rmtree(head.run.checkpoints, ignore_errors=True)
            for stale in head.run.path.glob("hpc_ckpt_*.ckpt"):
                stale.unlink()
    shutil.rmtree(job.checkpoints, ignore_errors=True)
    return None


def _callbacks(cfg: DictConfig, job: RunDir, training: Sequence[Head], loggers: Mapping[str, Any]) -> list[Any]:
    """The job's callbacks: the configured ones that do not belong to a run (progress bar...), the heads' book (best
    values, epoch lines, W&B panels), each head's checkpoints, and the job's own checkpoint (last, so that it
    records the heads' checkpoint states of the epoch)."""
    configured = [instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node is not None]
    per_run = (PredictionPanel, EpochSummary, ModelCheckpoint)
    panels = next((c for c in configured if isinstance(c, PredictionPanel)), None)
    epoch_lines = any(isinstance(c, EpochSummary) for c in configured)
    book = HeadsBook([head.name for head in training], loggers, panels, epoch_lines)
    checkpoints = [
        HeadCheckpoint(head.name, single.state_key, **OmegaConf.to_container(node, resolve=True))
        for head in training
        for node in (head.cfg.get("callbacks") or {}).values()
        if node is not None and isinstance(single := instantiate(node), ModelCheckpoint)
    ]
    job_last = ModelCheckpoint(
        dirpath=str(job.checkpoints), filename="last", monitor=None, save_top_k=1, every_n_epochs=1,
        enable_version_counter=False,
    )  # fmt: skip
    shared = [c for c in configured if not isinstance(c, per_run)]
    return [*shared, book, JobRequeue(job.checkpoints), *checkpoints, job_last]


def _logger_configs(cfg: DictConfig) -> dict[str, Any]:
    """A head's ``logger`` configs; W&B runs are created side by side (one per head) instead of reusing the
    process's current run."""
    configs = OmegaConf.to_container(cfg.get("logger") or {}, resolve=True)
    for node in configs.values():
        if isinstance(node, dict) and str(node.get("_target_", "")).endswith("WandbLogger"):
            node["reinit"] = "create_new"
    return configs


def _finish_loggers(loggers: Mapping[str, Sequence[Any]]) -> None:
    """Close every head's W&B run (each was created on its own, so ``wandb.finish()`` would not reach it)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in (lg for lgs in loggers.values() for lg in lgs):
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            try:
                logger._experiment.finish()
            except Exception as exc:  # W&B trouble never ends the work (e.g. a full disk)
                log.warning("W&B could not finish a head's run (%s); its offline files may be incomplete", exc)


def _load_weights(module: Any, path: Path) -> None:
    """Load a head's checkpoint into its module, as Lightning's ``trainer.test(ckpt_path=...)`` does for a single
    run (the module's load hook checks that the checkpoint is this decoder's, on this encoder)."""
    checkpoint = torch.load(path, map_location=module.device, weights_only=True)
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"], strict=False)


def _training_summary(trainer: L.Trainer, fitted: MultiHeadModule, name: str) -> tuple[Any, dict[str, float], int]:
    """(best val IoU, best value of each validation metric, epochs trained) of head ``name``."""
    scores = [
        float(c.best_model_score)
        for c in trainer.callbacks
        if isinstance(c, HeadCheckpoint) and c.head == name and c.monitor and c.best_model_score is not None
    ]
    book = next(c for c in trainer.callbacks if isinstance(c, HeadsBook))
    stopped = fitted.stopped.get(name)
    return (
        (scores[-1] if scores else None),
        dict(book.best[name].best),
        (trainer.current_epoch if stopped is None else stopped + 1),
    )


def _write_summary(job: RunDir, heads: Sequence[Head], status: Mapping[str, str]) -> None:
    """``<job>/heads.json``: the job's heads, their single-run commands and run directories, and what became of
    them."""
    write_json_atomic(
        job.heads_file,
        {
            "heads": {
                head.name: {"run": str(head.run.path), "overrides": head.overrides, "status": status[head.name]}
                for head in heads
            }
        },
    )
