"""Any timm backbone (DINOv2, DINOv3, any ViT or CNN with ``forward_intermediates``) as a deeploc encoder.

``layers=[k, ...]`` returns maps ``layer{k}``: timm's ``forward_intermediates`` outputs for its feature index ``k``
(a ViT's transformer block ``k``, 0-based, after its residual additions, no final norm, prefix tokens dropped,
``B x C x h x w``; a CNN's stage ``k``), all from one pass that stops after the deepest requested index. Channels
and strides come from the model's ``feature_info``, so decoders size themselves for any model.

Preprocessing comes from the model's own pretrained config (timm's ``resolve_data_config``: mean, std,
interpolation; the input size by default): timm's eval transform with ``crop_mode='squash'``, i.e. the whole image
resized to ``image_size x image_size`` (no centre crop: a localizer must see, and predict, every pixel), run on the
float tensor with antialiasing and clamped to [0, 1] as an 8-bit image would be.

The network is built with ``pretrained=False`` (never a download at run time) and seeded random weights; real
weights come from ``checkpoint``: a ``.safetensors`` file (timm's hub format) or a ``torch.save`` state dict read
with ``weights_only=True`` (e.g. DINOv2's ``dinov2_vits14_pretrain.pth``), passed through the model's own
``checkpoint_filter_fn`` (timm's conversion of original releases) and then loaded strictly.
"""

from __future__ import annotations

import difflib
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deeploc.models.encoders.base import ENCODERS, EncoderError, FeatureSpec, FrozenEncoder, check_layers
from deeploc.models.state_dicts import state_dict_mismatch

__all__ = ["TimmEncoder", "read_timm_weights", "save_timm_weights"]

# safetensors metadata key naming the timm model a file was saved from (deeploc's own files; hub files lack it).
MODEL_KEY = "timm_model"
_INTERPOLATIONS = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest"}


def _check_model_name(name: str) -> None:
    """Refuse a name timm does not know, suggesting the closest ones."""
    import timm

    if not isinstance(name, str) or not name or name == "???":
        raise EncoderError(
            "encoder.model is not set: give a timm model name, e.g. encoder.model=vit_small_patch14_dinov2"
        )
    known = timm.list_models()
    if name.split(".", 1)[0] in known:
        return
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = (
        f"; close matches: {', '.join(close)}"
        if close
        else "; list them with python -c 'import timm; print(timm.list_models())'"
    )
    raise EncoderError(f"encoder.model={name!r} is not a timm {timm.__version__} model{hint}")


def read_timm_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state dict, safetensors metadata)`` of a weights file, read without running code from it.

    Accepted: ``.safetensors``, and ``torch.save`` files holding a state dict (optionally under ``state_dict`` or
    ``model``, optionally with DistributedDataParallel's ``module.`` prefix).
    """
    metadata: dict[str, str] = {}
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                metadata = dict(handle.metadata() or {})
                state: Any = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        except (SafetensorError, OSError) as exc:
            raise EncoderError(f"cannot read timm weights {path} as safetensors: {exc}") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated, not a torch file, or pickled objects weights_only refuses
            raise EncoderError(
                f"cannot read timm weights {path} safely (torch.load weights_only=True, or .safetensors): {exc}"
            ) from None
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict) or not state:
        raise EncoderError(f"timm weights {path} hold no state dict (found {type(state).__name__})")
    if all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return dict(state), metadata


def save_timm_weights(path: str | Path, encoder: TimmEncoder) -> Path:
    """Write an encoder's network weights as a timm-style ``.safetensors`` file naming its model (tests, demos)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in encoder.model.state_dict().items()}
    meta = {MODEL_KEY: encoder.model_name, "model_kwargs": json.dumps(encoder.model_kwargs, sort_keys=True)}
    save_file(tensors, str(path), metadata=meta)
    return path


def _describe_weights(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """What a weights file holds, for messages: its recorded model, else the shapes of a ViT."""
    if MODEL_KEY in metadata:
        return f"holds timm model {metadata[MODEL_KEY]} {metadata.get('model_kwargs', '')}".rstrip(" {}")
    blocks = {k.split(".")[1] for k in state if k.startswith("blocks.")}
    patch = state.get("patch_embed.proj.weight")
    if isinstance(patch, torch.Tensor) and patch.ndim == 4:
        return f"holds a ViT with width {patch.shape[0]}, {len(blocks)} blocks, {patch.shape[-1]}-px patches"
    return f"holds {len(state)} tensors (e.g. {sorted(state)[:2]})"


@ENCODERS.register("timm")
class TimmEncoder(FrozenEncoder):
    """A timm model returning ``forward_intermediates`` maps ``layer{k}`` (see the module docstring).

    Args:
        model: a timm model name (``vit_small_patch14_dinov2``, ``vit_base_patch16_dinov3``...).
        layers: the feature indices returned as maps ``layer{k}`` (a ViT's blocks, 0-based); default the last.
        checkpoint: the model's weights (``.safetensors`` or a weights-only ``.pth``); required unless ``random_init``.
        image_size: input side, a multiple of the model's patch size (None: the pretrained config's input size).
        random_init, seed: seeded random weights instead of a checkpoint (tests and demos only).
        bf16: run under bfloat16 autocast on CUDA devices.
        model_kwargs: extra keywords of ``timm.create_model`` (e.g. ``depth``, ``embed_dim`` of a tiny test model).
        adapt, lora, lr: adaptation of the encoder's weights (``frozen``, ``lora``, ``full``; :mod:`.adaptation`).
    """

    family = "timm"
    selection_keys = ("layers",)  # which indices are returned, not their values: one cache for every layer list
    weights_hint = "the model's weights file (.safetensors from its timm hub page, or a weights-only .pth)"
    lora_targets = ("qkv", "proj")  # a timm ViT block's attention projections (not the patch embedding's proj)
    lora_scope = "blocks"

    def __init__(
        self,
        model: str,
        layers: Sequence[int] | int | None = None,
        checkpoint: str | None = None,
        image_size: int | None = None,
        random_init: bool = False,
        seed: int = 0,
        bf16: bool = True,
        model_kwargs: Mapping[str, Any] | None = None,
        adapt: str = "frozen",
        lora: Mapping[str, Any] | None = None,
        lr: float | None = None,
    ) -> None:
        import timm.data
        from timm.models import get_pretrained_cfg

        _check_model_name(model)
        self.model_name = model
        self.model_kwargs = dict(model_kwargs or {})
        self.requested_layers = layers
        pretrained = get_pretrained_cfg(model)
        data = timm.data.resolve_data_config({}, pretrained_cfg=pretrained.to_dict() if pretrained else {})
        self.mean_std = (tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"]))
        self.interpolation = _INTERPOLATIONS.get(str(data["interpolation"]), "bilinear")
        size = int(data["input_size"][-1]) if image_size is None else image_size
        self.preprocessing = (
            f"squash-resize-{self.interpolation}-antialias+mean={list(self.mean_std[0])}+std={list(self.mean_std[1])}"
        )
        super().__init__(size, checkpoint, random_init, seed, bf16, adapt, lora, lr)
        self.register_buffer("mean", torch.tensor(self.mean_std[0]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.mean_std[1]).view(1, 3, 1, 1), persistent=False)

    # ------------------------------------------------------------------------------------- building
    def build(self) -> nn.Module:
        import timm

        kwargs = {"pretrained": False, "num_classes": 0, **self.model_kwargs}
        try:
            net = timm.create_model(self.model_name, img_size=self.image_size, **kwargs)
        except TypeError:  # a model without an input-size argument (most CNNs)
            net = timm.create_model(self.model_name, **kwargs)
        if not hasattr(net, "forward_intermediates"):
            raise EncoderError(f"timm model {self.model_name} has no forward_intermediates; choose another model")
        info = list(getattr(net, "feature_info", None) or [])
        if not info:
            raise EncoderError(f"timm model {self.model_name} declares no feature_info; choose another model")
        self.feature_info = [{"channels": int(i["num_chs"]), "stride": float(i["reduction"])} for i in info]
        depth = len(self.feature_info)
        layers = [depth - 1] if self.requested_layers is None else self.requested_layers
        self.layers = check_layers(layers, depth, self.model_name, depth - 1)
        # A ViT's maps (stride = patch size p) decode to logits at p / 16 (four x2 upsamplings), as CLIP's.
        self.target_stride = max(i["stride"] for i in self.feature_info) / 16
        bad = sorted(
            {
                int(self.feature_info[k]["stride"])
                for k in self.layers
                if self.image_size % self.feature_info[k]["stride"]
            }
        )
        if bad:
            raise EncoderError(
                f"encoder.image_size={self.image_size} is not a multiple of {self.model_name}'s stride {bad[0]} "
                f"(its patch size); e.g. encoder.image_size={self.image_size // bad[0] * bad[0] or bad[0]}"
            )
        return net

    def load_weights(self, model: nn.Module, path: Path) -> None:
        state, metadata = read_timm_weights(path)
        named = metadata.get(MODEL_KEY)
        if named is not None and named.split(".", 1)[0] != self.model_name.split(".", 1)[0]:
            raise EncoderError(
                f"timm weights {path} are for model {named}, not encoder.model={self.model_name}; set "
                f"encoder.model={named} or point encoder.checkpoint at {self.model_name}'s weights"
            )
        filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
        if filter_fn is not None:  # timm's conversion of original releases (DINOv2's .pth, position embeddings)
            try:
                state = filter_fn(state, model)
            except Exception as exc:  # a file of another architecture can break the conversion itself
                raise EncoderError(
                    f"timm weights {path} cannot be converted for encoder.model={self.model_name}: {exc}. "
                    f"The file {_describe_weights(state, metadata)}."
                ) from None
        own = model.state_dict()
        # A classifier head (ImageNet weights) is not part of the encoder (built with num_classes=0).
        state = {k: v for k, v in state.items() if k in own or not k.startswith(("head.", "fc.", "classifier."))}
        details = state_dict_mismatch(own, state)
        if details:
            raise EncoderError(
                f"timm weights {path} do not match encoder.model={self.model_name} "
                f"{self.model_kwargs or ''} at encoder.image_size={self.image_size}: {details}. "
                f"The file {_describe_weights(state, metadata)}."
            )
        model.load_state_dict(state, strict=True)

    # ------------------------------------------------------------------------------- the contract
    @property
    def feature_specs(self) -> dict[str, FeatureSpec]:
        return {f"layer{k}": FeatureSpec(**self.feature_info[k]) for k in self.layers}

    def architecture(self) -> dict[str, Any]:
        return {"model": self.model_name, "layers": list(self.layers), "model_kwargs": dict(self.model_kwargs)}

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """timm's eval transform with ``crop_mode='squash'`` on tensors: whole-image resize, the model's mean/std."""
        size = (self.image_size, self.image_size)
        if images.shape[-2:] != size:
            antialias = self.interpolation != "nearest"
            extra = {"align_corners": False} if antialias else {}
            images = F.interpolate(images, size=size, mode=self.interpolation, antialias=antialias, **extra)
            images = images.clamp(0.0, 1.0)  # bicubic overshoot, clipped as an 8-bit image would be
        return (images - self.mean) / self.std

    def encode(self, inputs: torch.Tensor, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        index = {name: int(name.removeprefix("layer")) for name in names}
        wanted = sorted(set(index.values()))
        out = self.model.forward_intermediates(
            inputs, indices=wanted, stop_early=True, intermediates_only=True, output_fmt="NCHW"
        )
        maps = dict(zip(wanted, out))
        return {name: maps[k] for name, k in index.items()}
