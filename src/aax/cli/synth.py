"""``aax synth``: write a synthetic benchmark dataset (``lesion`` or ``fire``)."""

from __future__ import annotations

import argparse
import sys

from aax.cli._common import _number, non_negative_int, positive_int
from aax.data.synth import KINDS, generate


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``aax synth``."""
    parser = subparsers.add_parser(
        "synth", help="write synthetic lesion/fire data with ground-truth masks",
        description="Write a synthetic dataset in the folder layout: OUT/images/<class>/ "
                    "and 0/255 ground-truth masks in OUT/masks/<class>/ for the positive "
                    "class. The same seed gives byte-identical files.")
    parser.add_argument("--kind", choices=sorted(KINDS), default="lesion",
                        help="lesion (healthy/diseased) or fire (no_fire/fire)")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--n-per-class", type=positive_int, default=50, help="images per class")
    parser.add_argument("--size", type=_number(int, 1, 4096), default=64, help="image side in pixels")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
    parser.add_argument("--manifest", action="store_true",
                        help="also write OUT/manifest.csv (image,label,mask)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``aax synth``."""
    try:
        out = generate(args.kind, args.out, args.n_per_class, args.size, args.seed,
                       manifest=args.manifest)
    except ValueError as exc:
        print(f"aax synth: {exc}", file=sys.stderr)
        return 2
    negative, positive = KINDS[args.kind]
    print(f"wrote {2 * args.n_per_class} {args.size}x{args.size} images to {out} "
          f"({negative}, {positive}; masks for {positive})")
    return 0
