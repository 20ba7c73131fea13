"""The frozen-encoder contract every backbone implements (SAM2, CLIP, or a user's own).

An encoder maps ``B x 3 x H x W`` RGB images in [0, 1] (any size; it resizes them itself) to named feature maps
``B x C x h x w``. It declares, before any forward:

* ``feature_specs``: ``{name: FeatureSpec(channels, stride)}``, stride in encoder-input pixels per feature cell;
  decoders size themselves from these, so no table keyed by encoder names exists anywhere else;
* ``target_stride``: the stride (encoder-input pixels) at which decoders produce logits on this backbone;
* ``identity()``: a plain dict of everything that determines the maps (kind, architecture, input size, weights
  digest or random seed, preprocessing, compute precision). It keys the feature cache and is recorded in
  checkpoints and exports, where :meth:`FrozenEncoder.kwargs_from_identity` rebuilds the same encoder from it.

Subclasses implement :meth:`architecture` (the constructor keywords that define the network), :meth:`build`
(the network, with random weights), :meth:`load_weights` (an official weights file into it), :meth:`preprocess`
(resize, normalise) and :meth:`encode` (network input -> maps). Freezing, seeding, weight digests, precision and argument checks
live here, once.
"""

from __future__ import annotations

import abc
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from deeploc.errors import DeeplocError
from deeploc.io import file_digest
from deeploc.models.encoders.adaptation import Adaptable
from deeploc.registry import RecordsOptions, Registry

__all__ = [
    "ENCODERS",
    "EncoderError",
    "FeatureSpec",
    "FrozenEncoder",
    "build_encoder",
    "file_digest",
    "identity_name",
    "same_encoder",
]

ENCODERS: Registry[type[FrozenEncoder]] = Registry("encoder", "deeploc.models.encoders", "deeploc.encoders")

# Identity keys every encoder has; the others are its architecture keywords.
_BASE_KEYS = ("kind", "image_size", "weights", "preprocessing", "precision")
_RANDOM_WEIGHTS = re.compile(r"^random:seed=(-?\d+)$")
_SHA256_WEIGHTS = re.compile(r"^sha256:([0-9a-f]{64})$")


class EncoderError(DeeplocError, ValueError):
    """An encoder config or weights file that cannot be used; the message names it and the fix."""


@dataclass(frozen=True)
class FeatureSpec:
    """One feature map: channels, and stride in encoder-input pixels per cell."""

    channels: int
    stride: float


class FrozenEncoder(Adaptable, RecordsOptions, nn.Module, abc.ABC):
    """Base class of frozen encoders (see the module docstring for the contract).

    Args:
        image_size: square input side the images are resized to.
        checkpoint: the backbone's official weights file; required unless ``random_init``.
        random_init: seeded random weights instead (tests, demos); every run says so loudly.
        seed: seed of the random weights, so every process rebuilds the same encoder.
        bf16: compute under bfloat16 autocast on CUDA devices that support it.
        adapt: ``frozen`` (default), ``lora`` or ``full``: which encoder weights train (:mod:`.adaptation`).
        lora: LoRA settings (``rank``, ``alpha``, ``targets``, ``dropout``) for ``adapt=lora``.
        lr: learning rate of the encoder's trainable parameters (None: the decoder's, ``model.lr``).
    """

    registry_name: ClassVar[str]
    #: The backbone family in messages ("SAM2").
    family: ClassVar[str] = "image"
    #: Stride (encoder-input pixels) of the logits decoders produce on this backbone.
    target_stride: ClassVar[float] = 4.0
    #: How images are turned into the encoder input (part of the identity).
    preprocessing: ClassVar[str] = ""
    #: Architecture keywords that only choose WHICH maps are returned, never their values (e.g. CLIP's layers):
    #: left out of the feature-cache key and of the decoder/encoder compatibility check.
    selection_keys: ClassVar[tuple[str, ...]] = ()
    #: What a user downloads to get real weights, for messages.
    weights_hint: ClassVar[str] = "the official weights file"

    def __init__(
        self,
        image_size: int,
        checkpoint: str | None = None,
        random_init: bool = False,
        seed: int = 0,
        bf16: bool = True,
        adapt: str = "frozen",
        lora: Mapping[str, Any] | None = None,
        lr: float | None = None,
    ) -> None:
        super().__init__()
        self.setup_adaptation(adapt, lora, lr)
        if checkpoint is None and not random_init:
            raise EncoderError(
                f"encoder.checkpoint is not set. Point it at {self.weights_hint} or set encoder.random_init=true "
                "to use random weights (features then carry no pretrained knowledge)."
            )
        if checkpoint is not None and random_init:
            raise EncoderError("encoder.checkpoint and encoder.random_init=true exclude each other; unset one")
        if not isinstance(image_size, int) or image_size <= 0:
            raise EncoderError(f"encoder.image_size={image_size!r} must be a positive integer")
        self.image_size = image_size
        self.bf16 = bool(bf16)
        self.checkpoint = checkpoint
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = self.build()
        if checkpoint is not None:
            path = Path(checkpoint).expanduser()
            if not path.is_file():
                raise EncoderError(
                    f"encoder.checkpoint={str(path)!r} does not exist. Download {self.weights_hint} and set "
                    "encoder.checkpoint to its path, or set encoder.random_init=true for random weights."
                )
            self.load_weights(self.model, path)
            self.weights = f"sha256:{file_digest(path)}"
        else:
            warnings.warn(
                f"{self.family} encoder {self.describe()} uses RANDOM weights (seed {seed}): results say "
                "nothing about the pretrained backbone. Set encoder.checkpoint=<weights file> for real features.",
                stacklevel=2,
            )
            self.weights = f"random:seed={seed}"
        self.model.requires_grad_(False)
        self.model.eval()
        self.apply_adaptation(seed)

    # ------------------------------------------------------------------ what subclasses provide
    @property
    @abc.abstractmethod
    def feature_specs(self) -> dict[str, FeatureSpec]:
        """``{name: FeatureSpec}`` of every map this encoder can return, in a stable order."""

    @abc.abstractmethod
    def architecture(self) -> dict[str, Any]:
        """Plain constructor keywords that define the network (besides size, weights and precision)."""

    @abc.abstractmethod
    def build(self) -> nn.Module:
        """The network with freshly initialised weights (called under a fixed seed)."""

    @abc.abstractmethod
    def load_weights(self, model: nn.Module, path: Path) -> None:
        """Load an official weights file into ``model`` strictly; raise :class:`EncoderError` naming the file."""

    @abc.abstractmethod
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``B x 3 x H x W`` float images in [0, 1], any size -> the network's input (resized, normalised)."""

    @abc.abstractmethod
    def encode(self, inputs: torch.Tensor, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Maps ``names`` for preprocessed inputs (runs under bf16 autocast where that is the precision)."""

    # ------------------------------------------------------------------------------- the contract
    def init_config(self) -> dict[str, Any]:
        """Plain keywords that rebuild this encoder here (``kind`` + constructor arguments, weights path included)."""
        return {"kind": self.registry_name, **self.options()}

    def describe(self) -> str:
        """A short human name (``sam2.1_hiera_s@1024``)."""
        arch = self.architecture()
        main = next((str(v) for v in arch.values() if isinstance(v, str)), self.registry_name)
        return f"{main}@{self.image_size}"

    def compute_precision(self) -> str:
        """bf16 autocast on capable GPUs, else fp32 (depends on where the encoder sits now)."""
        param = next(self.model.parameters(), None)
        on_cuda = param is not None and param.is_cuda
        return "bf16" if self.bf16 and on_cuda and torch.cuda.is_bf16_supported() else "fp32"

    def identity(self) -> dict[str, Any]:
        """Everything that determines the features (see the module docstring); ``precision`` is where it runs."""
        identity = self.identity_of(self.architecture(), self.image_size, self.weights, self.compute_precision())
        identity["preprocessing"] = self.preprocessing  # an instance may derive it (timm: the model's config)
        return {**identity, **self.adaptation()}

    @classmethod
    def identity_of(
        cls, architecture: Mapping[str, Any], image_size: int, weights: str, precision: str = "fp32"
    ) -> dict[str, Any]:
        """The :meth:`identity` of an encoder of this class with these values, without building it (e.g. to
        describe the encoder a decoder imported from elsewhere was trained on)."""
        return {
            "kind": cls.registry_name,
            **architecture,
            "image_size": image_size,
            "weights": weights,
            "preprocessing": cls.preprocessing,
            "precision": precision,
        }

    def cache_identity(self) -> dict[str, Any]:
        """:meth:`identity` without the :attr:`selection_keys`: the feature-cache key of every map."""
        return {k: v for k, v in self.identity().items() if k not in self.selection_keys}

    def selected_maps(self) -> tuple[str, ...]:
        """The maps a user asked this encoder for through its :attr:`selection_keys` (CLIP: ``encoder.layers``), which
        the feature cache fills in the pass that computes a decoder's maps, so a sweep over them (``feature=``)
        encodes each image once. Empty without selection keys: every map is always available (SAM2), and only the
        maps a decoder reads are cached."""
        return tuple(self.feature_specs) if self.selection_keys else ()

    def selection_advice(self) -> str:
        """For a decoder that reads a map this encoder does not return now: the settings choosing which maps it
        returns (its :attr:`selection_keys`); "" when it always returns all of them."""
        if not self.selection_keys:
            return ""
        chosen = self.architecture()
        settings = " ".join(f"encoder.{key}={chosen[key]}".replace(" ", "") for key in self.selection_keys)
        return f"the {self.family} encoder returns the maps chosen by {settings}: include the map(s) the decoder reads"

    def feature_shape(self, name: str) -> tuple[int, int, int]:
        """``(C, h, w)`` of map ``name`` at this encoder's input size."""
        spec = self.spec(name)
        side = round(self.image_size / spec.stride)
        return (spec.channels, side, side)

    def spec(self, name: str) -> FeatureSpec:
        """The spec of map ``name``, failing with the names this encoder has."""
        try:
            return self.feature_specs[name]
        except KeyError:
            raise EncoderError(
                f"unknown feature {name!r} for the {self.registry_name} encoder {self.describe()}; "
                f"it provides {list(self.feature_specs)}"
            ) from None

    def forward(self, images: torch.Tensor, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Feature maps (float32, ``B x C x h x w``) by name: all of them unless ``names`` picks some. Gradients
        flow only through an adapted encoder (and only where grad mode is on)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.adapt != "frozen"):
            return self._maps(images, names)

    def _maps(self, images: torch.Tensor, names: Sequence[str] | None) -> dict[str, torch.Tensor]:
        wanted = tuple(names) if names else tuple(self.feature_specs)
        for name in wanted:
            self.spec(name)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape B x 3 x H x W, got {tuple(images.shape)}")
        inputs = self.preprocess(images.float())
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.compute_precision() == "bf16"):
            maps = self.encode(inputs, wanted)
        return {name: maps[name].float() for name in wanted}

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """Resize ``B x 3 x H x W`` images to the square input (bilinear with antialias, as torchvision's Resize
        on tensors); a no-op at that size. Prediction uses the same resize."""
        size = (self.image_size, self.image_size)
        if images.shape[-2:] == size:
            return images
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)

    # ------------------------------------------------------------------------------ rebuilding
    @classmethod
    def kwargs_from_identity(
        cls,
        identity: Mapping[str, Any],
        checkpoint: str | Path | None = None,
        fallback_checkpoint: str | Path | None = None,
        bf16: bool = True,
    ) -> dict[str, Any]:
        """Constructor keywords that rebuild the encoder ``identity`` describes.

        Random weights come back from their seed. Recorded weights need a file whose sha256 equals the recorded
        digest: ``checkpoint`` (checked strictly; a mismatch is refused naming both digests), else
        ``fallback_checkpoint`` (e.g. the path recorded at training time, used only if it exists and matches).
        """
        weights = str(identity.get("weights", ""))
        kwargs: dict[str, Any] = {k: v for k, v in identity.items() if k not in _BASE_KEYS}
        kwargs.update(image_size=int(identity["image_size"]), bf16=bool(bf16))
        random_match = _RANDOM_WEIGHTS.match(weights)
        if random_match:
            if checkpoint is not None:
                raise EncoderError(
                    f"the decoder was trained on an encoder with RANDOM weights ({weights}), but the weights file "
                    f"{checkpoint} was given; drop it (the random encoder is rebuilt from its seed)"
                )
            return {**kwargs, "random_init": True, "seed": int(random_match.group(1))}
        if not _SHA256_WEIGHTS.match(weights):
            raise EncoderError(f"unknown encoder weights {weights!r} in the recorded encoder identity")
        what = f"the {identity.get('kind', 'sam2')} weights it was trained with ({cls.weights_hint}, {weights})"
        if checkpoint is not None:
            path = Path(checkpoint).expanduser()
            if not path.is_file():
                raise EncoderError(f"weights file {path} does not exist; the decoder needs {what}")
            actual = f"sha256:{file_digest(path)}"
            if actual != weights:
                raise EncoderError(f"weights file {path} has digest {actual}, but the decoder needs {what}")
            return {**kwargs, "checkpoint": str(path)}
        if fallback_checkpoint is not None:
            path = Path(fallback_checkpoint).expanduser()
            if path.is_file() and f"sha256:{file_digest(path)}" == weights:
                return {**kwargs, "checkpoint": str(path)}
        raise MissingWeightsError(f"the decoder needs {what}; pass it with --encoder-checkpoint")


def check_layers(layers: Sequence[int] | int, depth: int, model: str, example: int) -> tuple[int, ...]:
    """``encoder.layers`` of a ViT with ``depth`` blocks as sorted distinct indices; an EncoderError naming the valid
    range of ``model`` (and ``encoder.layers=[example]``) for anything else."""
    chosen = [layers] if isinstance(layers, int) else list(layers)
    bad = [k for k in chosen if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < depth]
    if bad or not chosen or len(set(chosen)) != len(chosen):
        raise EncoderError(
            f"encoder.layers={chosen!r}: give distinct indices in 0..{depth - 1} ({model} has {depth} feature levels / "
            "blocks), "
            f"e.g. encoder.layers=[{example}]"
        )
    return tuple(sorted(chosen))


class MissingWeightsError(EncoderError):
    """The decoder needs the encoder weights file it was trained on, and none was given or found."""


def build_encoder(kind: str = "sam2", **kwargs: Any) -> FrozenEncoder:
    """The registered encoder ``kind`` built from plain keywords."""
    return ENCODERS.get(kind)(**kwargs)


def encoder_from_identity(
    identity: Mapping[str, Any],
    checkpoint: str | Path | None = None,
    fallback_checkpoint: str | Path | None = None,
    bf16: bool = True,
) -> FrozenEncoder:
    """Rebuild the encoder a recorded identity describes (checkpoint/export loading)."""
    if "kind" not in identity:
        raise EncoderError(
            f"the recorded encoder identity {dict(identity)} has no kind (a file of deeploc 0.1, which is not read "
            "any more): train the run again with this deeploc, then export it again"
        )
    cls = ENCODERS.get(str(identity["kind"]))
    encoder = cls(**cls.kwargs_from_identity(identity, checkpoint, fallback_checkpoint, bf16))
    if not same_encoder(encoder.identity(), identity):
        raise EncoderError(
            f"the rebuilt encoder {encoder.identity()} differs from the recorded {dict(identity)} "
            "(another deeploc version with other preprocessing?)"
        )
    return encoder


def identity_name(identity: Mapping[str, Any]) -> str:
    """An encoder's name in metrics.json and messages: its config (SAM2, CLIP) or timm model, plus its adaptation
    when adapted (``vit_large_patch14_dinov2 (lora rank 8)``), so reports never average it with the frozen one; a
    frozen encoder's name is what it was before adaptation existed."""
    name = str(identity.get("config", identity.get("model", identity.get("kind", "sam2"))))
    if "adapt" not in identity:
        return name
    rank = f" rank {identity['lora']['rank']}" if "lora" in identity else ""
    return f"{name} ({identity['adapt']}{rank})"


def same_encoder(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two identities describe the same features whatever device or precision each ran in."""

    def norm(identity: Mapping[str, Any]) -> dict[str, Any]:
        kind = str(identity.get("kind"))
        skip = ("precision", *(ENCODERS.get(kind).selection_keys if kind in ENCODERS else ()))
        return {"kind": kind, **{k: v for k, v in identity.items() if k not in skip}}

    return norm(a) == norm(b)
