"""``deeploc-make-data OUT``: write a deterministic synthetic dataset in the Dolos layout under OUT/wacv_data."""

from __future__ import annotations

import argparse
import time

from deeploc.cli.app import add_verbose_flag, import_plugins, report_error
from deeploc.data.layout import index_subsets
from deeploc.data.manipulations import SUBSET_DESCRIPTIONS, SUBSETS
from deeploc.data.samples import count_table, format_count_table
from deeploc.data.synthetic import generate_dataset
from deeploc.errors import DeeplocError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deeploc-make-data",
        description="Generate a synthetic localization dataset in the exact Dolos layout (four local "
        "manipulation methods: " + ", ".join(SUBSETS) + "). Same arguments, same bytes; re-running is a no-op.",
    )
    p.add_argument("out", help="output folder; the dataset is written to OUT/wacv_data")
    p.add_argument("--n-train", type=int, default=256, help="train images per subset (default: 256)")
    p.add_argument("--n-valid", type=int, default=64, help="valid images per subset (default: 64)")
    p.add_argument("--n-test", type=int, default=64, help="test images per subset (default: 64)")
    p.add_argument("--n-real", type=int, default=16, help="real / fully synthetic images per split (default: 16)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default: 256, as Dolos)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="threads (speed only, never the bytes)")
    add_verbose_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        import_plugins(args)
        path = generate_dataset(
            args.out,
            n_train=args.n_train,
            n_valid=args.n_valid,
            n_test=args.n_test,
            size=args.size,
            seed=args.seed,
            n_real=args.n_real,
            workers=max(1, args.workers),
        )
        samples = index_subsets(path, list(SUBSETS))
    except DeeplocError as exc:
        return report_error("deeploc-make-data", exc, args.verbose)
    print(f"dataset: {path} ({time.perf_counter() - start:.1f} s)")
    print(format_count_table(count_table(samples)))
    for name in SUBSETS:
        print(f"  {name}: {SUBSET_DESCRIPTIONS[name]}")
    print(
        f"use it with: data.root={path} data.source=dolos data.synthetic=null  (data=synthetic: these subsets, read "
        "as they are, no regeneration)"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
