"""One training run (``deeploc-train`` without ``heads``): train one decoder, test it on every test subset, write the
run's results.

* Settings are checked before any work (:mod:`deeploc.training.settings`); the run directory is found, locked and
  reused as :mod:`deeploc.training.steps` says (skip a finished run, resume an interrupted one).
* ``metrics.json`` is written last: a run directory without it is unfinished, whatever else it holds, and the next
  run resumes from its checkpoint or starts from scratch.
* ``trainer.fast_dev_run`` runs a debug pass and writes no checkpoint, metrics.json, overlays or resolved config
  (``debug=fdr`` also turns the loggers and log file off: nothing is kept). Other debug presets: conf/debug.
* The value returned to Hydra (for sweepers such as Optuna) is the best validation value of ``optimized_metric``
  over the run, never a test score.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig

from deeploc.config import to_primitive
from deeploc.runs.checkpoint_io import checkpoint_step
from deeploc.runs.checkpoints import check_checkpoint_digest
from deeploc.runs.rundir import RunDir
from deeploc.training.cluster import is_first_process
from deeploc.training.components import TrainingDiverged
from deeploc.training.interrupts import stop_on_sigterm
from deeploc.training.loggers import continue_history, finish_wandb
from deeploc.training.results import best_score, best_values, diverged_results, finish_runs, run_results
from deeploc.training.steps import (
    build_datamodule,
    build_model,
    build_trainer,
    check_run_inputs,
    foreign_checkpoint_refused,
    is_debug_pass,
    resume_path,
    reuse_decision,
    run_directory,
    run_lock,
    write_resolved_config,
)
from deeploc.training.test_maps import TestMaps

log = logging.getLogger("deeploc.training.run")


def extraction_device(cfg: DictConfig) -> str:
    """Where the frozen encoder computes features: the GPU when there is one and the trainer may use it."""
    wants_gpu = cfg.trainer.get("accelerator") in ("auto", "gpu", "cuda")
    return "cuda" if torch.cuda.is_available() and wants_gpu else "cpu"


def serve_features(cfg: DictConfig, datamodule: Any, encoder: Any, names: Sequence[str]) -> str:
    """Serve the encoder maps ``names`` as :func:`deeploc.features.serving.serve` decides from the run's settings;
    returns how they are served: ``"cache"`` (the data module's datasets read the filled cache) or ``"stream"`` (the
    encoder runs on every batch)."""
    from deeploc.features.serving import serve

    cache = serve(
        cfg.features.mode,
        encoder,
        names,
        datamodule.plan.all_samples(),
        cfg.features.dir,
        extraction_device(cfg),
        augment=to_primitive(cfg.data.get("augment")),
        batch_size=cfg.features.batch_size,
        debug_batches=int(cfg.trainer.get("fast_dev_run") or 0),
    )
    if cache is None:
        return "stream"
    datamodule.set_dataset_factory(lambda samples, stage: cache.dataset(samples))
    return "cache"


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train and test one configuration (settings already checked); returns the content of the run's
    metrics.json. However it ends, this job's W&B run is finished with it (failed when the job failed), so the next
    job of a sweep starts its own instead of logging into this one."""
    run = run_directory(cfg)
    failed = True
    try:
        # Only the first process of a job locks: the other DDP ranks belong to the same run.
        with run_lock(run) if is_first_process() else contextlib.nullcontext():
            results = _train_in(run, cfg)
        failed = False
    finally:
        finish_wandb(failed)
    if is_debug_pass(cfg) and is_first_process():
        _remove_if_empty(run)
    return results


def _remove_if_empty(run: RunDir) -> None:
    """A debug pass keeps no files: a run folder holding nothing but its lock (Hydra creates the folder; with
    ``debug=fdr`` nothing else writes there) is removed. Any other folder, e.g. a real run's, is left as it is."""
    if not run.path.is_dir() or list(run.path.iterdir()) != [run.lock_file]:
        return
    run.lock_file.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        run.path.rmdir()


def _train_in(run: RunDir, cfg: DictConfig) -> dict[str, Any]:
    debug = is_debug_pass(cfg)
    previous = None if debug else run.read_metrics()
    if not debug:
        check_run_inputs(run, cfg)
    decision = "train" if debug else reuse_decision(run, cfg)
    if decision == "skip":
        return previous

    L.seed_everything(cfg.seed, workers=True)
    if debug:  # a debug pass keeps no files; pointed at a real run, it must not overwrite its config
        run.path.mkdir(parents=True, exist_ok=True)
    else:
        write_resolved_config(run, cfg)
    # Data first: a bad dataset fails before loggers create anything in the run directory; then the Trainer, so
    # Lightning checks its settings (and W&B starts) before the encoder runs over the data.
    datamodule = build_datamodule(cfg)
    trainer = build_trainer(cfg)
    model = build_model(cfg)
    features = serve_features(cfg, datamodule, model.encoder, model.decoder.inputs)
    evaluate_only = decision == "eval"
    resume = None if evaluate_only or debug else resume_path(cfg, run)
    if not evaluate_only:  # earlier attempts' logs are kept up to the step training continues from
        continue_history(trainer.loggers, checkpoint_step(resume) if resume else 0)
    for logger in trainer.loggers:
        logger.log_hyperparams(to_primitive(cfg))
    resumes = f"the same command resumes the run from {run.last_checkpoint}" if not debug else "nothing was kept"
    with stop_on_sigterm(trainer, f"run {run.path}", resumes):
        if not evaluate_only:
            if resume:
                log.info("resuming from %s", resume)
            try:
                with foreign_checkpoint_refused(run, resume):
                    trainer.fit(model, datamodule=datamodule, ckpt_path=resume)
            except TrainingDiverged as exc:
                if not debug and trainer.is_global_zero:
                    run.write_metrics(diverged_results(cfg, datamodule, model, str(exc), trainer.current_epoch))
                raise
            if trainer.interrupted:
                raise KeyboardInterrupt(
                    f"training interrupted; re-run the same command to resume from {run.last_checkpoint}"
                )
        return _test(cfg, run, trainer, model, datamodule, features, previous, evaluate_only, debug)


def _test(
    cfg: DictConfig,
    run: RunDir,
    trainer: L.Trainer,
    model: Any,
    datamodule: Any,
    features: str,
    previous: dict[str, Any] | None,
    evaluate_only: bool,
    debug: bool,
) -> dict[str, Any]:
    """Test the best checkpoint (the in-memory model of a debug pass) and write the run's results."""
    if debug:
        return _debug_results(cfg, trainer, model, datamodule)
    best = run.model_checkpoint_after_training()
    if evaluate_only:  # the decoder/encoder fit is checked when Lightning loads it (module.on_load_checkpoint)
        check_checkpoint_digest(run.path, best)
    # Before testing: Lightning restores the callbacks' states from the checkpoint it tests (the best epoch's).
    training = None if evaluate_only else (best_score(trainer), best_values(trainer), trainer.current_epoch)
    model.test_maps = TestMaps(cfg.overlays)  # the overlays' maps, kept as the test computes them
    with foreign_checkpoint_refused(run, best):
        trainer.test(model, datamodule=datamodule, ckpt_path=str(best), verbose=False)
    metrics = run_results(cfg, datamodule, model, run, best, features, previous, training)
    if trainer.is_global_zero:
        finish_runs([model], datamodule, [run], [metrics], cfg.overlays, model.test_maps)
    return metrics


def _debug_results(cfg: DictConfig, trainer: L.Trainer, model: Any, datamodule: Any) -> dict[str, Any]:
    """Test the in-memory model of a ``trainer.fast_dev_run`` pass; nothing is written (no checkpoint exists)."""
    trainer.test(model, datamodule=datamodule, verbose=False)
    scores = ", ".join(f"{subset} {s['iou']:.2f}" for subset, s in model.test_results.items())
    log.warning(
        "fast_dev_run=%s: a debug pass (%s batch(es) per loop); nothing saved (no checkpoint, metrics.json or "
        "overlays). Test IoU (%%): %s",
        cfg.trainer.fast_dev_run, int(cfg.trainer.fast_dev_run), scores,
    )  # fmt: skip
    return {"test": model.test_results, "best_val": best_values(trainer), "status": "fast_dev_run"}
