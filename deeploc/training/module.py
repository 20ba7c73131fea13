"""The LightningModule: a frozen encoder (or its cached maps) -> a decoder -> BCE loss and the study's metrics.

The module never names an architecture: it receives an encoder (:class:`~deeploc.models.encoders.FrozenEncoder`)
and a decoder (:class:`~deeploc.models.decoders.Decoder`, or a factory Hydra built from ``conf/decoder``) and records
both as plain values in its hyperparameters and checkpoints, from which :mod:`deeploc.inference.loading` rebuilds them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from deeploc.errors import DeeplocError
from deeploc.metrics import CONVENTIONS, DEFAULT_CONVENTION, LocalizationMetrics, check_conventions
from deeploc.models.decoders import Decoder
from deeploc.models.encoders import FrozenEncoder, same_encoder
from deeploc.models.state_dicts import state_dict_mismatch
from deeploc.training.components import (
    SCHEDULES,
    DecoderFactory,
    IncompatibleCheckpointError,
    OptimizerFactory,
    TrainingDiverged,
    as_decoder,
    as_encoder,
    as_part,
    divergence,
    part_record,
    same_decoder,
)
from deeploc.training.test_maps import TestMaps


class LocalizationModule(L.LightningModule):
    """Trains a decoder on the maps of a frozen encoder to predict per-pixel manipulation logits.

    Batches carry either ``image`` (the encoder runs here, without gradients) or ``features`` (a dict of the maps
    the decoder reads, from the feature cache), plus ``mask`` at native resolution and ``index`` (dataset
    position, for exact DDP metrics).

    Args:
        encoder: the frozen encoder, or its plain keywords (``FrozenEncoder.init_config()``).
        decoder: the decoder, a factory taking ``feature_specs`` and ``target_stride`` (``conf/decoder`` with
            ``_partial_: true``), or a record (``Decoder.record()``).
        lr, weight_decay: the optimiser's learning rate and weight decay (study: 1e-3, 0).
        schedule: ``fixed`` (the study: constant LR) or ``plateau`` (DeCLIP: LR / ``plateau_factor`` after
            ``plateau_patience`` epochs without val IoU improvement, stop once LR < ``min_lr``).
        channels_last: run the decoder in channels-last memory format (faster convolutions on GPUs).
        metric_convention: the test's metric convention when ``metric_conventions`` is not given (config
            ``metrics.convention``; deeploc.metrics).
        metric_conventions: the conventions the test scores in, the first one primary (``metrics.conventions``).
            Validation always scores in ``study`` (model selection follows the study's protocol) and chooses each
            convention's F1 and IoU threshold on the validation split (deeploc.metrics.thresholds).
        keep_predictions: keep the test's probability maps (``eval.save_predictions``), to rescore them later;
            ``prediction_dtype``: how they are saved (``eval.prediction_dtype``: float32, float16, uint8).
        optimizer: a factory called with the decoder's parameters, ``lr`` and ``weight_decay`` (``conf/model``'s
            ``optimizer`` node, ``_partial_: true``; default: Adam, the study's).
        loss: the training loss on (logits, soft target masks) (``conf/model``'s ``loss``; default: BCE with
            logits, the study's).
        lr_scheduler: a factory called with the optimizer (``conf/model``'s ``lr_scheduler``, ``_partial_: true``,
            e.g. ``torch.optim.lr_scheduler.CosineAnnealingLR``), stepped every epoch (monitoring ``val/iou`` for
            schedulers that take a value); None: the ``schedule`` alone (the study's constant LR, DeCLIP's plateau).
    """

    def __init__(
        self,
        encoder: FrozenEncoder | Mapping[str, Any],
        decoder: Decoder | DecoderFactory | Mapping[str, Any],
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        schedule: str = "fixed",
        plateau_patience: int = 5,
        plateau_factor: float = 0.1,
        min_lr: float = 1e-6,
        channels_last: bool = False,
        metric_convention: str = DEFAULT_CONVENTION,
        metric_conventions: list[str] | None = None,
        keep_predictions: bool = False,
        prediction_dtype: str = "float32",
        optimizer: OptimizerFactory | Mapping[str, Any] | None = None,
        loss: nn.Module | Mapping[str, Any] | None = None,
        lr_scheduler: Callable[..., Any] | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.conventions = check_conventions(metric_conventions or metric_convention)
        if schedule not in SCHEDULES:
            raise ValueError(f"model.schedule={schedule!r} is not one of {SCHEDULES}")
        self.encoder = as_encoder(encoder)
        self.decoder = as_decoder(decoder, self.encoder)
        self.optimizer_factory = as_part(optimizer, torch.optim.Adam, partial=True)
        self.scheduler_factory = as_part(lr_scheduler, None, partial=True)
        if self.scheduler_factory is not None and schedule != "fixed":
            raise ValueError(
                f"model.lr_scheduler and schedule={schedule} both set the learning rate: keep one (schedule=study for "
                "the lr_scheduler alone)"
            )
        # Plain values only (checkpoints load with weights_only): the components are recorded, not pickled.
        self.save_hyperparameters(ignore=["encoder", "decoder", "optimizer", "loss", "lr_scheduler"])
        if channels_last:
            self.decoder = self.decoder.to(memory_format=torch.channels_last)
        self.loss_fn = as_part(loss, None, partial=False) or nn.BCEWithLogitsLoss()
        self.hparams.update(
            encoder=self.encoder.init_config(),
            decoder=self.decoder.record(),
            optimizer=part_record(self.optimizer_factory),
            loss=part_record(self.loss_fn),
        )
        if self.scheduler_factory is not None:  # recorded only when used: the study's hyperparameters stay as they were
            self.hparams["lr_scheduler"] = part_record(self.scheduler_factory)
        self.val_metrics = LocalizationMetrics(convention="study", choose=True)
        #: Per convention, the F1 and IoU thresholds chosen at the last validation epoch (saved in checkpoints, so
        #: the best epoch's reach the test).
        self.val_thresholds: dict[str, dict[str, float]] = {}
        self.test_metrics = nn.ModuleList()
        self.test_names: list[str] = []
        self.test_results: dict[str, dict[str, float]] = {}
        #: ``{convention: {subset: scores}}``, per-image scores and (``keep_predictions``) maps of every subset.
        self.test_scores: dict[str, dict[str, dict[str, float]]] = {}
        self.test_per_image: dict[str, dict[str, torch.Tensor]] = {}
        self.test_predictions: dict[str, dict[str, Any]] = {}
        #: The maps of the first test images of each subset, for the run's overlays (``test_maps.keep`` of them).
        self.test_maps = TestMaps()
        # Frozen weights are rebuilt from config, not stored in checkpoints (see on_load_checkpoint's guard).
        self.strict_loading = False
        self._plateau = {"best": float("-inf"), "bad_epochs": 0}
        self._first_loss: float | None = None  # the first training step's loss of this process (divergence rule)

    # ----------------------------------------------------------------- forward
    def features(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The decoder's input maps for a batch: cached features, or the encoder run on the images."""
        maps = batch["features"] if "features" in batch else self.encoder(batch["image"], names=self.decoder.inputs)
        out = {}
        for name in self.decoder.inputs:
            fmap = maps[name].float()
            out[name] = fmap.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else fmap
        return out

    def served_maps(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """:meth:`features` of a data loader's batch, refusing cached maps for an adapted encoder (they are the
        frozen encoder's: training or scoring on them would silently ignore the adaptation)."""
        if "features" in batch and self.encoder.adapt != "frozen":
            raise DeeplocError(
                f"encoder.adapt={self.encoder.adapt} trains the encoder, so its maps cannot come from the feature "
                "cache; set features=stream"
            )
        return self.features(batch)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Decoder logits ``B x 1 x h x w`` at the encoder's target stride."""
        return self.decoder(features)

    @torch.no_grad()
    def predict_probabilities(
        self,
        images: torch.Tensor,
        sizes: list[tuple[int, int]] | None = None,
        maps: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Per-pixel manipulation probabilities at the images' own resolution (``B x H x W``).

        With ``sizes`` (one ``(H, W)`` per image, e.g. native sizes of images resized to a common input),
        returns a list of ``H x W`` maps instead, each resized back bilinearly to its size. ``maps``: the encoder's
        maps of ``images`` when they are computed already (shared by several decoders).
        """
        probs = torch.sigmoid(self(self.features({"image": images} if maps is None else {"features": maps})).float())
        if sizes is None:
            return F.interpolate(probs, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return [
            F.interpolate(p[None], size=size, mode="bilinear", align_corners=False)[0, 0]
            for p, size in zip(probs, sizes)
        ]

    def compute_loss(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """The loss of ``logits`` against ``masks``, resized (bilinear, area-aware) to the logit grid, so edge
        targets are soft as in the study."""
        target = masks.float()
        if target.shape[-2:] != logits.shape[-2:]:
            target = F.interpolate(target, size=logits.shape[-2:], mode="bilinear", align_corners=False, antialias=True)
        return self.loss_fn(logits.float(), target)

    def training_loss(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """:meth:`compute_loss` of a training step, stopping a diverged run (:func:`divergence`)."""
        loss = self.compute_loss(logits, masks)
        value = float(loss.detach())
        if self._first_loss is None:
            self._first_loss = value
        problem = divergence(value, self._first_loss)
        if problem:
            raise TrainingDiverged(
                f"training diverged at epoch {self.current_epoch + 1}, step {self.global_step}: the loss is {problem}. "
                f"Lower the learning rate: model.lr={self.hparams.lr:g} now (e.g. model.lr={self.hparams.lr / 10:g})"
            )
        return loss

    # ---------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self(self.served_maps(batch))
        loss = self.training_loss(logits, batch["mask"])
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=logits.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits = self(self.served_maps(batch))
        self.log(
            "val/loss",
            self.compute_loss(logits, batch["mask"]),
            prog_bar=True,
            batch_size=logits.shape[0],
            sync_dist=True,
        )
        self.val_metrics.update(logits, batch["mask"], batch.get("index"))

    def on_validation_epoch_end(self) -> None:
        scores = self.validation_scores()
        for name in self.val_metrics.names:
            self.log(f"val/{name}", scores[name], prog_bar=name == "iou")
        if self.hparams.schedule == "plateau" and not self.trainer.sanity_checking:
            optimizer = self.optimizers().optimizer if hasattr(self.optimizers(), "optimizer") else self.optimizers()
            lr = self.plateau_step(float(scores["iou"]), optimizer.param_groups)
            if lr is not None:
                self.log("lr", lr)
                if self.plateau_done(lr):
                    self.trainer.should_stop = True

    def validation_scores(self) -> dict[str, torch.Tensor]:
        """The scores of the validation epoch that just ended (the metric state is reset for the next one)."""
        scores = self.val_metrics.compute()
        self.val_thresholds = self.val_metrics.chosen_thresholds(CONVENTIONS)  # all: any convention can rescore
        self.val_metrics.reset()
        return scores

    def plateau_step(self, val_iou: float, param_groups: list[dict[str, Any]]) -> float | None:
        """DeCLIP's schedule after one epoch: the LR of ``param_groups`` (this decoder's) / factor after `patience`
        epochs without improvement. Returns the new LR when it changed, else None (see :meth:`plateau_done`)."""
        state = self._plateau
        if val_iou > state["best"]:
            state["best"], state["bad_epochs"] = val_iou, 0
            return None
        state["bad_epochs"] += 1
        if state["bad_epochs"] < self.hparams.plateau_patience:
            return None
        state["bad_epochs"] = 0
        for group in param_groups:
            group["lr"] *= self.hparams.plateau_factor
        return float(param_groups[0]["lr"])

    def plateau_done(self, lr: float) -> bool:
        """Whether DeCLIP's schedule stops training at learning rate ``lr`` (below ``min_lr``)."""
        return lr < self.hparams.min_lr

    # -------------------------------------------------------------------- test
    def on_test_epoch_start(self) -> None:
        names = list(getattr(self.trainer.datamodule, "test_subsets", None) or [])
        count = len(self.trainer.test_dataloaders) if isinstance(self.trainer.test_dataloaders, list) else 1
        self.test_names = names if len(names) == count else [f"test_{i}" for i in range(count)]
        self.test_metrics = nn.ModuleList(
            LocalizationMetrics(
                conventions=self.conventions, chosen=self.val_thresholds, keep_predictions=self.hparams.keep_predictions
            )
            for _ in self.test_names
        ).to(self.device)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        maps = self.served_maps(batch)
        if "name" in batch:
            self.test_maps.add(self.test_names[dataloader_idx], maps, batch["name"])
        logits = self(maps)
        self.test_metrics[dataloader_idx].update(logits, batch["mask"], batch.get("index"))

    def on_test_epoch_end(self) -> None:
        self.collect_test_results()
        for name, metric in zip(self.test_names, self.test_metrics):
            for convention in self.conventions:
                suffix = "" if convention == self.conventions[0] else f"[{convention}]"  # the primary's keys as before
                for spec in metric.specs[convention]:
                    value = self.test_scores[convention][name][spec.name]
                    self.log(f"test/{name}/{spec.name}{suffix}", value, add_dataloader_idx=False)

    def collect_test_results(self) -> dict[str, dict[str, float]]:
        """The primary convention's test scores of every test subset (:attr:`test_results`); every convention's in
        :attr:`test_scores`, per-image scores in :attr:`test_per_image`, kept maps in :attr:`test_predictions`.
        The metric states are reset."""
        self.test_scores = {c: {} for c in self.conventions}
        self.test_per_image, self.test_predictions = {}, {}
        for name, metric in zip(self.test_names, self.test_metrics):
            for convention, scores in metric.compute_all().items():
                self.test_scores[convention][name] = {key: float(value) for key, value in scores.items()}
            self.test_per_image[name] = {k: v.cpu() for k, v in metric.per_image().items()}
            if metric.keep_predictions:
                self.test_predictions[name] = metric.predictions()
            metric.reset()
        self.test_results = self.test_scores[self.conventions[0]]
        return self.test_results

    # --------------------------------------------------------------- optimiser
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(
            self.param_groups(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        if self.scheduler_factory is None:
            return optimizer
        scheduler = {"scheduler": self.scheduler_factory(optimizer), "interval": "epoch", "monitor": "val/iou"}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def param_groups(self) -> Any:
        """What the optimizer trains: the decoder's parameters (frozen encoder: exactly as before adaptation
        existed), plus a group of the adapted encoder's trainable ones at ``encoder.lr`` (default ``model.lr``)."""
        trainable = self.encoder.trainable_parameters()
        if not trainable:
            return self.decoder.parameters()
        encoder_lr = self.encoder.lr if self.encoder.lr is not None else self.hparams.lr
        return [{"params": list(self.decoder.parameters())}, {"params": trainable, "lr": encoder_lr}]

    # ------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Frozen weights are rebuilt from the weights file; tuned ones (LoRA adapters, a fully tuned encoder) stay.
        tuned = {f"encoder.{k}" for k in self.encoder.tuned_keys()}
        frozen = [k for k in checkpoint["state_dict"] if k.startswith("encoder.") and k not in tuned]
        named = dict(self.named_parameters())
        if any(named[k].requires_grad for k in frozen if k in named):
            raise RuntimeError("refusing to drop encoder weights from the checkpoint: some are trainable")
        for key in frozen:
            del checkpoint["state_dict"][key]
        checkpoint["deeploc"] = {
            "encoder": self.encoder.identity(),
            "decoder": self.decoder.record(),
            "plateau": dict(self._plateau),
            "val_thresholds": self.val_thresholds,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from deeploc.runs.checkpoints import checkpoint_decoder_record

        meta = checkpoint.get("deeploc")
        if meta is None:
            raise IncompatibleCheckpointError("checkpoint was not written by deeploc's LocalizationModule")
        ours = self.encoder.identity()
        if not same_encoder(meta["encoder"], ours):
            raise IncompatibleCheckpointError(
                f"checkpoint was trained on encoder {meta['encoder']}, but the current config builds {ours}; "
                "use the encoder settings the run was trained with (its .hydra/config.yaml)"
            )
        tuned = [f"encoder.{k}" for k in self.encoder.tuned_keys()]
        missing = [k for k in tuned if k not in checkpoint["state_dict"]]
        if missing:
            raise IncompatibleCheckpointError(
                f"checkpoint lacks {len(missing)} tuned encoder tensor(s) of encoder.adapt={self.encoder.adapt} "
                f"(e.g. {missing[0]}): it was not written by this adapted run"
            )
        theirs = checkpoint_decoder_record(checkpoint)
        decoder_state = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("encoder.")}
        own_state = {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}
        problems = state_dict_mismatch(own_state, decoder_state)
        if problems or not same_decoder(theirs, self.decoder.record()):
            raise IncompatibleCheckpointError(
                f"checkpoint holds decoder {theirs.get('label')} on {theirs.get('inputs')}, but the config asks for "
                f"{self.decoder.label} on {list(self.decoder.inputs)}{f' ({problems})' if problems else ''}. Use "
                "the decoder and feature the run was trained with."
            )
        self._plateau = dict(meta.get("plateau", self._plateau))
        self.val_thresholds = dict(meta.get("val_thresholds", {}))
