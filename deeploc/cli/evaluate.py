"""`deeploc-eval MODEL`: test a trained run, checkpoint or exported decoder on any subsets and splits of any data
source; optionally on its real images (false alarms, detection: --real) and on perturbed copies (--perturb)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from deeploc.cli.app import import_plugins, report_error
from deeploc.cli.evaluate_args import build_parser
from deeploc.data.masks import MaskRules
from deeploc.data.sources import DataSource, build_source
from deeploc.errors import ConfigError, DeeplocError
from deeploc.metrics import DEFAULT_CONVENTION, check_conventions, column_label, reported_specs
from deeploc.runs.rundir import RunDir


def format_scores(
    results: dict[str, dict[str, float]],
    trained: dict,
    scores: dict[str, dict[str, dict[str, float]]] | None = None,
    chosen: dict[str, dict[str, float]] | None = None,
) -> list[str]:
    """One console line per subset, the subset labelled by its role in the model's training when that is known
    (in-domain / out-of-domain; held out / seen for leave-one-out); every value named ``<metric>[<convention>]``
    (``scores``: every convention's; default: ``results`` as study's)."""
    from deeploc.data.roles import subset_role

    scores = scores or {DEFAULT_CONVENTION: results}
    chosen = chosen or {}
    known = bool(trained.get("split") and trained.get("subset"))
    names = {n: f"{n} ({subset_role(trained['split'], trained['subset'], n)})" if known else n for n in results}
    width = max(map(len, names.values()))
    columns = [(c, spec) for c in scores for spec in reported_specs(c, chosen.get(c))]
    return [
        f"  {names[n]:<{width}}  "
        + "  ".join(
            f"{column_label(spec.name, c)} {_percent(scores[c].get(n, {}).get(spec.name)):>6}" for c, spec in columns
        )
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


def _source(args: argparse.Namespace, trained: dict[str, Any]) -> tuple[DataSource, bool]:
    """The data source to evaluate on, and whether it is the training run's kind of source (whose recorded options,
    mask settings and subsets are then the defaults)."""
    from deeploc.runs.checkpoints import ModelError

    recorded = trained.get("data_source") or "dolos"
    name = args.source or recorded
    same = _kind(name) == _kind(recorded)
    options: dict[str, Any] = {}
    if same and recorded != "generated":  # the generated source's options generate data; its root is read as Dolos
        options = {k: v for k, v in (trained.get("data_source_options") or {}).items() if k not in _SOURCE_KEYS}
    options.update(_options(args.source_option))
    polarity = args.mask_polarity or (trained.get("mask_polarity") if same else None)
    threshold = (
        args.mask_threshold if args.mask_threshold is not None else (trained.get("mask_threshold") if same else None)
    )
    if polarity is not None:
        options["mask_polarity"] = polarity
    if threshold is not None:
        options["mask_threshold"] = threshold
    root = args.data_root or trained.get("data")
    if not root:
        raise ModelError("the model does not record its training data: pass --data-root (and --subsets)")
    return build_source(_kind(name), root=root, **options), same


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from deeploc.evaluation.rescoring import recorded_thresholds, write_image_files
    from deeploc.evaluation.scoring import THRESHOLD, index_for_eval, score_subsets, write_results
    from deeploc.inference.loading import describe_model, load_model_and_metadata
    from deeploc.runs.checkpoints import ModelError

    try:
        import_plugins(args)
        args.conventions = check_conventions(args.conventions or args.convention or DEFAULT_CONVENTION)
        args.convention = args.conventions[0]
        if _rescoring(args):
            return _rescore(args)
        perturbations = _perturbations(args.perturb)
        if args.real and args.split == args.threshold_split:
            raise ConfigError(
                f"--real with --split {args.split} would choose the detection threshold on the evaluated images "
                "themselves: pass --threshold-split none (no balanced accuracy), or evaluate the test split"
            )
        from deeploc.inference.signing import signing_key

        key = signing_key(args.key_file)
        model, meta = load_model_and_metadata(args.model, args.encoder_checkpoint, args.device, signing_key=key)
        chosen = model.val_thresholds = recorded_thresholds(Path(args.model))
        trained = (meta.get("training") or {}).get("config") or {}
        source, same = _source(args, trained)
        subsets = args.subsets or (trained.get("subsets") if same else source.available_subsets())
        if not subsets:
            raise ModelError("the model does not record its training subsets: pass --subsets")
        rules = MaskRules(args.allow_empty_masks, args.max_manipulated_fraction)
        by_subset = index_for_eval(source, subsets, args.split, not args.no_validate, rules)
        real = _real_samples(args, source, subsets, rules) if args.real else None  # checked before any encoding
        scored = score_subsets(model, by_subset, *_run(args), keep_predictions=args.save_predictions)
        results = {name: result.metrics for name, result in scored.items()}
        every = {c: {name: result.by_convention[c] for name, result in scored.items()} for c in args.conventions}
        out = _out_dir(args, source.root(), subsets)
        context = {
            "model": str(args.model),
            "described": describe_model(meta),
            "data": str(source.root()),
            "source": source.describe(),
            "split": args.split,
            "convention": args.convention,
            "mask_polarity": source.mask_polarity,
            "mask_threshold": source.mask_threshold,
            "thresholds": {"split": "valid", "chosen": chosen},
        }
        written = list(write_results(out, results, context, every))  # type: ignore[arg-type]
        written += write_image_files(out, scored, args.prediction_dtype)
        print(f"{describe_model(meta)}; {args.split} split of {source.root()}")
        print(
            f"{args.split} scores (%, mean over images), metric convention{'s' if len(args.conventions) > 1 else ''} {', '.join(args.conventions)}, pixel "
            f"threshold {THRESHOLD}" + (f" and thresholds chosen on the valid split {chosen}" if chosen else "") + ":"
        )
        print("\n".join(format_scores(results, trained, every, chosen)))  # type: ignore[arg-type]
        if real is not None:
            written += _real(args, model, real, scored, out, context)
        if perturbations:
            written += _robustness(args, model, by_subset, perturbations, results, out, context, trained)
    except (DeeplocError, ValueError) as exc:
        return report_error("deeploc-eval", exc, args.verbose)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


_SOURCE_KEYS = ("root", "mask_polarity", "mask_threshold")


def _kind(source: str) -> str:
    """Generated data are read as Dolos: the two are one kind of source."""
    return "dolos" if source == "generated" else source


def _run(args: argparse.Namespace) -> tuple[int, int, str | None, tuple[str, ...]]:
    """How every evaluation pass runs: batch size, workers, feature cache, metric conventions."""
    return args.batch_size, args.num_workers, args.features_dir, args.conventions


_DATA_FLAGS = ("data_root", "subsets", "source", "real", "perturb")


def _rescoring(args: argparse.Namespace) -> bool:
    """Whether this call rescores saved predictions (--rescore, or a run directory holding them and no flag that
    asks for other data) instead of running the model."""
    from deeploc.metrics.store import predictions_files

    if args.rescore:
        return True
    model = Path(args.model)
    asks_other_data = any(getattr(args, flag) for flag in _DATA_FLAGS) or args.split != "test"
    if not model.is_dir() or asks_other_data:
        return False
    if predictions_files(model):
        return True
    if RunDir(model).metrics_file.is_file():
        print(f"no saved predictions in {model}: scoring with the model (keep them with eval.save_predictions=true "
              "when training, or --save-predictions, to rescore later without it)")  # fmt: skip
    return False


def _rescore(args: argparse.Namespace) -> int:
    """--rescore: every saved subset in --conventions, written like an evaluation (eval.json, eval.csv, scores/)."""
    from deeploc.evaluation.rescoring import rescore_into
    from deeploc.evaluation.scoring import THRESHOLD

    folder = Path(args.model)
    out = Path(args.out) if args.out else RunDir(folder).eval_root / f"rescored-{'-'.join(args.conventions)}"
    rescored, chosen, written = rescore_into(folder, args.conventions, out)
    trained = rescored.record.get("config") or {}
    print(f"rescored the saved predictions of {folder} (no model, encoder or images used)")
    print(
        f"scores (%, mean over images), metric conventions {', '.join(args.conventions)}, pixel threshold {THRESHOLD}:"
    )
    print("\n".join(format_scores(rescored.scores[args.convention], trained, rescored.scores, chosen)))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _perturbations(items: list[str] | None) -> list[Any]:
    """The --perturb items, checked before the model loads (a typo fails at once)."""
    if not items:
        return []
    from deeploc.evaluation.perturbations import parse_perturbations

    return parse_perturbations(items)


def _out_dir(args: argparse.Namespace, root: Path, subsets: list[str]) -> Path:
    """--out, else ``<run>/eval/<data>-<split>-<convention>-<digest>`` (``./eval/...`` for an export)."""
    if args.out:
        return Path(args.out)
    model = Path(args.model)
    run = RunDir(model if model.is_dir() else (model.parent.parent if model.suffix == ".ckpt" else Path(".")))
    return run.eval_dir(root, args.split, subsets, args.convention)


def _real_samples(args: argparse.Namespace, source: DataSource, subsets: list[str], rules: MaskRules) -> dict[str, Any]:
    """--real's samples, indexed and validated: the real images of --split, and (unless --threshold-split none)
    the real and manipulated images of the threshold split."""
    from deeploc.evaluation.scoring import index_for_eval, index_real

    validate = not args.no_validate
    samples: dict[str, Any] = {"real": index_real(source, args.split, validate)}
    if args.threshold_split != "none":
        samples["valid_real"] = index_real(source, args.threshold_split, validate)
        samples["valid_fake"] = index_for_eval(source, subsets, args.threshold_split, validate, rules)
    return samples


def _real(
    args: argparse.Namespace,
    model: Any,
    samples: dict[str, Any],
    scored: dict[str, Any],
    out: Path,
    context: dict[str, Any],
) -> list[Path]:
    """--real: false alarms on the real images of --split, detection of each subset against them."""
    from deeploc.evaluation.detection import detect, detection_markdown, write_detection, write_image_scores
    from deeploc.evaluation.scoring import score_subsets

    def images(by_subset: dict[str, Any]) -> dict[str, Any]:
        return {name: s.images for name, s in score_subsets(model, by_subset, *_run(args), localize=False).items()}

    real = images({"real": samples["real"]})["real"]
    real_valid = images({"real": samples["valid_real"]})["real"] if "valid_real" in samples else None
    fake_valid = list(images(samples["valid_fake"]).values()) if "valid_fake" in samples else []
    fakes = {name: s.images for name, s in scored.items()}
    detection = detect(real, fakes, real_valid, fake_valid)
    print(detection_markdown(detection, context))
    table = write_image_scores(out / "image_scores.csv", {"real": real, **fakes}, args.split)
    return [*write_detection(out, detection, context), table]


def _robustness(
    args: argparse.Namespace,
    model: Any,
    by_subset: dict[str, list[Any]],
    perturbations: list[Any],
    clean: dict[str, dict[str, float]],
    out: Path,
    context: dict[str, Any],
    trained: dict[str, Any],
) -> list[Path]:
    """--perturb: the scores of every perturbed copy of the test images, tables and figures."""
    from deeploc.evaluation.robustness import metric_table, ordered, run_robustness, write_robustness
    from deeploc.evaluation.scoring import THRESHOLD

    perturbed = run_robustness(model, by_subset, perturbations, *_run(args))
    paths = write_robustness(out, clean, perturbed, perturbations, context, trained)
    print(
        f"{column_label(reported_specs(args.convention)[0].name, args.convention)} under perturbation (%, {args.split} split, metric convention {args.convention}, pixel threshold "
        f"{THRESHOLD}):"
    )
    print(metric_table(clean, perturbed, ordered(perturbations), reported_specs(args.convention)[0].name))
    return paths


def _undefined_note(scores: dict[str, float]) -> str:
    """How many images the convention decided for (thin regions, empty masks), when there are any."""
    no_positive, empty = scores.get("n_f1_no_positive", 0), scores.get("n_ap_undefined", 0)
    return f"; {no_positive:.0f} without F1 positive, {empty:.0f} empty masks" if no_positive or empty else ""


if __name__ == "__main__":
    sys.exit(main())
