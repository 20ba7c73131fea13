"""``deeploc-import declip FILE.pth [--out FILE.safetensors]``: a decoder trained elsewhere as a deeploc export.

The export then runs under deeploc's protocol like a decoder deeploc trained: ``deeploc-eval``, ``deeploc-predict``
and every evaluation that takes a model. One source for now, ``declip`` (DeCLIP's released conv-N decoders on CLIP
ViT-L/14, :mod:`deeploc.inference.declip`); nothing in the file is executed (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import argparse
import json
import logging

from deeploc.cli.app import add_verbose_flag, import_plugins, report_error
from deeploc.errors import DeeplocError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deeploc-import", description=__doc__)
    sources = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    declip = sources.add_parser(
        "declip",
        help="a DeCLIP decoder (ViT_layer20_conv-20_<subset>.pth)",
        description="Convert a decoder released by DeCLIP (bit-ml/DeCLIP: conv-N on CLIP ViT-L/14 layer k) into a "
        "deeploc export. Everything in the file is checked (nesting, layer, decoder keys and shapes, backbone, "
        "finite weights, release file name); a mismatch is refused naming it. The export records the CLIP encoder by "
        "the sha256 of its weights file: OpenAI's published digest of ViT-L-14.pt unless --encoder-checkpoint names "
        "the file you will evaluate with (e.g. a .safetensors conversion); deeploc-eval and deeploc-predict then take "
        "that file as --encoder-checkpoint.",
    )
    declip.add_argument("file", help="the DeCLIP checkpoint (.pth)")
    declip.add_argument("--out", help="the export to write (default: FILE with the suffix .safetensors)")
    declip.add_argument(
        "--encoder-checkpoint",
        help="the CLIP ViT-L/14 weights file to record (loaded and checked; default: OpenAI's ViT-L-14.pt digest)",
    )
    declip.add_argument("--feature-layer", help="for files that do not record it, e.g. layer20 (as in the file name)")
    declip.add_argument("--decoder-type", help="for files that do not record it, e.g. conv-20 (as in the file name)")
    declip.add_argument("--show", action="store_true", help="print the metadata that was written")
    add_verbose_flag(declip)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="deeploc-import: %(message)s")
    from deeploc.inference.declip import import_declip
    from deeploc.inference.export import read_export
    from deeploc.inference.loading import describe_model

    try:
        import_plugins(args)
        path = import_declip(args.file, args.out, args.feature_layer, args.decoder_type, args.encoder_checkpoint)
        _, metadata = read_export(path)
    except (DeeplocError, OSError) as exc:
        return report_error("deeploc-import", exc, args.verbose)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): {describe_model(metadata)}")
    weights = metadata["encoder"]["weights"]
    origin = f"the file {args.encoder_checkpoint}" if args.encoder_checkpoint else "OpenAI's ViT-L-14.pt"
    print(f"its encoder weights: {origin} ({weights}); pass that file to deeploc-eval / deeploc-predict as "
          "--encoder-checkpoint")  # fmt: skip
    if args.show:
        print(json.dumps(metadata, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
