"""``deeploc-predict INPUT... --model MODEL``: manipulation heatmaps, masks, overlays and a summary for any images."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from typing import Any

from deeploc.cli.app import add_model_flags, add_verbose_flag, import_plugins, report_error
from deeploc.errors import DeeplocError
from deeploc.inference.inputs import DEFAULT_MAX_PIXELS, collect_inputs
from deeploc.metrics import IMAGE_SCORE


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deeploc-predict",
        description="Localize manipulations in images with a trained deeploc decoder. Writes, per image, "
        "heatmaps/<name>.png, masks/<name>.png (255 = manipulated) and overlays/<name>.png at the image's "
        "native size, and summary.json + summary.csv (size, manipulated fraction, max / mean score and the "
        f"image-level score: {IMAGE_SCORE}).",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns (quote globs)")
    p.add_argument(
        "--model",
        required=True,
        help="a run directory of deeploc-train, a .ckpt, or a decoder exported with deeploc-export (.safetensors)",
    )
    add_model_flags(p)
    p.add_argument("--out", default="predictions", help="output folder (default: ./predictions)")
    p.add_argument("--threshold", type=float, default=0.5, help="mask threshold: prob > threshold (default: 0.5)")
    p.add_argument("--batch-size", type=int, default=8, help="images per encoder batch (default: 8)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--workers", type=int, default=2, help="image decoding processes (default: 2; 0 = in-process)")
    p.add_argument("--recursive", action="store_true", help="also predict on images in subfolders of folder inputs")
    p.add_argument("--save-probs", action="store_true", help="also write probs/<name>.npy (float32 H x W)")
    p.add_argument(
        "--max-pixels",
        type=float,
        default=DEFAULT_MAX_PIXELS,
        help=f"refuse images with more pixels than this (default: {DEFAULT_MAX_PIXELS:.0e})",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_verbose_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="deeploc-predict: %(message)s")
    _quiet_opencv()
    from deeploc.inference.loading import describe_model, load_model_and_metadata
    from deeploc.inference.predict import predict_paths

    if not 0.0 <= args.threshold <= 1.0:
        print(f"deeploc-predict: --threshold must be in [0, 1], got {args.threshold}", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print(f"deeploc-predict: --batch-size must be >= 1, got {args.batch_size}", file=sys.stderr)
        return 2
    try:
        items = collect_inputs(args.inputs, recursive=args.recursive, exclude=None)
        import_plugins(args)
        with warnings.catch_warnings():
            # The loader states random-weight encoders itself, once, below.
            warnings.filterwarnings("ignore", message=".* encoder .* RANDOM weights")
            model, metadata = _load(args, load_model_and_metadata)
    except DeeplocError as exc:
        return report_error("deeploc-predict", exc, args.verbose)
    print(f"model: {describe_model(metadata)}", file=sys.stderr)
    if str(metadata["encoder"].get("weights", "")).startswith("random:"):
        print("deeploc-predict: WARNING the encoder has RANDOM weights (a demo / test model)", file=sys.stderr)
    model_info = {
        "path": str(args.model),
        "decoder": metadata["decoder"],
        "encoder": metadata["encoder"],
        "training": (metadata.get("training") or {}).get("config"),
        "device": str(next(model.decoder.parameters()).device),
    }
    summary = predict_paths(
        model,
        items,
        args.out,
        threshold=args.threshold,
        batch_size=args.batch_size,
        save_probs=args.save_probs,
        workers=args.workers,
        max_pixels=int(args.max_pixels),
        progress=not args.quiet,
        model_info=model_info,
    )
    print(
        f"{len(summary.predicted)} image(s) predicted, {len(summary.skipped)} skipped; summary: {summary.json_path}",
        file=sys.stderr,
    )
    failed_explicit = [r.image for r in summary.skipped if r.explicit]
    if failed_explicit:
        print(
            f"deeploc-predict: error: {len(failed_explicit)} file(s) named on the command line could not be "
            f"predicted (reasons above and in the summary): {', '.join(failed_explicit)}",
            file=sys.stderr,
        )
        return 1
    if not summary.predicted:
        print("deeploc-predict: error: no image could be predicted (reasons above and in the summary)", file=sys.stderr)
        return 1
    return 0


def _quiet_opencv() -> None:
    """OpenCV prints its own decoder complaints for corrupt files; the summary states them once, clearly."""
    import cv2

    with contextlib.suppress(AttributeError):  # OpenCV builds without the logging module
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)


def _load(args: argparse.Namespace, loader: Any) -> tuple[Any, dict[str, Any]]:
    from deeploc.inference.signing import signing_key
    from deeploc.runs.checkpoints import MissingCheckpointError

    key = signing_key(args.key_file)
    try:
        return loader(args.model, args.encoder_checkpoint, args.device, signing_key=key)
    except MissingCheckpointError:
        env = os.environ.get("SAM2_CHECKPOINT")
        if args.encoder_checkpoint is not None or not env:
            raise
    # $SAM2_CHECKPOINT is only a default for decoders that need a checkpoint (and is verified like the option).
    print(f"deeploc-predict: using $SAM2_CHECKPOINT={env}", file=sys.stderr)
    return loader(args.model, env, args.device, signing_key=key)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
