"""`deeploc-report SWEEP_DIR [--out DIR] [--wandb] [--compare-study] [--robustness] [--bootstrap N] [--ci-seed S]
[--compare A B]... [--latex]`: tables, confidence intervals, paired tests and figures of a sweep."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from deeploc.cli.app import add_verbose_flag, import_plugins, report_error
from deeploc.errors import DeeplocError
from deeploc.report.uncertainty import Bootstrap
from deeploc.report.write import log_wandb, write_report


def main(argv: Sequence[str] | None = None) -> int:
    """Write the report, print it as Markdown; exit 0 when at least one finished run was found."""
    parser = argparse.ArgumentParser(prog="deeploc-report", description=__doc__)
    parser.add_argument("sweep_dir", type=Path, help="sweep (or single run) directory holding run folders")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: SWEEP_DIR/report)")
    parser.add_argument(
        "--wandb", action="store_true", help="log tables and figures to W&B (WANDB_MODE; offline by default)"
    )
    parser.add_argument(
        "--compare-study", action="store_true", help="put the study's published ID / OOD beside ours (Dolos only)"
    )
    parser.add_argument(
        "--robustness",
        action="store_true",
        help="compare the runs' deeploc-eval --perturb results: a table and one figure per metric (ID / OOD per "
        "configuration against the perturbation strength)",
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        metavar="N",
        help="bootstrap draws of the 95%% confidence intervals (over test images and seeds; default 1000)",
    )
    parser.add_argument("--ci-seed", type=int, default=0, help="seed of the bootstrap draws (default 0)")
    parser.add_argument(
        "--compare",
        nargs=2,
        action="append",
        metavar=("A", "B"),
        help="paired test of configuration A against B (labels as in the report, e.g. 'conv20/image_embed') on the "
        "same test images: difference, its CI and p-value, Holm-corrected over all pairs; repeatable; "
        "'--compare all all' compares every pair",
    )
    parser.add_argument("--latex", action="store_true", help="also write tables.tex (booktabs tables)")
    add_verbose_flag(parser)
    args = parser.parse_args(argv)
    if args.bootstrap < 1:
        parser.error(f"--bootstrap {args.bootstrap}: give at least 1 draw (e.g. 1000)")
    if not args.sweep_dir.is_dir():
        print(f"deeploc-report: sweep directory not found: {args.sweep_dir}", file=sys.stderr)
        return 2
    try:
        import_plugins(args)  # metrics of your own are report columns once registered
        paths = write_report(
            args.sweep_dir,
            args.out,
            compare_study=args.compare_study,
            robustness=args.robustness,
            bootstrap=Bootstrap(args.bootstrap, args.ci_seed),
            compare=[tuple(pair) for pair in args.compare or []],
            latex=args.latex,
        )
    except DeeplocError as exc:
        return report_error("deeploc-report", exc, args.verbose)
    print(paths.report_md.read_text(encoding="utf-8"))
    if args.wandb:
        print(f"W&B run written to {log_wandb(paths)}")
    print(f"Report files in {paths.out_dir}")
    if paths.n_runs == 0:
        print(f"deeploc-report: no finished run under {args.sweep_dir}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
