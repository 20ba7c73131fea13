"""Lightning callbacks: a one-line console summary per epoch, and prediction panels for W&B."""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger

from deeploc.data.layout import read_mask, read_rgb
from deeploc.visualize import panel

log = logging.getLogger(__name__)


class EpochSummary(L.Callback):
    """Logs one line per epoch: losses, validation IoU, learning rate and duration."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        parts = [f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"]
        for key in ("train/loss_epoch", "val/loss", "val/iou", "val/f1_best", "val/ap"):
            if key in metrics:
                parts.append(f"{key.replace('_epoch', '')} {float(metrics[key]):.4g}")
        parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.2g}")
        parts.append(f"{time.perf_counter() - getattr(self, '_start', time.perf_counter()):.1f}s")
        if trainer.is_global_zero:
            log.info(" | ".join(parts))


def render_panels(pl_module: Any, samples: list[Any]) -> list[np.ndarray]:
    """Image | prediction | heatmap | truth panels for a few samples (runs the encoder on just these images)."""
    images = [read_rgb(s.image) for s in samples]
    batch = torch.stack([torch.from_numpy(im).permute(2, 0, 1) for im in images]).float().div(255)
    probs = pl_module.predict_probabilities(batch.to(pl_module.device)).cpu().numpy()
    return [panel(im, p, read_mask(s.mask, s.mask_polarity) != 255) for im, p, s in zip(images, probs, samples)]


class PredictionPanel(L.Callback):
    """Every few epochs, logs a small panel of validation images with predicted and true masks to W&B."""

    def __init__(self, every_n_epochs: int = 5, n_images: int = 4) -> None:
        self.every_n_epochs = every_n_epochs
        self.n_images = n_images

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        epoch = trainer.current_epoch + 1
        if not wandb_loggers or trainer.sanity_checking or not trainer.is_global_zero or epoch % self.every_n_epochs:
            return
        plan = getattr(trainer.datamodule, "plan", None)
        if plan is None or not plan.valid:
            return
        samples = plan.valid[: self.n_images]
        panels = render_panels(pl_module, samples)
        captions = [f"{s.subset}/{s.name}: image | prediction | probability | truth" for s in samples]
        for logger in wandb_loggers:
            logger.log_image("val/predictions", panels, step=trainer.global_step, caption=captions)
