"""``aax export OUT --format coco|png|review --to PATH``."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export annotations as COCO JSON, PNG masks or the review list",
                       description="Write the annotations of OUT (a folder made by `aax annotate`) in a "
                                   "format other tools read. Images are named by their path relative to "
                                   "the annotated input folder.")
    p.add_argument("out", help="folder written by `aax annotate`")
    p.add_argument("--format", choices=["coco", "png", "review"], required=True,
                   help="coco: one COCO JSON file, masks as compressed RLE, every image listed with "
                        "its decision; png: a flat folder of mask PNGs with index.csv; review: the "
                        "flagged images, most uncertain first, as review.csv and review.json")
    p.add_argument("--to", required=True, help="coco: a .json file; png and review: a folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from aax.export import export_coco, export_png
    from aax.review_list import review_list

    if args.format == "coco":
        result = export_coco(args.out, args.to)
    elif args.format == "png":
        result = export_png(args.out, args.to)
    else:
        result = {k: v for k, v in review_list(args.out, args.to).items() if k != "entries"}
    print(json.dumps(result))
    return 0
