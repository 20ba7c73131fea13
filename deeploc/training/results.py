"""The results of a tested run: its metrics.json content, overlays, and the console table of its scores."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from deeploc.config import to_primitive
from deeploc.metrics import (
    column_label,
    reported_specs,
)
from deeploc.metrics.store import PREDICTIONS_DIR, SCORES_DIR, save_predictions, write_per_image
from deeploc.models.encoders import identity_name
from deeploc.runs.record import RunRecord
from deeploc.runs.rundir import RunDir
from deeploc.training.callbacks import BestValidation
from deeploc.training.test_maps import TestMaps

log = logging.getLogger("deeploc.training.run")


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
        "optimization": {part: to_primitive(model.hparams.get(part)) for part in ("optimizer", "loss", "lr_scheduler")},
    }
    return RunRecord(**fields)


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


def diverged_results(cfg: DictConfig, datamodule: Any, model: Any, reason: str, epoch: int) -> dict[str, Any]:
    """The metrics.json of a run whose training diverged (:class:`deeploc.training.module.TrainingDiverged`):
    ``status: diverged`` and the reason, no test scores (the report lists such runs apart, never averages them). The
    run is not finished: the same command tries it again, a lower ``model.lr`` is another run."""
    return {
        "config": summarise_config(cfg, datamodule, model).to_dict(),
        "convention": model.hparams.metric_convention,
        "test": {},
        "best_val_iou": None,
        "best_val": {},
        "epochs": epoch + 1,
        "status": "diverged",
        "reason": reason,
    }


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


def best_values(trainer: L.Trainer) -> dict[str, float]:
    """The best value of each validation metric over the run (see :class:`deeploc.training.callbacks.BestValidation`)."""
    for callback in trainer.callbacks:
        if isinstance(callback, BestValidation):
            return dict(callback.best)
    return {}


def best_score(trainer: L.Trainer) -> float | None:
    """The best monitored value of the run's checkpoint callback (its best val IoU), if any."""
    for callback in trainer.checkpoint_callbacks:
        if getattr(callback, "monitor", None) and callback.best_model_score is not None:
            return float(callback.best_model_score)
    return None


def best_validation_value(metrics: dict[str, Any] | None, metric: str) -> float | None:
    """The best validation value of ``metric`` recorded in a run's metrics (``best_val``), None when not recorded."""
    value = ((metrics or {}).get("best_val") or {}).get(metric)
    return None if value is None else float(value)


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
