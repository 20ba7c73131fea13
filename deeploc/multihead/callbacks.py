"""What makes each head of a multi-head job a run of its own: its checkpoints (:class:`HeadCheckpoint`), its
bookkeeping (:class:`HeadsBook`: best values, epoch lines, W&B panels) and its loggers (:class:`HeadLoggers`).

Every head's checkpoint is the one its single run would write (:func:`head_checkpoint`): its decoder tensors, its
parameter group's optimiser state, its callbacks' states under the single run's keys, its hyperparameters and
record, and the job's loop state (the same batches: the same epoch and step).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from deeploc.metrics import optimized_metrics
from deeploc.training.callbacks import BestValidation, PredictionPanel, epoch_line, switch_off_wandb
from deeploc.training.cluster import RequeueOnSignal

__all__ = [
    "HeadCheckpoint",
    "HeadLoggers",
    "HeadsBook",
    "JobRequeue",
    "head_checkpoint",
    "optimizer_group_state",
]

log = logging.getLogger("deeploc.multihead")


def _head_metrics(metrics: Mapping[str, Any], head: str) -> dict[str, Any]:
    """The values head ``head`` logged (``<head>/<key>``), under the single run's keys."""
    prefix = f"{head}/"
    return {key[len(prefix) :]: value for key, value in metrics.items() if key.startswith(prefix)}


def optimizer_group_state(state: Mapping[str, Any], index: int) -> dict[str, Any]:
    """Parameter group ``index`` of an optimiser's ``state_dict()`` as the state dict of an optimiser holding that
    group alone (what a single run's Adam over the same parameters saves)."""
    group = state["param_groups"][index]
    ids = list(group["params"])
    return {
        "state": {i: state["state"][p] for i, p in enumerate(ids) if p in state["state"]},
        "param_groups": [{**group, "params": list(range(len(ids)))}],
    }


def head_checkpoint(trainer: L.Trainer, head: str) -> dict[str, Any]:
    """Head ``head``'s checkpoint in its single run's format, from the job's current state."""
    job = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
    module = trainer.lightning_module
    own = module.heads[head]
    prefix = f"heads.{head}."
    shared = ("state_dict", "optimizer_states", "callbacks", "deeploc", "hparams_name", "hyper_parameters")
    checkpoint = {key: value for key, value in job.items() if key not in shared}
    checkpoint["state_dict"] = {k[len(prefix) :]: v for k, v in job["state_dict"].items() if k.startswith(prefix)}
    checkpoint["optimizer_states"] = [optimizer_group_state(job["optimizer_states"][0], module.head_index(head))]
    book = next(c for c in trainer.callbacks if isinstance(c, HeadsBook))
    checkpoint["callbacks"] = {
        **book.single_states(head),
        **{
            c.single_state_key: c.single_state()
            for c in trainer.callbacks
            if isinstance(c, HeadCheckpoint) and c.head == head
        },
    }
    checkpoint["hparams_name"] = own._hparams_name
    checkpoint["hyper_parameters"] = dict(own.hparams)
    own.on_save_checkpoint(checkpoint)  # the encoder's weights out; encoder identity, decoder record, schedule in
    return checkpoint


class HeadCheckpoint(ModelCheckpoint):
    """One of a head's ``conf/callbacks`` checkpoints (``best`` or ``last``), in the head's run directory: it
    monitors the head's own value and writes the head's checkpoint (:func:`head_checkpoint`).

    Args:
        head: the head's name.
        single_state_key: the state key of this callback in the single run (its checkpoint stores the state there).
        kwargs: the single run's ``ModelCheckpoint`` arguments (``monitor`` as the single run names it; Hydra's
            ``_target_`` and the like are left out).
    """

    def __init__(self, head: str, single_state_key: str, **kwargs: Any) -> None:
        kwargs = {k: v for k, v in kwargs.items() if not k.startswith("_")}
        self.head = head
        self.single_state_key = single_state_key
        self.single_monitor = kwargs.get("monitor")
        super().__init__(**{**kwargs, "monitor": f"{head}/{self.single_monitor}" if self.single_monitor else None})

    @property
    def state_key(self) -> str:
        return f"{self.head}/{super().state_key}"

    def single_state(self) -> dict[str, Any]:
        return {**self.state_dict(), "monitor": self.single_monitor}

    def _should_skip_saving_checkpoint(self, trainer: L.Trainer) -> bool:
        return super()._should_skip_saving_checkpoint(trainer) or not trainer.lightning_module.trains(self.head)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        trainer.strategy.save_checkpoint(head_checkpoint(trainer, self.head), filepath)
        trainer.strategy.barrier("HeadCheckpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath


class HeadsBook(PredictionPanel):
    """The per-head bookkeeping of a multi-head job in one callback, heads by name (as dinov2 keeps its grid of
    linear heads): each training head's best validation values (its single run's ``BestValidation`` state, saved
    in its checkpoints), its epoch line (``epoch_lines``), and its W&B panels at its single run's epochs in its own
    W&B run (``panels``: the configured ``PredictionPanel``, or None), one encoder pass drawing every head's."""

    def __init__(
        self,
        heads: Sequence[str],
        loggers: Mapping[str, Sequence[Logger]],
        panels: PredictionPanel | None = None,
        epoch_lines: bool = True,
    ) -> None:
        super().__init__(panels.every_n_epochs, panels.n_images) if panels else super().__init__()
        self.panels = panels is not None
        self.epoch_lines = epoch_lines
        self.best = {name: BestValidation(optimized_metrics()) for name in heads}
        self.wandb = {name: [lg for lg in lgs if isinstance(lg, WandbLogger)] for name, lgs in loggers.items()}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {name: best.state_dict() for name, best in self.best.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name, best in self.best.items():
            best.load_state_dict(state_dict.get(name, {}))

    def single_states(self, head: str) -> dict[str, Any]:
        """Head ``head``'s callback states under its single run's keys (for its checkpoints)."""
        return {BestValidation.__qualname__: self.best[head].state_dict()} if head in self.best else {}

    # ------------------------------------------------------------ epoch lines
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not (self.epoch_lines and trainer.is_global_zero):
            return
        seconds = time.perf_counter() - getattr(self, "_start", time.perf_counter())
        groups = trainer.optimizers[0].param_groups
        for name, _ in pl_module.training_heads():
            metrics = {k: float(v) for k, v in _head_metrics(trainer.callback_metrics, name).items()}
            lr = groups[pl_module.head_index(name)]["lr"]
            log.info("%s: %s", name, epoch_line(trainer.current_epoch, trainer.max_epochs, metrics, lr, seconds))

    # ------------------------------------------------------- best validation
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for name, best in self.best.items():
            if pl_module.trains(name):
                best.update(_head_metrics(trainer.callback_metrics, name))

    # ----------------------------------------------------------------- panels
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.panels:
            super().on_validation_epoch_end(trainer, pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.panels:
            super().on_test_end(trainer, pl_module)

    def targets(self, trainer: L.Trainer, pl_module: Any, training: bool) -> list[tuple[Any, list[WandbLogger]]]:
        heads = pl_module.training_heads() if training else pl_module.heads.items()
        return [(head, self.wandb.get(name, [])) for name, head in heads]

    def wandb_failed(self, trainer: L.Trainer, exc: OSError, needed: int) -> None:
        """W&B off for every head: no more panels, and the heads' loggers keep their other loggers only."""
        self.wandb = {name: [] for name in self.wandb}
        for logger in trainer.loggers:
            if isinstance(logger, HeadLoggers):
                logger.heads = {
                    n: [lg for lg in lgs if not isinstance(lg, WandbLogger)] for n, lgs in logger.heads.items()
                }
        switch_off_wandb(trainer, exc, needed)


class JobRequeue(RequeueOnSignal):
    """:class:`~deeploc.training.cluster.RequeueOnSignal` writing the job's checkpoint (all heads) into the job's folder,
    from which the requeued job resumes; the heads' run directories only ever hold single-run checkpoints."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = Path(folder)

    def checkpoint_path(self, trainer: L.Trainer) -> Path:
        return self.folder / self.filename


class HeadLoggers(Logger):
    """The job's logger: hands each head's values (``<head>/<key>``) to that head's own loggers under the single
    run's keys, with the job's ``epoch``. ``hparams``: each head's module hyperparameters (logged with the data
    module's, as Lightning logs a single run's)."""

    def __init__(self, loggers: Mapping[str, Sequence[Logger]], hparams: Mapping[str, Mapping[str, Any]]) -> None:
        super().__init__()
        self.heads = {name: list(lgs) for name, lgs in loggers.items()}
        self.hparams = {name: dict(h) for name, h in hparams.items()}

    @property
    def name(self) -> str:
        return "heads"

    @property
    def version(self) -> None:
        return None

    def all_loggers(self) -> list[Logger]:
        return [logger for loggers in self.heads.values() for logger in loggers]

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        for name, loggers in self.heads.items():
            for logger in loggers:
                logger.log_hyperparams({**self.hparams.get(name, {}), **dict(params or {})})

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        for name, loggers in self.heads.items():
            own = _head_metrics(metrics, name)
            if not own:
                continue
            if "epoch" in metrics:
                own["epoch"] = metrics["epoch"]
            for logger in loggers:
                logger.log_metrics(own, step)

    @rank_zero_only
    def save(self) -> None:
        _ = [logger.save() for logger in self.all_loggers()]

    @rank_zero_only
    def finalize(self, status: str) -> None:
        _ = [logger.finalize(status) for logger in self.all_loggers()]
