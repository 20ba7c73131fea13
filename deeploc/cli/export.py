"""``deeploc-export RUN_DIR [--out FILE]``: the trained decoder as one small self-describing safetensors file."""

from __future__ import annotations

import argparse
import json
import logging

from deeploc.cli.app import add_key_flag, add_verbose_flag, import_plugins, report_error
from deeploc.errors import DeeplocError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deeploc-export",
        description="Write a run's decoder (best checkpoint) as one safetensors file: decoder weights only, plus "
        "JSON metadata in the file header (decoder, encoder identity and weights digest or seed, input size, "
        "training summary and test metrics, deeploc version). deeploc-predict --model and deeploc-eval accept it.",
    )
    p.add_argument("model", help="a run directory of deeploc-train, or one of its .ckpt files")
    p.add_argument("--out", default=None, help="output file (default: <run dir>/decoder.safetensors)")
    p.add_argument("--show", action="store_true", help="print the metadata that was written")
    add_key_flag(p, "sign the export with it")
    add_verbose_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="deeploc-export: %(message)s")
    from deeploc.inference.export import export_decoder, read_export
    from deeploc.inference.loading import describe_model
    from deeploc.inference.signing import signing_key

    try:
        import_plugins(args)
        key = signing_key(args.key_file)
        path = export_decoder(args.model, args.out, key)
        _, metadata = read_export(path, key)
    except (DeeplocError, OSError) as exc:
        return report_error("deeploc-export", exc, args.verbose)
    size_kib = path.stat().st_size / 1024
    print(f"wrote {path} ({size_kib:.1f} KiB): {describe_model(metadata)}")
    if args.show:
        print(json.dumps(metadata, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
