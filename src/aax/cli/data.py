"""``aax data check`` (what a dataset holds, and every file in it that cannot be used),
``aax data convert`` (manifests for public layouts) and ``aax data split`` (a held-out test part)."""

from __future__ import annotations

import argparse
import json
import sys

from aax.cli._common import add_label_map_argument
from aax.data import FORMATS, open_dataset


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``aax data`` and its sub-commands."""
    parser = subparsers.add_parser("data", help="inspect and check datasets",
                                   description="Inspect and check datasets.")
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    check = sub.add_parser(
        "check", help="count samples and masks per class, list unusable files",
        description="Open a dataset, decode every image and mask, and report counts per "
                    "class and every file that cannot be used. Exit status 1 when any "
                    "file is unusable, 2 when the source cannot be opened.")
    check.add_argument("source", help="dataset folder or CSV manifest")
    check.add_argument("--format", choices=FORMATS, default=None,
                       help="layout of SOURCE (default: detected)")
    check.add_argument("--split", default=None, help="TBX11K list to read, e.g. val")
    check.add_argument("--include-sick", action="store_true",
                       help="TBX11K: keep sick (non-TB) images as the class 'sick'")
    check.add_argument("--classes", default=None,
                       help="comma-separated allowed class names; other labels are errors")
    add_label_map_argument(check)
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.add_argument("--no-progress", action="store_true",
                       help="no progress bar (it goes to stderr)")
    check.set_defaults(func=run_check)
    convert = sub.add_parser(
        "convert", help="write a CSV manifest for a public layout (BUSI, labelme)",
        description="busi: class folders with NAME.png and NAME_mask*.png (beside, or in images/ and "
                    "mask/), masks of one image merged. labelme: IMAGES and a folder of labelme JSON "
                    "files; polygons become masks, images without shapes are of --negative. Writes "
                    "OUT/manifest.csv and OUT/masks/; images are not copied.")
    convert.add_argument("layout", choices=["busi", "labelme"])
    convert.add_argument("source", help="busi: the folder of class folders; labelme: the image folder")
    convert.add_argument("--labels", default=None, help="labelme: the folder of JSON files")
    convert.add_argument("--negative", default="no_defect", help="labelme: the class of images without shapes")
    convert.add_argument("--out", required=True, help="folder for manifest.csv and masks/")
    convert.set_defaults(func=run_convert)
    split = sub.add_parser(
        "split", help="hold out a test part: write OUT/train.csv and OUT/test.csv",
        description="A seeded split, class by class (the validation split's rule), of any dataset "
                    "into two CSV manifests: train on OUT/train.csv (aax train holds out its own "
                    "validation part from it) and score on OUT/test.csv (aax evaluate), never trained "
                    "or calibrated on. The same SOURCE, fraction and seed give the same split.")
    split.add_argument("source", help="dataset folder or CSV manifest")
    split.add_argument("--out", required=True, help="folder for train.csv and test.csv")
    split.add_argument("--test-fraction", type=float, default=0.25,
                       help="share of each class held out for testing (default 0.25)")
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--format", choices=FORMATS, default=None, help="layout of SOURCE (default: detected)")
    add_label_map_argument(split)
    split.set_defaults(func=run_split)
    parser.set_defaults(func=lambda args: _usage(parser))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def run_check(args: argparse.Namespace) -> int:
    """Run ``aax data check``; 0 when every file is usable, 1 when not, 2 on a bad source."""
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    try:
        dataset = open_dataset(args.source, args.format, include_sick=args.include_sick,
                               split=args.split, classes=classes, label_map=args.label_map)
    except (OSError, ValueError) as exc:
        print(f"aax data check: {exc}", file=sys.stderr)
        return 2
    # the bar goes to stderr, so --json output stays one clean object on stdout
    dataset = dataset.verify(progress=not args.no_progress)
    summary = dataset.summary()
    summary["ok"] = not dataset.errors
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
    return 1 if dataset.errors else 0


def run_convert(args: argparse.Namespace) -> int:
    """Run ``aax data convert``; 0 when every file converted, 1 when some did not, 2 on a bad source."""
    from aax.data.convert import convert_labelme, convert_masks_beside

    try:
        if args.layout == "busi":
            result = convert_masks_beside(args.source, args.out)
        else:
            if not args.labels:
                print("aax data convert: labelme needs --labels FOLDER", file=sys.stderr)
                return 2
            result = convert_labelme(args.source, args.labels, args.out, negative=args.negative)
    except (OSError, ValueError) as exc:
        print(f"aax data convert: {exc}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{k} {v}" for k, v in sorted(result.counts.items()))
    print(f"wrote {result.manifest} ({counts})")
    for error in result.errors:
        print(f"  skipped {error}", file=sys.stderr)
    return 1 if result.errors else 0


def run_split(args: argparse.Namespace) -> int:
    """Run ``aax data split``; 0 when written, 2 on a bad source or fraction."""
    from aax.data.split import split_manifests

    try:
        dataset = open_dataset(args.source, args.format, label_map=args.label_map)
        written = split_manifests(dataset, args.out, args.test_fraction, args.seed)
    except (OSError, ValueError) as exc:
        print(f"aax data split: {exc}", file=sys.stderr)
        return 2
    for part, (path, counts) in written.items():
        print(f"{part}: {path} ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})")
    for error in dataset.errors:
        print(f"  left out {error.path}: {error.reason}", file=sys.stderr)
    return 0


def format_summary(summary: dict) -> str:
    """The text report of ``Dataset.summary()``."""
    width = max([len("total")] + [len(c) for c in summary["classes"]])
    lines = [f"{summary['source']} ({summary['format']})",
             f"{'class':<{width}}  {'images':>7}  {'masks':>7}"]
    for name, c in summary["classes"].items():
        lines.append(f"{name:<{width}}  {c['images']:>7}  {c['masks']:>7}")
    lines.append(f"{'total':<{width}}  {summary['n_samples']:>7}  {summary['n_masks']:>7}")
    if summary["errors"]:
        lines.append(f"{summary['n_errors']} unusable file(s):")
        lines.extend(f"  {e['path']}: {e['reason']}" for e in summary["errors"])
    else:
        lines.append("no unusable files")
    return "\n".join(lines)
