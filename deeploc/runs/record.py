"""The settings a run records in metrics.json (``"config"``): one schema for the writer and every reader.

``deeploc.training.run.summarise_config`` builds a :class:`RunRecord` from the run's config, data and model;
``deeploc.report.provenance`` reads one back (:meth:`RunRecord.from_metrics`) to tell experiments apart. The
field order is the key order of metrics.json. Values are plain JSON (numbers, strings, lists, dicts, None).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

from deeploc.errors import DeeplocError
from deeploc.runs.rundir import METRICS_FILE


class RunRecordError(DeeplocError, ValueError):
    """A metrics.json whose ``config`` is not a run record of this deeploc (names the file and the fix)."""


@dataclass(frozen=True)
class RunRecord:
    """What identifies a run: every setting that changes its scores, the data it used and how maps were served."""

    decoder: str  # the decoder's label (e.g. CONV-4)
    depth: Any
    decoder_name: str  # registry name
    decoder_options: dict[str, Any]  # every keyword argument of the decoder
    parameters: Any
    feature: str  # the map(s) the decoder reads, joined by "+"
    split: str
    subset: Any
    subsets: list[str]
    encoder_kind: str
    encoder: str
    encoder_overrides: dict[str, Any]
    encoder_weights: str  # "random" or the checkpoint path
    weights: str  # "sha256:<hex>" of the checkpoint or "random:seed=<n>"
    image_size: Any
    max_epochs: Any
    schedule: str
    plateau: dict[str, Any] | None
    lr: Any
    weight_decay: Any
    batch_size: Any
    precision: str
    augment: Any
    n_train: Any
    n_valid: Any
    split_n_train: Any
    split_n_valid: Any
    split_seed: Any
    data: str
    data_source: str
    data_source_options: dict[str, Any]
    generated_data: bool
    data_params: Any
    mask_polarity: str
    mask_threshold: Any
    seed: Any
    features: str | None  # how the maps were served: "cache" or "stream"
    deeploc_version: str
    # Every constructor keyword that defines the encoder's network (``architecture()``: a plug-in's depth, width,
    # ...): runs whose encoders differ in any of them are different experiments. None: not recorded.
    encoder_architecture: dict[str, Any] | None = None
    # The optimizer, loss and LR scheduler as plain records (``model.optimizer``, ``model.loss``,
    # ``model.lr_scheduler``; ``{"_target_": ..., <plain keywords>}``): another one is another experiment.
    optimization: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The record as metrics.json's ``config`` object (field order)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], source: str = METRICS_FILE) -> RunRecord:
        """A record read back from metrics.json's ``config``; refuses one that lacks a field (another deeploc)."""
        names = [f.name for f in fields(cls)]
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [k for k in required if k not in config]
        if missing:
            raise RunRecordError(
                f"{source}: its config lacks {', '.join(missing)}: it was not written by this deeploc (records of "
                "deeploc 0.1 are not read). Train the run again with the same overrides and if_finished=retrain"
            )
        return cls(**{k: config[k] for k in names if k in config})

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any], source: str = METRICS_FILE) -> RunRecord:
        """The record of a run's metrics.json object."""
        config = metrics.get("config")
        if not isinstance(config, Mapping):
            raise RunRecordError(f"{source} has no config object; train the run again (if_finished=retrain)")
        return cls.from_dict(config, source)
