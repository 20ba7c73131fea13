"""Frozen image encoders: the contract every backbone implements (:mod:`.base`) and the built-in backbones.

Built-ins register themselves (``@ENCODERS.register("sam2")``) and are found by name without an import list;
``build_encoder(kind, **kwargs)`` builds one and ``encoder_from_identity`` rebuilds one from a checkpoint's record.
"""

from deeploc.models.encoders.adaptation import ADAPTATIONS, AdaptationError
from deeploc.models.encoders.base import (
    ENCODERS,
    EncoderError,
    FeatureSpec,
    FrozenEncoder,
    MissingWeightsError,
    build_encoder,
    encoder_from_identity,
    file_digest,
    identity_name,
    same_encoder,
)

__all__ = [
    "ADAPTATIONS",
    "ENCODERS",
    "AdaptationError",
    "EncoderError",
    "FeatureSpec",
    "FrozenEncoder",
    "MissingWeightsError",
    "build_encoder",
    "encoder_from_identity",
    "file_digest",
    "identity_name",
    "same_encoder",
]
