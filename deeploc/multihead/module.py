"""``MultiHeadModule``: several decoders (``LocalizationModule`` heads sharing one frozen encoder, in an
``nn.ModuleDict``) trained on one stream of batches, each exactly as in its own run (docs/multihead.md).

* Per batch, every map the heads read is computed once (one encoder pass, or one read of the cache).
* One optimiser with a parameter group per head: the heads share no parameter, so the summed loss gives each head's
  parameters exactly its own loss's gradient, and Adam updates each parameter from its own gradient and state.
* DeCLIP's plateau schedule runs per head on its group; a head it stops takes no further part (no forward pass, no
  gradient, no checkpoint, no log). Logged values are ``<head>/<the single run's key>``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

import lightning as L
import torch
from torch import nn

from deeploc.errors import ConfigError
from deeploc.metrics import metric_names
from deeploc.models.encoders import same_encoder
from deeploc.training.components import IncompatibleCheckpointError, TrainingDiverged, same_decoder
from deeploc.training.module import LocalizationModule
from deeploc.training.test_maps import TestMaps

__all__ = ["MultiHeadModule"]

log = logging.getLogger("deeploc.multihead")


class MultiHeadModule(L.LightningModule):
    """Train several heads (``{name: LocalizationModule}``, one shared encoder) on the same batches.

    ``stopped`` maps a head stopped by DeCLIP's schedule to the last epoch it trained.
    """

    def __init__(self, heads: Mapping[str, LocalizationModule]) -> None:
        super().__init__()
        if not heads:
            raise ValueError("MultiHeadModule needs at least one head")
        encoders = {id(head.encoder) for head in heads.values()}
        if len(encoders) != 1:
            raise ValueError("the heads of a MultiHeadModule must share one encoder object")
        self.encoder = next(iter(heads.values())).encoder
        self.heads = nn.ModuleDict(dict(heads))
        wanted = {name for head in heads.values() for name in head.decoder.inputs}
        #: The maps the heads read together, in the encoder's order.
        self.maps = tuple(name for name in self.encoder.feature_specs if name in wanted)
        # Frozen weights are rebuilt from config, not stored in checkpoints (as in LocalizationModule).
        self.strict_loading = False
        self.stopped: dict[str, int] = {}
        #: The maps of the first test images of each subset, shared by every head's overlays.
        self.test_maps = TestMaps()

    # ----------------------------------------------------------------- wiring
    @property
    def trainer(self) -> L.Trainer:
        return L.LightningModule.trainer.fget(self)  # type: ignore[attr-defined]

    @trainer.setter
    def trainer(self, trainer: L.Trainer | None) -> None:
        # Lightning hands the trainer to direct LightningModule children only; the heads sit in a ModuleDict.
        L.LightningModule.trainer.fset(self, trainer)  # type: ignore[attr-defined]
        for head in self._modules.get("heads", {}).values():
            head.trainer = trainer

    def trains(self, name: str) -> bool:
        """Whether head ``name`` trains in the current epoch (False once DeCLIP's schedule stopped it)."""
        last = self.stopped.get(name)
        return last is None or self.current_epoch <= last

    def training_heads(self) -> Iterator[tuple[str, LocalizationModule]]:
        return ((name, head) for name, head in self.heads.items() if self.trains(name))

    def head_index(self, name: str) -> int:
        """The position of head ``name``: its parameter group in the optimiser."""
        return list(self.heads).index(name)

    def shared_maps(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Every map the heads read for this batch: the cached ones, or one encoder pass over the images."""
        return batch["features"] if "features" in batch else self.encoder(batch["image"], names=self.maps)

    def _logits(self, head: LocalizationModule, maps: dict[str, torch.Tensor]) -> torch.Tensor:
        return head(head.features({"features": maps}))

    # ---------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        maps = self.shared_maps(batch)
        total = None
        for name, head in self.training_heads():
            logits = self._logits(head, maps)
            try:
                loss = head.training_loss(logits, batch["mask"])
            except TrainingDiverged as exc:
                raise TrainingDiverged(f"head {name}: {exc}") from None
            self.log(f"{name}/train/loss", loss, on_step=True, on_epoch=True, batch_size=logits.shape[0])
            total = loss if total is None else total + loss
        assert total is not None, "the trainer should have stopped: every head has stopped"
        return total

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        maps = self.shared_maps(batch)
        for name, head in self.training_heads():
            logits = self._logits(head, maps)
            loss = head.compute_loss(logits, batch["mask"])
            self.log(f"{name}/val/loss", loss, batch_size=logits.shape[0], sync_dist=True)
            head.val_metrics.update(logits, batch["mask"], batch.get("index"))

    def on_validation_epoch_end(self) -> None:
        for name, head in list(self.training_heads()):
            scores = head.validation_scores()
            for metric in head.val_metrics.names:
                self.log(f"{name}/val/{metric}", scores[metric])
            if head.hparams.schedule != "plateau" or self.trainer.sanity_checking:
                continue
            group = self.trainer.optimizers[0].param_groups[self.head_index(name)]
            lr = head.plateau_step(float(scores["iou"]), [group])
            if lr is None:
                continue
            self.log(f"{name}/lr", lr)
            if head.plateau_done(lr):
                self.stopped[name] = self.current_epoch
                log.info("head %s: learning rate %.2g < min_lr, its training stops after epoch %d", name, lr,
                         self.current_epoch + 1)  # fmt: skip
        if all(name in self.stopped for name in self.heads):
            self.trainer.should_stop = True

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """One optimiser (the heads' ``model.optimizer``, which must be the same class) with a parameter group per
        head, holding that head's own options (``lr``, ``weight_decay`` and its optimizer node's)."""
        heads = list(self.heads.values())
        if any(head.scheduler_factory is not None for head in heads):
            raise ConfigError("model.lr_scheduler with heads: train the heads one by one (deeploc-train -m arch=...)")
        kinds = {head.hparams.optimizer["_target_"] for head in heads}
        if len(kinds) > 1:
            raise ConfigError(
                f"the heads use different optimizers ({', '.join(sorted(kinds))}); one job has one optimizer with a "
                "parameter group per head: give the heads the same model.optimizer, or train them one by one"
            )
        options = [
            {**getattr(h.optimizer_factory, "keywords", {}), "weight_decay": h.hparams.weight_decay} for h in heads
        ]
        groups = [{**o, "params": list(h.decoder.parameters()), "lr": h.hparams.lr} for o, h in zip(options, heads)]
        return heads[0].optimizer_factory(groups)

    # -------------------------------------------------------------------- test
    def on_test_epoch_start(self) -> None:
        for head in self.heads.values():
            head.on_test_epoch_start()

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        maps = self.shared_maps(batch)
        if "name" in batch:
            self.test_maps.add(next(iter(self.heads.values())).test_names[dataloader_idx], maps, batch["name"])
        for head in self.heads.values():
            head.test_metrics[dataloader_idx].update(self._logits(head, maps), batch["mask"], batch.get("index"))

    def on_test_epoch_end(self) -> None:
        for name, head in self.heads.items():
            for subset, scores in head.collect_test_results().items():
                for key in [k for k in metric_names() if k in scores]:  # the metrics its primary convention reports
                    self.log(f"{name}/test/{subset}/{key}", scores[key], add_dataloader_idx=False)

    # ------------------------------------------------------------- checkpoints
    def _encoder_key(self, key: str) -> bool:
        return key.startswith("encoder.") or any(key.startswith(f"heads.{name}.encoder.") for name in self.heads)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if any(p.requires_grad for p in self.encoder.parameters()):
            raise RuntimeError("refusing to drop encoder weights from the checkpoint: some are trainable")
        for key in [k for k in checkpoint["state_dict"] if self._encoder_key(k)]:
            del checkpoint["state_dict"][key]
        checkpoint["deeploc"] = {
            "heads": list(self.heads),
            "encoder": self.encoder.identity(),
            "decoders": {name: head.decoder.record() for name, head in self.heads.items()},
            "plateau": {name: dict(head._plateau) for name, head in self.heads.items()},
            "stopped": dict(self.stopped),
            "val_thresholds": {name: head.val_thresholds for name, head in self.heads.items()},
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("deeploc") or {}
        if meta.get("heads") != list(self.heads):
            raise IncompatibleCheckpointError(
                f"the multi-head checkpoint holds heads {meta.get('heads')}, this job trains {list(self.heads)}"
            )
        if not same_encoder(meta["encoder"], self.encoder.identity()):
            raise IncompatibleCheckpointError(
                f"the multi-head checkpoint was trained on encoder {meta['encoder']}, this job builds "
                f"{self.encoder.identity()}"
            )
        for name, head in self.heads.items():
            if not same_decoder(meta["decoders"][name], head.decoder.record()):
                raise IncompatibleCheckpointError(
                    f"head {name}: the multi-head checkpoint holds decoder {meta['decoders'][name].get('label')}, "
                    f"this job builds {head.decoder.label}"
                )
            head._plateau = dict(meta["plateau"][name])
            head.val_thresholds = dict((meta.get("val_thresholds") or {}).get(name, {}))
        self.stopped = {str(k): int(v) for k, v in meta.get("stopped", {}).items()}
