"""The frozen CLIP ViT image encoder (DeCLIP's backbone), returning the patch tokens of chosen transformer blocks.

What DeCLIP (bit-ml/DeCLIP) decodes, and so what ``layers=[k]`` returns as map ``layer{k}``: the output of
transformer block ``k`` (0-based, after its residual additions; no final LayerNorm, no projection) of OpenAI CLIP's
vision tower, CLS token dropped, the 16 x 16 patch tokens of a 224 input reshaped row-major to ``B x 1024 x 16 x 16``.
Several layers come from one forward pass that stops after the deepest requested block.

Preprocessing is DeCLIP's (its datasets apply ``Resize((224, 224))``, ``ToTensor``, ``Normalize`` with CLIP's
mean/std): a bilinear, antialiased resize of the whole image to the input size (no centre crop: DeCLIP does not use
CLIP's bicubic resize + crop), then CLIP's normalisation. The resize runs on the float image tensor (DeCLIP resized
8-bit PIL images, so its inputs differ by PIL's rounding: at most one grey level).

The network is open_clip's ``VisionTransformer`` with OpenAI's QuickGELU: its keys are OpenAI's (``visual.*``), so
OpenAI's file loads as it is. Weights are read without running code from the file: OpenAI's TorchScript archive
(``ViT-L-14.pt``) through :mod:`deeploc.models.torchscript`, ``torch.save`` state dicts with ``weights_only=True``
and ``.safetensors`` files (open_clip's formats) with safetensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deeploc.io import torch_load_failure
from deeploc.models.encoders.base import (
    ENCODERS,
    EncoderError,
    FeatureSpec,
    FrozenEncoder,
    check_layers,
)
from deeploc.models.state_dicts import state_dict_mismatch
from deeploc.models.torchscript import TorchScriptError, is_torchscript_archive, read_torchscript_tensors

__all__ = ["ARCHITECTURES", "CLIP_MEAN", "CLIP_STD", "CLIPEncoder", "ViTConfig", "read_clip_vision_weights"]

# OpenAI CLIP's normalisation (also DeCLIP's datasets).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ViTConfig:
    """A CLIP vision tower: width, blocks, heads, patch size, embedding size, the weights file users fetch, and
    the sha256 its publisher gives for that file (None: no official file)."""

    width: int
    layers: int
    heads: int
    patch_size: int
    output_dim: int
    weights: str
    sha256: str | None = None


# Every preset has 14-pixel patches, so target_stride 14/16 gives DeCLIP's 256 x 256 logits at 224 input.
ARCHITECTURES: dict[str, ViTConfig] = {
    "ViT-L-14": ViTConfig(
        width=1024,
        layers=24,
        heads=16,
        patch_size=14,
        output_dim=768,
        weights=(
            "OpenAI's ViT-L-14.pt (the 'ViT-L/14' entry of _MODELS in OpenAI CLIP's clip/clip.py, "
            "sha256 b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836), or open_clip's "
            "ViT-L-14 'openai' weights as .safetensors / .bin"
        ),
        # The digest in OpenAI's download URL, which OpenAI's clip.py checks after downloading.
        sha256="b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
    ),
    # TESTS ONLY: same code path and block indices as ViT-L-14 (24 blocks, so layer12 ... layer23, every CLIP config
    # and experiment run on it unchanged), but 64 wide with one head (1.2 M parameters), random weights.
    "clip_micro": ViTConfig(
        width=64, layers=24, heads=1, patch_size=14, output_dim=32, weights="no file (random weights only)"
    ),
}


# Fallback for a TorchScript archive the safe reader refuses (docs/clip.md).
_CONVERT = (
    "python -c \"import torch; from safetensors.torch import save_file; m = torch.jit.load('{path}', map_location='cpu'); "
    "save_file({{k: v.float().contiguous() for k, v in m.state_dict().items()}}, '{path}.safetensors')\""
)


def _describe_weights(state: Mapping[str, torch.Tensor]) -> str:
    """What vision tower a state dict holds, for messages."""
    conv = state.get("conv1.weight")
    pos = state.get("positional_embedding")
    blocks = {k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")}
    if not isinstance(conv, torch.Tensor) or not isinstance(pos, torch.Tensor) or conv.ndim != 4 or pos.ndim != 2:
        return "does not look like a CLIP ViT vision tower"
    width, patch = int(conv.shape[0]), int(conv.shape[-1])
    side = round((pos.shape[0] - 1) ** 0.5) * patch
    named = [n for n, c in ARCHITECTURES.items() if (c.width, c.layers, c.patch_size) == (width, len(blocks), patch)]
    return f"holds a ViT with width {width}, {len(blocks)} blocks, {patch}-px patches, trained at {side} px" + (
        f" ({named[0]}: set encoder.config={named[0]} encoder.image_size={side})" if named else ""
    )


def read_clip_vision_weights(path: Path) -> dict[str, torch.Tensor]:
    """The vision tower's tensors (``visual.`` prefix removed) of a CLIP weights file, read without running code.

    Accepted: OpenAI's TorchScript archives, ``.safetensors`` files and ``torch.save`` files holding a state dict
    (optionally under ``state_dict``, optionally with DistributedDataParallel's ``module.`` prefix) of a whole CLIP
    model (``visual.*`` keys) or of its vision tower alone.
    """
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise EncoderError(f"cannot read CLIP weights {path} as safetensors: {exc}") from None
    elif is_torchscript_archive(path):
        try:
            state = read_torchscript_tensors(path)
        except TorchScriptError as exc:
            raise EncoderError(
                f"CLIP weights: {exc}. If you trust the file, convert it once (this runs its TorchScript): "
                f"{_CONVERT.format(path=path)} and set encoder.checkpoint to the .safetensors file (docs/clip.md)"
            ) from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated, not a torch file, or pickled objects weights_only refuses
            raise EncoderError(
                f"cannot read CLIP weights {path} safely (torch.load weights_only=True, or a TorchScript archive, "
                f"or .safetensors): {torch_load_failure(exc)}. A truncated download fails here: download it again."
            ) from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise EncoderError(f"CLIP weights {path} hold no state dict (found {type(state).__name__})")
    if all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    visual = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    if visual:
        return visual
    if "conv1.weight" in state:  # a vision tower saved on its own
        return dict(state)
    raise EncoderError(
        f"CLIP weights {path} hold no CLIP vision tower (no 'visual.*' keys; e.g. {sorted(state)[:3]}); "
        f"expected {ARCHITECTURES['ViT-L-14'].weights}"
    )


@ENCODERS.register("clip")
class CLIPEncoder(FrozenEncoder):
    """Frozen CLIP ViT returning the patch tokens of transformer blocks ``layers`` (see the module docstring).

    Args:
        config: the vision tower: ``ViT-L-14`` (DeCLIP's) or ``clip_micro`` (tests only).
        layers: the blocks whose outputs are returned, as maps ``layer{k}`` (0-based; DeCLIP: 20).
        checkpoint: OpenAI's weights file (``ViT-L-14.pt``) or open_clip's; required unless ``random_init``.
        image_size: input side, a multiple of the patch size; real weights fix it (ViT-L-14: 224).
        random_init, seed: seeded random weights instead of a checkpoint (demos and tests only).
        bf16: run under bfloat16 autocast on CUDA devices (off by default: DeCLIP runs CLIP in float32).
        adapt, lora, lr: adaptation of the encoder's weights (``frozen``, ``lora``, ``full``; :mod:`.adaptation`).
    """

    family = "CLIP"
    target_stride = 14 / 16  # 16 x 16 tokens -> DeCLIP's 256 x 256 logits (four x2 upsamplings)
    preprocessing = "bilinear-antialias-resize+clip-norm"
    selection_keys = ("layers",)  # which blocks are returned, not their values: one cache for every layer list
    weights_hint = "OpenAI's ViT-L-14.pt (docs/clip.md)"
    # The attention of each block (torch's MultiheadAttention: its joint q/k/v projection, see .adaptation).
    lora_targets = ("attn",)
    lora_scope = "transformer"

    def __init__(
        self,
        config: str = "ViT-L-14",
        layers: Sequence[int] | int = (20,),
        checkpoint: str | None = None,
        image_size: int = 224,
        random_init: bool = False,
        seed: int = 0,
        bf16: bool = False,
        adapt: str = "frozen",
        lora: Mapping[str, Any] | None = None,
        lr: float | None = None,
    ) -> None:
        if config not in ARCHITECTURES:
            raise EncoderError(
                f"encoder.config={config!r} is not a CLIP architecture; choose one of {list(ARCHITECTURES)}"
            )
        self.config = config
        self.vit = ARCHITECTURES[config]
        # DeCLIP decodes layer 20 of ViT-L-14.
        self.layers = check_layers(layers, self.vit.layers, self.config, min(20, self.vit.layers - 1))
        self.weights_hint = self.vit.weights
        if not isinstance(image_size, int) or image_size <= 0 or image_size % self.vit.patch_size:
            raise EncoderError(
                f"encoder.image_size={image_size!r} must be a positive multiple of {config}'s "
                f"{self.vit.patch_size}-px patches (DeCLIP: 224)"
            )
        super().__init__(image_size, checkpoint, random_init, seed, bf16, adapt, lora, lr)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def feature_specs(self) -> dict[str, FeatureSpec]:
        return {f"layer{k}": FeatureSpec(self.vit.width, self.vit.patch_size) for k in self.layers}

    def architecture(self) -> dict[str, Any]:
        return {"config": self.config, "layers": list(self.layers)}

    def build(self) -> nn.Module:
        from open_clip.transformer import QuickGELU, VisionTransformer

        vit = self.vit
        return VisionTransformer(
            image_size=self.image_size,
            patch_size=vit.patch_size,
            width=vit.width,
            layers=vit.layers,
            heads=vit.heads,
            mlp_ratio=4.0,
            output_dim=vit.output_dim,
            act_layer=QuickGELU,  # OpenAI's activation (open_clip's "-quickgelu" / "openai" models)
        )

    def load_weights(self, model: nn.Module, path: Path) -> None:
        state = read_clip_vision_weights(path)
        details = state_dict_mismatch(model.state_dict(), state)
        if details:
            raise EncoderError(
                f"CLIP weights {path} do not match encoder.config={self.config!r} at "
                f"encoder.image_size={self.image_size}: {details}. The file {_describe_weights(state)}."
            )
        model.load_state_dict(state, strict=True)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """DeCLIP's: bilinear antialiased resize of the whole image to the input size, CLIP mean/std."""
        return (self.resize(images) - self.mean) / self.std

    def encode(self, inputs: torch.Tensor, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        index = {name: int(name.removeprefix("layer")) for name in names}
        wanted = sorted(set(index.values()))
        out = self.model.forward_intermediates(
            inputs, indices=wanted, stop_early=True, intermediates_only=True, output_fmt="NCHW"
        )
        maps = dict(zip(wanted, out["image_intermediates"]))
        return {name: maps[k] for name, k in index.items()}
