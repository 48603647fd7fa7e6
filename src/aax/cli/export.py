"""``aax export OUT --format coco|png|label-studio|cvat --to PATH``."""

from __future__ import annotations

import argparse
import json
import sys

FORMATS = ["coco", "png", "label-studio", "cvat"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export annotations (reviewed ones preferred) for annotation tools")
    p.add_argument("out", help="folder written by `aax annotate`")
    p.add_argument("--format", choices=FORMATS, required=True)
    p.add_argument("--to", required=True,
                   help="coco: a .json file; png: a folder; label-studio: a folder (tasks.json, config.xml); "
                        "cvat: a folder (annotations.xml)")
    p.add_argument("--image-root", default=None,
                   help="label-studio: prefix (URL or path) put before each image's path relative to the "
                        "input root in the tasks' data.image (default: the absolute path)")
    p.add_argument("--local-files", default=None, metavar="DOCUMENT_ROOT",
                   help="label-studio: write local-files URLs (/data/local-files/?d=...) relative to "
                        "Label Studio's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from aax.export import export_coco, export_png

    if (args.image_root or args.local_files) and args.format != "label-studio":
        print("--image-root and --local-files apply to --format label-studio only", file=sys.stderr)
        return 2
    if args.image_root and args.local_files:
        print("give --image-root or --local-files, not both", file=sys.stderr)
        return 2
    if args.format == "coco":
        result = export_coco(args.out, args.to)
    elif args.format == "png":
        result = export_png(args.out, args.to)
    elif args.format == "label-studio":
        from aax.labelstudio import export_label_studio

        result = export_label_studio(args.out, args.to, image_root=args.image_root, local_files=args.local_files)
    else:
        from aax.cvat import export_cvat

        result = export_cvat(args.out, args.to)
    print(json.dumps(result))
    return 0
