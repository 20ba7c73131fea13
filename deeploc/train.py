"""`deeploc-train`: compose conf/, train one decoder, test it on every test subset, write the run's results.

Run directories are derived from the overrides, so re-running a command finds its earlier work: a finished run
is skipped (``if_finished=eval`` re-tests its best checkpoint, ``retrain`` starts over in place) and an
interrupted one resumes from ``checkpoints/last.ckpt``.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from deeploc.checkpointing import checkpoint_step
from deeploc.config import CONF_DIR, to_primitive
from deeploc.export import check_checkpoint_digest
from deeploc.metrics import check_convention, recorded_convention
from deeploc.monitoring import build_loggers, continue_history
from deeploc.runs import RunDir

log = logging.getLogger("deeploc.train")

# The frozen SAM2 encoder stays in eval mode on purpose (module.py); Lightning would warn about it on every fit.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)

IF_FINISHED = ("skip", "eval", "retrain")


def run_directory(cfg: DictConfig) -> RunDir:
    """This job's run directory (Hydra's output dir)."""
    return RunDir(Path(HydraConfig.get().runtime.output_dir))


def build_components(cfg: DictConfig) -> tuple[Any, Any]:
    """Instantiate the data module and the LightningModule, and wire the feature store when it can be used."""
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = instantiate(cfg.model)
    attach_feature_store(cfg, datamodule, model)
    return datamodule, model


def extraction_device(cfg: DictConfig) -> str:
    """Where the frozen encoder computes features: the GPU when there is one and the trainer may use it."""
    wants_gpu = cfg.trainer.get("accelerator") in ("auto", "gpu", "cuda")
    return "cuda" if torch.cuda.is_available() and wants_gpu else "cpu"


def open_feature_store(cfg: DictConfig, model: Any) -> tuple[Any, str]:
    """The feature store of this run's encoder and feature, and the device to fill it on.

    The encoder moves to that device first: its identity (the cache key) includes the precision it computes in.
    """
    from deeploc.features.store import FeatureStore

    device = extraction_device(cfg)
    model.encoder.to(device)
    return FeatureStore(cfg.features.dir, model.encoder.identity(), model.hparams.feature), device


def attach_feature_store(cfg: DictConfig, datamodule: Any, model: Any) -> None:
    """Serve cached encoder features instead of images when config and augmentations allow it."""
    from deeploc.features.store import cache_allowed

    if not cfg.features.enabled:
        log.info("feature cache disabled (features=none): the encoder runs on every batch")
        return
    allowed, reason = cache_allowed(to_primitive(cfg.data.get("augment")))
    if not allowed:
        log.warning("feature cache not used: %s; the encoder runs on every batch", reason)
        return
    store, device = open_feature_store(cfg, model)
    store.extract(datamodule.plan.all_samples(), model.encoder, batch_size=cfg.features.batch_size, device=device)
    model.encoder.to("cpu")
    datamodule.set_dataset_factory(lambda samples, stage: store.dataset(samples))


def build_trainer(cfg: DictConfig) -> L.Trainer:
    """The Lightning Trainer with the configured callbacks and loggers, plus deeploc.cluster's requeue-on-signal
    callback and the cluster environment a SLURM / submitit job needs (docs/cluster.md), writing checkpoints
    atomically in their own folder (deeploc.checkpointing)."""
    from deeploc import cluster
    from deeploc.checkpointing import with_atomic_checkpoints

    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = build_loggers(cfg.get("logger"))
    extras = cluster.trainer_extras(cfg.trainer, callbacks)
    extras["plugins"] = with_atomic_checkpoints(extras.get("plugins", []))
    trainer = instantiate(cfg.trainer, logger=loggers or False, **extras)
    cluster.check_launch(trainer)
    return trainer


def resume_path(cfg: DictConfig, run: RunDir) -> str | None:
    """The checkpoint an interrupted run continues from, if any (``resume=false`` ignores it): the most advanced of
    ``checkpoints/last.ckpt`` and the requeue / HPC checkpoints written when a cluster job was signalled."""
    from deeploc.cluster import newest_checkpoint

    newest = newest_checkpoint(run.path) if cfg.resume else None
    return None if newest is None else str(newest)


def summarise_config(cfg: DictConfig, datamodule: Any, model: Any) -> dict[str, Any]:
    """What identifies a run in tables: every setting that changes its scores (deeploc.provenance reads them back)
    and the data it used. The full config is in .hydra/ and config_resolved.yaml. Values are primitives."""
    from deeploc import __version__

    counts = datamodule.describe()
    split = cfg.data.split
    plateau = cfg.model.schedule == "plateau"
    return {
        "decoder": cfg.decoder.name,
        "depth": cfg.decoder.depth,
        "feature": cfg.feature.name,
        "split": split.mode,
        "subset": cfg.subset,
        "subsets": list(cfg.data.subsets),
        "encoder": cfg.encoder.config,
        "encoder_overrides": to_primitive(cfg.encoder.overrides) or {},
        "encoder_weights": "random" if cfg.encoder.random_init else str(cfg.encoder.checkpoint),
        # sha256 of the checkpoint or the random-weight seed, as the encoder computed it for its identity.
        "weights": model.encoder.weights,
        "image_size": cfg.encoder.image_size,
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
        "generated_data": cfg.data.get("synthetic") is not None,
        "data_params": to_primitive(cfg.data.get("synthetic")),
        "mask_polarity": cfg.data.get("mask_polarity", "black_is_manipulated"),
        "seed": cfg.seed,
        "deeploc_version": __version__,
    }


def write_overlays(model: Any, datamodule: Any, run: RunDir, count: int) -> list[Path]:
    """Render a few test predictions of each test subset as panels into <run>/overlays/<subset>/."""
    from PIL import Image

    from deeploc.callbacks import render_panels

    written = []
    model.eval()
    for subset, samples in datamodule.plan.test.items():
        chosen = samples[:count]
        if not chosen:
            continue
        folder = run.path / "overlays" / subset
        folder.mkdir(parents=True, exist_ok=True)
        for sample, picture in zip(chosen, render_panels(model, chosen)):
            path = folder / f"{sample.name}.png"
            Image.fromarray(picture).save(path)
            written.append(path)
    return written


def check_config(cfg: DictConfig) -> None:
    """Fail before any work on values the user still has to provide, naming the key and how to set it."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as exc:
        raise ValueError(f"config value {exc.full_key} is not set: pass {exc.full_key}=...") from None
    if cfg.data.get("root") is None and cfg.data.get("synthetic") is None:
        raise ValueError(
            "data.root is not set: pass data.root=/path/to/wacv_data (the unzipped Dolos folder) or set DOLOS_ROOT; "
            "without Dolos, use data=synthetic"
        )
    if cfg.if_finished not in IF_FINISHED:
        raise ValueError(f"if_finished={cfg.if_finished!r} must be one of {IF_FINISHED}")
    check_convention(cfg.metrics.convention)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train and test one configuration; returns the content of the run's metrics.json."""
    check_config(cfg)
    run = run_directory(cfg)
    previous = run.read_metrics()
    if run.finished and cfg.if_finished == "skip":
        log.info("run %s already finished; skipping (if_finished=eval re-tests, =retrain starts over)", run.path)
        if recorded_convention(previous) != cfg.metrics.convention:
            log.warning(
                "its scores were computed with metrics.convention=%s, not %s as asked; they are left as they are: "
                "if_finished=eval re-tests its best checkpoint with %s",
                recorded_convention(previous),
                cfg.metrics.convention,
                cfg.metrics.convention,
            )
        return previous
    if cfg.if_finished == "retrain" and run.finished:
        # Only a finished run starts over; an interrupted (e.g. requeued) retrain resumes like any other run.
        shutil.rmtree(run.checkpoints, ignore_errors=True)
        for stale in run.path.glob("hpc_ckpt_*.ckpt"):
            stale.unlink()
        run.metrics_file.unlink(missing_ok=True)

    L.seed_everything(cfg.seed, workers=True)
    run.path.mkdir(parents=True, exist_ok=True)
    (run.path / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    datamodule, model = build_components(cfg)
    trainer = build_trainer(cfg)
    evaluate_only = run.finished and cfg.if_finished == "eval"
    resume = None if evaluate_only else resume_path(cfg, run)
    if not evaluate_only:  # earlier attempts' logs are kept up to the step training continues from
        continue_history(trainer.loggers, checkpoint_step(resume) if resume else 0)
    for logger in trainer.loggers:
        logger.log_hyperparams(to_primitive(cfg))
    try:
        if not evaluate_only:
            if resume:
                log.info("resuming from %s", resume)
            trainer.fit(model, datamodule=datamodule, ckpt_path=resume)
            if trainer.interrupted:
                raise KeyboardInterrupt(
                    f"training interrupted; re-run the same command to resume from {run.last_checkpoint}"
                )
        best = run.best_checkpoint if run.best_checkpoint.exists() else run.last_checkpoint
        if evaluate_only:  # the decoder/encoder fit is checked when Lightning loads it (module.on_load_checkpoint)
            check_checkpoint_digest(run.path, best)
        trainer.test(model, datamodule=datamodule, ckpt_path=str(best), verbose=False)
        metrics = {
            "config": summarise_config(cfg, datamodule, model),
            "convention": model.hparams.metric_convention,
            "test": model.test_results,
            "best_checkpoint": str(best.relative_to(run.path)),
            "checkpoint_sha256": run.checkpoint_digests(),
            "best_val_iou": previous["best_val_iou"] if evaluate_only else _best_score(trainer),
            "epochs": previous["epochs"] if evaluate_only else trainer.current_epoch,
            "status": "finished",
        }
        if trainer.is_global_zero:
            run.write_metrics(metrics)
            write_overlays(model, datamodule, run, cfg.overlays)
            log.info("%s", format_results(metrics, run))
        return metrics
    finally:
        _finish_wandb()


def format_results(metrics: dict[str, Any], run: RunDir) -> str:
    """A console table of the test scores, each subset labelled by its role (in-domain / out-of-domain, or held
    out / seen for leave-one-out), with what produced them and where the artefacts are."""
    from deeploc.labels import subset_role, training_phrase

    config = metrics["config"]
    split, subset = config["split"], config["subset"]
    labels = {name: f"{name} ({subset_role(split, subset, name)})" for name in metrics["test"]}
    width = max([len("test subset"), *map(len, labels.values())]) + 2
    lines = [
        f"test results (%, mean over images) of CONV-{config['depth']} on {config['feature']}, {split} split, "
        f"{training_phrase(split, subset, config.get('subsets'))}; metric convention "
        f"{metrics.get('convention', 'trufor')}:",
        f"  {'test subset':<{width}}{'IoU':>8}{'F1':>8}{'F1 best':>9}{'AP':>8}{'images':>8}",
    ]
    for name, scores in metrics["test"].items():
        lines.append(
            f"  {labels[name]:<{width}}{scores['iou']:8.2f}{scores['f1_fixed']:8.2f}{scores['f1_best']:9.2f}"
            f"{scores['ap']:8.2f}{scores['n_images']:8.0f}"
        )
    if config.get("generated_data"):
        lines.append(
            "  NOTE: trained and tested on deeploc's GENERATED Dolos-format data (four classical manipulations), "
            "not on Dolos. Real data: data=dolos data.root=<path to wacv_data> (deeploc-check validates it first)."
        )
    if config["encoder_weights"] == "random":
        lines.append(
            f"  NOTE: SAM2 encoder {config['encoder']} had RANDOM weights: these numbers say nothing about pretrained "
            "SAM2. Use encoder=hiera_s encoder.checkpoint=<sam2.1_hiera_small.pt> and data=dolos data.root=<wacv_data>."
        )
    lines.append(f"  results: {run.metrics_file}; overlays: {run.path / 'overlays'}; checkpoints: {run.checkpoints}")
    return "\n".join(lines)


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


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Console entry point; returns the mean test IoU of the training subset (for Hydra sweepers)."""
    metrics = train(cfg)
    scores = (metrics or {}).get("test", {}).get(str(cfg.subset))
    return None if scores is None else scores["iou"]


if __name__ == "__main__":
    main()
