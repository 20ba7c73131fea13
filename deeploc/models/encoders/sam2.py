"""The frozen SAM2 image encoder, returning the three feature maps the study decodes.

Features are exactly the tensors ``SAM2ImagePredictor.set_image`` stores in ``_features``: the image is resized to
the model's input size and ImageNet-normalised, ``forward_image`` runs the Hiera trunk, the FPN neck and the mask
decoder's ``conv_s0`` / ``conv_s1`` projections, ``no_mem_embed`` is added to the lowest-resolution map, and the
maps are reshaped to ``B x C x H x W``. Unlike the predictor this works batched on device tensors and at any input
size that is a multiple of 32.

The model is built without Hydra's global state: ``import sam2`` initialises GlobalHydra, which breaks a Hydra
application (shared/reference/sam2.md), so the packaged YAML is read with OmegaConf and instantiated directly.
"""

from __future__ import annotations

import importlib.resources
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from deeploc.models.encoders.base import (
    ENCODERS,
    EncoderError,
    FeatureSpec,
    FrozenEncoder,
)
from deeploc.models.state_dicts import state_dict_mismatch

log = logging.getLogger(__name__)


def _release_sam2_global_hydra() -> None:
    """Undo the GlobalHydra that ``import sam2`` sets up (it would make a later ``@hydra.main`` fail).

    Only sam2's own instance (primary config source ``sam2``) is cleared, never an application's.
    """
    import sam2  # noqa: F401
    from hydra.core.global_hydra import GlobalHydra

    instance = GlobalHydra.instance()
    if instance.is_initialized():
        sources = instance.hydra.config_loader.get_sources()
        if any(source.provider == "main" and source.path == "sam2" for source in sources):
            instance.clear()


_release_sam2_global_hydra()

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Keys build_sam2 merges into every config (apply_postprocessing=True); kept for bit-identical models.
_POSTPROCESSING = {
    "sam_mask_decoder_extra_args": {
        "dynamic_multimask_via_stability": True,
        "dynamic_multimask_stability_delta": 0.05,
        "dynamic_multimask_stability_thresh": 0.98,
    }
}

# A smaller-than-tiny SAM2.1 for tests and CPU demos (8.6 M params; encoder 1.3 M).
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "sam2.1_hiera_micro": (
        "sam2.1_hiera_t",
        {
            "image_encoder.trunk.embed_dim": 32,
            "image_encoder.trunk.stages": [1, 1, 2, 1],
            "image_encoder.trunk.global_att_blocks": [3],
            "image_encoder.neck.backbone_channel_list": [256, 128, 64, 32],
            "memory_attention.num_layers": 1,
        },
    ),
}

# Official checkpoint file names, for error messages that tell a user which config a checkpoint needs.
CHECKPOINT_NAMES = {
    "sam2.1_hiera_t": "sam2.1_hiera_tiny.pt",
    "sam2.1_hiera_s": "sam2.1_hiera_small.pt",
    "sam2.1_hiera_b+": "sam2.1_hiera_base_plus.pt",
    "sam2.1_hiera_l": "sam2.1_hiera_large.pt",
    "sam2_hiera_t": "sam2_hiera_tiny.pt",
    "sam2_hiera_s": "sam2_hiera_small.pt",
    "sam2_hiera_b+": "sam2_hiera_base_plus.pt",
    "sam2_hiera_l": "sam2_hiera_large.pt",
}

# (patch-embed width, number of trunk blocks) -> Hiera size; used to name the size a mismatched checkpoint is for.
_HIERA_SIZES = {(96, 12): "hiera_t", (96, 16): "hiera_s", (112, 24): "hiera_b+", (144, 48): "hiera_l"}


# The three maps of SAM2ImagePredictor._features; channels are fixed by the mask decoder's conv_s0 / conv_s1.
FEATURE_SPECS: dict[str, FeatureSpec] = {
    "image_embed": FeatureSpec(256, 16),
    "high_res_feats_0": FeatureSpec(32, 4),
    "high_res_feats_1": FeatureSpec(64, 8),
}


def available_configs() -> list[str]:
    """Names of the SAM2 / SAM2.1 configs shipped in the sam2 package, plus deeploc's presets."""
    root = importlib.resources.files("sam2") / "configs"
    names = [p.name.removesuffix(".yaml") for d in ("sam2", "sam2.1") for p in (root / d).iterdir()]
    return sorted(n for n in names if n.startswith("sam2")) + sorted(PRESETS)


def load_model_config(config: str, image_size: int, overrides: dict[str, Any] | None = None) -> Any:
    """The resolved OmegaConf ``model`` node for a packaged SAM2 config name (e.g. ``sam2.1_hiera_s``)."""
    preset_overrides: dict[str, Any] = {}
    if config in PRESETS:
        config, preset_overrides = PRESETS[config]
    family = "sam2.1" if config.startswith("sam2.1") else "sam2"
    path = importlib.resources.files("sam2") / "configs" / family / f"{config}.yaml"
    if not path.is_file():
        raise EncoderError(
            f"encoder.config={config!r} is not a SAM2 config shipped with the sam2 package; "
            f"choose one of {available_configs()}"
        )
    if image_size % 32:
        raise EncoderError(f"encoder.image_size={image_size} must be a multiple of 32 (e.g. 256, 512, 1024)")
    cfg = OmegaConf.load(str(path))
    cfg = OmegaConf.merge(cfg, {"model": _POSTPROCESSING}, {"model": {"image_size": image_size}})
    for key, value in {**preset_overrides, **(overrides or {})}.items():
        if OmegaConf.select(cfg.model, key, default="__missing__") == "__missing__":
            raise EncoderError(f"encoder.overrides key {key!r} does not exist in the SAM2 config {config!r}")
        OmegaConf.update(cfg.model, key, value, merge=False)
    OmegaConf.resolve(cfg)
    return cfg.model


def build_sam2_model(config: str, image_size: int, overrides: dict[str, Any] | None = None) -> nn.Module:
    """Instantiate a SAM2Base from a packaged config with freshly initialised weights."""
    from hydra.utils import instantiate

    return instantiate(load_model_config(config, image_size, overrides), _recursive_=True)


def _describe_checkpoint(state: dict[str, torch.Tensor]) -> str:
    """Guess the Hiera size a state dict was trained as, for error messages."""
    weight = state.get("image_encoder.trunk.patch_embed.proj.weight")
    blocks = {int(k.split(".")[3]) for k in state if k.startswith("image_encoder.trunk.blocks.")}
    if weight is None or not blocks:
        return "not a SAM2 model state dict"
    key = (int(weight.shape[0]), max(blocks) + 1)
    size = _HIERA_SIZES.get(key, f"a Hiera with embed_dim {key[0]} and {key[1]} blocks")
    return f"looks like {size}"


def load_checkpoint_into(model: nn.Module, checkpoint: str | Path, config: str) -> None:
    """Load an official SAM2 checkpoint ({"model": state_dict}) strictly, with messages a user can act on."""
    path = Path(checkpoint).expanduser()
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated file, a non-torch file or pickled objects
        raise EncoderError(f"cannot read SAM2 checkpoint {path}: {exc}") from exc
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
        raise EncoderError(f"{path} is not an official SAM2 checkpoint: expected a dict with a 'model' state dict")
    state = payload["model"]
    details = state_dict_mismatch(model.state_dict(), state)
    if details:
        raise EncoderError(
            f"SAM2 checkpoint {path} does not match encoder.config={config!r}: {details}. "
            f"The checkpoint {_describe_checkpoint(state)}; set encoder.config to the config it was trained with "
            f"(official pairs: {CHECKPOINT_NAMES})."
        )
    model.load_state_dict(state, strict=True)


@ENCODERS.register("sam2")
class SAM2Encoder(FrozenEncoder):
    """Frozen SAM2 image encoder returning the three maps the study decodes (see the module docstring).

    Args:
        config: a SAM2 config shipped with the sam2 package (``sam2.1_hiera_s``...) or a deeploc preset
            (``sam2.1_hiera_micro``).
        checkpoint: an official SAM2 checkpoint file; required unless ``random_init``.
        image_size: encoder input side (multiple of 32); the study uses 1024.
        random_init, seed: seeded random weights instead of a checkpoint (demos and tests only).
        overrides: dotted keys under ``model`` to change in the SAM2 config.
        adapt, lora, lr: adaptation of the encoder's weights (``frozen``, ``lora``, ``full``; :mod:`.adaptation`).
        bf16: run the encoder under bfloat16 autocast on CUDA devices.
    """

    family = "SAM2"
    target_stride = 4.0  # the study's decoders give 256 x 256 logits for a 1024 input
    preprocessing = "bilinear-antialias-resize+imagenet-norm"
    weights_hint = "an official SAM2 checkpoint (e.g. sam2.1_hiera_small.pt, github.com/facebookresearch/sam2)"
    lora_targets = ("qkv", "proj")  # the attention projections of the Hiera trunk's blocks
    lora_scope = "image_encoder.trunk"

    def __init__(
        self,
        config: str = "sam2.1_hiera_s",
        checkpoint: str | None = None,
        image_size: int = 1024,
        random_init: bool = False,
        seed: int = 0,
        overrides: dict[str, Any] | None = None,
        bf16: bool = True,
        adapt: str = "frozen",
        lora: Mapping[str, Any] | None = None,
        lr: float | None = None,
    ) -> None:
        self.config = config
        self.overrides = dict(overrides or {})
        # Name the exact file this config needs in messages.
        self.weights_hint = (
            f"{CHECKPOINT_NAMES.get(config, 'the matching SAM2 .pt file')} from the SAM2 release page "
            "(github.com/facebookresearch/sam2, 'Download Checkpoints')"
        )
        super().__init__(image_size, checkpoint, random_init, seed, bf16, adapt, lora, lr)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def feature_specs(self) -> dict[str, FeatureSpec]:
        return dict(FEATURE_SPECS)

    def architecture(self) -> dict[str, Any]:
        return {"config": self.config, "overrides": self.overrides}

    def build(self) -> nn.Module:
        if self.image_size % 32:
            raise EncoderError(f"encoder.image_size={self.image_size} must be a multiple of 32 (e.g. 256, 512, 1024)")
        return build_sam2_model(self.config, self.image_size, self.overrides)

    def load_weights(self, model: nn.Module, path: Path) -> None:
        load_checkpoint_into(model, path, self.config)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resize to the input size and ImageNet-normalise, as the predictor's SAM2Transforms does."""
        return (self.resize(images) - self.mean) / self.std

    def encode(self, inputs: torch.Tensor, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        backbone_out = self.model.forward_image(inputs)
        _, vision_feats, _, sizes = self.model._prepare_backbone_features(backbone_out)
        if self.model.directly_add_no_mem_embed:
            vision_feats[-1] = vision_feats[-1] + self.model.no_mem_embed
        batch = inputs.shape[0]
        maps = [f.permute(1, 2, 0).reshape(batch, -1, h, w) for f, (h, w) in zip(vision_feats, sizes)]
        by_name = {"high_res_feats_0": maps[0], "high_res_feats_1": maps[1], "image_embed": maps[2]}
        return {name: by_name[name] for name in names}


def save_random_checkpoint(
    path: str | Path, config: str, seed: int = 0, overrides: dict[str, Any] | None = None
) -> Path:
    """Write a randomly initialised SAM2 model in the official checkpoint format ({"model": state_dict}).

    Real checkpoints cannot be downloaded in CI; this makes a file that travels the same loading path.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_sam2_model(config, 1024, overrides)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, path)
    return path
