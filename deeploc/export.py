"""Trained decoders as small self-describing files, and loading any trained model for inference.

An export is ONE safetensors file: the decoder's tensors (``ConvDecoder.state_dict()``, BatchNorm statistics
included; no encoder weights) and, in the safetensors header's ``__metadata__`` under the key ``deeploc``, a JSON
document that says how to rebuild everything else:

* ``decoder``: feature map, depth (CONV-N), input channels, output stride, parameter count;
* ``encoder``: the encoder identity (:meth:`SAM2FeatureEncoder.identity`: config name, overrides, input size,
  preprocessing and ``weights`` = ``sha256:<digest of the SAM2 checkpoint file>`` or ``random:seed=<N>``) and
  ``encoder_options`` (bf16 autocast on CUDA);
* ``decoder_sha256``: a digest of the decoder tensors, checked on every load (a damaged file is refused);
* ``training`` / ``test``: the run's metrics.json summary (data, split, subsets, best val IoU, test scores);
* ``deeploc_version``, ``format`` and ``format_version``.

The header's second key, ``deeploc_sha256``, is the sha256 of that JSON text exactly as stored: it covers every
metadata field and, through ``decoder_sha256``, the tensors, so any edit of the file is refused on load. It is an
integrity check against damage and hand edits, not a signature against forgery (anyone can recompute it).
Format 1 exports (deeploc 0.1) had no such digest and are refused with the command that re-exports them.

Loading reads only safetensors tensors and JSON: nothing is unpickled. Run directories and Lightning ``.ckpt``
files (our own training outputs) are read with ``torch.load(weights_only=True)``, which refuses arbitrary
pickled objects as well. A checkpoint inside a run directory must be the run's own: its sha256 must equal the one
metrics.json recorded, and its decoder and encoder must be those the run records (metrics.json's config; for an
unfinished run, config_resolved.yaml).

The encoder is rebuilt from the identity: random-weight encoders from their seed, checkpoint-based ones from a
SAM2 checkpoint file whose sha256 must equal the recorded digest (``--sam2-checkpoint``; a run directory or
``.ckpt`` also remembers the path it was trained with).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from deeploc.errors import DeeplocError
from deeploc.labels import describe_training
from deeploc.models.decoders import ConvDecoder, count_parameters
from deeploc.models.encoder import CHECKPOINT_NAMES, EncoderError, file_digest, same_encoder
from deeploc.runs import RunDir

__all__ = [
    "EXPORT_SUFFIX",
    "FORMAT",
    "FORMAT_VERSION",
    "METADATA_KEY",
    "IncompatibleModelError",
    "MissingCheckpointError",
    "ModelError",
    "check_checkpoint_digest",
    "check_compatible",
    "check_run_checkpoint",
    "decoder_digest",
    "deeploc_version",
    "describe_model",
    "encoder_kwargs_from_identity",
    "export_decoder",
    "load_exported",
    "load_model",
    "load_model_and_metadata",
    "metadata_digest",
    "read_checkpoint",
    "read_export",
    "resolve_checkpoint",
    "resolve_device",
    "write_export",
]

log = logging.getLogger(__name__)

FORMAT = "deeploc-decoder"
FORMAT_VERSION = 2
METADATA_KEY = "deeploc"
DIGEST_KEY = "deeploc_sha256"
EXPORT_SUFFIX = ".safetensors"
DEFAULT_EXPORT_NAME = "decoder.safetensors"
_SAFETENSORS_MAX_HEADER = 100_000_000
_RANDOM_WEIGHTS = re.compile(r"^random:seed=(-?\d+)$")
_SHA256_WEIGHTS = re.compile(r"^sha256:([0-9a-f]{64})$")


class ModelError(DeeplocError, RuntimeError):
    """A model path, export file or SAM2 checkpoint that cannot be used; the message names it and the fix."""


class IncompatibleModelError(ModelError):
    """A decoder paired with another encoder (config, size, weights) or feature map than it was trained with."""


class MissingCheckpointError(ModelError):
    """The decoder needs the SAM2 checkpoint it was trained on, and none was given or found."""


def deeploc_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deeploc")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without installation
        return "unknown"


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


# --------------------------------------------------------------------------------------------- checkpoints


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The checkpoint a run directory stands for (metrics.json's best, else best.ckpt, else last.ckpt)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not p.is_dir():
        raise ModelError(f"model {p} does not exist (expected a run directory, a .ckpt or a {EXPORT_SUFFIX} file)")
    run = RunDir(p)
    metrics = run.read_metrics() or {}
    candidates = []
    if metrics.get("best_checkpoint"):
        candidates.append(p / metrics["best_checkpoint"])
    candidates += [run.best_checkpoint, run.last_checkpoint]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ModelError(
        f"run directory {p} has no checkpoint (looked for {', '.join(str(c.relative_to(p)) for c in candidates)}); "
        "has the run trained at least one epoch?"
    )


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Decoder tensors and deeploc metadata of a LocalizationModule ``.ckpt`` (weights_only: no pickled objects)."""
    p = Path(path)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(
            f"cannot read checkpoint {p} safely (torch.load weights_only=True): {exc}. "
            "Only Lightning checkpoints written by deeploc-train are supported."
        ) from exc
    if not isinstance(ckpt, dict) or "deeploc" not in ckpt or "hyper_parameters" not in ckpt:
        raise ModelError(f"{p} is not a checkpoint written by deeploc's LocalizationModule (no 'deeploc' entry)")
    hparams = dict(ckpt["hyper_parameters"])
    encoder_hparams = dict(hparams.get("encoder") or {})
    state = {k.removeprefix("decoder."): v for k, v in ckpt["state_dict"].items() if k.startswith("decoder.")}
    if not state:
        raise ModelError(f"checkpoint {p} holds no decoder weights")
    info = {
        "feature": hparams["feature"],
        "depth": int(hparams["depth"]),
        "encoder": dict(ckpt["deeploc"]["encoder"]),
        "encoder_options": {"bf16": bool(encoder_hparams.get("bf16", True))},
        # Where the SAM2 checkpoint was when training ran (a hint; its digest is what is checked).
        "encoder_checkpoint_path": encoder_hparams.get("checkpoint"),
        "hyperparameters": {k: v for k, v in hparams.items() if k != "encoder"},
        "epoch": ckpt.get("epoch"),
        "global_step": ckpt.get("global_step"),
    }
    return state, info


def _run_model_settings(run_dir: Path) -> tuple[dict[str, str], str] | None:
    """The decoder and encoder a run says it trained, and the file that says it (None when neither does).

    A finished run's metrics.json ``config`` describes what produced its results; config_resolved.yaml is rewritten
    by every later launch in the directory (even a refused one), so it only speaks for unfinished runs.
    """
    import yaml

    config = (RunDir(run_dir).read_metrics() or {}).get("config")
    if isinstance(config, dict) and all(k in config for k in ("depth", "feature", "encoder", "image_size")):
        settings = _model_settings(
            config["feature"], config["depth"], config["encoder"], config["image_size"], config.get("encoder_weights")
        )
        return settings, "metrics.json"
    try:
        model = (yaml.safe_load((run_dir / "config_resolved.yaml").read_text()) or {}).get("model")
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(model, dict) or not isinstance(model.get("encoder"), dict):
        return None
    encoder = model["encoder"]
    weights = f"random:seed={encoder.get('seed')}" if encoder.get("random_init") else encoder.get("checkpoint")
    settings = _model_settings(
        model["feature"], model["depth"], encoder.get("config"), encoder.get("image_size"), weights
    )
    return settings, "config_resolved.yaml"


def _checkpoint_model_settings(info: Mapping[str, Any], seeded: bool) -> dict[str, str]:
    """The decoder and encoder a checkpoint was trained with (:func:`read_checkpoint`'s ``info``); ``seeded=False``
    reduces random weights to ``random``, as metrics.json records them."""
    identity = info["encoder"]
    weights = str(identity["weights"])
    if not weights.startswith("random:"):
        weights = info.get("encoder_checkpoint_path")  # runs name the SAM2 file by its path
    elif not seeded:
        weights = "random"
    return _model_settings(info["feature"], info["depth"], identity["config"], identity["image_size"], weights)


def _model_settings(feature: str, depth: int, encoder: str, image_size: int, weights: Any) -> dict[str, str]:
    return {
        "decoder": f"CONV-{int(depth)} on {feature}",
        "encoder": f"{encoder} at {image_size} px with weights {weights}",
    }


def check_checkpoint_digest(run_dir: Path, ckpt_path: Path) -> None:
    """Refuse a run's checkpoint whose sha256 differs from the one its metrics.json recorded (if it recorded one)."""
    from deeploc.models.encoder import file_digest

    relative = ckpt_path.resolve().relative_to(run_dir.resolve()).as_posix()
    recorded = ((RunDir(run_dir).read_metrics() or {}).get("checkpoint_sha256") or {}).get(relative)
    if recorded is None:
        return
    actual = f"sha256:{file_digest(ckpt_path)}"
    if actual != recorded:
        raise IncompatibleModelError(
            f"checkpoint {ckpt_path} ({actual}) is not the one run {run_dir} finished with (its metrics.json "
            f"records {recorded} for {relative}): the file was replaced or modified after the run. Restore the "
            "run's own checkpoint, or train the run again (deeploc-train with the same overrides and "
            "if_finished=retrain)"
        )


def check_run_checkpoint(run_dir: Path, ckpt_path: Path, info: Mapping[str, Any]) -> None:
    """Refuse a checkpoint inside a run directory that is not the run's own, naming both sides and the fix.

    Its sha256 must equal the one the run recorded in metrics.json (runs of deeploc <= 0.1 recorded none), and the
    decoder and encoder it was trained with must be those the run records (:func:`_run_model_settings`).
    """
    check_checkpoint_digest(run_dir, ckpt_path)
    recorded = _run_model_settings(run_dir)
    if recorded is None:
        return
    expected, source = recorded
    trained = _checkpoint_model_settings(info, seeded=source != "metrics.json")
    if expected != trained:
        differing = "; ".join(
            f"its {k} is {trained[k]}, the run's is {expected[k]}" for k in expected if expected[k] != trained[k]
        )
        raise IncompatibleModelError(
            f"checkpoint {ckpt_path} was not trained by run {run_dir}: {differing} ({source}). Restore the run's "
            "own checkpoint, or use this file from the run directory it was trained in"
        )


# ------------------------------------------------------------------------------------------------- export


def decoder_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the decoder tensors (names, dtypes, shapes, bytes), independent of the file layout."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"sha256:{digest.hexdigest()}"


def write_export(out: str | os.PathLike[str], state: Mapping[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write decoder tensors + metadata (JSON in the safetensors header) as one file, atomically."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    meta = dict(metadata)
    meta["decoder_sha256"] = decoder_digest(tensors)
    text = json.dumps(meta, sort_keys=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        save_file(tensors, tmp, metadata={METADATA_KEY: text, DIGEST_KEY: metadata_digest(text)})
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def metadata_digest(text: str) -> str:
    """sha256 of the metadata JSON text exactly as stored in the header (covers the tensors via decoder_sha256)."""
    return f"sha256:{hashlib.sha256(text.encode()).hexdigest()}"


def _data_config(run_dir: Path | None) -> dict[str, Any] | None:
    """The run's resolved ``data`` settings (subsets, split, sizes) from config_resolved.yaml, when present."""
    if run_dir is None or not (run_dir / "config_resolved.yaml").is_file():
        return None
    import yaml

    try:
        config = yaml.safe_load((run_dir / "config_resolved.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    data = (config or {}).get("data")
    if not isinstance(data, dict):
        return None
    return {k: v for k, v in data.items() if not k.startswith("_")}


def _export_metadata(
    info: dict[str, Any], metrics: dict[str, Any] | None, source: dict[str, Any], data: dict[str, Any] | None = None
) -> dict[str, Any]:
    decoder = ConvDecoder(info["feature"], info["depth"])
    identity = info["encoder"]
    metrics = metrics or {}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "deeploc_version": deeploc_version(),
        "torch_version": torch.__version__,
        "decoder": {
            "class": "deeploc.models.decoders.ConvDecoder",
            "feature": info["feature"],
            "depth": info["depth"],
            "in_channels": decoder.in_channels,
            "output_stride": decoder.output_stride,
            "parameters": count_parameters(decoder),
        },
        "encoder": identity,
        "encoder_options": info["encoder_options"],
        "input": {
            "image_size": identity["image_size"],
            "channels": "RGB",
            "value_range": [0.0, 1.0],
            "resize": "whole image resized (bilinear, antialiased) to image_size x image_size; probabilities "
            "resized back bilinearly to the image's native size",
        },
        "training": {
            "config": metrics.get("config"),
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


def export_decoder(model_path: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Export the decoder of a run directory (its best checkpoint) or of a ``.ckpt`` file; returns the file.

    ``out`` defaults to ``<run dir>/decoder.safetensors`` (next to the ``.ckpt`` for a checkpoint file).
    """
    src = Path(model_path).expanduser()
    ckpt_path = resolve_checkpoint(src)
    if ckpt_path.suffix == EXPORT_SUFFIX or _is_safetensors(ckpt_path):
        raise ModelError(f"{ckpt_path} is already an exported decoder; export takes a run directory or a .ckpt")
    state, info = read_checkpoint(ckpt_path)
    run_dir = src if src.is_dir() else _run_dir_of(ckpt_path)
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
    # Make sure the weights fit the recorded architecture before writing anything.
    _decoder_from_state(state, info["feature"], info["depth"], str(ckpt_path))
    if out is None:
        out = (run_dir if run_dir is not None else ckpt_path.parent) / DEFAULT_EXPORT_NAME
    return write_export(out, state, _export_metadata(info, metrics, source, _data_config(run_dir)))


def _run_dir_of(ckpt_path: Path) -> Path | None:
    """The run directory of ``<run>/checkpoints/x.ckpt``, when that is where the checkpoint lives."""
    parent = ckpt_path.resolve().parent
    if parent.name == "checkpoints":
        return parent.parent
    return None


# --------------------------------------------------------------------------------------------------- import


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length followed by a JSON object."""
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


def read_export(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Decoder tensors and metadata of an exported file (safetensors + JSON only), with integrity checks."""
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
    return state, metadata


def _describe_identity(identity: Mapping[str, Any]) -> str:
    parts = [f"{k}={identity[k]}" for k in ("config", "image_size", "weights") if k in identity]
    if identity.get("overrides"):
        parts.append(f"overrides={identity['overrides']}")
    return "{" + ", ".join(parts) + "}"


def check_compatible(
    metadata: Mapping[str, Any],
    expect_encoder: Mapping[str, Any] | None = None,
    expect_feature: str | None = None,
    source: str = "decoder",
) -> None:
    """Refuse pairing a decoder with another encoder identity or feature map; the message names both."""
    trained_feature = metadata["decoder"]["feature"]
    if expect_feature is not None and expect_feature != trained_feature:
        raise IncompatibleModelError(
            f"{source} was trained on feature {trained_feature!r}, not on the requested feature {expect_feature!r}"
        )
    if expect_encoder is not None:
        trained = dict(metadata["encoder"])
        wanted = dict(expect_encoder)
        differing = sorted(
            k for k in set(trained) | set(wanted) if k != "precision" and trained.get(k) != wanted.get(k)
        )
        if differing:
            details = "; ".join(
                f"{k}: {trained.get(k)!r} (decoder) vs {wanted.get(k)!r} (requested)" for k in differing
            )
            raise IncompatibleModelError(
                f"{source} was trained with encoder {_describe_identity(trained)}, but the requested encoder is "
                f"{_describe_identity(wanted)} ({details})"
            )


def encoder_kwargs_from_identity(
    identity: Mapping[str, Any],
    sam2_checkpoint: str | os.PathLike[str] | None = None,
    bf16: bool = True,
    fallback_checkpoint: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """``SAM2FeatureEncoder`` keyword arguments that rebuild the encoder an identity describes.

    Random weights come back from their seed. Checkpoint weights need a SAM2 checkpoint file whose sha256 equals
    the recorded digest: ``sam2_checkpoint`` (checked strictly; a mismatch is refused naming both digests), else
    ``fallback_checkpoint`` (e.g. the path recorded at training time, used only when it exists and matches).
    """
    weights = str(identity.get("weights", ""))
    kwargs: dict[str, Any] = {
        "config": identity["config"],
        "image_size": int(identity["image_size"]),
        "overrides": dict(identity.get("overrides") or {}),
        "bf16": bf16,
    }
    random_match = _RANDOM_WEIGHTS.match(weights)
    sha_match = _SHA256_WEIGHTS.match(weights)
    if random_match:
        if sam2_checkpoint is not None:
            raise IncompatibleModelError(
                f"the decoder was trained on a SAM2 encoder with RANDOM weights ({weights}), but --sam2-checkpoint "
                f"{sam2_checkpoint} (sha256:{file_digest(sam2_checkpoint) if Path(sam2_checkpoint).is_file() else '?'})"
                " was given; drop --sam2-checkpoint (the random encoder is rebuilt from its seed)"
            )
        return {**kwargs, "random_init": True, "seed": int(random_match.group(1))}
    if not sha_match:
        raise ModelError(f"unknown encoder weights {weights!r} in the decoder's metadata")
    hint = CHECKPOINT_NAMES.get(identity["config"], "the SAM2 checkpoint it was trained with")
    if sam2_checkpoint is not None:
        path = Path(sam2_checkpoint).expanduser()
        if not path.is_file():
            raise ModelError(f"--sam2-checkpoint {path} does not exist (the decoder needs {hint}, {weights})")
        actual = f"sha256:{file_digest(path)}"
        if actual != weights:
            raise IncompatibleModelError(
                f"SAM2 checkpoint {path} has digest {actual}, but the decoder was trained on encoder "
                f"{identity['config']} with weights {weights}; pass the checkpoint it was trained with ({hint})"
            )
        return {**kwargs, "checkpoint": str(path)}
    if fallback_checkpoint is not None:
        path = Path(fallback_checkpoint).expanduser()
        if path.is_file() and f"sha256:{file_digest(path)}" == weights:
            return {**kwargs, "checkpoint": str(path)}
    raise MissingCheckpointError(
        f"the decoder needs the SAM2 checkpoint of encoder {identity['config']} with weights {weights} ({hint}); "
        "pass it with --sam2-checkpoint (or sam2_checkpoint=...)"
    )


def _decoder_from_state(state: Mapping[str, torch.Tensor], feature: str, depth: int, source: str) -> ConvDecoder:
    try:
        decoder = ConvDecoder(feature, depth)
    except ValueError as exc:
        raise ModelError(f"{source}: {exc}") from exc
    own = decoder.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    reshaped = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or reshaped:
        raise IncompatibleModelError(
            f"{source}: the weights are not a CONV-{depth} decoder on feature {feature!r} (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, other shapes {reshaped[:3]})"
        )
    decoder.load_state_dict(dict(state), strict=True)
    return decoder


def _build_module(
    state: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any],
    encoder_kwargs: dict[str, Any],
    device: torch.device,
    source: str,
) -> Any:
    from deeploc.module import LocalizationModule

    feature, depth = metadata["decoder"]["feature"], int(metadata["decoder"]["depth"])
    decoder = _decoder_from_state(state, feature, depth, source)
    try:
        module = LocalizationModule(feature=feature, depth=depth, encoder=encoder_kwargs)
    except EncoderError as exc:
        raise ModelError(f"{source}: cannot rebuild its SAM2 encoder: {exc}") from exc
    rebuilt = module.encoder.identity()
    if not same_encoder(rebuilt, dict(metadata["encoder"])):
        raise IncompatibleModelError(
            f"{source}: the rebuilt encoder {_describe_identity(rebuilt)} (preprocessing "
            f"{rebuilt.get('preprocessing')!r}) differs from the one the decoder was trained with "
            f"{_describe_identity(metadata['encoder'])} (preprocessing {metadata['encoder'].get('preprocessing')!r})"
        )
    module.decoder.load_state_dict(decoder.state_dict(), strict=True)
    return module.to(device).eval()


def load_exported(
    path: str | os.PathLike[str],
    sam2_checkpoint: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    expect_encoder: Mapping[str, Any] | None = None,
    expect_feature: str | None = None,
) -> tuple[Any, dict[str, Any]]:
    """(LocalizationModule in eval mode on ``device``, metadata) from an exported decoder file."""
    state, metadata = read_export(path)
    source = f"exported decoder {path}"
    check_compatible(metadata, expect_encoder, expect_feature, source)
    kwargs = encoder_kwargs_from_identity(
        metadata["encoder"], sam2_checkpoint, bool(metadata.get("encoder_options", {}).get("bf16", True))
    )
    return _build_module(state, metadata, kwargs, resolve_device(device), source), metadata


def load_model_and_metadata(
    model_path: str | os.PathLike[str],
    sam2_checkpoint: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    expect_encoder: Mapping[str, Any] | None = None,
    expect_feature: str | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Like :func:`load_model`, also returning export-style metadata (decoder, encoder, training, test)."""
    p = Path(model_path).expanduser()
    if p.is_file() and (p.suffix == EXPORT_SUFFIX or _is_safetensors(p)):
        return load_exported(p, sam2_checkpoint, device, expect_encoder, expect_feature)
    ckpt_path = resolve_checkpoint(p)
    state, info = read_checkpoint(ckpt_path)
    run_dir = p if p.is_dir() else _run_dir_of(ckpt_path)
    if run_dir is not None:
        check_run_checkpoint(run_dir, ckpt_path, info)
    metrics = RunDir(run_dir).read_metrics() if run_dir is not None else None
    metadata = _export_metadata(info, metrics, {"run": str(run_dir) if run_dir else None, "checkpoint": str(ckpt_path)})
    source = f"checkpoint {ckpt_path}"
    check_compatible(metadata, expect_encoder, expect_feature, source)
    kwargs = encoder_kwargs_from_identity(
        info["encoder"], sam2_checkpoint, info["encoder_options"]["bf16"], info.get("encoder_checkpoint_path")
    )
    return _build_module(state, metadata, kwargs, resolve_device(device), source), metadata


def load_model(
    model_path: str | os.PathLike[str],
    sam2_checkpoint: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    expect_encoder: Mapping[str, Any] | None = None,
    expect_feature: str | None = None,
) -> Any:
    """A LocalizationModule (eval mode, on ``device``) from a run directory, a ``.ckpt`` or an exported decoder.

    The frozen encoder is rebuilt from the recorded identity (see :func:`encoder_kwargs_from_identity`).
    ``expect_encoder`` (an encoder identity) and ``expect_feature`` refuse a decoder trained for anything else.
    """
    return load_model_and_metadata(model_path, sam2_checkpoint, device, expect_encoder, expect_feature)[0]


def describe_model(metadata: Mapping[str, Any]) -> str:
    """One line: CONV-N on feature, encoder identity, and the training subset when known."""
    dec = metadata["decoder"]
    text = f"CONV-{dec['depth']} on {dec['feature']}, encoder {_describe_identity(metadata['encoder'])}"
    training = describe_training((metadata.get("training") or {}).get("config") or {})
    return f"{text}, {training}" if training else text
