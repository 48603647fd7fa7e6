"""``aax evaluate RUN DATA --out DIR``: the paper's tables 1-4 for labelled data, and a report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aax.cli._common import add_device_argument, add_label_map_argument, positive_int, unit_float


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score the ensemble and each member on labelled data",
                       description="Annotate labelled DATA once and score the ensemble and each member alone "
                                   "(accuracy, precision, recall, F1, flag rate; IoU and pixel metrics where "
                                   "DATA has ground-truth masks). Writes metrics.json, tables.md, "
                                   "per_image.csv and report.html into --out.")
    p.add_argument("run", help="RUN folder written by `aax train`")
    p.add_argument("data", help="labelled data: a folder, a CSV manifest or a TBX11K folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--unseen", default=None,
                   help="images of a kind never trained on: reports their flag rate and, side by side for "
                        "MC-Dropout u, max softmax, energy, KNN and (relative) Mahalanobis, per member and "
                        "for the ensemble rule, the AUROC, FPR at 95%% TPR and flag rates at the stored "
                        "thresholds (docs/novelty.md)")
    p.add_argument("--theta", type=unit_float, default=None, help="uncertainty threshold (default: the RUN's)")
    p.add_argument("--tau", type=unit_float, default=None, help="saliency threshold for masks (default: the RUN's)")
    p.add_argument("--mc-passes", type=positive_int, default=None, help="MC Dropout passes K (default: the RUN's)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="images per batch (default: chosen for the device and input size)")
    p.add_argument("--no-report", action="store_true", help="skip report.html")
    p.add_argument("--no-novelty", dest="novelty", action="store_false",
                   help="skip the novelty step, for the ensemble and for each member alone (which "
                        "otherwise goes to review when its own novelty test calls an image novel): the "
                        "paper's protocol alone, as its tables were made (novelty scores are still "
                        "compared with --unseen)")
    p.add_argument("--exclude-reviewed", action="store_true",
                   help="leave out the images RUN learned from reviews (`aax retrain`); without it, "
                        "DATA holding any of them is refused, since they would not be held-out figures")
    p.add_argument("--against", default=None, metavar="OLD_RUN",
                   help="also evaluate OLD_RUN on the same images (either run's reviewed images left "
                        "out of both) and print the two side by side; OLD_RUN's outputs go to OUT/against/, "
                        "the table to OUT/comparison.md")
    add_label_map_argument(p)
    add_device_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from aax.evaluation.evaluate import evaluate
    from aax.models.ensemble import Ensemble

    reviewed = "exclude" if (args.exclude_reviewed or args.against) else "refuse"
    try:
        ensemble = Ensemble.load(args.run, device=args.device)
        old = Ensemble.load(args.against, device=args.device) if args.against else None
        common = dict(unseen=args.unseen, theta=args.theta, tau=args.tau, mc_passes=args.mc_passes,
                      batch_size=args.batch_size, report=not args.no_report, label_map=args.label_map,
                      novelty=args.novelty, reviewed=reviewed)
        result = evaluate(ensemble, args.data, out=args.out, reviewed_runs=[old] if old else [], **common)
        before = (evaluate(old, args.data, out=Path(args.out) / "against", reviewed_runs=[ensemble], **common)
                  if old else None)
    except (FileNotFoundError, ValueError) as exc:
        print(f"aax evaluate: {exc}", file=sys.stderr)
        return 2
    print(result["tables"])
    if before is not None:
        from aax.evaluation.tables import comparison_markdown

        table = comparison_markdown(before, result, (f"{args.against}", f"{args.run}"))
        (Path(args.out) / "comparison.md").write_text(table + "\n", encoding="utf-8")
        print(f"\n{args.against} and {args.run} on the same images:\n\n{table}")
    for err in result["errors"]:
        print(f"error: {err['image']}: {err['error']}", file=sys.stderr)
    written = "metrics.json, tables.md, per_image.csv" + ("" if args.no_report else ", report.html")
    print(f"written to {args.out}: {written}", file=sys.stderr)
    return 0
