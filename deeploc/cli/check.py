"""``deeploc-check ROOT``: index and validate a Dolos-layout dataset, print counts; exit 1 on bad data."""

from __future__ import annotations

import argparse
import sys
import time

from deeploc.cli.app import add_verbose_flag
from deeploc.data.errors import DatasetError
from deeploc.data.layout import (
    SPLITS,
    available_subsets,
    count_table,
    format_count_table,
    index_subsets,
    resolve_root,
    validate_samples,
)
from deeploc.errors import DeeplocError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deeploc-check",
        description="Validate every image and mask of a Dolos-layout dataset (decode, size, binary masks) "
        "and print the counts per subset and split.",
    )
    p.add_argument("root", help="the unzipped wacv_data folder (or its data/ child)")
    p.add_argument("--subsets", nargs="+", default=None, help="subsets to check (default: all with masks)")
    p.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    p.add_argument("--source", default="celebahq", help="source folder under data/ (default: celebahq)")
    p.add_argument("--workers", type=int, default=2, help="decoding threads (default: 2)")
    p.add_argument("--cache", default=None, help="validation cache file (re-checks only changed files)")
    add_verbose_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        root = resolve_root(args.root)
        subsets = args.subsets or available_subsets(root, args.source)
        if not subsets:
            raise DatasetError(f"no localization subsets (fake/<subset>/masks) under {root / args.source}")
        samples = index_subsets(root, subsets, splits=args.splits, source=args.source)
        print(f"dataset root: {root}")
        print(format_count_table(count_table(samples)))
        start = time.perf_counter()
        validate_samples(samples, cache_file=args.cache, workers=max(1, args.workers))
    except DeeplocError as exc:
        if args.verbose:
            raise
        print(f"deeploc-check: {exc}", file=sys.stderr)
        return 1
    print(f"OK: {len(samples)} samples valid ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
