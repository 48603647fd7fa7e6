"""``aax retrain RUN --reviews OUT --out RUN2``: train again, learning from reviews."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aax.cli._common import add_device_argument, add_review_learning_arguments


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "retrain", help="train a new RUN with the reviews of annotation folders",
        description="Train a new RUN on the data and settings RUN was trained with, learning from the "
                    "reviews stored in OUT (aax import, or aax serve --store): reviewed classes replace "
                    "the dataset's, reviewed images always train (never validate), reviewed images that "
                    "are not in the data join it, and reviewed masks teach each member where to look "
                    "(a localisation loss). Calibration then also uses the reviewed masks when there are "
                    "at least 10. RUN2 lists every reviewed image, and `aax evaluate` refuses them as "
                    "test images. Compare: aax evaluate RUN2 TEST --out DIR --against RUN.")
    p.add_argument("run", help="the RUN to start from (its data and training settings are reused)")
    p.add_argument("--reviews", nargs="+", required=True, metavar="OUT",
                   help="annotation folders whose reviews to learn from")
    p.add_argument("--out", required=True, help="the new RUN folder")
    p.add_argument("--data", default=None,
                   help="the dataset (default: the one RUN was trained on, as its manifest records)")
    add_review_learning_arguments(p, run_default=True)
    p.add_argument("--epochs", type=int, default=None, help="maximum epochs per member (default: RUN's)")
    p.add_argument("--warm-start", action="store_true",
                   help="start every member from RUN's instead of from its initial weights (ImageNet); "
                        "a few epochs (--epochs) are then enough")
    p.add_argument("--resume", action="store_true", help="continue an interrupted retraining in --out")
    p.add_argument("--no-calibrate", action="store_true", help="skip calibration afterwards")
    p.add_argument("--novelty-images", default=None, metavar="PATH",
                   help="as for aax train: set the novelty thresholds on these images")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_device_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``aax retrain``; returns the exit status."""
    from aax.cli.train import read_reviews_arg, report
    from aax.training.retrain import retrain

    try:
        out = retrain(args.run, args.out, read_reviews_arg(args), data=args.data,
                      localisation_weight=args.localisation_weight, localisation_loss=args.localisation_loss,
                      segmentation_weight=args.segmentation_weight, segmentation_epochs=args.segmentation_epochs,
                      segmentation_views=args.segmentation_views,
                      epochs=args.epochs, warm_start=args.warm_start,
                      device=args.device, resume=args.resume, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as exc:
        print(f"aax retrain: error: {exc}", file=sys.stderr)
        return 2
    report(Path(out), args)
    print(f"compare on held-out images: aax evaluate {out} TEST --out DIR --against {args.run}")
    return 0
