"""The export file format: a trained decoder as ONE self-describing safetensors file.

An export holds the decoder's tensors (its ``state_dict()``, BatchNorm statistics included; no encoder weights, except
the tuned tensors of an adapted encoder, LoRA adapters or a fully tuned encoder, under ``encoder.``) and,
in the safetensors header's ``__metadata__`` under the key ``deeploc``, a JSON document that says how to rebuild
everything else:

* ``decoder``: the decoder record (:meth:`Decoder.record`: registered name, label, keyword arguments, the maps it
  reads with their channels and strides, target stride, parameter count);
* ``encoder``: the encoder identity (:meth:`FrozenEncoder.identity`: kind, architecture, input size,
  preprocessing and ``weights`` = ``sha256:<digest of the weights file>`` or ``random:seed=<N>``) and
  ``encoder_options`` (bf16 autocast on CUDA);
* ``decoder_sha256``: a digest of the decoder tensors;
* ``training`` / ``test``: the run's metrics.json summary (data, split, subsets, best val IoU, test scores);
* ``deeploc_version``, ``format`` and ``format_version``.

The header's second key, ``deeploc_sha256``, is the sha256 of that JSON text exactly as stored: it covers every
metadata field and, through ``decoder_sha256``, the tensors, so any edit of the file is refused on load. It is an
integrity check against damage and hand edits, not a signature against forgery (anyone can recompute it); a keyed
signature (``deeploc_hmac_sha256``, :mod:`deeploc.inference.signing`) is written and checked when a key is configured.
Format 1 exports (deeploc 0.1) had no such digest and are refused with the command that re-exports them.
Reading an export parses only safetensors tensors and JSON: nothing is unpickled, nothing is imported (the decoder
is looked up by its registered name, :mod:`deeploc.registry`). Loading for inference: :mod:`deeploc.inference.loading`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from deeploc.inference.signing import SIGNATURE_KEY, check_signature, sign
from deeploc.io import atomic_write_bytes, file_digest, finite_or_null
from deeploc.runs.checkpoints import (
    ModelError,
    check_run_checkpoint,
    decoder_with_weights,
    read_checkpoint,
    resolve_checkpoint,
)
from deeploc.runs.rundir import RunDir

__all__ = [
    "EXPORT_SUFFIX",
    "FORMAT",
    "FORMAT_VERSION",
    "METADATA_KEY",
    "decoder_digest",
    "deeploc_version",
    "export_decoder",
    "export_metadata",
    "is_export",
    "metadata_digest",
    "read_export",
    "split_encoder_state",
    "write_export",
]

log = logging.getLogger(__name__)

FORMAT = "deeploc-decoder"
FORMAT_VERSION = 2
METADATA_KEY = "deeploc"
DIGEST_KEY = "deeploc_sha256"
EXPORT_SUFFIX = ".safetensors"
_SAFETENSORS_MAX_HEADER = 100_000_000


def deeploc_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deeploc")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without installation
        return "unknown"


def decoder_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the decoder tensors (names, dtypes, shapes, bytes), independent of the file layout."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"sha256:{digest.hexdigest()}"


ENCODER_PREFIX = "encoder."


def split_encoder_state(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(decoder tensors, tuned encoder tensors without their ``encoder.`` prefix) of an export's tensors."""
    decoder = {k: v for k, v in state.items() if not k.startswith(ENCODER_PREFIX)}
    encoder = {k.removeprefix(ENCODER_PREFIX): v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    return decoder, encoder


def write_export(
    out: str | os.PathLike[str],
    state: Mapping[str, torch.Tensor],
    metadata: dict[str, Any],
    signing_key: bytes | None = None,
) -> Path:
    """Write decoder tensors + metadata (JSON in the safetensors header) as one file, atomically."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    meta = dict(metadata)
    meta["decoder_sha256"] = decoder_digest(tensors)
    # Strict JSON (no bare NaN): an undefined test score is null, as in metrics.json.
    text = json.dumps(finite_or_null(meta), sort_keys=True, allow_nan=False)
    header = {METADATA_KEY: text, DIGEST_KEY: metadata_digest(text)}
    if signing_key is not None:
        header[SIGNATURE_KEY] = sign(text, signing_key)
    return atomic_write_bytes(out, save(tensors, metadata=header))


def metadata_digest(text: str) -> str:
    """sha256 of the metadata JSON text exactly as stored in the header (covers the tensors via decoder_sha256)."""
    return f"sha256:{hashlib.sha256(text.encode()).hexdigest()}"


def _data_config(run_dir: Path | None) -> dict[str, Any] | None:
    """The run's resolved ``data`` settings (subsets, split, sizes) from config_resolved.yaml, when present."""
    if run_dir is None or not RunDir(run_dir).resolved_config.is_file():
        return None
    import yaml

    try:
        config = yaml.safe_load(RunDir(run_dir).resolved_config.read_text())
    except (OSError, yaml.YAMLError):
        return None
    data = (config or {}).get("data")
    if not isinstance(data, dict):
        return None
    return {k: v for k, v in data.items() if not k.startswith("_")}


def export_metadata(
    info: Mapping[str, Any],
    metrics: Mapping[str, Any] | None,
    source: dict[str, Any],
    data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The export metadata of a checkpoint's ``info`` (:func:`deeploc.checkpoints.read_checkpoint`)."""
    identity = info["encoder"]
    metrics = metrics or {}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "deeploc_version": deeploc_version(),
        "torch_version": torch.__version__,
        "decoder": dict(info["decoder"]),
        "encoder": identity,
        "encoder_options": info["encoder_options"],
        "input": {
            "image_size": identity["image_size"],
            "channels": "RGB",
            "value_range": [0.0, 1.0],
            "preprocessing": identity.get("preprocessing"),
            "resize": "whole image resized to image_size x image_size; probabilities resized back bilinearly to "
            "the image's native size",
        },
        "training": {
            "config": metrics.get("config"),
            "convention": metrics.get("convention"),
            "data": data,
            "status": metrics.get("status", "unknown (no metrics.json)"),
            "best_val_iou": metrics.get("best_val_iou"),
            "epochs": metrics.get("epochs"),
            "hyperparameters": info.get("hyperparameters"),
            "checkpoint_epoch": info.get("epoch"),
            "checkpoint_global_step": info.get("global_step"),
        },
        "test": metrics.get("test"),
        "source": source,
    }


def export_decoder(
    model_path: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, signing_key: bytes | None = None
) -> Path:
    """Export the decoder of a run directory (its best checkpoint) or of a ``.ckpt`` file; returns the file.

    ``out`` defaults to ``<run dir>/decoder.safetensors`` (next to the ``.ckpt`` for a checkpoint file).
    """
    src = Path(model_path).expanduser()
    ckpt_path = resolve_checkpoint(src)
    if is_export(ckpt_path):
        raise ModelError(f"{ckpt_path} is already an exported decoder; export takes a run directory or a .ckpt")
    state, info = read_checkpoint(ckpt_path)
    run_dir = src if src.is_dir() else RunDir.of_checkpoint(ckpt_path)
    if run_dir is not None:
        check_run_checkpoint(run_dir, ckpt_path, info)
    metrics = RunDir(run_dir).read_metrics() if run_dir is not None else None
    if metrics is None:
        log.warning("no metrics.json next to %s: the export carries no training or test summary", ckpt_path)
    elif metrics.get("status") != "finished":
        log.warning(
            "run %s has not finished (status %r); exporting its current checkpoint", run_dir, metrics.get("status")
        )
    source = {
        "run": run_dir.name if run_dir is not None else None,
        "checkpoint": str(ckpt_path.relative_to(run_dir)) if run_dir is not None else ckpt_path.name,
        "checkpoint_sha256": f"sha256:{file_digest(ckpt_path)}",
    }
    decoder_with_weights(
        info["decoder"], state, str(ckpt_path)
    )  # the weights fit the record before anything is written
    if out is None:
        out = RunDir(run_dir).export_file if run_dir is not None else ckpt_path.parent / "decoder.safetensors"
    tensors = {**state, **{ENCODER_PREFIX + k: v for k, v in info.get("encoder_state", {}).items()}}
    return write_export(out, tensors, export_metadata(info, metrics, source, _data_config(run_dir)), signing_key)


def is_export(path: Path) -> bool:
    """Whether ``path`` is a safetensors file (an 8-byte little-endian header length, then a JSON object)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    return 0 < int.from_bytes(head[:8], "little") < _SAFETENSORS_MAX_HEADER and head[8:9] == b"{"


def _verified_metadata(p: Path, header: Mapping[str, str]) -> dict[str, Any]:
    """The export's metadata, after checking that its text is exactly what deeploc-export wrote."""
    text, recorded = header[METADATA_KEY], header.get(DIGEST_KEY)
    reexport = f"re-export it from its run directory (deeploc-export RUN_DIR --out {p}) or use an unmodified copy"
    if recorded is not None and metadata_digest(text) != recorded:
        raise ModelError(
            f"{p}: the deeploc metadata was modified after export (its digest {metadata_digest(text)} differs from "
            f"the recorded {recorded}); {reexport}"
        )
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(f"{p}: the deeploc metadata is not valid JSON ({exc})") from exc
    if not isinstance(metadata, dict):
        raise ModelError(f"{p}: the deeploc metadata is not a JSON object")
    if metadata.get("format") != FORMAT:
        raise ModelError(f"{p}: metadata format {metadata.get('format')!r} is not {FORMAT!r}")
    version = metadata.get("format_version")
    if not isinstance(version, int):
        raise ModelError(f"{p}: the deeploc metadata has no valid format_version ({version!r})")
    if version > FORMAT_VERSION:
        raise ModelError(
            f"{p} uses export format version {version}, newer than this deeploc "
            f"({deeploc_version()}, format {FORMAT_VERSION}); upgrade deeploc"
        )
    if recorded is None and version < 2:
        raise ModelError(
            f"{p} was written by deeploc 0.1 (export format {version}): its metadata is not covered by a digest, so "
            f"an edited field (a score, the encoder seed) could not be detected. Re-export the run with this deeploc: "
            f"deeploc-export RUN_DIR --out {p}"
        )
    if recorded is None:
        raise ModelError(f"{p}: the header has no metadata digest ('{DIGEST_KEY}'): it was modified; {reexport}")
    return metadata


def read_export(
    path: str | os.PathLike[str], signing_key: bytes | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Decoder tensors and metadata of an exported file (safetensors + JSON only), with integrity checks; with
    ``signing_key``, its keyed signature must match (:mod:`deeploc.inference.signing`)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelError(f"exported decoder {p} does not exist")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
            if METADATA_KEY not in header:
                raise ModelError(
                    f"{p} is a safetensors file but not a deeploc decoder export (no '{METADATA_KEY}' metadata)"
                )
            metadata = _verified_metadata(p, header)
            if signing_key is not None:
                check_signature(p, header[METADATA_KEY], header.get(SIGNATURE_KEY), signing_key)
            state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - safe_open has no iter
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{p} is not a readable safetensors file: {exc}") from exc
    for key in ("decoder", "encoder", "decoder_sha256"):
        if key not in metadata:
            raise ModelError(f"{p}: the deeploc metadata lacks {key!r}")
    actual = decoder_digest(state)
    if actual != metadata["decoder_sha256"]:
        raise ModelError(
            f"{p}: decoder weights digest {actual} differs from the recorded {metadata['decoder_sha256']}; "
            "the file is damaged or was modified"
        )
    if not isinstance(metadata["decoder"], dict) or "name" not in metadata["decoder"]:
        raise ModelError(
            f"{p}: its decoder has no registered name (an export of deeploc 0.1, which is not read any more); "
            f"re-export the run with this deeploc: deeploc-export RUN_DIR --out {p}"
        )
    return state, metadata
