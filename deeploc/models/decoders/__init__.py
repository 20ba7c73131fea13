"""Decoders: the contract (:mod:`.base`) and the built-ins, one module each (conv, linear, fusion).

Built-ins register themselves (``@DECODERS.register("conv")``) and are found by name without an import list.
"""

from deeploc.models.decoders.base import (
    DECODERS,
    Decoder,
    DecoderError,
    UnknownMapError,
    build_decoder,
    conv_block,
    count_parameters,
    decoder_from_record,
    upsample_steps,
)

__all__ = [
    "DECODERS",
    "Decoder",
    "DecoderError",
    "UnknownMapError",
    "build_decoder",
    "conv_block",
    "count_parameters",
    "decoder_from_record",
    "upsample_steps",
]
