"""Checks of a composed training config before any work (data indexing, feature extraction, training).

Each problem is named by the key a user types on the command line, with the fix; all problems of a config are
reported together in one :class:`~deeploc.errors.ConfigError`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

from deeploc.config import CONF_DIR
from deeploc.data.masks import POLARITIES
from deeploc.errors import ConfigError
from deeploc.features.serving import MODES as FEATURE_MODES
from deeploc.metrics import CONVENTIONS, optimized_metrics
from deeploc.metrics.store import PREDICTION_DTYPES
from deeploc.registry import import_modules
from deeploc.runs.naming import override_key

IF_FINISHED = ("skip", "eval", "retrain")
# Config groups an `arch` choice sets together.
ARCH_PARTS = ("decoder", "feature")
_ABSENT = object()


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value: Any) -> bool:
    return _int(value) and value >= 1


def _non_negative_int(value: Any) -> bool:
    return _int(value) and value >= 0


def _optional_positive_int(value: Any) -> bool:
    return value is None or _positive_int(value)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _non_negative_number(value: Any) -> bool:
    return _number(value) and value >= 0


def _fraction(value: Any) -> bool:
    return _number(value) and 0 < value < 1


def _devices(value: Any) -> bool:
    """Lightning's forms: a count >= 1, -1 (all), "auto", a list of indices or a string "0,1"."""
    if isinstance(value, (list, ListConfig)):
        return len(value) > 0 and all(_non_negative_int(v) for v in value)
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        return value == "auto" or (len(parts) > 0 and all(p.isdigit() for p in parts))
    return _positive_int(value) or value == -1


def _fast_dev_run(value: Any) -> bool:
    return isinstance(value, bool) or _non_negative_int(value)


def _one_of(options: Any) -> Callable[[Any], bool]:
    return lambda value: value in options


# (key as typed on the command line, rule, what the value must be). Keys a config does not have are skipped.
RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    (
        "trainer.max_epochs",
        _positive_int,
        "must be a positive integer (-1, Lightning's 'no limit', would train forever: give a number of epochs; "
        "schedule=declip stops by itself before its max_epochs)",
    ),
    ("trainer.devices", _devices, "must be a positive integer, -1 (all), 'auto' or a list of device indices"),
    ("trainer.num_nodes", _positive_int, "must be a positive integer"),
    ("trainer.fast_dev_run", _fast_dev_run, "must be true/false or a number of batches"),
    ("data.batch_size", _positive_int, "must be a positive integer"),
    ("data.eval_batch_size", _optional_positive_int, "must be a positive integer, or null (= data.batch_size)"),
    ("data.num_workers", _non_negative_int, "must be an integer >= 0 (0 loads data in the main process)"),
    ("split.n_train", _optional_positive_int, "must be a positive integer, or null (all images)"),
    ("split.n_valid", _optional_positive_int, "must be a positive integer, or null (all images)"),
    ("features.batch_size", _positive_int, "must be a positive integer"),
    (
        "features.mode",
        _one_of(FEATURE_MODES),
        "must be auto (cache when it fits, else stream), cache or stream (the encoder on every batch)",
    ),
    # 0 is allowed: a frozen decoder (tests of the schedule use it).
    ("model.lr", _non_negative_number, "must be a number >= 0"),
    ("model.weight_decay", _non_negative_number, "must be a number >= 0"),
    ("model.plateau_patience", _positive_int, "must be a positive integer (epochs)"),
    ("model.plateau_factor", _fraction, "must be a number between 0 and 1"),
    ("model.min_lr", _non_negative_number, "must be a number >= 0"),
    ("seed", _int, "must be an integer"),
    ("overlays", _non_negative_int, "must be an integer >= 0 (test images rendered per subset)"),
    ("if_finished", _one_of(IF_FINISHED), f"must be one of {', '.join(IF_FINISHED)}"),
    (
        "optimized_metric",
        lambda value: value in optimized_metrics(),
        "must be val/loss or val/<name> of a registered metric (built-in: iou, f1_fixed, f1_best, ap); a metric of "
        "your own registers when its module is listed under plugins",
    ),
    (
        "metrics.convention",
        _one_of(CONVENTIONS),
        f"must be one of {', '.join(CONVENTIONS)} (study: DeCLIP's formulas, the study's numbers; the default)",
    ),
    (
        "metrics.conventions",
        lambda v: v is None or (len(v) > 0 and len(set(v)) == len(v) and all(c in CONVENTIONS for c in v)),
        f"must be null or a list of distinct conventions among {', '.join(CONVENTIONS)}, e.g. [study,trufor,benco]",
    ),
    ("eval.save_predictions", lambda v: isinstance(v, bool), "must be true or false"),
    ("eval.prediction_dtype", _one_of(PREDICTION_DTYPES), f"must be one of {', '.join(PREDICTION_DTYPES)}"),
    ("data.mask_polarity", _one_of(POLARITIES), f"must be one of {', '.join(POLARITIES)}"),
    (
        "data.mask_threshold",
        lambda v: v is None or (_non_negative_int(v) and v <= 254),
        "must be null (exact 0 / 255 masks) or an integer in [0, 254] (mask values above it read white)",
    ),
    ("data.allow_empty_masks", lambda v: isinstance(v, bool), "must be true or false"),
    ("data.max_manipulated_fraction", lambda v: _number(v) and 0 < v <= 1, "must be a number in (0, 1]"),
)


def check_config(cfg: DictConfig) -> None:
    """Fail before any work on values still to be provided and on values that cannot work, naming each key."""
    check_required(cfg)
    check_settings(cfg)


def check_required(cfg: DictConfig) -> None:
    """Every value is set (``???`` nowhere) and there is a dataset (resolves the whole config: inside a Hydra job)."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except InterpolationToMissingValueError as exc:  # a value that refers to an unset one names the unset one
        key = re.search(r"Missing mandatory value: (\S+)", str(exc))
        missing = key.group(1) if key else exc.full_key
        raise ConfigError(f"config value {missing} is not set: pass {missing}=...") from None
    except MissingMandatoryValue as exc:
        raise ConfigError(f"config value {exc.full_key} is not set: pass {exc.full_key}=...") from None
    if cfg.data.get("root") is None and cfg.data.get("synthetic") is None:
        raise ConfigError(
            "data.root is not set: pass data.root=/path/to/wacv_data (the unzipped Dolos folder) or set DOLOS_ROOT; "
            "without Dolos, use data=synthetic"
        )


def check_settings(cfg: DictConfig) -> None:
    """Each value of :data:`RULES` the config has can work; all problems are reported in one error."""
    problems = [
        f"{key}={value!r} {requirement}"
        for key, rule, requirement in RULES
        if (value := OmegaConf.select(cfg, key, default=_ABSENT)) is not _ABSENT and not rule(value)
    ]
    if problems:
        raise ConfigError("; ".join(problems))


def check_choices(hydra: DictConfig) -> None:
    """Refuse command lines that would silently run something else than they say (``hydra`` = the Hydra config).

    * ``arch`` (chosen on the command line or by an experiment) sets decoder and feature together; a
      ``decoder``/``feature`` override next to it would train another pair than the run's name and arch say.
    * an experiment that defines a sweep (``hydra.sweeper.params``) run without ``-m`` would train one
      configuration of it.
    """
    overrides = [str(o) for o in hydra.overrides.task]
    keys = {override_key(o): o for o in overrides}
    arch = hydra.runtime.choices.get("arch")
    clashing = [line for key, line in keys.items() if key.split(".")[0] in ARCH_PARTS]
    if arch is not None and clashing:
        experiment = hydra.runtime.choices.get("experiment")
        source = f"arch={arch}" if "arch" in keys else f"experiment={experiment} chooses arch={arch}"
        raise ConfigError(
            f"{source}, which sets decoder and feature together, and {' '.join(clashing)} overrides them: the run "
            f"would be named after arch but train another decoder or feature. Choose the pair with arch only "
            f"(arch=<decoder>_<feature>, one of: {', '.join(arch_options())}; in a sweep over arch, e.g. "
            "experiment=paper_table, narrow it with arch=...), or drop arch (~arch) and set decoder=... feature=..."
        )
    params = hydra.sweeper.get("params") or {}
    if params and hydra.get("mode") != RunMode.MULTIRUN:
        experiment = hydra.runtime.choices.get("experiment")
        search = hydra.runtime.choices.get("hparams_search")
        grid = " ".join(f"{key}={value}" for key, value in params.items())
        source = f"hparams_search={search}" if search else f"experiment={experiment}" if experiment else "this config"
        raise ConfigError(
            f"{source} is a sweep ({grid}) but the command has no -m, so it would train only one configuration of "
            f"it. Add -m: deeploc-train -m {' '.join(overrides)}"
        )


class CheckBeforeLaunch(Callback):
    """Hydra callback (conf/train.yaml): check the settings a run or a whole sweep shares ONCE, before Hydra
    creates any run directory or starts a job. A problem every job of a sweep would have (``-m model.lr=-1
    seed=1,2``) is then one line and exit 1, instead of one failure per job and stub run directories; values a
    sweep varies are checked in each job (:func:`check_config`)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    @staticmethod
    def _check(config: DictConfig) -> None:
        try:
            import_modules(config.get("plugins"), "plugins")  # their metrics, encoders... are valid settings
            check_choices(config.hydra)
            check_settings(config)
        except ConfigError as exc:  # Hydra turns a callback's exceptions into warnings; an exit it lets through
            raise LaunchRefused(str(exc)) from None


class LaunchRefused(SystemExit):
    """A run or sweep refused before launch: exit 1 with its one ``console_line`` (deeploc.cli.app prints it;
    without deeploc's app, Python prints the message)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.console_line = message


def arch_options() -> list[str]:
    """The ``arch`` choices in conf/arch."""
    return sorted(p.stem for p in (Path(CONF_DIR) / "arch").glob("*.yaml"))
