"""Loading any trained model for inference: a run directory, a ``.ckpt`` or an exported decoder.

The decoder is rebuilt from its record by registered name (a user decoder must be registered: imported with
``--import`` or declared as an entry point; :mod:`deeploc.registry`), the encoder from its identity: random
weights from their seed, real weights from a file whose sha256 must equal the recorded digest
(``encoder_checkpoint``; a run directory or ``.ckpt`` also remembers the path it was trained with). A decoder is
never paired with another encoder (kind, architecture, size, weights, preprocessing) or other maps than it was
trained with: the message names both sides.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from deeploc.data.roles import describe_training
from deeploc.inference.export import ENCODER_PREFIX, export_metadata, is_export, read_export, split_encoder_state
from deeploc.models.decoders import DecoderError
from deeploc.models.encoders import (
    AdaptationError,
    EncoderError,
    FrozenEncoder,
    MissingWeightsError,
    encoder_from_identity,
)
from deeploc.registry import UnknownComponentError
from deeploc.runs.checkpoints import (
    IncompatibleModelError,
    MissingCheckpointError,
    ModelError,
    check_run_checkpoint,
    decoder_with_weights,
    read_checkpoint,
    resolve_checkpoint,
)
from deeploc.runs.rundir import RunDir

__all__ = [
    "check_compatible",
    "describe_model",
    "load_model",
    "load_model_and_metadata",
    "resolve_device",
]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; an explicit CUDA device that is not there is an error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ModelError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} was requested but CUDA is not available here; use --device cpu or auto")
    return dev


def describe_identity(identity: Mapping[str, Any]) -> str:
    """``{kind, config, image_size, weights, ...}`` in one short line."""
    keys = ("kind", "config", "layers", "image_size", "weights")
    parts = [f"{k}={identity[k]}" for k in keys if k in identity]
    if identity.get("overrides"):
        parts.append(f"overrides={identity['overrides']}")
    return "{" + ", ".join(parts) + "}"


def describe_model(metadata: Mapping[str, Any]) -> str:
    """One line: decoder on its maps, encoder identity, and what it was trained on when known."""
    dec = metadata["decoder"]
    text = f"{dec.get('label', dec.get('name'))} on {'+'.join(dec.get('inputs', []))}, encoder " + describe_identity(
        metadata["encoder"]
    )
    training = describe_training((metadata.get("training") or {}).get("config") or {})
    return f"{text}, {training}" if training else text


def check_compatible(
    metadata: Mapping[str, Any],
    expect_encoder: Mapping[str, Any] | None = None,
    expect_feature: str | None = None,
    source: str = "decoder",
) -> None:
    """Refuse pairing a decoder with another encoder identity or feature map; the message names both."""
    trained_feature = "+".join(metadata["decoder"].get("inputs", []))
    if expect_feature is not None and expect_feature != trained_feature:
        raise IncompatibleModelError(
            f"{source} was trained on feature {trained_feature!r}, not on the requested feature {expect_feature!r}"
        )
    if expect_encoder is not None:
        trained, wanted = {"kind": "sam2", **metadata["encoder"]}, {"kind": "sam2", **expect_encoder}
        differing = sorted(
            k for k in set(trained) | set(wanted) if k != "precision" and trained.get(k) != wanted.get(k)
        )
        if differing:
            details = "; ".join(
                f"{k}: {trained.get(k)!r} (decoder) vs {wanted.get(k)!r} (requested)" for k in differing
            )
            raise IncompatibleModelError(
                f"{source} was trained with encoder {describe_identity(trained)}, but the requested encoder is "
                f"{describe_identity(wanted)} ({details})"
            )


def _rebuild_encoder(
    identity: Mapping[str, Any], checkpoint: Any, fallback: Any, bf16: bool, source: str
) -> FrozenEncoder:
    try:
        return encoder_from_identity(identity, checkpoint, fallback, bf16)
    except MissingWeightsError as exc:
        raise MissingCheckpointError(f"{source}: {exc}") from None
    except UnknownComponentError as exc:
        raise ModelError(f"{source}: {exc}") from None
    except EncoderError as exc:
        raise IncompatibleModelError(f"{source}: cannot rebuild its encoder: {exc}") from exc


def _build_module(
    state: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any],
    encoder: FrozenEncoder,
    device: torch.device,
    source: str,
) -> Any:
    from deeploc.training.module import LocalizationModule

    state, tuned = split_encoder_state(state)
    decoder = decoder_with_weights(metadata["decoder"], state, source)
    try:
        encoder.load_tuned_state(tuned, source)  # an adapted encoder's adapters / tuned weights
        module = LocalizationModule(encoder=encoder, decoder=decoder)
    except (DecoderError, AdaptationError) as exc:
        raise IncompatibleModelError(f"{source}: {exc}") from exc
    return module.to(device).eval()


def load_model_and_metadata(
    model_path: str | os.PathLike[str],
    encoder_checkpoint: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    expect_encoder: Mapping[str, Any] | None = None,
    expect_feature: str | None = None,
    signing_key: bytes | None = None,
) -> tuple[Any, dict[str, Any]]:
    """(LocalizationModule in eval mode on ``device``, export-style metadata: decoder, encoder, training, test)
    from a run directory, a ``.ckpt`` or an exported decoder.

    ``expect_encoder`` (an encoder identity) and ``expect_feature`` refuse a decoder trained for anything else.
    With ``signing_key``, an export must carry a signature made with it (:mod:`deeploc.inference.signing`).
    """
    p = Path(model_path).expanduser()
    if p.is_file() and is_export(p):
        state, metadata = read_export(p, signing_key)
        source, fallback = f"exported decoder {p}", None
        bf16 = bool(metadata.get("encoder_options", {}).get("bf16", True))
    else:
        ckpt_path = resolve_checkpoint(p)
        state, info = read_checkpoint(ckpt_path)
        state = {**state, **{ENCODER_PREFIX + k: v for k, v in info["encoder_state"].items()}}
        run_dir = p if p.is_dir() else RunDir.of_checkpoint(ckpt_path)
        if run_dir is not None:
            check_run_checkpoint(run_dir, ckpt_path, info)
        metrics = RunDir(run_dir).read_metrics() if run_dir is not None else None
        run = {"run": str(run_dir) if run_dir else None, "checkpoint": str(ckpt_path)}
        metadata = export_metadata(info, metrics, run)
        source, fallback = f"checkpoint {ckpt_path}", info.get("encoder_checkpoint_path")
        bf16 = info["encoder_options"]["bf16"]
    check_compatible(metadata, expect_encoder, expect_feature, source)
    encoder = _rebuild_encoder(metadata["encoder"], encoder_checkpoint, fallback, bf16, source)
    return _build_module(state, metadata, encoder, resolve_device(device), source), metadata


def load_model(
    model_path: str | os.PathLike[str],
    encoder_checkpoint: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    expect_encoder: Mapping[str, Any] | None = None,
    expect_feature: str | None = None,
    signing_key: bytes | None = None,
) -> Any:
    """The LocalizationModule of :func:`load_model_and_metadata`."""
    return load_model_and_metadata(model_path, encoder_checkpoint, device, expect_encoder, expect_feature, signing_key)[
        0
    ]
