"""`deeploc-eval MODEL`: test a trained run, checkpoint or exported decoder on any subsets and splits."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from deeploc.cli.app import add_verbose_flag
from deeploc.errors import DeeplocError
from deeploc.naming import eval_dir_name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deeploc-eval", description=__doc__)
    parser.add_argument("model", help="run directory, .ckpt file or exported decoder (.safetensors)")
    parser.add_argument("--data-root", help="dataset root (wacv_data or its data/ child); default: the training data")
    parser.add_argument("--subsets", nargs="+", help="subsets to test on; default: the training run's subsets")
    parser.add_argument("--split", default="test", choices=("train", "valid", "test"))
    parser.add_argument(
        "--out",
        help="output folder; default: <run>/eval/<data folder name>-<split>-<digest of the data folder and subsets> "
        "(./eval/... for exports)",
    )
    parser.add_argument("--sam2-checkpoint", help="SAM2 checkpoint, when the model used one (checked by digest)")
    parser.add_argument("--features-dir", help="feature cache folder to reuse/fill (default: no cache)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--no-validate", action="store_true", help="skip decoding every file once before scoring")
    add_verbose_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from deeploc.evaluate import evaluate, index_for_eval, write_results
    from deeploc.export import ModelError, describe_model, load_model_and_metadata

    try:
        model, meta = load_model_and_metadata(args.model, args.sam2_checkpoint, args.device)
        trained = (meta.get("training") or {}).get("config") or {}
        root = args.data_root or trained.get("data")
        subsets = args.subsets or trained.get("subsets")
        if not root or not subsets:
            raise ModelError("the model does not record its training data: pass --data-root and --subsets")
        by_subset = index_for_eval(root, subsets, args.split, validate=not args.no_validate)
        results = evaluate(model, by_subset, args.batch_size, args.num_workers, args.features_dir)
    except (DeeplocError, ValueError) as exc:
        if args.verbose:
            raise
        print(f"deeploc-eval: {exc}", file=sys.stderr)
        return 1
    source = Path(args.model)
    base = source if source.is_dir() else (source.parent.parent if source.suffix == ".ckpt" else Path("eval"))
    out = Path(args.out) if args.out else base / "eval" / eval_dir_name(root, args.split, subsets)
    context = {"model": str(source), "described": describe_model(meta), "data": str(root), "split": args.split}
    json_path, csv_path = write_results(out, results, context)
    for name, scores in results.items():
        print(
            f"{name:>20}: IoU {scores['iou']:6.2f}  F1 {scores['f1_fixed']:6.2f} / best {scores['f1_best']:6.2f}  AP {scores['ap']:6.2f}  (n={scores['n_images']:.0f})"
        )
    print(f"wrote {json_path} and {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
