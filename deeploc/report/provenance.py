"""What produced a run's numbers: the settings that change results, and how they compare with the study's setup.

Settings come from metrics.json's ``config``, a :class:`deeploc.runs.record.RunRecord` (written by
``deeploc.training.run.summarise_config``). A metrics.json of deeploc 0.1 (fewer settings, no ``convention``) is
refused (:class:`deeploc.runs.record.RunRecordError`; the report lists the run as missing, with the reason).
Decisions: docs/decisions.md "Reports".
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any

from deeploc.evaluation.figures import root_name
from deeploc.metrics import recorded_convention
from deeploc.runs.record import RunRecord
from deeploc.runs.rundir import RunDir

LOO = "leave_one_out"
UNKNOWN = "unknown"

# The study's setup (protocol.md): what a run must match for its numbers to be comparable with the poster's.
STUDY_ENCODER = "sam2.1_hiera_s"
STUDY_IMAGE_SIZE = 1024
STUDY_EPOCHS = 20
STUDY_CONVENTION = "study"
STUDY_LOO = (3000, 300, 42)  # per seen subset: train images, valid images, name-shuffle seed

LABELS = {
    "decoder": "decoder",
    "feature": "feature",
    "encoder": "encoder",
    "encoder_overrides": "encoder overrides",
    "encoder_architecture": "encoder architecture",
    "decoder_options": "decoder options",
    "optimization": "optimizer / loss / LR scheduler",
    "weights": "weights",
    "image_size": "input size",
    "max_epochs": "max epochs",
    "schedule": "schedule",
    "lr": "lr",
    "weight_decay": "weight decay",
    "batch_size": "batch size",
    "precision": "precision",
    "augment": "augmentation",
    "split_sizes": "split sizes",
    "data": "data",
    "mask_polarity": "mask polarity",
    "convention": "metric convention",
}


@dataclass(frozen=True)
class Settings:
    """Every setting that changes a run's scores, except its subset (a matrix row) and its seed (averaged over).

    Runs with equal Settings repeat one experiment; runs that differ in any field are never averaged together.
    None = the run did not record the setting.
    """

    decoder: str
    feature: str
    encoder: str | None
    encoder_overrides: str  # compact JSON of encoder.overrides, "{}" = none
    # Compact JSON of every keyword of the encoder's network (architecture()) and of the decoder (but its inputs,
    # the feature): a plug-in's depth or width separates runs like any other setting.
    encoder_architecture: str
    decoder_options: str
    optimization: str  # compact JSON of the optimizer, loss and LR scheduler records, "null" = not recorded
    weights: str | None  # "sha256:<hex>" or "random:seed=<n>"
    image_size: int | None
    max_epochs: int | None
    schedule: str | None  # "fixed" or "plateau(patience=5, factor=0.1, min_lr=1e-06)"
    lr: float | None
    weight_decay: float | None
    batch_size: int | None
    precision: str | None
    augment: str  # compact JSON of data.augment, "null" = none
    split_sizes: str | None  # "full subsets" (cross, in_domain) or the leave-one-out sizes
    data: str | None  # "generated: <parameters>" or the dataset root
    mask_polarity: str  # how masks are read (data.mask_polarity)
    convention: str

    def show(self, key: str) -> str:
        """The value of `key` as tables and captions print it."""
        return show(key, getattr(self, key))

    @property
    def generated(self) -> bool:
        return bool(self.data and self.data.startswith("generated"))


KEYS: tuple[str, ...] = tuple(f.name for f in fields(Settings))
OTHER_KEYS: tuple[str, ...] = KEYS[2:]  # everything but decoder and feature, which every table names anyway


def show(key: str, value: Any) -> str:
    """A setting value as printed: "unknown" for None, "none" for empty overrides, short weight digests."""
    if value is None:
        return UNKNOWN
    if key in ("encoder_overrides", "augment", "encoder_architecture", "decoder_options", "optimization") and value in (
        "{}",
        "null",
    ):
        return "none"
    if key == "weights":
        kind, _, rest = str(value).partition(":")
        if kind == "random":
            return f"random ({rest.replace('=', ' ')})"
        if kind == "sha256":
            return f"sha256:{rest[:12]}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def read_settings(run_dir: Path, metrics: Mapping[str, Any]) -> Settings:
    """The Settings of a finished run from its metrics.json (`metrics`); refuses a record of another deeploc."""
    source = str(RunDir(run_dir).metrics_file)
    record = RunRecord.from_metrics(metrics, source)
    return Settings(
        decoder=record.decoder,
        feature=record.feature,
        encoder=_scalar(record.encoder),
        encoder_overrides=_compact(record.encoder_overrides or {}),
        encoder_architecture=_compact(record.encoder_architecture),
        decoder_options=_compact({k: v for k, v in (record.decoder_options or {}).items() if k != "inputs"}),
        optimization=_compact(record.optimization),
        weights=_str(record.weights),
        image_size=_scalar(record.image_size),
        max_epochs=_scalar(record.max_epochs),
        schedule=_schedule(record),
        lr=_float(record.lr),
        weight_decay=_float(record.weight_decay),
        batch_size=_scalar(record.batch_size),
        precision=_str(record.precision),
        augment=_compact(record.augment),
        split_sizes=_split_sizes(record),
        data=_data(record),
        mask_polarity=str(record.mask_polarity),
        convention=recorded_convention(metrics, source),
    )


# Keys whose value follows from another's in the built-ins (CONV-N's depth is in its label, an encoder config fixes
# its architecture): shown only where they tell apart runs that the other key does not.
_NAMED_BY = {"encoder_architecture": "encoder", "decoder_options": "decoder"}


def varying_keys(settings: Sequence[Settings]) -> list[str]:
    """The keys besides decoder and feature whose value differs between `settings`."""

    def varies(key: str) -> bool:
        by = _NAMED_BY.get(key)
        if by is None:
            return len({getattr(s, key) for s in settings}) > 1
        values: dict[Any, set[Any]] = {}
        for s in settings:
            values.setdefault(getattr(s, by), set()).add(getattr(s, key))
        return any(len(v) > 1 for v in values.values())

    return [k for k in OTHER_KEYS if varies(k)]


def common_value(settings: Sequence[Settings], key: str) -> str:
    """The value all `settings` share for `key`, or "varies: a; b" listing the values."""
    values = list(dict.fromkeys(s.show(key) for s in settings))
    return values[0] if len(values) == 1 else "varies: " + "; ".join(values)


def study_gaps(s: Settings, split: str) -> list[str]:
    """How `s` differs from the study's setup (protocol.md); empty when the numbers are comparable."""
    gaps = []
    if s.weights is None:
        gaps.append("encoder weights not recorded")
    elif s.weights.startswith("random"):
        gaps.append("RANDOM encoder weights")
    if s.encoder != STUDY_ENCODER:
        gaps.append(f"encoder {s.show('encoder')} (study: {STUDY_ENCODER})")
    if s.encoder_overrides != "{}":
        gaps.append(f"encoder overrides {s.encoder_overrides}")
    if s.image_size != STUDY_IMAGE_SIZE:
        gaps.append(f"input {s.show('image_size')} (study: {STUDY_IMAGE_SIZE})")
    if not isinstance(s.max_epochs, int) or s.max_epochs < STUDY_EPOCHS:
        gaps.append(f"{s.show('max_epochs')} epochs (study: {STUDY_EPOCHS})")
    if s.data is None:
        gaps.append("data not recorded")
    elif s.generated:
        gaps.append("GENERATED data (study: Dolos)")
    if s.convention != STUDY_CONVENTION:
        gaps.append(f"{s.convention} metric convention (study: DeCLIP's, metrics.convention={STUDY_CONVENTION})")
    if split == LOO and s.split_sizes != loo_sizes(*STUDY_LOO):
        gaps.append(f"split sizes {s.show('split_sizes')} (study: {loo_sizes(*STUDY_LOO)})")
    return gaps


CAPTION_KEYS = (
    "encoder",
    "encoder_overrides",
    "weights",
    "image_size",
    "max_epochs",
    "split_sizes",
    "data",
    "convention",
)


def caption(settings: Sequence[Settings], versions: Sequence[str | None] = ()) -> str:
    """One line naming what produced a figure: encoder, weights, input size, epochs, data, metric convention and
    deeploc version; settings that differ between the figure's configurations are named, not listed."""
    shared, varying = [], []
    for k in CAPTION_KEYS:
        values = list(dict.fromkeys(_caption_value(s, k) for s in settings))
        if len(values) > 1:
            varying.append(LABELS[k])
        elif values and values[0] not in ("none", "full subsets"):
            shared.append(f"{LABELS[k]} {values[0]}")
    text = ", ".join([*shared, f"deeploc {version_text(versions)}"])
    return text + (f"; differing between configurations (see their labels): {', '.join(varying)}" if varying else "")


def _caption_value(s: Settings, key: str) -> str:
    """A setting as a caption prints it: a real data root by its folder name, no machine path."""
    if key == "data" and s.data is not None and not s.generated:
        return root_name(s.data)
    return s.show(key)


def version_text(versions: Sequence[str | None]) -> str:
    """The deeploc versions that wrote the runs."""
    shown = dict.fromkeys(v or UNKNOWN for v in versions)
    return " / ".join(shown) or UNKNOWN


def loo_sizes(n_train: Any, n_valid: Any, seed: Any) -> str:
    return f"{n_train} train + {n_valid} valid per seen subset, seed {seed}"


def sort_key(s: Settings) -> tuple:
    """A sort key (None sorts first)."""
    return tuple((v is not None, str(v)) for v in astuple(s))


def _compact(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _scalar(value: Any) -> Any:
    """`value` itself when it is a JSON scalar, else its compact JSON (a hand-edited file must not break the report)."""
    return value if value is None or isinstance(value, str | int | float | bool) else _compact(value)


def _float(value: Any) -> Any:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else _scalar(value)


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def _schedule(record: RunRecord) -> str | None:
    name, plateau = _scalar(record.schedule), record.plateau
    if name != "plateau":
        return name
    plateau = plateau if isinstance(plateau, dict) else {}
    return "plateau(" + ", ".join(f"{k}={show(k, plateau.get(k))}" for k in ("patience", "factor", "min_lr")) + ")"


def _split_sizes(record: RunRecord) -> str | None:
    if record.split != LOO:
        return "full subsets"
    values = [record.split_n_train, record.split_n_valid, record.split_seed]
    return None if None in values else loo_sizes(*values)


def _data(record: RunRecord) -> str | None:
    """Generated data are identified by their parameters (generation is deterministic), real data by their root."""
    if record.generated_data:
        params = record.data_params
        if not isinstance(params, dict):
            return "generated: parameters not recorded"
        return "generated: " + ", ".join(f"{k}={params[k]}" for k in sorted(params))
    return _str(record.data)
