"""Lightning callbacks: a one-line console summary per epoch, a progress bar numbered like it, the best validation
scores, prediction panels for W&B."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import ProcessingSpeedColumn
from lightning.pytorch.loggers import WandbLogger

from deeploc.data.images import read_mask, read_rgb
from deeploc.errors import DISK_FULL, DiskFullError
from deeploc.metrics import image_scores, metric_names
from deeploc.training.loggers import finish_wandb
from deeploc.visualize import panel

log = logging.getLogger(__name__)


_SUMMARY_KEYS = ("train/loss_epoch", "val/loss", "val/iou", "val/f1_best", "val/ap")


def epoch_line(epoch: int, max_epochs: int | None, metrics: dict[str, float], lr: float, seconds: float) -> str:
    """The epoch summary: losses (4 decimals), percentages (2 decimals), learning rate and duration."""
    parts = [f"epoch {epoch + 1}/{max_epochs}"]
    for key in _SUMMARY_KEYS:
        if key in metrics:
            # Scores are percentages (0-100): two decimals, never scientific notation; losses four.
            digits = 2 if key.removeprefix("val/") in metric_names() else 4
            parts.append(f"{key.replace('_epoch', '')} {float(metrics[key]):.{digits}f}")
    parts.append(f"lr {lr:.2g}")
    parts.append(f"{seconds:.1f}s")
    return " | ".join(parts)


class EpochSummary(L.Callback):
    """Logs one line per epoch: losses, validation IoU, learning rate and duration (:func:`epoch_line`)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k in _SUMMARY_KEYS}
        seconds = time.perf_counter() - getattr(self, "_start", time.perf_counter())
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        if trainer.is_global_zero:
            log.info(epoch_line(trainer.current_epoch, trainer.max_epochs, metrics, lr, seconds))


class _SpeedColumn(ProcessingSpeedColumn):
    """The batch rate once Rich has measured one; Lightning's column shows ``0.00it/s`` until then (all along
    for an epoch of one or two batches)."""

    def render(self, task: Any) -> Any:
        from rich.text import Text

        return Text("") if task.speed is None else super().render(task)


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar, numbering epochs from 1 like the epoch summary ("Epoch 3/20" is the third of
    twenty; Lightning's own bar says "Epoch 2/19"), without the logger's version column and without a rate before
    there is one. Only on a terminal (or in Jupyter): into a log file (SLURM output, a pipe) Rich would write each
    bar once when it ends, its metrics wrapped over lines; the epoch summary lines say it there."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._interactive: bool | None = None

    @property
    def is_enabled(self) -> bool:
        if self._interactive is None:
            from rich.console import Console

            # The console the bar will draw on (Lightning reconfigures Rich's with these console_kwargs).
            console = Console(**self._console_kwargs)
            self._interactive = console.is_terminal or console.is_jupyter
        return super().is_enabled and self._interactive

    def configure_columns(self, trainer: L.Trainer) -> list:
        columns = super().configure_columns(trainer)
        speed = _SpeedColumn(style=self.theme.processing_speed)
        return [speed if isinstance(column, ProcessingSpeedColumn) else column for column in columns]

    def _get_train_description(self, current_epoch: int) -> str:
        description = f"Epoch {current_epoch + 1}"
        if self.trainer.max_epochs is not None:
            description += f"/{self.trainer.max_epochs}"
        return f"{description:{len(self.validation_description)}}"

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


class BestValidation(L.Callback):
    """The best value of each validation metric over the run (``directions``: metric -> "max" or "min").

    Stateful: saved in checkpoints, so a resumed run knows the bests of the epochs before the interruption.
    """

    def __init__(self, directions: dict[str, str]) -> None:
        self.directions = dict(directions)
        self.best: dict[str, float] = {}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After the module's on_validation_epoch_end, which logs the epoch's scores.
        if not trainer.sanity_checking:
            self.update(trainer.callback_metrics)

    def update(self, metrics: Mapping[str, Any]) -> None:
        """Take one validation epoch's values (``metrics``: name -> value) into account."""
        for key, direction in self.directions.items():
            if key not in metrics:
                continue
            value = float(metrics[key])
            if math.isnan(value):  # an undefined score is no candidate for the best
                continue
            previous = self.best.get(key)
            better = max if direction == "max" else min
            self.best[key] = value if previous is None else better(previous, value)

    def state_dict(self) -> dict[str, Any]:
        return {"best": dict(self.best)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = {str(k): float(v) for k, v in state_dict.get("best", {}).items()}


def render_panels_of(
    modules: Sequence[Any], samples: list[Any], maps: dict[str, torch.Tensor] | None = None
) -> list[list[np.ndarray]]:
    """Titled image | prediction | probability | truth panels of a few samples for several modules sharing one
    encoder (one run's module, or the heads of a multi-head job): the encoder runs once on the images, every
    module's decoder on its maps. One list of panels per module. ``maps``: the
    samples' maps when they are at hand already (the feature cache), so the encoder does not run at all."""
    images = [read_rgb(s.image) for s in samples]
    batch = torch.stack([torch.from_numpy(im).permute(2, 0, 1) for im in images]).float().div(255)
    batch = batch.to(modules[0].device)
    if maps is None:
        names = tuple(dict.fromkeys(name for module in modules for name in module.decoder.inputs))
        maps = modules[0].encoder(batch, names=names)
    else:
        maps = {name: fmap.to(modules[0].device).float() for name, fmap in maps.items()}
    truths = [read_mask(s.mask, s.mask_polarity, s.mask_threshold) != 255 for s in samples]
    out = []
    for module in modules:
        probs = module.predict_probabilities(batch, maps=maps).cpu().numpy()
        out.append(
            [panel(im, p, t, header=panel_header(s, p, t)) for s, im, p, t in zip(samples, images, probs, truths)]
        )
    return out


def panel_header(sample: Any, prob: np.ndarray, truth: np.ndarray) -> str:
    """What a panel shows: the image, its subset and the IoU of ``prob > 0.5`` with its true mask (as scored)."""
    iou = image_scores(torch.from_numpy(prob), torch.from_numpy(truth))["iou"]
    return f"{sample.name} ({sample.subset}): IoU {iou:.1f}%"


def cached_maps(dataset: Any, samples: Sequence[Any]) -> dict[str, torch.Tensor] | None:
    """The cached maps of ``samples``, the first items of ``dataset`` (a split's dataset), or None when the dataset
    serves images (the encoder must run; nothing is read) or holds other images."""
    from deeploc.features.dataset import CachedFeatureDataset

    if not isinstance(dataset, CachedFeatureDataset):
        return None
    items = [dataset[i] for i in range(min(len(samples), len(dataset)))]
    if not items or [item["name"] for item in items] != [s.name for s in samples]:
        return None
    return {
        name: torch.stack([torch.as_tensor(item["features"][name]) for item in items]) for name in items[0]["features"]
    }


class PredictionPanel(L.Callback):
    """Prediction panels (image | prediction | probability | truth, :func:`deeploc.visualize.panel`) in W&B.

    * ``val/predictions``: the first ``n_images`` validation images after the first epoch, every
      ``every_n_epochs`` epochs and after the last one (a short run shows its start and its end);
    * ``test/<subset>/predictions``: the tested model (the best checkpoint) on the first ``n_images`` images of
      each test subset, when testing ends.

    Each caption names the subset and the image (and the epoch, or that it is the tested model).
    """

    def __init__(self, every_n_epochs: int = 5, n_images: int = 4) -> None:
        if every_n_epochs < 1 or n_images < 1:
            raise ValueError(
                f"callbacks.panel.every_n_epochs={every_n_epochs} and callbacks.panel.n_images={n_images} must be "
                ">= 1 (no panels: callbacks.panel=null)"
            )
        self.every_n_epochs = every_n_epochs
        self.n_images = n_images

    def due(self, epoch: int, max_epochs: int | None) -> bool:
        """Whether the epoch numbered ``epoch`` (from 1) gets a validation panel."""
        return epoch == 1 or epoch % self.every_n_epochs == 0 or epoch == max_epochs

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if trainer.sanity_checking or not self.due(epoch, trainer.max_epochs):
            return
        plan = self._plan(trainer)
        if plan is not None and plan.valid:
            self.log_panels(trainer, self.targets(trainer, pl_module, training=True), "val/predictions", plan.valid,
                            ("valid", None), f"epoch {epoch}, validation")  # fmt: skip

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        plan = self._plan(trainer)
        targets = self.targets(trainer, pl_module, training=False)
        for subset, samples in (plan.test if plan is not None else {}).items():
            if samples:
                self.log_panels(trainer, targets, f"test/{subset}/predictions", samples, ("test", subset),
                                "tested model, test")  # fmt: skip

    def targets(self, trainer: L.Trainer, pl_module: Any, training: bool) -> list[tuple[Any, list[WandbLogger]]]:
        """(module, its W&B loggers) pairs to draw panels for: here the run's module and the trainer's loggers."""
        return [(pl_module, _wandb_loggers(trainer))]

    def _plan(self, trainer: L.Trainer) -> Any:
        """The data plan when panels are wanted here (rank 0), else None."""
        if not trainer.is_global_zero:
            return None
        return getattr(trainer.datamodule, "plan", None)

    def log_panels(
        self,
        trainer: L.Trainer,
        targets: Sequence[tuple[Any, Sequence[WandbLogger]]],
        key: str,
        samples: list[Any],
        stage: tuple[str, str | None],
        context: str,
    ) -> None:
        """Draw the first ``n_images`` of ``samples`` for every target module (one encoder pass for all of them, or
        none when the split is served from the feature cache) and log them to that module's W&B loggers."""
        targets = [(module, loggers) for module, loggers in targets if loggers]
        if not targets:
            return
        chosen = samples[: self.n_images]
        maps = cached_maps(trainer.datamodule.dataset(*stage), chosen)
        captions = [f"{context} subset {s.subset}, image {s.name}" for s in chosen]
        drawn = render_panels_of([module for module, _ in targets], chosen, maps)
        for (_, loggers), panels in zip(targets, drawn):
            for logger in loggers:
                try:
                    logger.log_image(key, panels, step=trainer.global_step, caption=captions)
                except OSError as exc:  # e.g. a full disk as W&B copies the image: W&B goes off, training goes on
                    self.wandb_failed(trainer, exc, sum(p.nbytes for p in panels))
                    return

    def wandb_failed(self, trainer: L.Trainer, exc: OSError, needed: int) -> None:
        """W&B could not take a panel: switch W&B off for the rest of the run (:func:`switch_off_wandb`)."""
        switch_off_wandb(trainer, exc, needed)


def switch_off_wandb(trainer: L.Trainer, exc: OSError, needed: int | None = None) -> None:
    """W&B trouble never ends the work: drop the trainer's W&B loggers, finish the W&B run as far as it can be, and
    say so in one warning (for a full disk: the folder, the space needed and free, DEEPLOC_OUTPUTS)."""
    reason = DiskFullError(exc.filename or ".", needed) if exc.errno in DISK_FULL else exc
    trainer.loggers = [lg for lg in trainer.loggers if not isinstance(lg, WandbLogger)]
    finish_wandb(failed=True)
    log.warning(
        "W&B is off for the rest of this run: %s. Training goes on; the metrics are in the run's other logs "
        "(csv/metrics.csv with the default loggers).",
        reason,
    )


def _wandb_loggers(trainer: L.Trainer) -> list[WandbLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
