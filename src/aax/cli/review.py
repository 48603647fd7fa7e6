"""``aax review OUT``: the images a person must review, in the order chosen (``--order``)."""

from __future__ import annotations

import argparse
import sys

from aax.cli._common import non_negative_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("review", help="list the images flagged for review",
                       description="List the images of OUT (a folder made by `aax annotate`) that the "
                                   "ensemble flagged instead of annotating: why (uncertain, no-consensus, "
                                   "novel), each member's prediction, probability and uncertainty, and the "
                                   "overlay when --save-saliency kept one; in --order (most uncertain first "
                                   "by default). Writes review.csv and review.json (into OUT, or --to).")
    p.add_argument("out", help="folder written by `aax annotate`")
    p.add_argument("--to", default=None, help="folder for review.csv and review.json (default: OUT)")
    from aax.annotation.review_list import DEFAULT_ORDER, ORDERS

    p.add_argument("--order", choices=ORDERS, default=DEFAULT_ORDER,
                   help=f"which images first (default {DEFAULT_ORDER}): uncertainty = the most uncertain "
                        "member; disagreement = the members' maps agree least; random (seeded by --seed). "
                        "docs/reviews.md compares them")
    p.add_argument("--all", dest="include_all", action="store_true",
                   help="list every annotated image, not only the flagged ones (for budgets beyond them)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of --order random (default 0)")
    p.add_argument("--limit", type=non_negative_int, default=20, help="entries to print (default 20; the files hold all)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from aax.annotation.review_list import review_list

    result = review_list(args.out, args.to, order=args.order, include_all=args.include_all, seed=args.seed)
    entries = result["entries"]
    print(f"{result['n']} images to review, {args.order} order")
    for e in entries[: max(0, args.limit)]:
        votes = ", ".join(f"{m['name']}: {m['predicted']} p={_num(m['probability'], 2)} "
                          f"u={_num(m['uncertainty'], 4)}" for m in e["members"])
        print(f"  {e['image']}  [{e['reason']}]  {votes}" + (f"  overlay: {e['overlay']}" if e["overlay"] else ""))
    if len(entries) > args.limit:
        print(f"  ... and {len(entries) - args.limit} more")
    print(f"written: {', '.join(result['files'])}", file=sys.stderr)
    return 0


def _num(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
