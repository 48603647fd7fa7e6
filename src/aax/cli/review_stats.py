"""``aax review-stats OUT``: agreement between the model and the reviewers."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("review-stats", help="agreement between model and reviewers (decisions, mask IoU, flags)")
    p.add_argument("out", help="folder written by `aax annotate`, with imported reviews")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from aax.interop.export import _open
    from aax.interop.reviews import review_stats

    store = _open(args.out)
    try:
        print(json.dumps(review_stats(store), indent=2))
    finally:
        store.close()
    return 0
