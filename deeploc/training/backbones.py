"""``backbone.<family>=<conf/encoder choice>``: the encoder of each configuration of a sweep over several backbones.

A sweep that pairs configurations on different backbones (``experiment=backbones``: the study's SAM2 archs beside
DeCLIP's CONV-20 on CLIP layer 20) cannot take one ``encoder=`` for all of them: it would put the CLIP maps on a SAM2
encoder or the other way round. Such a sweep sets ``backbone: {sam2: hiera_s, clip: clip_vitl14}`` (keys: encoder
families, the registry names of :data:`deeploc.models.encoders.ENCODERS`); each job then uses the encoder its
family's key names, e.g. ``deeploc-train -m experiment=backbones backbone.sam2=micro backbone.clip=clip_micro``. An
``encoder=`` on the command line still wins.
"""

from __future__ import annotations

from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from hydra.utils import get_class
from omegaconf import DictConfig, open_dict

from deeploc.errors import ConfigError
from deeploc.runs.naming import override_key

__all__ = ["choose_backbone"]


def choose_backbone(cfg: DictConfig, hydra: DictConfig) -> str | None:
    """Give this job the encoder ``cfg.backbone`` names for the family of its encoder (composed by Hydra as
    ``encoder=<choice>`` would, with the command line's ``encoder.*`` overrides); returns the choice, or None when
    nothing changes (no ``backbone`` key, no entry for the family, the same choice, or ``encoder=`` given)."""
    backbones = cfg.get("backbone")
    task = [str(o) for o in hydra.overrides.task]
    if not backbones or "encoder" in map(override_key, task):
        return None
    family = getattr(get_class(cfg.encoder._target_), "registry_name", None)
    choice = backbones.get(family)
    if choice is None or choice == hydra.runtime.choices.get("encoder"):
        return None
    try:
        composed = (
            GlobalHydra.instance()
            .config_loader()
            .load_configuration(
                config_name=hydra.job.config_name,
                overrides=[*map(str, hydra.overrides.hydra), *task, f"encoder={choice}"],
                run_mode=RunMode.RUN,
                from_shell=False,
            )
        )
    except Exception as exc:  # Hydra's own message names the missing option
        raise ConfigError(f"backbone.{family}={choice}: {_first_line(exc)}") from None
    with open_dict(cfg):
        cfg.encoder = composed.encoder
    return str(choice)


def _first_line(exc: Any) -> str:
    return str(exc).strip().splitlines()[0]
