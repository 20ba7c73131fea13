"""`deeploc-eval MODEL`: test a trained run, checkpoint or exported decoder on any subsets and splits."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from deeploc.cli.app import add_model_flags, add_verbose_flag, import_plugins
from deeploc.data.masks import DEFAULT_POLARITY, MAX_MANIPULATED_FRACTION, POLARITIES, MaskRules
from deeploc.data.sources import build_source
from deeploc.errors import ConfigError, DeeplocError
from deeploc.metrics import CONVENTIONS, DEFAULT_CONVENTION
from deeploc.runs import RunDir


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
    add_model_flags(parser)
    parser.add_argument("--features-dir", help="feature cache folder to reuse/fill (default: no cache)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--no-validate", action="store_true", help="skip decoding every file once before scoring")
    parser.add_argument(
        "--convention",
        default=DEFAULT_CONVENTION,
        choices=CONVENTIONS,
        help="metric convention for the undefined cases (thin regions, empty masks): study = DeCLIP's formulas "
        "(default), trufor = TruFor's (deeploc <= 0.1); recorded in eval.json and eval.csv",
    )
    parser.add_argument(
        "--source",
        default=None,
        help="the data source of --data-root (deeploc/data/sources: dolos, ...; default: the training run's, dolos "
        "for generated data, which is read as it is)",
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
        help="how the masks are drawn (data.mask_polarity); default: the training run's, else black_is_manipulated",
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


def format_scores(results: dict[str, dict[str, float]], trained: dict) -> list[str]:
    """One console line per subset, the subset labelled by its role in the model's training when that is known
    (in-domain / out-of-domain; held out / seen for leave-one-out)."""
    from deeploc.labels import subset_role
    from deeploc.metrics import metric_specs

    known = bool(trained.get("split") and trained.get("subset"))
    names = {n: f"{n} ({subset_role(trained['split'], trained['subset'], n)})" if known else n for n in results}
    width = max(map(len, names.values()))
    specs = metric_specs()
    return [
        f"  {names[n]:<{width}}  "
        + "  ".join(f"{spec.label} {_percent(s.get(spec.name)):>6}" for spec in specs)
        + f"  (n={s['n_images']:.0f}{_undefined_note(s)})"
        for n, s in results.items()
    ]


def _options(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs (values parsed as YAML) as keyword arguments of the data source."""
    import yaml

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--source-option {pair!r}: expected KEY=VALUE")
        options[key] = yaml.safe_load(value)
    return options


def _percent(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from deeploc.checkpoints import ModelError
    from deeploc.evaluate import evaluate, index_for_eval, write_results
    from deeploc.inference import describe_model, load_model_and_metadata

    try:
        import_plugins(args)
        model, meta = load_model_and_metadata(args.model, args.encoder_checkpoint, args.device)
        trained = (meta.get("training") or {}).get("config") or {}
        root = args.data_root or trained.get("data")
        subsets = args.subsets or trained.get("subsets")
        if not root or not subsets:
            raise ModelError("the model does not record its training data: pass --data-root and --subsets")
        polarity = args.mask_polarity or trained.get("mask_polarity") or DEFAULT_POLARITY
        rules = MaskRules(args.allow_empty_masks, args.max_manipulated_fraction)
        name = args.source or trained.get("data_source") or "dolos"
        name = "dolos" if name == "generated" else name  # the recorded root is the generated wacv_data folder
        source = build_source(name, root=root, mask_polarity=polarity, **_options(args.source_option))
        by_subset = index_for_eval(source, subsets, args.split, not args.no_validate, rules)
        results = evaluate(model, by_subset, args.batch_size, args.num_workers, args.features_dir, args.convention)
    except (DeeplocError, ValueError) as exc:
        if args.verbose:
            raise
        print(f"deeploc-eval: {exc}", file=sys.stderr)
        return 1
    source = Path(args.model)
    run = RunDir(source if source.is_dir() else (source.parent.parent if source.suffix == ".ckpt" else Path(".")))
    out = Path(args.out) if args.out else run.eval_dir(root, args.split, subsets, args.convention)
    context = {
        "model": str(source),
        "described": describe_model(meta),
        "data": str(root),
        "split": args.split,
        "convention": args.convention,
        "mask_polarity": polarity,
    }
    json_path, csv_path = write_results(out, results, context)
    print(f"{describe_model(meta)}; {args.split} split of {root}")
    print(f"{args.split} scores (%, mean over images), metric convention {args.convention}:")
    print("\n".join(format_scores(results, trained)))
    print(f"wrote {json_path} and {csv_path}")
    return 0


def _undefined_note(scores: dict[str, float]) -> str:
    """How many images the convention decided for (thin regions, empty masks), when there are any."""
    no_positive, empty = scores.get("n_f1_no_positive", 0), scores.get("n_ap_undefined", 0)
    return f"; {no_positive:.0f} without F1 positive, {empty:.0f} empty masks" if no_positive or empty else ""


if __name__ == "__main__":
    sys.exit(main())
