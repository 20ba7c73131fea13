"""Read a decoder released by DeCLIP (bit-ml/DeCLIP) as a deeploc CONV-N decoder on CLIP ViT-L/14 features.

What a DeCLIP checkpoint holds (its ``save_networks``): a dict with ``model`` (the state dict of its localisation
model), ``optimizer``, ``total_steps``, ``feature_layer`` (``"layer20"``) and ``decoder_type`` (``"conv-20"``); older
files may lack the last two, which DeCLIP then takes from its command line. In ``model``:

* ``fc.<i>.*``: the decoder, one ``nn.Sequential``: per stage (1024 -> 512 -> 256 -> 128 -> 64) ``N/4`` blocks
  Conv2d 5x5 -> BatchNorm2d -> ReLU then a x2 bilinear upsample, and last a Conv2d 5x5 64 -> 1. deeploc's
  :class:`~deeploc.models.decoders.conv.ConvDecoder` on a 1024-channel stride-14 map has the same modules in the same
  order, split into ``body`` (everything but the head) and ``head``, so ``fc.<i>`` is ``body.<i>`` and the last
  index is ``head``;
* ``model.*``: the frozen CLIP backbone (OpenAI's weights), not part of the decoder; checked to be ViT-L/14;
* ``att1.*`` / ``att2.*``: DeCLIP's attention decoder, and ``fc.0`` as a ``Linear``: its linear decoder; neither
  is a deeploc decoder, so both are refused, as are the ViT+RN50 decoders (2048 input channels: RN50 layer3 too).

Released files are named ``ViT_layer20_conv-20_<training subset>.pth``; the name, when it follows that pattern, gives
the training subset and must agree with the contents. The file is read with ``torch.load(weights_only=True)``.

:func:`import_declip` (``deeploc-import declip``) writes the decoder as a deeploc export (:mod:`deeploc.inference.export`): the
ConvDecoder's weights and record, the CLIP ViT-L/14 encoder identity (layer, 224 px, DeCLIP's preprocessing, the
sha256 of the CLIP weights file: OpenAI's published digest of ``ViT-L-14.pt``, or that of the file given), and what
the file says about its training, so ``deeploc-eval`` / ``deeploc-predict`` run it like any trained deeploc model.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deeploc.errors import DeeplocError
from deeploc.io import torch_load_failure
from deeploc.models.decoders import build_decoder
from deeploc.models.encoders.clip import ARCHITECTURES, CLIPEncoder
from deeploc.models.state_dicts import state_dict_mismatch

__all__ = ["DeclipDecoder", "DeclipImportError", "import_declip", "parse_release_name", "read_declip_decoder"]

#: DeCLIP's released decoders read OpenAI CLIP ViT-L/14.
BACKBONE = "ViT-L-14"
#: The Dolos subsets DeCLIP trains and tests on (its README's release table, Dolos' celebahq/fake folders).
DOLOS_SUBSETS = ("repaint-p2-9k", "ldm", "lama", "pluralistic")
_LAYER = re.compile(r"^layer(\d+)$")
_CONV = re.compile(r"^conv-(\d+)$")
# ViT_layer20_conv-20_lama.pth, ViT_layer20+RN50_layer3_conv-20_lama.pth
_RELEASE_NAME = re.compile(
    r"^ViT_(?P<layers>layer\d+(?:\+RN50_layer\d+)?)_(?P<decoder>conv-\d+|linear|attention)_(?P<subset>.+)$"
)


class DeclipImportError(DeeplocError, ValueError):
    """A DeCLIP checkpoint deeploc cannot import; the message names the file, what does not match and the fix."""


@dataclass(frozen=True)
class DeclipDecoder:
    """A DeCLIP decoder in deeploc's terms.

    Attributes:
        record: :meth:`deeploc.models.decoders.Decoder.record` of the equivalent ConvDecoder (rebuild it with
            :func:`deeploc.models.decoders.decoder_from_record`).
        state_dict: its weights under deeploc's key names (``body.*``, ``head.*``), float32.
        encoder: constructor keywords of the CLIP encoder it reads (``kind``, ``config``, ``layers``, ``image_size``).
        feature_layer: DeCLIP's name of the map (``layer20``); deeploc's map has the same name.
        decoder_type: DeCLIP's decoder name (``conv-20``).
        training_subset: the Dolos subset it was trained on, from a release file name (None if not named so).
        total_steps: DeCLIP's training step counter, when the file has one.
    """

    record: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    encoder: dict[str, Any]
    feature_layer: str
    decoder_type: str
    training_subset: str | None
    total_steps: int | None


def parse_release_name(path: str | Path) -> dict[str, str] | None:
    """``{backbone, feature_layer, decoder_type, training_subset}`` from a DeCLIP release file name, else None."""
    match = _RELEASE_NAME.match(Path(path).stem)
    if match is None:
        return None
    vit_layer, _, rn50_layer = match["layers"].partition("+RN50_")
    return {
        "backbone": "ViT+RN50" if rn50_layer else "ViT",
        "feature_layer": vit_layer,
        "decoder_type": match["decoder"],
        "training_subset": match["subset"],
    }


def _load(path: Path) -> dict[str, Any]:
    try:
        # mmap: released files may carry the whole CLIP backbone (GBs) next to the decoder.
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # a truncated or non-torch file, or pickled objects weights_only refuses
        raise DeclipImportError(
            f"cannot read DeCLIP checkpoint {path} safely (torch.load weights_only=True): {torch_load_failure(exc)}. A truncated "
            "download fails here: compare its size with the release's and download it again."
        ) from None
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
        found = sorted(payload)[:5] if isinstance(payload, dict) else type(payload).__name__
        raise DeclipImportError(
            f"{path} is not a DeCLIP checkpoint: expected a dict with a 'model' state dict (DeCLIP's "
            f"save_networks), found {found}"
        )
    return payload


def _declared(path: Path, payload: Mapping[str, Any], key: str, given: str | None) -> str:
    """``feature_layer`` / ``decoder_type`` from the file, or from the caller when the file has none; both must agree."""
    found = payload.get(key)
    if found is not None and not isinstance(found, str):
        raise DeclipImportError(f"{path}: '{key}' is {found!r}, expected a string such as 'layer20' / 'conv-20'")
    if found is not None and given is not None and found != given:
        raise DeclipImportError(f"{path} says {key}={found!r}, but {given!r} was given; drop the option or fix it")
    value = found if found is not None else given
    if value is None:
        example = {"feature_layer": "layer20", "decoder_type": "conv-20"}[key]
        raise DeclipImportError(
            f"{path} does not record its {key} (older DeCLIP files do not); give it as in the release file name: "
            f"deeploc-import declip {path.name} --{key.replace('_', '-')} {example} (Python: {key}={example!r})"
        )
    return value


def _split_state(path: Path, state: Mapping[str, Any]) -> dict[str, Any]:
    """The decoder part (``fc.*``), after checking what else the state dict holds."""
    if any(k.startswith(("att1.", "att2.")) for k in state):
        raise DeclipImportError(
            f"{path} holds DeCLIP's attention decoder (att1/att2 keys); deeploc imports only conv-N decoders"
        )
    other = sorted(k for k in state if not k.startswith(("fc.", "model.")))
    if other:
        raise DeclipImportError(f"{path}: unexpected keys in 'model' (e.g. {other[:3]}); not a DeCLIP checkpoint")
    fc = {k: v for k, v in state.items() if k.startswith("fc.")}
    if not fc:
        raise DeclipImportError(f"{path}: no decoder weights ('fc.*' keys) in 'model'")
    first = fc.get("fc.0.weight")
    if isinstance(first, torch.Tensor) and first.ndim == 2:
        raise DeclipImportError(
            f"{path} holds DeCLIP's linear decoder (fc.0 is a Linear {tuple(first.shape)}); deeploc's linear "
            "probe upsamples differently, so only conv-N decoders import"
        )
    return fc


def _check_backbone(path: Path, state: Mapping[str, Any]) -> None:
    """The backbone weights a DeCLIP ViT file carries (``model.visual.*``), if any, must be ViT-L/14 at 224."""
    vit = ARCHITECTURES[BACKBONE]
    expected = {
        "model.visual.conv1.weight": (vit.width, 3, vit.patch_size, vit.patch_size),
        "model.visual.positional_embedding": ((224 // vit.patch_size) ** 2 + 1, vit.width),
    }
    for key, shape in expected.items():
        value = state.get(key)
        if isinstance(value, torch.Tensor) and tuple(value.shape) != shape:
            raise DeclipImportError(
                f"{path}: backbone weight {key} has shape {tuple(value.shape)}, expected {shape} for CLIP "
                f"{BACKBONE} at 224 px; deeploc imports DeCLIP decoders trained on ViT-L/14 only"
            )


def _hint(fc: Mapping[str, Any]) -> str:
    """What a decoder that does not match looks like instead, for messages."""
    first = fc.get("fc.0.weight")
    if isinstance(first, torch.Tensor) and first.ndim == 4 and first.shape[1] == 2 * ARCHITECTURES[BACKBONE].width:
        return (
            " Its first conv reads 2048 channels: a ViT+RN50 decoder, which needs CLIP RN50 layer3 features that "
            "deeploc does not compute."
        )
    convs = sum(1 for k, v in fc.items() if k.endswith(".weight") and isinstance(v, torch.Tensor) and v.ndim == 4)
    return f" It has {convs} convolutions, i.e. conv-{convs - 1} plus the head if it is a DeCLIP ViT-L/14 decoder."


def read_declip_decoder(
    path: str | Path, feature_layer: str | None = None, decoder_type: str | None = None
) -> DeclipDecoder:
    """Read DeCLIP checkpoint ``path`` (see the module docstring) as a deeploc ConvDecoder, checking everything.

    Args:
        path: a DeCLIP ``.pth`` file.
        feature_layer, decoder_type: for files that do not record them (``layer20``, ``conv-20``); must agree
            with the file when it does.

    Raises :class:`DeclipImportError` naming the file and the mismatch: an unreadable or truncated file, another
    nesting, a layer or decoder the file does not match (keys, shapes, depth), a non-ViT-L/14 backbone, a linear /
    attention / ViT+RN50 decoder, non-finite weights, or a release file name that contradicts the contents.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DeclipImportError(f"DeCLIP checkpoint {path} does not exist")
    payload = _load(path)
    layer_name = _declared(path, payload, "feature_layer", feature_layer)
    kind = _declared(path, payload, "decoder_type", decoder_type)
    vit = ARCHITECTURES[BACKBONE]
    layer_match = _LAYER.match(layer_name)
    if layer_match is None or not 0 <= int(layer_match[1]) < vit.layers:
        raise DeclipImportError(
            f"{path}: feature_layer {layer_name!r} is not a ViT-L/14 block (layer0..layer{vit.layers - 1}); "
            "ViT+RN50 or RN50 decoders are not importable"
        )
    conv_match = _CONV.match(kind)
    if conv_match is None or int(conv_match[1]) <= 0 or int(conv_match[1]) % 4:
        raise DeclipImportError(
            f"{path}: decoder_type {kind!r} is not importable; deeploc imports DeCLIP's conv-N decoders "
            "(N a multiple of 4: conv-4, conv-12, conv-20)"
        )
    layer, depth = int(layer_match[1]), int(conv_match[1])
    release = parse_release_name(path)
    if release is not None:
        if release["backbone"] != "ViT":
            raise DeclipImportError(
                f"{path} is a ViT+RN50 release (CLIP ViT-L/14 and RN50 layer3 features concatenated); deeploc "
                "has no RN50 encoder, so only the ViT_layer*_conv-* decoders import"
            )
        named = (release["feature_layer"], release["decoder_type"])
        if named != (layer_name, kind):
            raise DeclipImportError(
                f"{path}: the file name says {'_'.join(named)}, its contents say {layer_name}_{kind}; "
                "the file was renamed or is another release: check the download"
            )
    state = payload["model"]
    fc = _split_state(path, state)
    _check_backbone(path, state)

    decoder = build_decoder(
        "conv",
        {layer_name: (vit.width, vit.patch_size)},
        CLIPEncoder.target_stride,
        inputs=layer_name,
        depth=depth,
    )
    # DeCLIP's fc.<i> is body.<i> (same module order); its last index is the head.
    head = f"fc.{len(decoder.body)}."
    ours = {
        k.replace("body.", "fc.", 1) if k.startswith("body.") else k.replace("head.", head, 1): k
        for k in decoder.state_dict()
    }
    expected = {declip: decoder.state_dict()[name] for declip, name in ours.items()}
    details = state_dict_mismatch(expected, fc)
    if details:
        raise DeclipImportError(
            f"{path}: the decoder does not match DeCLIP's {kind} on {layer_name}: {details}.{_hint(fc)}"
        )
    bad = sorted(k for k, v in fc.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if bad:
        raise DeclipImportError(f"{path}: decoder weights {bad[:3]} hold NaN or infinite values; the file is corrupt")
    decoder.load_state_dict({ours[k]: v for k, v in fc.items()}, strict=True)
    steps = payload.get("total_steps")
    return DeclipDecoder(
        record=decoder.record(),
        state_dict={k: v.detach().clone() for k, v in decoder.state_dict().items()},
        encoder={"kind": "clip", "config": BACKBONE, "layers": [layer], "image_size": 224},
        feature_layer=layer_name,
        decoder_type=kind,
        training_subset=release["training_subset"] if release else None,
        total_steps=int(steps) if isinstance(steps, int) else None,
    )


def import_declip(
    path: str | Path,
    out: str | Path | None = None,
    feature_layer: str | None = None,
    decoder_type: str | None = None,
    encoder_checkpoint: str | Path | None = None,
) -> Path:
    """Write DeCLIP checkpoint ``path`` as a deeploc export (default: ``<path without .pth>.safetensors``).

    The export records CLIP ViT-L/14's identity with the sha256 of ``encoder_checkpoint`` (the file is loaded and
    must be a ViT-L/14 vision tower at 224 px), else OpenAI's published digest of ``ViT-L-14.pt``: evaluation and
    prediction then need exactly that file (``--encoder-checkpoint``). ``feature_layer`` / ``decoder_type``: for
    files that do not record them (:func:`read_declip_decoder`).
    """
    from deeploc.inference.export import export_metadata, write_export
    from deeploc.io import file_digest

    source = Path(path).expanduser()
    declip = read_declip_decoder(source, feature_layer, decoder_type)
    target = Path(out).expanduser() if out is not None else source.with_suffix(".safetensors")
    if target.resolve() == source.resolve():
        raise DeclipImportError(f"--out {target} is the DeCLIP file itself; write the export to another file")
    vit = ARCHITECTURES[BACKBONE]
    if encoder_checkpoint is None:
        weights = f"sha256:{vit.sha256}"
    else:  # the file the user will evaluate with: checked to be the backbone, and recorded by its digest
        encoder = CLIPEncoder(BACKBONE, declip.encoder["layers"], str(encoder_checkpoint), declip.encoder["image_size"])
        weights = encoder.weights
    identity = CLIPEncoder.identity_of(
        {"config": BACKBONE, "layers": declip.encoder["layers"]}, declip.encoder["image_size"], weights
    )
    record = declip.record
    training: dict[str, Any] = {
        "trained_by": "DeCLIP (github.com/bit-ml/DeCLIP)",
        "decoder": record["label"],
        "feature": declip.feature_layer,
        "encoder_kind": identity["kind"],
        "encoder": BACKBONE,
        "image_size": identity["image_size"],
        "weights": weights,
        "subsets": list(DOLOS_SUBSETS),
    }
    if declip.training_subset is not None:  # DeCLIP trains on one subset and tests on all: deeploc's cross split
        training.update(split="cross", subset=declip.training_subset)
    info = {
        "decoder": record,
        "encoder": identity,
        "encoder_options": {"bf16": False},  # DeCLIP runs CLIP in float32
        "hyperparameters": None,
        "epoch": None,
        "global_step": declip.total_steps,
    }
    metrics = {"config": training, "status": "imported from DeCLIP"}
    origin = {
        "imported_from": "DeCLIP",
        "file": source.name,
        "file_sha256": f"sha256:{file_digest(source)}",
        "feature_layer": declip.feature_layer,
        "decoder_type": declip.decoder_type,
        "total_steps": declip.total_steps,
    }
    return write_export(target, declip.state_dict, export_metadata(info, metrics, origin))
