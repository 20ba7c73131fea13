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

import hashlib
import importlib.resources
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from deeploc.errors import DeeplocError
from deeploc.features_spec import FEATURES, feature_info

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


class EncoderError(DeeplocError, ValueError):
    """A SAM2 config or checkpoint that cannot be used; the message names it and the fix."""


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
    if not path.is_file():
        hint = CHECKPOINT_NAMES.get(config, "the matching .pt file")
        raise EncoderError(
            f"encoder.checkpoint={str(path)!r} does not exist. Download {hint} from the SAM2 release page "
            "(github.com/facebookresearch/sam2, 'Download Checkpoints') and set encoder.checkpoint to its path, "
            "or set encoder.random_init=true for a run with random weights."
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated file, a non-torch file or pickled objects
        raise EncoderError(f"cannot read SAM2 checkpoint {path}: {exc}") from exc
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
        raise EncoderError(f"{path} is not an official SAM2 checkpoint: expected a dict with a 'model' state dict")
    state = payload["model"]
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        details = "; ".join(
            f"{len(keys)} {what} (e.g. {keys[0]})"
            for what, keys in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", mismatched),
            )
            if keys
        )
        raise EncoderError(
            f"SAM2 checkpoint {path} does not match encoder.config={config!r}: {details}. "
            f"The checkpoint {_describe_checkpoint(state)}; set encoder.config to the config it was trained with "
            f"(official pairs: {CHECKPOINT_NAMES})."
        )
    model.load_state_dict(state, strict=True)


def file_digest(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's contents (identifies checkpoint weights for caches and exports)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class SAM2FeatureEncoder(nn.Module):
    """Frozen SAM2 image encoder mapping ``B x 3 x H x W`` images in [0, 1] to the three feature maps.

    Args:
        config: a SAM2 config shipped with the sam2 package (``sam2.1_hiera_s``...) or a deeploc preset.
        checkpoint: an official SAM2 checkpoint file; required unless ``random_init``.
        image_size: encoder input side (multiple of 32); the study uses 1024.
        random_init: use seeded random weights instead of a checkpoint (demos and tests only).
        seed: the seed of the random weights, so that every process rebuilds the same encoder.
        overrides: dotted keys under ``model`` to change in the SAM2 config.
        bf16: run the encoder under bfloat16 autocast on CUDA devices.
    """

    def __init__(
        self,
        config: str = "sam2.1_hiera_s",
        checkpoint: str | None = None,
        image_size: int = 1024,
        random_init: bool = False,
        seed: int = 0,
        overrides: dict[str, Any] | None = None,
        bf16: bool = True,
    ) -> None:
        super().__init__()
        if checkpoint is None and not random_init:
            raise EncoderError(
                "encoder.checkpoint is not set. Point it at an official SAM2 checkpoint "
                f"(e.g. {CHECKPOINT_NAMES.get(config, 'sam2.1_hiera_small.pt')}) or set encoder.random_init=true "
                "to use random weights (features then carry no pretrained knowledge)."
            )
        if checkpoint is not None and random_init:
            raise EncoderError("encoder.checkpoint and encoder.random_init=true exclude each other; unset one")
        self.config = config
        self.image_size = image_size
        self.bf16 = bf16
        self.overrides = dict(overrides or {})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = build_sam2_model(config, image_size, self.overrides)
        if checkpoint is not None:
            load_checkpoint_into(self.model, checkpoint, config)
            self.weights = f"sha256:{file_digest(checkpoint)}"
        else:
            warnings.warn(
                f"SAM2 encoder {config} uses RANDOM weights (seed {seed}): results say nothing about pretrained "
                "SAM2. Set encoder.checkpoint=<path to an official .pt> for real features.",
                stacklevel=2,
            )
            self.weights = f"random:seed={seed}"
        self.model.requires_grad_(False)
        self.model.eval()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> SAM2FeatureEncoder:
        """The encoder is frozen: it stays in eval mode whatever the trainer asks."""
        return super().train(False)

    def compute_precision(self) -> str:
        """The precision the encoder computes in where it is now: bf16 autocast on capable GPUs, else fp32."""
        return "bf16" if self.bf16 and self.mean.is_cuda and torch.cuda.is_bf16_supported() else "fp32"

    def identity(self) -> dict[str, Any]:
        """Everything that determines the features: the feature-cache key and the metadata of checkpoints/exports.

        ``precision`` depends on the device the encoder sits on; :func:`same_encoder` ignores it when asking
        whether a decoder fits an encoder (the weights are what matter there), caches keep it.
        """
        return {
            "config": self.config,
            "overrides": self.overrides,
            "image_size": self.image_size,
            "weights": self.weights,
            "preprocessing": "bilinear-antialias-resize+imagenet-norm",
            "precision": self.compute_precision(),
        }

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resize to the encoder's input size and ImageNet-normalise, as the predictor's SAM2Transforms does."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape B x 3 x H x W, got {tuple(images.shape)}")
        return (self.resize(images.float()) - self.mean) / self.std

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """Resize ``B x 3 x H x W`` images to the square encoder input (no-op when already that size)."""
        size = (self.image_size, self.image_size)
        if images.shape[-2:] == size:
            return images
        # torchvision's Resize on tensors is bilinear with antialias; identical through F.interpolate.
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, names: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """Feature maps (float32, ``B x C x h x w``) by name; all three unless ``names`` picks some."""
        wanted = names or tuple(FEATURES)
        for name in wanted:
            feature_info(name)
        x = self.preprocess(images)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.compute_precision() == "bf16"):
            backbone_out = self.model.forward_image(x)
            _, vision_feats, _, sizes = self.model._prepare_backbone_features(backbone_out)
            if self.model.directly_add_no_mem_embed:
                vision_feats[-1] = vision_feats[-1] + self.model.no_mem_embed
        batch = x.shape[0]
        maps = [f.permute(1, 2, 0).reshape(batch, -1, h, w).float() for f, (h, w) in zip(vision_feats, sizes)]
        by_name = {"high_res_feats_0": maps[0], "high_res_feats_1": maps[1], "image_embed": maps[2]}
        return {name: by_name[name] for name in wanted}


def same_encoder(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two encoder identities describe the same model (config, size, weights, preprocessing),
    whatever device or precision each ran in."""
    strip = ("precision",)
    return {k: v for k, v in a.items() if k not in strip} == {k: v for k, v in b.items() if k not in strip}


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
