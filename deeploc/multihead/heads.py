"""The heads of a multi-head job, each composed by Hydra as the single run it stands for.

Head ``H`` of a job launched with task overrides ``O`` is the single run ``O - heads + arch=H`` (or ``decoder=H``),
with ``experiment=<head_experiment>`` in place of the job's experiment when set. Hydra's own config loader composes
it from the same conf/ and the job's Hydra overrides, so its run directory is the one that single run uses.

Heads share one stream of batches, so every setting but the decoder, its map, the optimiser and schedule
(``model``) and the per-run folders must be the job's (:func:`check_shared`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write

from deeploc.errors import ConfigError
from deeploc.runs.naming import override_key
from deeploc.runs.rundir import RunDir

__all__ = ["Head", "check_run_folders", "check_shared", "compose_heads", "head_inputs", "head_names", "head_overrides"]

# Settings a head may have of its own: what it trains (decoder, feature, the model's optimiser and schedule), and
# what names or places its run (its sweep folder, its checkpoint folders, its loggers).
OWN_KEYS = ("decoder", "feature", "model", "heads", "head_experiment", "sweep_name", "callbacks", "logger")
OWN_TRAINER_KEYS = ("default_root_dir",)


@dataclass(frozen=True)
class Head:
    """One head: the single run it stands for."""

    name: str
    overrides: list[str]  # the single run's task overrides
    cfg: DictConfig  # its config, every interpolation resolved (as that run sees it)
    task: DictConfig  # its config before resolution (what Hydra saves as .hydra/config.yaml)
    hydra: DictConfig  # its Hydra config (runtime.output_dir = its run directory)

    @property
    def run(self) -> RunDir:
        return RunDir(Path(self.hydra.runtime.output_dir))

    def write_hydra_files(self) -> None:
        """``<run>/.hydra/{config,hydra,overrides}.yaml``, as Hydra writes them for a single run."""
        subdir = self.hydra.output_subdir
        if subdir is None:
            return
        folder = self.run.path / str(subdir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.yaml").write_text(OmegaConf.to_yaml(self.task))
        (folder / "hydra.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create({"hydra": self.hydra})))
        (folder / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(list(self.overrides))))


def head_names(cfg: DictConfig) -> list[str]:
    """The job's ``heads``, checked: a non-empty list of distinct names."""
    heads = cfg.get("heads")
    if isinstance(heads, str):
        heads = [heads]
    if not isinstance(heads, (list, ListConfig)) or not heads or not all(isinstance(h, str) and h for h in heads):
        raise ConfigError(
            f"heads={heads!r} must be a list of decoder names from conf/arch or conf/decoder, e.g. "
            "heads=[conv20_image_embed,conv20_high_res_feats_1]"
        )
    names = [str(h) for h in heads]
    twice = sorted({h for h in names if names.count(h) > 1})
    if twice:
        raise ConfigError(f"heads={names} names {', '.join(twice)} twice: each head trains once; drop the duplicate")
    return names


def head_overrides(task: Iterable[str], choice: str, head_experiment: str | None) -> list[str]:
    """The single run's task overrides: the job's without ``heads`` / ``head_experiment`` (and with
    ``experiment=<head_experiment>`` when that is set), plus ``choice`` (``arch=<head>`` or ``decoder=<head>``)."""
    kept = [line for line in map(str, task) if override_key(line) not in ("heads", "head_experiment")]
    if head_experiment:
        kept = [line for line in kept if override_key(line) != "experiment"] + [f"experiment={head_experiment}"]
    return [*kept, choice]


def _group_options(group: str, hydra: DictConfig) -> list[str]:
    """The choices of config group ``group`` on the job's config search path (``--config-dir`` and
    ``hydra.searchpath`` add a user's own)."""
    overrides = [*map(str, hydra.overrides.hydra), *map(str, hydra.overrides.task)]
    loader = GlobalHydra.instance().config_loader()
    return sorted(loader.get_group_options(group, config_name=hydra.job.config_name, overrides=overrides))


def _choice(name: str, hydra: DictConfig) -> str:
    """``arch=<name>`` or ``decoder=<name>``: where ``name`` is a config choice (conf/arch first)."""
    options = {group: _group_options(group, hydra) for group in ("arch", "decoder")}
    for group, names in options.items():
        if name in names:
            return f"{group}={name}"
    raise ConfigError(
        f"heads: unknown head {name!r}: it is neither a conf/arch choice ({', '.join(options['arch'])}) nor a "
        f"conf/decoder choice ({', '.join(options['decoder'])})"
    )


def compose_heads(cfg: DictConfig, hydra: DictConfig) -> list[Head]:
    """The heads of the job whose config is ``cfg`` and Hydra config ``hydra`` (``HydraConfig.get()``): each composed
    as its single run, checked like one (:func:`deeploc.settings.check_config` and ``check_choices``) and checked to
    share the job's settings (:func:`check_shared`). Where they write is checked by :func:`check_run_folders`."""
    from deeploc.training.settings import check_choices, check_config

    names = head_names(cfg)
    task = [str(o) for o in hydra.overrides.task]
    clashing = [line for line in task if override_key(line) in ("arch", "decoder")]
    if clashing:
        raise ConfigError(
            f"heads chooses every head's decoder, and {' '.join(clashing)} would set one for all of them; drop it "
            "(heads=[...] takes conf/arch or conf/decoder names)"
        )
    shared = _plain(cfg)
    heads = []
    trained: dict[str, str] = {}  # what a head trains (decoder, its map, model settings) -> its name
    for name in names:
        overrides = head_overrides(task, _choice(name, hydra), cfg.get("head_experiment"))
        head = _compose(name, overrides, hydra)
        try:
            check_choices(head.hydra)
            check_config(head.cfg)
        except ConfigError as exc:
            raise ConfigError(f"head {name} (the run {' '.join(overrides)}): {exc}") from None
        if head.cfg.get("heads"):
            raise ConfigError(
                f"head {name}: the run {' '.join(overrides)} would itself train heads={list(head.cfg.heads)}; set "
                "head_experiment to the single-run experiment the heads belong to (as experiment=paper_table_multihead "
                "does with head_experiment: paper_table)"
            )
        check_shared(shared, head)
        what = repr([_plain(head.cfg[key]) for key in ("decoder", "feature", "model")])
        if what in trained:
            raise ConfigError(
                f"heads {trained[what]} and {name} are the same configuration under two names (decoder "
                f"{head.cfg.decoder.get('_target_', '?').rsplit('.', 1)[-1]} on {head.cfg.feature.name}, the same "
                "model settings): it would train twice; keep one of them"
            )
        trained[what] = name
        heads.append(head)
    return heads


def check_run_folders(heads: Sequence[Head], job: Path) -> None:
    """Every head needs a run directory of its own, other than the job's folder."""
    folders: dict[Path, str] = {}
    for head in heads:
        if head.run.path == job:
            raise ConfigError(
                f"head {head.name} would write into the job's own folder {job}: a fixed hydra.run.dir or "
                "hydra.sweep.subdir names one folder, and each head needs its own run directory. Drop it (the heads' "
                "directories follow from their overrides; hydra.sweep.dir or paths.output_dir choose where they go)"
            )
        if head.run.path in folders:
            raise ConfigError(
                f"heads {folders[head.run.path]} and {head.name} are the same run ({head.run.path}): keep one of them"
            )
        folders[head.run.path] = head.name


def _compose(name: str, overrides: list[str], job_hydra: DictConfig) -> Head:
    """Compose the single run ``overrides`` as Hydra composes a job (the job's Hydra overrides first), decide its run
    directory as Hydra does, and resolve its config with that directory as ``hydra:runtime.output_dir``."""
    loader = GlobalHydra.instance().config_loader()
    composed = loader.load_configuration(
        config_name=job_hydra.job.config_name,
        overrides=[*map(str, job_hydra.overrides.hydra), *overrides],
        run_mode=RunMode.RUN,
        from_shell=False,
    )
    hydra_config = HydraConfig.instance()
    saved = hydra_config.cfg
    try:
        hydra_config.set_config(composed)
        if composed.hydra.mode == RunMode.MULTIRUN:
            folder = Path(str(composed.hydra.sweep.dir)) / str(composed.hydra.sweep.subdir)
        else:
            folder = Path(str(composed.hydra.run.dir))
        with read_write(composed.hydra.runtime), open_dict(composed.hydra.runtime):
            composed.hydra.runtime.output_dir = os.path.abspath(folder)
        hydra_config.set_config(composed)
        task = copy.deepcopy(composed)
        with read_write(task), open_dict(task):
            del task["hydra"]
        resolved = OmegaConf.create(OmegaConf.to_container(task, resolve=True))
        hydra_node = copy.deepcopy(hydra_config.cfg.hydra)
    finally:
        hydra_config.cfg = saved
    OmegaConf.set_readonly(hydra_node, False)
    return Head(name=name, overrides=overrides, cfg=resolved, task=task, hydra=hydra_node)


def _plain(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def _flat(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """A plain config as ``{dotted key: value}`` (an empty mapping is a value)."""
    if isinstance(cfg, Mapping) and cfg:
        return {k: v for key, item in cfg.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): cfg}


def check_shared(job: Mapping[str, Any], head: Head) -> None:
    """Refuse a head whose run would differ from the job in a setting the heads share (data, split, encoder,
    features, trainer, seed...): one stream of batches cannot serve it."""
    theirs = _plain(head.cfg)
    skip = set(OWN_KEYS)
    mine = {k: v for k, v in job.items() if k not in skip}
    other = {k: v for k, v in theirs.items() if k not in skip}
    for cfg in (mine, other):
        cfg["trainer"] = {k: v for k, v in (cfg.get("trainer") or {}).items() if k not in OWN_TRAINER_KEYS}
    mine, other = _flat(mine), _flat(other)
    keys = [k for k in dict.fromkeys([*mine, *other]) if mine.get(k, "<absent>") != other.get(k, "<absent>")]
    if keys:
        details = "; ".join(f"{k}: {other.get(k, '<absent>')!r} (job: {mine.get(k, '<absent>')!r})" for k in keys[:5])
        raise ConfigError(
            f"head {head.name} (the run {' '.join(head.overrides)}) differs from the job in settings the heads share: "
            f"{details}. The heads of a job train on one stream of batches; train this one on its own "
            f"(deeploc-train {' '.join(head.overrides)}) or make the settings equal"
        )


def head_inputs(heads: Sequence[Head], encoder: Any) -> tuple[str, ...]:
    """The maps the heads read together, in the encoder's order (the union of their decoders' inputs)."""
    from hydra.utils import instantiate

    wanted: set[str] = set()
    for head in heads:
        decoder = instantiate(head.cfg.decoder)(
            feature_specs=encoder.feature_specs, target_stride=encoder.target_stride
        )
        wanted.update(decoder.inputs)
    return tuple(name for name in encoder.feature_specs if name in wanted)
