"""The LightningModule: frozen SAM2 encoder (or cached features) -> CONV-N decoder -> BCE loss and the study's metrics."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from deeploc.errors import DeeplocError
from deeploc.metrics import DEFAULT_CONVENTION, LocalizationMetrics, check_convention
from deeploc.models.decoders import ConvDecoder
from deeploc.models.encoder import SAM2FeatureEncoder, same_encoder

SCHEDULES = ("fixed", "plateau")
METRIC_NAMES = ("iou", "f1_fixed", "f1_best", "ap")


class IncompatibleCheckpointError(DeeplocError, RuntimeError):
    """A checkpoint trained with another encoder, feature or decoder than the current config."""


class LocalizationModule(L.LightningModule):
    """Trains a CONV-N decoder on one frozen SAM2 feature map to predict per-pixel manipulation logits.

    Batches carry either ``image`` (the encoder runs here, without gradients) or ``features`` (read from the
    feature store), plus ``mask`` at native resolution and ``index`` (dataset position, for exact DDP metrics).

    Args:
        feature: SAM2 feature map to decode (``image_embed``, ``high_res_feats_0``, ``high_res_feats_1``).
        depth: N of CONV-N.
        encoder: keyword arguments of :class:`SAM2FeatureEncoder` (primitive, so checkpoints stay loadable).
        lr, weight_decay: Adam settings (study: 1e-3, 0).
        schedule: ``fixed`` (the study: constant LR) or ``plateau`` (DeCLIP: LR / ``plateau_factor`` after
            ``plateau_patience`` epochs without val IoU improvement, stop once LR < ``min_lr``).
        channels_last: run the decoder in channels-last memory format (faster convolutions on GPUs).
        metric_convention: ``study`` or ``trufor``, how validation and test scores treat the undefined cases
            (config ``metrics.convention``; deeploc.metrics).
    """

    def __init__(
        self,
        feature: str = "image_embed",
        depth: int = 20,
        encoder: dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        schedule: str = "fixed",
        plateau_patience: int = 5,
        plateau_factor: float = 0.1,
        min_lr: float = 1e-6,
        channels_last: bool = False,
        metric_convention: str = DEFAULT_CONVENTION,
    ) -> None:
        super().__init__()
        check_convention(metric_convention)
        if schedule not in SCHEDULES:
            raise ValueError(f"model.schedule={schedule!r} is not one of {SCHEDULES}")
        self.save_hyperparameters()
        self.encoder = SAM2FeatureEncoder(**(encoder or {}))
        self.decoder = ConvDecoder(feature, depth)
        if channels_last:
            self.decoder = self.decoder.to(memory_format=torch.channels_last)
        self.loss_fn = nn.BCEWithLogitsLoss()
        self.val_metrics = LocalizationMetrics(convention=metric_convention)
        self.test_metrics = nn.ModuleList()
        self.test_names: list[str] = []
        self.test_results: dict[str, dict[str, float]] = {}
        # Frozen weights are rebuilt from config, not stored in checkpoints (see on_load_checkpoint's guard).
        self.strict_loading = False
        self._plateau = {"best": float("-inf"), "bad_epochs": 0}

    # ----------------------------------------------------------------- forward
    def features(self, batch: dict[str, Any]) -> torch.Tensor:
        """The decoder's input for a batch: cached features, or the frozen encoder run on the images."""
        if "features" in batch:
            feats = batch["features"]
        else:
            feats = self.encoder(batch["image"], names=(self.hparams.feature,))[self.hparams.feature]
        feats = feats.float()
        if self.hparams.channels_last:
            feats = feats.contiguous(memory_format=torch.channels_last)
        return feats

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Decoder logits ``B x 1 x h x w`` (stride 4 of the encoder input)."""
        return self.decoder(features)

    @torch.no_grad()
    def predict_probabilities(
        self, images: torch.Tensor, sizes: list[tuple[int, int]] | None = None
    ) -> torch.Tensor | list[torch.Tensor]:
        """Per-pixel manipulation probabilities at the images' own resolution (``B x H x W``).

        With ``sizes`` (one ``(H, W)`` per image, e.g. native sizes of images resized to a common input),
        returns a list of ``H x W`` maps instead, each resized back bilinearly to its size.
        """
        probs = torch.sigmoid(self(self.features({"image": images})).float())
        if sizes is None:
            return F.interpolate(probs, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return [
            F.interpolate(p[None], size=size, mode="bilinear", align_corners=False)[0, 0]
            for p, size in zip(probs, sizes)
        ]

    def _loss(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        # Masks resized (bilinear, area-aware) to the logit grid, so edge targets are soft as in the study.
        target = masks.float()
        if target.shape[-2:] != logits.shape[-2:]:
            target = F.interpolate(target, size=logits.shape[-2:], mode="bilinear", align_corners=False, antialias=True)
        loss = self.loss_fn(logits.float(), target)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {loss.item()} at step {self.global_step}")
        return loss

    # ---------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self(self.features(batch))
        loss = self._loss(logits, batch["mask"])
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=logits.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits = self(self.features(batch))
        self.log(
            "val/loss", self._loss(logits, batch["mask"]), prog_bar=True, batch_size=logits.shape[0], sync_dist=True
        )
        self.val_metrics.update(logits, batch["mask"], batch.get("index"))

    def on_validation_epoch_end(self) -> None:
        scores = self.val_metrics.compute()
        self.val_metrics.reset()
        for name in METRIC_NAMES:
            self.log(f"val/{name}", scores[name], prog_bar=name == "iou")
        if self.hparams.schedule == "plateau" and not self.trainer.sanity_checking:
            self._plateau_step(float(scores["iou"]))

    def _plateau_step(self, val_iou: float) -> None:
        """DeCLIP's schedule: LR / factor after `patience` epochs without improvement; stop below `min_lr`."""
        state = self._plateau
        if val_iou > state["best"]:
            state["best"], state["bad_epochs"] = val_iou, 0
            return
        state["bad_epochs"] += 1
        if state["bad_epochs"] < self.hparams.plateau_patience:
            return
        state["bad_epochs"] = 0
        optimizer = self.optimizers().optimizer if hasattr(self.optimizers(), "optimizer") else self.optimizers()
        for group in optimizer.param_groups:
            group["lr"] *= self.hparams.plateau_factor
        lr = optimizer.param_groups[0]["lr"]
        self.log("lr", lr)
        if lr < self.hparams.min_lr:
            self.trainer.should_stop = True

    # -------------------------------------------------------------------- test
    def on_test_epoch_start(self) -> None:
        names = list(getattr(self.trainer.datamodule, "test_subsets", None) or [])
        count = len(self.trainer.test_dataloaders) if isinstance(self.trainer.test_dataloaders, list) else 1
        self.test_names = names if len(names) == count else [f"test_{i}" for i in range(count)]
        self.test_metrics = nn.ModuleList(
            LocalizationMetrics(convention=self.hparams.metric_convention) for _ in self.test_names
        ).to(self.device)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        logits = self(self.features(batch))
        self.test_metrics[dataloader_idx].update(logits, batch["mask"], batch.get("index"))

    def on_test_epoch_end(self) -> None:
        self.test_results = {}
        for name, metric in zip(self.test_names, self.test_metrics):
            scores = {key: float(value) for key, value in metric.compute().items()}
            metric.reset()
            self.test_results[name] = scores
            for key in METRIC_NAMES:
                self.log(f"test/{name}/{key}", scores[key], add_dataloader_idx=False)

    # --------------------------------------------------------------- optimiser
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.decoder.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    # ------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        frozen = [k for k in checkpoint["state_dict"] if k.startswith("encoder.")]
        if any(p.requires_grad for p in self.encoder.parameters()):
            raise RuntimeError("refusing to drop encoder weights from the checkpoint: some are trainable")
        for key in frozen:
            del checkpoint["state_dict"][key]
        checkpoint["deeploc"] = {"encoder": self.encoder.identity(), "plateau": dict(self._plateau)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("deeploc")
        if meta is None:
            raise IncompatibleCheckpointError("checkpoint was not written by deeploc's LocalizationModule")
        ours = self.encoder.identity()
        if not same_encoder(meta["encoder"], ours):
            raise IncompatibleCheckpointError(
                f"checkpoint was trained on encoder {meta['encoder']}, but the current config builds {ours}; "
                "use the encoder settings the run was trained with (its .hydra/config.yaml)"
            )
        own, theirs = self.state_dict(), checkpoint["state_dict"]
        missing = sorted(k for k in set(own) - set(theirs) if not k.startswith("encoder."))
        unexpected = sorted(set(theirs) - set(own))
        reshaped = sorted(k for k in set(theirs) & set(own) if theirs[k].shape != own[k].shape)
        if missing or unexpected or reshaped:
            trained = checkpoint.get("hyper_parameters", {})
            raise IncompatibleCheckpointError(
                f"checkpoint decoder weights do not fit this model (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}, other shapes {reshaped[:3]}): it was trained as CONV-{trained.get('depth', '?')} "
                f"on {trained.get('feature', '?')}, the config asks for another decoder: CONV-{self.hparams.depth} "
                f"on {self.hparams.feature}. Use the decoder and feature the run was trained with."
            )
        self._plateau = dict(meta.get("plateau", self._plateau))
