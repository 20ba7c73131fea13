"""One training run (the steps of `deeploc-train` and of multi-head jobs): train one decoder, test it on every test subset, write the run's results.

Run directories are derived from the overrides (:mod:`deeploc.runs.naming`), so re-running a command finds its earlier
work: a finished run is skipped (``if_finished=eval`` re-tests its best checkpoint, ``retrain`` starts over in
place) and an interrupted one resumes from ``checkpoints/last.ckpt``.

* Settings are checked before any work (:mod:`deeploc.training.settings`).
* One process at a time works in a run directory: it holds ``<run>/.lock`` (``fcntl.flock``, released by the
  kernel when the process ends, however it ends); a second command on the same directory is refused, naming the
  first one's pid.
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
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from deeploc.config import to_primitive
from deeploc.errors import ConfigError
from deeploc.metrics import (
    check_conventions,
    column_label,
    optimized_metrics,
    recorded_convention,
    reported_specs,
)
from deeploc.metrics.store import PREDICTIONS_DIR, SCORES_DIR, save_predictions, write_per_image
from deeploc.models.encoders import identity_name
from deeploc.runs.checkpoint_io import checkpoint_step
from deeploc.runs.checkpoints import check_checkpoint_digest
from deeploc.runs.naming import changed_inputs
from deeploc.runs.record import RunRecord
from deeploc.runs.rundir import RunDir
from deeploc.training.callbacks import BestValidation
from deeploc.training.loggers import build_loggers, continue_history
from deeploc.training.test_maps import TestMaps

log = logging.getLogger("deeploc.training.run")


def run_directory(cfg: DictConfig) -> RunDir:
    """This job's run directory (Hydra's output dir)."""
    return RunDir(Path(HydraConfig.get().runtime.output_dir))


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
    from deeploc.training import cluster

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


def summarise_config(cfg: DictConfig, datamodule: Any, model: Any, features: str | None = None) -> RunRecord:
    """What identifies a run in tables: every setting that changes its scores (deeploc.report.provenance reads them back)
    and the data it used, plus how the maps were served (``features``: cache or stream). The full config is in
    .hydra/ and config_resolved.yaml. Values are primitives (metrics.json's ``config``: ``record.to_dict()``)."""
    from deeploc import __version__

    counts = datamodule.describe()
    split = cfg.data.split
    plateau = cfg.model.schedule == "plateau"
    decoder = model.decoder.record()
    encoder = model.encoder.identity()
    fields = {
        "decoder": decoder["label"],
        "depth": decoder["options"].get("depth"),
        "decoder_name": decoder["name"],
        "decoder_options": decoder["options"],
        "parameters": decoder["parameters"],
        # The map(s) the decoder reads, joined by "+" for decoders that read several.
        "feature": "+".join(decoder["inputs"]),
        "split": split.mode,
        "subset": cfg.subset,
        "subsets": list(cfg.data.subsets),
        "encoder_kind": encoder["kind"],
        # An adapted encoder is another setting (deeploc-report never averages it with the frozen one): named here.
        "encoder": identity_name(encoder),
        "encoder_overrides": encoder.get("overrides") or {},
        "encoder_weights": "random" if model.encoder.weights.startswith("random") else str(model.encoder.checkpoint),
        # sha256 of the checkpoint or the random-weight seed, as the encoder computed it for its identity.
        "weights": model.encoder.weights,
        "image_size": model.encoder.image_size,
        "max_epochs": cfg.trainer.max_epochs,
        "schedule": cfg.model.schedule,
        "plateau": (
            {"patience": cfg.model.plateau_patience, "factor": cfg.model.plateau_factor, "min_lr": cfg.model.min_lr}
            if plateau
            else None
        ),
        "lr": cfg.model.lr,
        "weight_decay": cfg.model.weight_decay,
        "batch_size": cfg.data.batch_size,
        "precision": str(cfg.trainer.precision),
        "augment": to_primitive(cfg.data.get("augment")),
        "n_train": counts["n_train"],
        "n_valid": counts["n_valid"],
        "split_n_train": split.get("n_train"),
        "split_n_valid": split.get("n_valid"),
        "split_seed": split.get("seed"),
        "data": str(datamodule.data_root),
        "data_source": datamodule.data_source.registry_name,
        "data_source_options": datamodule.data_source.options(),
        "generated_data": cfg.data.get("synthetic") is not None,
        "data_params": to_primitive(cfg.data.get("synthetic")),
        "mask_polarity": cfg.data.get("mask_polarity", "black_is_manipulated"),
        "mask_threshold": cfg.data.get("mask_threshold"),
        "seed": cfg.seed,
        "features": features,
        "deeploc_version": __version__,
        "encoder_architecture": to_primitive(model.encoder.architecture()),
    }
    return RunRecord(**fields)


def write_overlays(
    models: Sequence[Any], datamodule: Any, runs: Sequence[RunDir], count: int, kept: TestMaps | None = None
) -> list[Path]:
    """Render a few test predictions of each test subset as panels into <run>/overlays/<subset>/, for each model
    (sharing one encoder: the heads of a multi-head job) and its run. The maps are the ones the test scored:
    ``kept`` by the test step, else read from the feature cache; only when neither holds them (e.g. another DDP
    rank tested those images) does the encoder run, once per subset."""
    from PIL import Image

    from deeploc.training.callbacks import cached_maps, render_panels_of

    written = []
    for model in models:
        model.eval()
    for subset, samples in datamodule.plan.test.items():
        chosen = samples[:count]
        if not chosen:
            continue
        maps = kept.of(subset, chosen) if kept is not None else None
        if maps is None:
            maps = cached_maps(datamodule.dataset("test", subset), chosen)
        for run, pictures in zip(runs, render_panels_of(models, chosen, maps)):
            folder = run.overlay_dir(subset)
            folder.mkdir(parents=True, exist_ok=True)
            for sample, picture in zip(chosen, pictures):
                path = folder / f"{sample.name}.png"
                Image.fromarray(picture).save(path)
                written.append(path)
    return written


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train and test one configuration (settings already checked); returns the content of the run's
    metrics.json."""
    from deeploc.training.cluster import is_first_process

    run = run_directory(cfg)
    # Only the first process of a job locks: the other DDP ranks belong to the same run.
    with run_lock(run) if is_first_process() else contextlib.nullcontext():
        results = _train_in(run, cfg)
    if is_debug_pass(cfg) and is_first_process():
        _remove_if_empty(run)
    return results


def is_debug_pass(cfg: DictConfig) -> bool:
    """Whether ``cfg`` is a ``trainer.fast_dev_run`` pass (``debug=fdr``): nothing of it is kept."""
    return bool(cfg.trainer.get("fast_dev_run"))


def _remove_if_empty(run: RunDir) -> None:
    """A debug pass keeps no files: a run folder holding nothing but its lock (Hydra creates the folder; with
    ``debug=fdr`` nothing else writes there) is removed. Any other folder, e.g. a real run's, is left as it is."""
    if not run.path.is_dir() or list(run.path.iterdir()) != [run.lock_file]:
        return
    run.lock_file.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        run.path.rmdir()


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
    try:
        if not evaluate_only:
            if resume:
                log.info("resuming from %s", resume)
            with foreign_checkpoint_refused(run, resume):
                trainer.fit(model, datamodule=datamodule, ckpt_path=resume)
            if trainer.interrupted:
                raise KeyboardInterrupt(
                    f"training interrupted; re-run the same command to resume from {run.last_checkpoint}"
                )
        if debug:
            return _debug_results(cfg, trainer, model, datamodule)
        best = run.model_checkpoint_after_training()
        if evaluate_only:  # the decoder/encoder fit is checked when Lightning loads it (module.on_load_checkpoint)
            check_checkpoint_digest(run.path, best)
        # Before testing: Lightning restores the callbacks' states from the checkpoint it tests (the best epoch's).
        training = None if evaluate_only else (_best_score(trainer), _best_values(trainer), trainer.current_epoch)
        model.test_maps = TestMaps(cfg.overlays)  # the overlays' maps, kept as the test computes them
        with foreign_checkpoint_refused(run, best):
            trainer.test(model, datamodule=datamodule, ckpt_path=str(best), verbose=False)
        metrics = run_results(cfg, datamodule, model, run, best, features, previous, training)
        if trainer.is_global_zero:
            finish_runs([model], datamodule, [run], [metrics], cfg.overlays, model.test_maps)
        return metrics
    finally:
        _finish_wandb()


@contextlib.contextmanager
def foreign_checkpoint_refused(run: RunDir, checkpoint: str | Path | None) -> Iterator[None]:
    """Name the checkpoint file and how to start over when Lightning loads one this config did not train
    (:class:`deeploc.training.module.IncompatibleCheckpointError`, raised without the file's path)."""
    from deeploc.training.module import IncompatibleCheckpointError

    try:
        yield
    except IncompatibleCheckpointError as exc:
        raise IncompatibleCheckpointError(
            f"{checkpoint}: {exc} To start this run over with the current settings instead, delete {run.checkpoints} "
            "(and metrics.json) and run the same command again, or give it a new folder: hydra.run.dir=/path/to/new/run"
        ) from None


def run_results(
    cfg: DictConfig,
    datamodule: Any,
    model: Any,
    run: RunDir,
    best: Path,
    features: str,
    previous: dict[str, Any] | None,
    training: tuple[float | None, dict[str, float], int] | None,
) -> dict[str, Any]:
    """The content of a tested run's metrics.json. ``training``: (best val IoU, best value of each validation
    metric, epochs trained) of the training just done; None when the run was only re-tested (the values recorded
    in ``previous`` are kept)."""
    best_val_iou, best_val, epochs = (
        (previous["best_val_iou"], previous.get("best_val", {}), previous["epochs"]) if training is None else training
    )
    return {
        "config": summarise_config(cfg, datamodule, model, features).to_dict(),
        "convention": model.conventions[0],
        "test": model.test_results,
        # Every convention's scores ({convention: {subset: scores}}; the primary one is "test" above) and the
        # thresholds chosen on the validation split at the best epoch (deeploc.metrics.thresholds).
        "conventions": list(model.conventions),
        "scores": model.test_scores,
        "thresholds": {"split": "valid", "chosen": model.val_thresholds},
        "best_checkpoint": str(best.relative_to(run.path)),
        "checkpoint_sha256": run.checkpoint_digests(),
        "best_val_iou": best_val_iou,
        "best_val": best_val,
        "epochs": epochs,
        "status": "finished",
    }


def finish_runs(
    models: Sequence[Any],
    datamodule: Any,
    runs: Sequence[RunDir],
    metrics: Sequence[dict[str, Any]],
    overlays: int,
    kept: TestMaps | None = None,
) -> None:
    """Write tested runs' overlays, then each one's metrics.json (last: the mark of a finished run); log results."""
    write_overlays(models, datamodule, runs, overlays, kept)
    for model, run, results in zip(models, runs, metrics):
        write_test_files(model, datamodule, run.path)
        run.write_metrics(results)
        log.info("%s", format_results(results, run))


def write_test_files(model: Any, datamodule: Any, folder: Path) -> None:
    """``scores/<subset>.csv`` (every image's score in every convention) and, with ``eval.save_predictions``,
    ``predictions/<subset>.npz`` (its probability maps and masks, to rescore without the model)."""
    for subset, columns in model.test_per_image.items():
        dataset = datamodule.dataset("test", subset) if hasattr(datamodule, "dataset") else None
        samples = getattr(dataset, "samples", None)
        names = [s.name for s in samples] if samples is not None else None
        write_per_image(folder / SCORES_DIR / f"{subset}.csv", columns, names)
        if subset in model.test_predictions:
            dtype = model.hparams.get("prediction_dtype", "float32")
            save_predictions(folder / PREDICTIONS_DIR / f"{subset}.npz", model.test_predictions[subset], dtype, names)


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


def _debug_results(cfg: DictConfig, trainer: L.Trainer, model: Any, datamodule: Any) -> dict[str, Any]:
    """Test the in-memory model of a ``trainer.fast_dev_run`` pass; nothing is written (no checkpoint exists)."""
    trainer.test(model, datamodule=datamodule, verbose=False)
    scores = ", ".join(f"{subset} {s['iou']:.2f}" for subset, s in model.test_results.items())
    log.warning(
        "fast_dev_run=%s: a debug pass (%s batch(es) per loop); nothing saved (no checkpoint, metrics.json or "
        "overlays). Test IoU (%%): %s",
        cfg.trainer.fast_dev_run, int(cfg.trainer.fast_dev_run), scores,
    )  # fmt: skip
    return {"test": model.test_results, "best_val": _best_values(trainer), "status": "fast_dev_run"}


def format_results(metrics: dict[str, Any], run: RunDir) -> str:
    """A console table of the test scores, each subset labelled by its role (in-domain / out-of-domain, or held
    out / seen for leave-one-out), with what produced them and where the artefacts are."""
    from deeploc.data.roles import subset_role, training_phrase
    from deeploc.models.encoders import ENCODERS

    config = metrics["config"]
    split, subset = config["split"], config["subset"]
    labels = {name: f"{name} ({subset_role(split, subset, name)})" for name in metrics["test"]}
    width = max([len("test subset"), *map(len, labels.values())]) + 2
    chosen = (metrics.get("thresholds") or {}).get("chosen") or {}
    by_convention = metrics.get("scores") or {metrics.get("convention", "trufor"): metrics["test"]}
    columns = [(c, spec) for c in by_convention for spec in reported_specs(c, chosen.get(c))]
    labels_ = [column_label(spec.name, c) for c, spec in columns]
    widths = [max(8, len(label) + 2) for label in labels_]
    lines = [
        f"test results (%, mean over images) of {config['decoder']} on {config['feature']}, {split} split, "
        f"{training_phrase(split, subset, config.get('subsets'))}; metric convention"
        f"{'s' if len(by_convention) > 1 else ''} {', '.join(by_convention)}"
        + (f"; thresholds chosen on the valid split: {chosen}" if any(chosen.values()) else "")
        + ":",
        f"  {'test subset':<{width}}"
        + "".join(f"{label:>{w}}" for label, w in zip(labels_, widths))
        + f"{'images':>8}",
    ]
    for name, scores in metrics["test"].items():
        values = "".join(
            f"{_number(by_convention[c].get(name, {}).get(spec.name)):>{w}}" for (c, spec), w in zip(columns, widths)
        )
        lines.append(f"  {labels[name]:<{width}}{values}{scores['n_images']:8.0f}")
    if config.get("generated_data"):
        lines.append(
            "  NOTE: trained and tested on deeploc's GENERATED Dolos-format data (four classical manipulations), "
            "not on Dolos. Real data: data=dolos data.root=<path to wacv_data> (deeploc-check validates it first)."
        )
    if config["encoder_weights"] == "random":
        encoder = ENCODERS.get(config.get("encoder_kind", "sam2"))
        lines.append(
            f"  NOTE: {encoder.family} encoder {config['encoder']} had RANDOM weights: these numbers say nothing about "
            f"pretrained {encoder.family}. Use a pretrained encoder config (conf/encoder) with "
            f"encoder.checkpoint=<{encoder.weights_hint}>."
        )
    lines.append(f"  results: {run.metrics_file}; overlays: {run.overlays}; checkpoints: {run.checkpoints}")
    return "\n".join(lines)


def _number(value: Any) -> str:
    """A percentage with two decimals (never scientific notation); ``-`` for an undefined (null) one."""
    return "-" if value is None else f"{float(value):.2f}"


def _best_values(trainer: L.Trainer) -> dict[str, float]:
    """The best value of each validation metric over the run (see :class:`deeploc.training.callbacks.BestValidation`)."""
    for callback in trainer.callbacks:
        if isinstance(callback, BestValidation):
            return dict(callback.best)
    return {}


def best_validation_value(metrics: dict[str, Any] | None, metric: str) -> float | None:
    """The best validation value of ``metric`` recorded in a run's metrics (``best_val``), None when not recorded."""
    value = ((metrics or {}).get("best_val") or {}).get(metric)
    return None if value is None else float(value)


def _best_score(trainer: L.Trainer) -> float | None:
    for callback in trainer.checkpoint_callbacks:
        if getattr(callback, "monitor", None) and callback.best_model_score is not None:
            return float(callback.best_model_score)
    return None


def _finish_wandb() -> None:
    """Close this job's W&B run so the next multirun job never logs into it."""
    import wandb

    if wandb.run is not None:
        wandb.finish()
