"""``deeploc-check ROOT``: index and validate a Dolos-layout dataset, print counts; exit 1 on bad data.

One pass lists every problem of the dataset (layout, files, mask rules, image sizes), not only the first kind.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping

from deeploc.cli.app import add_verbose_flag, import_plugins, report_error
from deeploc.data.errors import DatasetError, format_problems
from deeploc.data.layout import available_subsets, index_subsets, resolve_root
from deeploc.data.masks import DEFAULT_POLARITY, MAX_MANIPULATED_FRACTION, POLARITIES, MaskRules, MaskStats
from deeploc.data.regions import ERODE_SIZE
from deeploc.data.samples import SPLITS, Sample, count_table, format_count_table
from deeploc.data.validate import dataset_problems, inspect_samples
from deeploc.errors import DeeplocError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deeploc-check",
        description="Validate every image and mask of a Dolos-layout dataset (decode, size, binary gray masks, "
        "polarity, empty masks) and print the counts per subset and split, and per subset how many masks are empty "
        "or too thin for the F1 metric.",
    )
    p.add_argument("root", help="the unzipped wacv_data folder (or its data/ child)")
    p.add_argument("--subsets", nargs="+", default=None, help="subsets to check (default: all with masks)")
    p.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    p.add_argument("--source", default="celebahq", help="source folder under data/ (default: celebahq)")
    p.add_argument("--workers", type=int, default=2, help="decoding threads (default: 2)")
    p.add_argument("--cache", default=None, help="validation cache file (re-checks only changed files)")
    p.add_argument(
        "--mask-polarity",
        default=DEFAULT_POLARITY,
        choices=POLARITIES,
        help=f"how the masks are drawn, as data.mask_polarity (default: {DEFAULT_POLARITY}, Dolos)",
    )
    p.add_argument(
        "--allow-empty-masks",
        action="store_true",
        help="accept masks with no manipulated pixel (data.allow_empty_masks)",
    )
    p.add_argument(
        "--max-manipulated-fraction",
        type=float,
        default=MAX_MANIPULATED_FRACTION,
        help="largest mean manipulated share of each image in a split (data.max_manipulated_fraction; default: "
        f"{MAX_MANIPULATED_FRACTION})",
    )
    add_verbose_flag(p)
    return p


def format_mask_table(stats: Mapping[Sample, MaskStats]) -> str:
    """Per subset: masks, empty ones, thin ones (no F1 positive), mean manipulated share, image size(s)."""
    rows: dict[str, list[MaskStats]] = {}
    for sample, st in stats.items():
        rows.setdefault(sample.subset, []).append(st)
    width = max([len("subset"), *(len(s) for s in rows)])
    lines = [f"{'subset':<{width}}  {'masks':>6}  {'empty':>6}  {'thin':>6}  {'manip%':>7}  size (WxH)"]
    for subset, group in rows.items():
        empty = sum(st.manipulated == 0 for st in group)
        thin = sum(st.thin for st in group)
        share = 100.0 * sum(st.fraction for st in group) / len(group)
        sizes = sorted({st.size for st in group})
        size = sizes[0] if len(sizes) == 1 else f"{len(sizes)} sizes: {', '.join(sizes[:3])}"
        lines.append(f"{subset:<{width}}  {len(group):>6}  {empty:>6}  {thin:>6}  {share:>7.2f}  {size}")
    lines.append(
        "masks = those that passed the file checks; thin = every region is thinner than the metrics' "
        f"{ERODE_SIZE}x{ERODE_SIZE} erosion, so F1 has no positive pixel in that image (see deeploc.metrics)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import_plugins(args)
        rules = MaskRules(args.allow_empty_masks, args.max_manipulated_fraction)
        root = resolve_root(args.root)
        subsets = args.subsets or available_subsets(root, args.source)
        if not subsets:
            raise DatasetError(f"no localization subsets (fake/<subset>/masks) under {root / args.source}")
        problems: list[str] = []
        samples = index_subsets(root, subsets, args.splits, args.source, args.mask_polarity, problems=problems)
    except (DeeplocError, ValueError) as exc:
        return report_error("deeploc-check", exc, args.verbose)
    print(f"dataset root: {root}")
    print(format_count_table(count_table(samples)))
    start = time.perf_counter()
    stats, file_problems = inspect_samples(samples, cache_file=args.cache, workers=max(1, args.workers))
    problems += file_problems + dataset_problems(stats, rules)
    if stats:
        print(format_mask_table(stats))
    if problems:
        print(
            f"deeploc-check: {len(problems)} problem(s) in {root} ({len(samples)} samples indexed):"
            f"{format_problems(problems)}\n"
            "Fix or replace these files, or pass the named option. deeploc never skips a bad file: skipping would "
            "silently change the sample counts and the metrics.",
            file=sys.stderr,
        )
        return 1
    print(f"OK: {len(samples)} samples valid ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
