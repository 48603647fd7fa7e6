"""``aax import OUT --from label-studio|cvat FILE``: reviewed labels into the store."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    from aax.interop.review_import import FORMATS

    p = sub.add_parser("import", help="import reviewed annotations (Label Studio JSON export, CVAT XML)")
    p.add_argument("out", help="folder written by `aax annotate`")
    p.add_argument("--from", dest="source", choices=FORMATS, required=True, help="the tool that wrote FILE")
    p.add_argument("file", help="Label Studio: the project's JSON export; CVAT: annotations.xml")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from aax.interop.review_import import import_file
    from aax.interop.reviews import ReviewImportError

    try:
        result = import_file(args.out, args.source, args.file)
    except (ReviewImportError, ValueError, FileNotFoundError) as exc:
        print(f"aax import: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0
