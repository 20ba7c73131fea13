"""The parts of a LocalizationModule built from config or records: the encoder and decoder, the optimizer, loss
and scheduler factories (``_partial_`` nodes) and their plain records, and the rule that stops a diverged run."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from deeploc.errors import DeeplocError
from deeploc.models.decoders import Decoder, DecoderError, UnknownMapError, decoder_from_record
from deeploc.models.encoders import FrozenEncoder, build_encoder

SCHEDULES = ("fixed", "plateau")

DecoderFactory = Callable[..., Decoder]
OptimizerFactory = Callable[..., torch.optim.Optimizer]


class IncompatibleCheckpointError(DeeplocError, RuntimeError):
    """A checkpoint trained with another encoder or decoder than the current config."""


class TrainingDiverged(DeeplocError, FloatingPointError):
    """The training loss diverged (:func:`divergence`); the run is recorded with ``status: diverged``."""


#: A training step's loss above this multiple of the first step's loss means divergence (docs/reliability.md).
DIVERGENCE_FACTOR = 1e3


def divergence(loss: float, first: float) -> str:
    """Why a training step's ``loss`` means the run diverged, or "": the loss is not finite, or it is over
    :data:`DIVERGENCE_FACTOR` times ``first``, the first training step's loss of the run (a loss that grows a
    thousandfold from its starting value is not training: e.g. BCE starts near 0.69, and 690 needs logits in the
    hundreds on the wrong side)."""
    if not math.isfinite(loss):
        return f"{loss} (not finite)"
    if first > 0 and loss > DIVERGENCE_FACTOR * first:
        return f"{loss:.3g}, over {DIVERGENCE_FACTOR:g} x the first step's {first:.3g}"
    return ""


def as_encoder(encoder: FrozenEncoder | Mapping[str, Any]) -> FrozenEncoder:
    """An encoder instance, or one built from plain keywords (``{"kind": "sam2", ...}``)."""
    if isinstance(encoder, FrozenEncoder):
        return encoder
    options = dict(encoder)
    return build_encoder(str(options.pop("kind", "sam2")), **options)


def as_decoder(decoder: Decoder | DecoderFactory | Mapping[str, Any], encoder: FrozenEncoder) -> Decoder:
    """A decoder instance; a factory (Hydra's ``_partial_`` node) given the encoder's maps; or a record."""
    if isinstance(decoder, Mapping):
        built = decoder_from_record(decoder)
    elif isinstance(decoder, Decoder):
        built = decoder
    else:
        try:
            built = decoder(feature_specs=encoder.feature_specs, target_stride=encoder.target_stride)
        except UnknownMapError as exc:
            advice = encoder.selection_advice()
            if not advice:
                raise
            raise UnknownMapError(f"{exc}; {advice}") from None
        if not isinstance(built, Decoder):
            raise DecoderError(
                f"decoder config builds a {type(built).__name__}, not a deeploc Decoder: its _target_ must be a "
                "subclass of deeploc.models.decoders.Decoder (docs/extending.md)"
            )
    for name, spec in built.in_specs.items():
        if encoder.feature_specs.get(name) != spec:
            raise DecoderError(
                f"decoder {built.label} reads {name} as {spec}, but encoder {encoder.describe()} provides "
                f"{encoder.feature_specs.get(name, 'no such map')}; its maps: {list(encoder.feature_specs)}"
            )
    return built


def as_part(part: Any, default: Any, partial: bool) -> Any:
    """An optimiser factory or a loss: ``part`` itself, ``default`` for None, or built from its record
    (``{"_target_": ...}``, e.g. read back from a checkpoint's hyperparameters)."""
    if part is None:
        return default
    if isinstance(part, Mapping):
        from hydra.utils import instantiate

        return instantiate({**part, "_partial_": partial})
    return part


def part_record(part: Any) -> dict[str, Any]:
    """A plain record of an optimiser factory (a ``functools.partial``, Hydra's ``_partial_`` node) or a loss:
    ``{"_target_": <import path>, <keyword>: <value>...}`` (keywords only when they are plain values)."""
    func = getattr(part, "func", part if isinstance(part, type) else type(part))
    keywords = getattr(part, "keywords", {})
    plain = {k: _plain(v) for k, v in keywords.items() if _plain(v) is not _NOT_PLAIN}
    return {"_target_": f"{func.__module__}.{func.__qualname__}", **plain}


def same_decoder(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two decoder records build the same architecture (name, options, input maps)."""
    keys = ("name", "class", "options", "feature_specs", "target_stride")
    return all(a.get(k) == b.get(k) for k in keys)


_NOT_PLAIN = object()


def _plain(value: Any) -> Any:
    """``value`` as a plain JSON value (numbers, strings, None, lists of them: Adam's ``betas``), else a marker."""
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str, type(None))) for v in value):
        return list(value)
    return _NOT_PLAIN
