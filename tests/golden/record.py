"""Record the golden results: ``python -m tests.golden.record [SCENARIO ...]`` (from the repository root).

Runs the scenarios of tests/golden/scenarios.py (all of them, or the ones named: their entries are replaced, the
others kept) in a temporary folder and writes tests/golden/golden.json, which tests/test_golden.py compares with
exactly. Re-record only when a change of results is intended, and say why in the commit.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tests.golden.scenarios import GOLDEN_FILE, SCENARIOS, Session, environment


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.golden.record", description=__doc__)
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO", help=f"default: all ({', '.join(SCENARIOS)})")
    parser.add_argument("--out", type=Path, default=GOLDEN_FILE, help=f"default: {GOLDEN_FILE}")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary one)")
    parser.add_argument(
        "--overlays-only",
        action="store_true",
        help="replace only the overlays' pixel digests (a deliberate change of the pictures); numbers and "
        "checkpoints stay as recorded",
    )
    args = parser.parse_args(argv)
    unknown = [name for name in args.scenarios if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}")
    names = args.scenarios or list(SCENARIOS)
    root = args.keep or Path(tempfile.mkdtemp(prefix="deeploc-golden-"))
    root.mkdir(parents=True, exist_ok=True)
    keep_rest = (args.scenarios or args.overlays_only) and args.out.is_file()
    golden = json.loads(args.out.read_text()) if keep_rest else {"scenarios": {}}
    environment_recorded = golden.get("environment")
    session = Session(root)
    start = time.perf_counter()
    try:
        for name in names:
            record = session.record(name)
            if args.overlays_only:
                golden["scenarios"][name]["overlays"] = record["overlays"]
            else:
                golden["scenarios"][name] = record
            print(f"{name}: {session.seconds[name]:.1f} s ({session.cpu_seconds[name]:.1f} s CPU)", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    scenarios = {name: golden["scenarios"][name] for name in SCENARIOS if name in golden["scenarios"]}
    recorded_on = environment_recorded if args.overlays_only and environment_recorded else environment()
    golden = {"environment": recorded_on, "scenarios": scenarios}
    args.out.write_text(json.dumps(golden, indent=1, sort_keys=False) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB) in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
