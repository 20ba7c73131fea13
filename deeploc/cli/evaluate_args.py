"""The command line of `deeploc-eval`: its flags, their defaults and help."""

from __future__ import annotations

import argparse

from deeploc.cli.app import add_model_flags, add_verbose_flag
from deeploc.data.masks import MAX_MANIPULATED_FRACTION, POLARITIES
from deeploc.metrics import CONVENTION_SOURCES, DEFAULT_CONVENTION
from deeploc.metrics.store import PREDICTION_DTYPES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deeploc-eval", description=__doc__)
    parser.add_argument("model", help="run directory, .ckpt file or exported decoder (.safetensors)")
    parser.add_argument(
        "--data-root",
        help="the data source's root (Dolos: wacv_data or its data/ child; folders: the dataset folder; manifest: "
        "the CSV); default: the training data",
    )
    parser.add_argument(
        "--subsets",
        nargs="+",
        help="subsets to test on; default: the training run's subsets (its data source), else every subset of --source",
    )
    parser.add_argument("--split", default="test", choices=("train", "valid", "test"))
    parser.add_argument(
        "--out",
        help="output folder; default: <run>/eval/<data folder name>-<split>-<digest of the data folder and subsets> "
        "(./eval/... for exports)",
    )
    add_model_flags(parser)
    parser.add_argument("--features-dir", help="feature cache folder to reuse/fill (default: no cache)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--no-validate", action="store_true", help="skip decoding every file once before scoring")
    parser.add_argument(
        "--conventions",
        nargs="+",
        metavar="NAME",
        help=f"metric conventions to score in, the first primary (default: {DEFAULT_CONVENTION}): "
        + "; ".join(f"{name} = {source}" for name, source in CONVENTION_SOURCES.items())
        + ". Recorded in eval.json (scores.<convention>) and eval.csv",
    )
    parser.add_argument("--convention", help="one metric convention (= --conventions NAME)")
    parser.add_argument(
        "--save-predictions",
        action="store_true",
        help="keep every image's probability map and mask in <out>/predictions/<subset>.npz, to rescore them later "
        "in any convention without the model",
    )
    parser.add_argument(
        "--prediction-dtype",
        default="float32",
        choices=PREDICTION_DTYPES,
        help="how --save-predictions stores the maps: float32 rescores bit-identically; float16 / uint8 are 2x / 4x "
        "smaller and rescore approximately",
    )
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="rescore MODEL's saved predictions (a run directory or deeploc-eval folder holding predictions/) in "
        "--conventions, with no model, GPU or images; this is the default for a run directory that holds them "
        "when no --data-root, --subsets, --source, --split, --real or --perturb is given",
    )
    parser.add_argument(
        "--source",
        default=None,
        help="the data source of --data-root (deeploc/data/sources: dolos, folders, manifest, ...; default: the "
        "training run's, dolos for generated data, which is read as it is)",
    )
    parser.add_argument(
        "--source-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the data source (as data.source_options.KEY; repeatable; values are YAML)",
    )
    parser.add_argument(
        "--mask-polarity",
        choices=POLARITIES,
        help="how the masks are drawn (data.mask_polarity); default: the training run's for its own kind of data "
        "source, else the source's (dolos: black_is_manipulated; folders, manifest: white_is_manipulated)",
    )
    parser.add_argument(
        "--mask-threshold",
        type=int,
        default=None,
        help="binarise masks first: values above it read white, the others black (data.mask_threshold; e.g. 127 "
        "for JPEG-saved masks); default: the training run's for its own kind of data source, else exact 0 / 255",
    )
    parser.add_argument(
        "--real",
        action="store_true",
        help="also score the source's real (pristine) images of --split: false alarms at the pixel threshold 0.5 "
        "and image-level detection of real vs each subset (AUC, AP, balanced accuracy) -> detection.json/.csv/.md, "
        "image_scores.csv",
    )
    parser.add_argument(
        "--threshold-split",
        choices=("valid", "none"),
        default="valid",
        help="the split whose real and fake images choose the detection threshold of --real's balanced accuracy "
        "(default: valid; none: no balanced accuracy, e.g. for a test-only dataset)",
    )
    parser.add_argument(
        "--perturb",
        nargs="+",
        metavar="ITEM",
        help="also score perturbed copies of the test images: name=strength,... items (jpeg=90,70,50 resize=0.75,0.5 "
        "blur=1,2 noise=0.01,0.03), a conf/perturb name (default) or a YAML file -> robustness.json/.csv/.md and "
        "robustness_<metric>.png",
    )
    parser.add_argument(
        "--allow-empty-masks",
        action="store_true",
        help="accept masks with no manipulated pixel (data.allow_empty_masks)",
    )
    parser.add_argument(
        "--max-manipulated-fraction",
        type=float,
        default=MAX_MANIPULATED_FRACTION,
        help=f"largest mean manipulated share of each image in a split (default: {MAX_MANIPULATED_FRACTION})",
    )
    add_verbose_flag(parser)
    return parser
