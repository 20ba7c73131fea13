"""Image perturbations for robustness evaluation: a registry of named, deterministic degradations with a strength.

A perturbation maps an ``H x W x 3`` uint8 RGB image, a strength and a random generator to a new uint8 RGB image
(of any size). It is applied to the image file before anything else (so before the encoder); the random
generator is seeded from the image's pixels, the perturbation's name and the strength
(:func:`image_generator`), so a perturbed image depends on nothing else: the same file gives the same bytes in
every run and on every machine with the same OpenCV build.

Built-ins (:mod:`.standard`): ``jpeg`` (quality, 4:4:4), ``jpeg420`` (quality, 4:2:0 chroma subsampling),
``resize`` (scale factor), ``blur`` (Gaussian sigma, pixels) and ``noise`` (Gaussian standard deviation, in [0, 1]
intensity units). A new one is a function in a module of this
package (or of a package declaring the entry-point group ``deeploc.perturbations``) decorated with
:func:`register_perturbation`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deeploc.errors import ConfigError
from deeploc.registry import Registry

__all__ = [
    "PERTURBATIONS",
    "Perturbation",
    "PerturbationSpec",
    "apply",
    "image_generator",
    "parse_perturbations",
    "register_perturbation",
]

Apply = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]


@dataclass(frozen=True)
class PerturbationSpec:
    """A registered perturbation: its key, axis label, description, the function, which strengths are valid, and
    whether a higher strength is milder (JPEG quality, resize scale) or harsher (blur, noise)."""

    name: str
    label: str
    description: str
    apply: Apply
    valid: Callable[[float], bool]
    valid_text: str
    higher_is_milder: bool


PERTURBATIONS: Registry[PerturbationSpec] = Registry(
    "perturbation", "deeploc.evaluation.perturbations", "deeploc.perturbations"
)


def register_perturbation(
    name: str,
    label: str,
    description: str,
    valid: Callable[[float], bool],
    valid_text: str,
    higher_is_milder: bool = False,
) -> Callable[[Apply], Apply]:
    """Decorator: make ``apply(image, strength, rng) -> image`` the perturbation ``name``."""

    def add(function: Apply) -> Apply:
        PERTURBATIONS.add(
            name, PerturbationSpec(name, label, description, function, valid, valid_text, higher_is_milder)
        )  # type: ignore[arg-type]
        return function

    return add


@dataclass(frozen=True)
class Perturbation:
    """One perturbation at one strength (``jpeg=70``)."""

    name: str
    strength: float

    @property
    def spec(self) -> PerturbationSpec:
        return PERTURBATIONS.get(self.name)  # type: ignore[return-value]

    @property
    def text(self) -> str:
        """``jpeg=70``: how a command line and the output files name it."""
        return f"{self.name}={self.strength:g}"

    def severity(self) -> float:
        """A number that grows as the perturbation gets harsher (for ordering strengths)."""
        return -self.strength if self.spec.higher_is_milder else self.strength


def image_generator(image: np.ndarray, perturbation: Perturbation) -> np.random.Generator:
    """The random generator of one image and perturbation: seeded by sha256 of the pixels, shape and ``jpeg=70``."""
    digest = hashlib.sha256(f"{perturbation.text}|{image.shape}|".encode() + np.ascontiguousarray(image).tobytes())
    return np.random.default_rng(np.frombuffer(digest.digest(), dtype=np.uint32))


def apply(image: np.ndarray, perturbation: Perturbation) -> np.ndarray:
    """``image`` (``H x W x 3`` uint8 RGB) perturbed, as uint8 RGB; deterministic (module docstring)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 uint8 image, got {image.shape} {image.dtype}")
    out = perturbation.spec.apply(image, perturbation.strength, image_generator(image, perturbation))
    return np.ascontiguousarray(out, dtype=np.uint8)


def parse_perturbations(items: Sequence[str]) -> list[Perturbation]:
    """Perturbations from command-line items, in order, each strength once and checked.

    An item is ``name=s1,s2,...`` (``jpeg=90,70,50``), the name of a file in ``conf/perturb/`` (``default``), or a
    YAML file path; a YAML file maps names to lists of strengths (``jpeg: [90, 70]``).
    """
    found: list[Perturbation] = []
    for item in items:
        for name, strengths in _expand(item).items():
            spec = _spec(name, item)
            if strengths is None or strengths == []:
                raise ConfigError(f"--perturb {item}: {name} has no strengths: give one or more ({spec.valid_text})")
            for value in strengths if isinstance(strengths, list) else [strengths]:
                strength = _number(value, name, item)
                if not spec.valid(strength):
                    raise ConfigError(f"--perturb {item}: {name} strength {strength:g} is invalid: {spec.valid_text}")
                perturbation = Perturbation(name, strength)
                if perturbation not in found:
                    found.append(perturbation)
    if not found:
        raise ConfigError("--perturb: no perturbation given (e.g. --perturb jpeg=90,70,50 blur=1,2, or default)")
    return found


def _expand(item: str) -> Mapping[str, Any]:
    import yaml

    from deeploc.config import CONF_DIR

    name, sep, values = item.partition("=")
    if sep:
        return {name.strip(): [v for v in values.split(",") if v.strip()]}
    path = Path(item).expanduser()
    if not path.is_file() and (path.suffix in (".yaml", ".yml") or "/" in item):
        raise ConfigError(f"--perturb {item}: the file {path.absolute()} does not exist")
    if not path.is_file():
        path = Path(CONF_DIR) / "perturb" / f"{item}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (Path(CONF_DIR) / "perturb").glob("*.yaml"))
        raise ConfigError(
            f"--perturb {item}: expected name=strength,... (e.g. jpeg=90,70), a YAML file, or one of conf/perturb: "
            f"{', '.join(known)}"
        )
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"--perturb {path}: expected a mapping of perturbation names to lists of strengths")
    return data


def _spec(name: str, item: str) -> PerturbationSpec:
    if name not in PERTURBATIONS:
        raise ConfigError(f"--perturb {item}: unknown perturbation {name!r}; known: {', '.join(PERTURBATIONS.names())}")
    return PERTURBATIONS.get(name)  # type: ignore[return-value]


def _number(value: Any, name: str, item: str) -> float:
    try:
        number = float(str(value).strip())
    except ValueError:
        raise ConfigError(f"--perturb {item}: {name} strength {value!r} is not a number") from None
    if not np.isfinite(number):
        raise ConfigError(f"--perturb {item}: {name} strength {value!r} is not a finite number")
    return number
