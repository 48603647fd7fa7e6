"""``aax export OUT --format coco|png|label-studio|cvat|review --to PATH``."""

from __future__ import annotations

import argparse
import json

FORMATS = ["coco", "png", "label-studio", "cvat", "review"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export annotations (reviewed ones preferred) for annotation tools",
                       description="Write the annotations of OUT (a folder made by `aax annotate`) in a "
                                   "format annotation tools read; where a reviewer's decision was imported "
                                   "(`aax import`), it is exported instead of the model's. Images are named "
                                   "by their path relative to the annotated input folder.")
    p.add_argument("out", help="folder written by `aax annotate`")
    p.add_argument("--format", choices=FORMATS, required=True,
                   help="coco: one COCO JSON file, masks as compressed RLE, every image listed with its "
                        "decision; png: a flat folder of mask PNGs with index.csv; label-studio: tasks.json "
                        "and config.xml, with the decision and brush masks as predictions; cvat: CVAT for "
                        "images 1.1 annotations.xml with masks; review: the flagged images, most uncertain "
                        "first, as review.csv and review.json")
    p.add_argument("--to", required=True,
                   help="coco: a .json file; png, label-studio, cvat and review: a folder")
    p.add_argument("--image-root", default=None,
                   help="label-studio: prefix (URL or path) put before each image's path relative to the "
                        "input root in the tasks' data.image (default: the absolute path)")
    p.add_argument("--local-files", default=None, metavar="DOCUMENT_ROOT",
                   help="label-studio: write local-files URLs (/data/local-files/?d=...) relative to "
                        "Label Studio's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from aax.interop.export import export_coco, export_png

    if (args.image_root or args.local_files) and args.format != "label-studio":
        raise ValueError("--image-root and --local-files apply to --format label-studio only")
    if args.image_root and args.local_files:
        raise ValueError("give --image-root or --local-files, not both")
    if args.format == "coco":
        result = export_coco(args.out, args.to)
    elif args.format == "png":
        result = export_png(args.out, args.to)
    elif args.format == "label-studio":
        from aax.interop.labelstudio import export_label_studio

        result = export_label_studio(args.out, args.to, image_root=args.image_root, local_files=args.local_files)
    elif args.format == "cvat":
        from aax.interop.cvat import export_cvat

        result = export_cvat(args.out, args.to)
    else:
        from aax.annotation.review_list import review_list

        result = {k: v for k, v in review_list(args.out, args.to).items() if k != "entries"}
    print(json.dumps(result))
    return 0
