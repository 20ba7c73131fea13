"""Reading deeploc's training checkpoints, and checking that a run directory's checkpoint is the run's own.

A checkpoint (``<run>/checkpoints/{best,last}.ckpt``) holds the decoder's tensors (``decoder.*``), the module's
plain hyperparameters and, under ``deeploc``, the encoder identity and the decoder record (registered name, keyword
arguments, input specs) from which :mod:`deeploc.inference.loading` rebuilds the model. It is read with
``torch.load(weights_only=True)``: nothing pickled is executed. Checkpoints of deeploc 0.1 (no decoder record) are
refused, naming the file and the fix (train the run again).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from deeploc.errors import DeeplocError
from deeploc.io import file_digest, torch_load_failure
from deeploc.models.decoders import Decoder, DecoderError, decoder_from_record
from deeploc.models.encoders import identity_name
from deeploc.models.state_dicts import state_dict_mismatch
from deeploc.registry import UnknownComponentError
from deeploc.runs.record import RunRecord
from deeploc.runs.rundir import METRICS_FILE, RESOLVED_CONFIG, RunDir

__all__ = [
    "IncompatibleModelError",
    "MissingCheckpointError",
    "ModelError",
    "check_checkpoint_digest",
    "check_run_checkpoint",
    "checkpoint_decoder_record",
    "decoder_with_weights",
    "read_checkpoint",
    "resolve_checkpoint",
]

log = logging.getLogger(__name__)


class ModelError(DeeplocError, RuntimeError):
    """A model path, export file or checkpoint that cannot be used; the message names it and the fix."""


class IncompatibleModelError(ModelError):
    """A decoder paired with another encoder (kind, size, weights) or other maps than it was trained with."""


class MissingCheckpointError(ModelError):
    """The decoder needs the encoder weights file it was trained on, and none was given or found."""


def checkpoint_decoder_record(checkpoint: Mapping[str, Any], source: str = "the checkpoint") -> dict[str, Any]:
    """The decoder record a checkpoint (a dict as ``torch.load`` returns it) was saved with."""
    meta = checkpoint.get("deeploc") or {}
    if isinstance(meta.get("decoder"), Mapping):
        return dict(meta["decoder"])
    raise ModelError(
        f"{source} records no decoder (a checkpoint of deeploc 0.1, which is not read any more): train the run "
        "again with this deeploc (deeploc-train with the same overrides and if_finished=retrain)"
    )


def decoder_with_weights(record: Mapping[str, Any], state: Mapping[str, torch.Tensor], source: str) -> Decoder:
    """The decoder a record describes, holding ``state`` (refused naming the mismatch when they do not fit)."""
    try:
        decoder = decoder_from_record(record)
    except UnknownComponentError as exc:
        raise ModelError(f"{source}: {exc}") from None
    except DecoderError as exc:
        raise ModelError(f"{source}: cannot rebuild its decoder: {exc}") from exc
    problems = state_dict_mismatch(decoder.state_dict(), state)
    if problems:
        raise IncompatibleModelError(
            f"{source}: the weights are not a {record.get('label')} decoder on {'+'.join(record.get('inputs', []))} "
            f"({problems})"
        )
    decoder.load_state_dict(dict(state), strict=True)
    return decoder


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The checkpoint a path stands for: the file itself, or a run directory's model checkpoint."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not p.is_dir():
        raise ModelError(f"model {p} does not exist (expected a run directory, a .ckpt or a .safetensors file)")
    found = RunDir(p).model_checkpoint()
    if found is None:
        raise ModelError(
            f"run directory {p} has no checkpoint (looked for metrics.json's best_checkpoint, checkpoints/best.ckpt "
            "and checkpoints/last.ckpt); has the run trained at least one epoch?"
        )
    return found


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Decoder tensors and what rebuilds the model, from a LocalizationModule ``.ckpt`` (weights_only).

    ``info``: ``decoder`` (record), ``encoder`` (identity), ``encoder_options`` (bf16), ``encoder_checkpoint_path``
    (where the encoder weights were when training ran: a hint, their digest is what is checked), the other
    ``hyperparameters``, ``epoch`` and ``global_step``.
    """
    p = Path(path)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(
            f"{p} is not a checkpoint deeploc can read safely: {torch_load_failure(exc)}. Only checkpoints written "
            "by deeploc-train are read (with torch.load(weights_only=True), so nothing in the file is executed)"
        ) from None
    if not isinstance(ckpt, dict) or "deeploc" not in ckpt or "hyper_parameters" not in ckpt:
        raise ModelError(f"{p} is not a checkpoint written by deeploc's LocalizationModule (no 'deeploc' entry)")
    hparams = dict(ckpt["hyper_parameters"])
    encoder_config = dict(hparams.get("encoder") or {})
    state = {k.removeprefix("decoder."): v for k, v in ckpt["state_dict"].items() if k.startswith("decoder.")}
    if not state:
        raise ModelError(f"checkpoint {p} holds no decoder weights")
    info = {
        "decoder": checkpoint_decoder_record(ckpt, f"checkpoint {p}"),
        "encoder": dict(ckpt["deeploc"]["encoder"]),
        "encoder_options": {"bf16": bool(encoder_config.get("bf16", True))},
        "encoder_checkpoint_path": encoder_config.get("checkpoint"),
        # The tuned encoder tensors of an adapted run (LoRA adapters, a fully tuned encoder); empty when frozen.
        "encoder_state": {
            k.removeprefix("encoder."): v for k, v in ckpt["state_dict"].items() if k.startswith("encoder.")
        },
        "hyperparameters": {k: v for k, v in hparams.items() if k not in ("encoder", "decoder", "feature", "depth")},
        "epoch": ckpt.get("epoch"),
        "global_step": ckpt.get("global_step"),
    }
    return state, info


# ------------------------------------------------------------------------- is a run's checkpoint its own?


def check_checkpoint_digest(run_dir: Path, ckpt_path: Path) -> None:
    """Refuse a run's checkpoint whose sha256 differs from the one its metrics.json recorded (a finished run
    records the digests of its best and last checkpoints; one that records none was written by deeploc 0.1)."""
    relative = ckpt_path.resolve().relative_to(run_dir.resolve()).as_posix()
    metrics = RunDir(run_dir).read_metrics() or {}
    if metrics.get("status") == "finished" and "checkpoint_sha256" not in metrics:
        raise ModelError(
            f"run {run_dir} records no checkpoint digests (a run of deeploc 0.1, which is not read any more): "
            "train it again with this deeploc (deeploc-train with the same overrides and if_finished=retrain)"
        )
    recorded = (metrics.get("checkpoint_sha256") or {}).get(relative)
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

    Its sha256 must equal the one the run recorded in metrics.json, and the decoder and encoder it was trained with must be those the run records: metrics.json's ``config`` for a finished
    run (config_resolved.yaml is rewritten by every later launch in the directory, even a refused one), else
    config_resolved.yaml.
    """
    check_checkpoint_digest(run_dir, ckpt_path)
    recorded = _run_model(run_dir)
    if recorded is None:
        return
    expected, source = recorded
    trained = {"decoder": _decoder_summary(info["decoder"]), "encoder": _encoder_summary(info)}
    differing = [k for k in ("decoder", "encoder") if expected.get(k) is not None and expected[k] != trained[k]]
    if differing:
        details = "; ".join(f"its {k} is {trained[k]}, the run's is {expected[k]}" for k in differing)
        raise IncompatibleModelError(
            f"checkpoint {ckpt_path} was not trained by run {run_dir}: {details} ({source}). Restore the run's "
            "own checkpoint, or use this file from the run directory it was trained in"
        )


def _decoder_summary(record: Mapping[str, Any]) -> str:
    return f"{record.get('label', record.get('name'))} on {'+'.join(record.get('inputs', []))}"


def _encoder_summary(info: Mapping[str, Any]) -> str:
    identity = info["encoder"]
    weights = str(identity["weights"])
    if not weights.startswith("random:"):
        weights = str(info.get("encoder_checkpoint_path"))  # runs name the weights file by its path
    return _encoder_text(identity_name(identity), identity["image_size"], weights)


def _encoder_text(name: Any, image_size: Any, weights: Any) -> str:
    return f"{name} at {image_size} px with weights {weights}"


def _run_model(run_dir: Path) -> tuple[dict[str, Any], str] | None:
    """What a run says its decoder and encoder are, and the file that says it (None when nothing does)."""
    import yaml

    run = RunDir(run_dir)
    metrics = run.read_metrics()
    if metrics is not None:
        record = RunRecord.from_metrics(metrics, str(run.metrics_file))
        # Checkpoint weights are named by their path, as _encoder_summary names them.
        weights = record.weights if record.weights.startswith("random:") else record.encoder_weights
        return {
            "decoder": f"{record.decoder} on {record.feature}",
            "encoder": _encoder_text(record.encoder, record.image_size, weights),
        }, METRICS_FILE
    try:
        resolved = yaml.safe_load(RunDir(run_dir).resolved_config.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    encoder = resolved.get("encoder")
    if not isinstance(encoder, dict):
        return None
    weights = f"random:seed={encoder.get('seed')}" if encoder.get("random_init") else encoder.get("checkpoint")
    return {
        "decoder": _configured_decoder(resolved.get("decoder")),
        "encoder": _encoder_text(encoder.get("config"), encoder.get("image_size"), weights),
    }, RESOLVED_CONFIG


def _configured_decoder(node: Any) -> str | None:
    """``<label> on <inputs>`` of a resolved ``decoder`` config node, when its class is a registered decoder."""
    from deeploc.models.decoders import DECODERS

    if not isinstance(node, dict) or not isinstance(node.get("inputs"), (str, list)):
        return None
    classes = {f"{cls.__module__}.{cls.__qualname__}": cls for _, cls in DECODERS.items()}
    cls = classes.get(str(node.get("_target_")))
    if cls is None:
        return None
    options = {k: v for k, v in node.items() if not k.startswith("_")}
    inputs = [options["inputs"]] if isinstance(options["inputs"], str) else list(options["inputs"])
    label = cls.label_for(options)
    return f"{label} on {'+'.join(inputs)}"
