"""``aax export OUT --format coco|png --to PATH``."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export annotations as COCO JSON or PNG masks")
    p.add_argument("out", help="folder written by `aax annotate`")
    p.add_argument("--format", choices=["coco", "png"], required=True)
    p.add_argument("--to", required=True, help="COCO: a .json file; png: a folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from aax.export import export_coco, export_png

    result = export_coco(args.out, args.to) if args.format == "coco" else export_png(args.out, args.to)
    print(json.dumps(result))
    return 0
