"""The decoder contract: which maps a decoder reads, how it is built, checked, recorded and rebuilt.

A decoder is an ``nn.Module`` that declares ``inputs`` (names of encoder maps) and maps ``{name: B x C x h x w}``
to ``B x 1 x H x W`` logits at the encoder's ``target_stride``. It is built from the encoder's ``feature_specs``
(channels and stride per map), the ``target_stride`` and plain keyword arguments, so one class serves every
backbone. This base class owns everything but the layers:

* argument checks (unknown inputs name the maps the encoder has);
* input checks on every forward (missing map, wrong rank or channels) and the output check (one logit channel);
* the record written into checkpoints and exports (:meth:`Decoder.record`: registered name, keyword arguments,
  input specs), from which :func:`decoder_from_record` rebuilds the same decoder without an encoder, and without
  importing anything the record names (see :mod:`deeploc.registry`);
* DeCLIP's weight initialisation (normal(0, ``init_std``) conv weights, zero biases).

Adding a decoder = one module in this package with ``@DECODERS.register("<name>")`` on a ``Decoder`` subclass that
implements :meth:`Decoder.decode`, plus ``conf/decoder/<name>.yaml`` (docs/extending.md).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from deeploc.errors import DeeplocError
from deeploc.models.encoders.base import FeatureSpec
from deeploc.registry import RecordsOptions, Registry, UnknownComponentError

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

DECODERS: Registry[type[Decoder]] = Registry("decoder", "deeploc.models.decoders", "deeploc.decoders")


class DecoderError(DeeplocError, ValueError):
    """A decoder that cannot be built or cannot read what it is given; the message names the key and the fix."""


class UnknownMapError(DecoderError):
    """A decoder asked to read maps the encoder does not provide."""


def _as_spec(value: FeatureSpec | Sequence[float] | Mapping[str, float]) -> FeatureSpec:
    if isinstance(value, FeatureSpec):
        return value
    if isinstance(value, Mapping):
        return FeatureSpec(int(value["channels"]), float(value["stride"]))
    channels, stride = value
    return FeatureSpec(int(channels), float(stride))


class Decoder(RecordsOptions, nn.Module, abc.ABC):
    """Base class of decoders (see the module docstring).

    Args:
        feature_specs: the encoder's maps, ``{name: FeatureSpec(channels, stride)}``.
        target_stride: stride (encoder-input pixels) of the logits, the encoder's ``target_stride``.
        inputs: the map (a name) or maps this decoder reads; None = every map of ``feature_specs``.
    """

    registry_name: ClassVar[str]
    #: How many maps the decoder reads: None = any number >= 1.
    n_inputs: ClassVar[int | None] = None
    _derived_options = ("feature_specs", "target_stride")  # given by the encoder, recorded in record()

    def __init__(
        self,
        feature_specs: Mapping[str, FeatureSpec | Sequence[float]],
        target_stride: float = 4.0,
        inputs: str | Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        specs = {str(name): _as_spec(spec) for name, spec in feature_specs.items()}
        names = list(specs) if inputs is None else [inputs] if isinstance(inputs, str) else [str(n) for n in inputs]
        unknown = [n for n in names if n not in specs]
        if unknown or not names:
            raise UnknownMapError(
                f"{type(self).__name__}: inputs {unknown or names} are not maps of the encoder; it provides "
                f"{list(specs)} (set decoder.inputs, or feature=<name> for single-map decoders)"
            )
        if self.n_inputs is not None and len(names) != self.n_inputs:
            raise DecoderError(
                f"{type(self).__name__} reads exactly {self.n_inputs} map(s), got inputs {names}; pick one with "
                "feature=<name> (or decoder.inputs=[...])"
            )
        if len(set(names)) != len(names):
            raise DecoderError(f"{type(self).__name__}: inputs {names} name a map twice")
        self.inputs: tuple[str, ...] = tuple(names)
        self.in_specs: dict[str, FeatureSpec] = {n: specs[n] for n in names}
        self.target_stride = float(target_stride)
        self._options["inputs"] = list(self.inputs)
        self.options()  # plain values only, checked now rather than at the first checkpoint

    # ------------------------------------------------------------------ what subclasses provide
    @abc.abstractmethod
    def decode(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits ``B x 1 x H x W`` from the checked input maps (exactly :attr:`inputs`)."""

    @classmethod
    def label_for(cls, options: Mapping[str, Any]) -> str:
        """The label of a decoder of this class built with ``options`` (``conv20``); the registered name (the
        class name if unregistered) by default. A classmethod, so a config can be named without building it."""
        return cls.registry_name if DECODERS.has(cls) else cls.__name__

    @property
    def label(self) -> str:
        """Name in run directories, reports and messages (:meth:`label_for` of this decoder's options)."""
        return type(self).label_for(self._options)

    # ---------------------------------------------------------------------------- the contract
    def forward(self, features: Mapping[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Logits for a dict of maps (a bare tensor is accepted for single-input decoders)."""
        if isinstance(features, torch.Tensor):
            if len(self.inputs) != 1:
                raise DecoderError(f"{self.label} reads {list(self.inputs)}: pass a dict of maps, not one tensor")
            features = {self.inputs[0]: features}
        chosen = {}
        for name in self.inputs:
            fmap = features.get(name)
            if fmap is None:
                raise DecoderError(f"{self.label} reads map {name!r}, but the batch holds {sorted(features)}")
            channels = self.in_specs[name].channels
            if fmap.ndim != 4 or fmap.shape[1] != channels:
                raise DecoderError(
                    f"{self.label} expects {name} as B x {channels} x h x w features, got {tuple(fmap.shape)}"
                )
            chosen[name] = fmap
        logits = self.decode(chosen)
        if logits.ndim != 4 or logits.shape[1] != 1:
            raise DecoderError(f"{self.label}.decode must return B x 1 x H x W logits, got {tuple(logits.shape)}")
        return logits

    def record(self) -> dict[str, Any]:
        """Plain description written into checkpoints and exports; :func:`decoder_from_record` rebuilds from it.

        ``name`` is the registered name (None for a decoder class that was never registered: it trains and
        resumes, since the training config imports it, but loading it elsewhere needs it registered); ``class``
        says where it was defined, for messages only (nothing is ever imported from a record).
        """
        cls = type(self)
        return {
            "name": cls.registry_name if DECODERS.has(cls) else None,
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "label": self.label,
            "options": self.options(),
            "inputs": list(self.inputs),
            "feature_specs": {n: {"channels": s.channels, "stride": s.stride} for n, s in self.in_specs.items()},
            "target_stride": self.target_stride,
            "parameters": count_parameters(self),
        }

    def init_weights(self, std: float) -> None:
        """DeCLIP's initialisation: conv weights normal(0, ``std``), conv biases zero."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)


def build_decoder(
    name: str,
    feature_specs: Mapping[str, FeatureSpec | Sequence[float]],
    target_stride: float = 4.0,
    **options: Any,
) -> Decoder:
    """The registered decoder ``name`` for an encoder's ``feature_specs`` and ``target_stride``."""
    cls = DECODERS.get(name)
    try:
        return cls(feature_specs, target_stride, **options)
    except TypeError as exc:  # an option the class does not take
        raise DecoderError(f"decoder {name!r}: {exc}") from None


def decoder_from_record(record: Mapping[str, Any]) -> Decoder:
    """Rebuild a decoder from :meth:`Decoder.record` (a checkpoint's or an export's), without its encoder."""
    try:
        name, options = record["name"], dict(record["options"])
        specs, stride = dict(record["feature_specs"]), float(record["target_stride"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DecoderError(f"the decoder record {dict(record)} is incomplete ({exc!r})") from None
    if name is None:
        raise UnknownComponentError(
            f"decoder {record.get('class')} was trained without being registered, so it cannot be loaded by name: "
            "decorate the class with @DECODERS.register('<name>') (deeploc.models.decoders) and train again, or "
            "load the checkpoint in Python with the class at hand (LocalizationModule.load_from_checkpoint)"
        )
    return build_decoder(str(name), specs, stride, **options)


def conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    """DeCLIP's block: Conv2d 5x5 (padding 2) -> BatchNorm2d -> ReLU."""
    return [nn.Conv2d(c_in, c_out, kernel_size=5, padding=2), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def upsample_steps(stride: float, target_stride: float, what: str) -> int:
    """How many x2 upsamplings take a map at ``stride`` to ``target_stride`` (an error unless a power of two)."""
    ratio = stride / target_stride
    steps = round(math.log2(ratio)) if ratio > 0 else -1
    if steps < 0 or abs(2**steps - ratio) > 1e-6 * ratio:
        raise DecoderError(
            f"{what}: stride {stride} is not a power-of-two multiple of the target stride {target_stride}; "
            "this decoder upsamples by factors of 2"
        )
    return steps


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
