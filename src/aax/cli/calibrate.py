"""``aax calibrate RUN VALDATA``: choose theta (and tau) on validation data, into the RUN."""

from __future__ import annotations

import argparse
import sys

from aax.cli._common import _number, add_device_argument, add_label_map_argument, positive_int, unit_float
from aax.models.mask_settings import MAP_SOURCES

_pass_rate = _number(float, 0.0, 1.0, low_open=True)


def register(sub: argparse._SubParsersAction) -> None:
    from aax.models.novelty import MIN_PER_CLASS, SCORES

    p = sub.add_parser("calibrate", help="choose theta and tau on validation data",
                       description="Annotate VALDATA once and choose theta (best accuracy on the images not "
                                   "flagged, with at most --max-flag-rate of them flagged) and, where VALDATA "
                                   "has ground-truth masks, tau (best mean IoU). Writes both into RUN/aax.json "
                                   "with a calibration entry, and the risk-coverage curve into RUN/calibration/.")
    p.add_argument("run", help="RUN folder written by `aax train`")
    p.add_argument("valdata", nargs="?", default=None,
                   help="labelled validation data (default: the validation split recorded in the RUN)")
    p.add_argument("--max-flag-rate", type=unit_float, default=0.2,
                   help="largest share of validation images theta may flag (default 0.2)")
    p.add_argument("--fusions", nargs="+", choices=["min", "mean", "vote"], default=["min", "mean", "vote"],
                   help="mask fusions to choose from where VALDATA has masks (default: all three; "
                        "'min' alone keeps the paper's intersection)")
    p.add_argument("--all-members", dest="choose_members", action="store_false",
                   help="fuse every agreeing member's map, as the paper does (default: where VALDATA has masks, "
                        "also choose the set of members whose maps form masks: a member whose maps lower the "
                        "validation IoU is left out of the masks, never out of the class decision)")
    p.add_argument("--refines", nargs="+", choices=["none", "superpixels"], default=["none", "superpixels"],
                   help="refinements of the fused map to choose from where VALDATA has masks (default: both; "
                        "'none' alone keeps the paper's thresholded map; superpixels: the map averaged over "
                        "the image's regions, docs/method.md)")
    p.add_argument("--map-sources", nargs="+", choices=list(MAP_SOURCES), default=None,
                   help="the map sources to choose from where the validation data has masks (default: the "
                        "RUN's own, XGrad-CAM unless set). With patch, the RUN's patch bank is made first "
                        "from its negative training images (docs/quality.md: patch maps cost 1.6x stride-32 "
                        "annotation); segmentation needs members retrained on 10 or more reviewed masks")
    p.add_argument("--tau-without-masks", choices=["keep", "otsu"], default="keep",
                   help="without ground-truth masks: keep the RUN's tau, or use each image's Otsu "
                        "threshold (default keep)")
    p.add_argument("--mc-passes", type=positive_int, default=None, help="MC Dropout passes K (default: the RUN's)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="images per batch (default: chosen for the device and input size)")
    add_label_map_argument(p)
    p.add_argument("--no-novelty", dest="novelty", action="store_false",
                   help="leave the novelty features and thresholds as they are")
    p.add_argument("--novelty-score", choices=list(SCORES), default=None,
                   help="the score the novelty step thresholds (default: the RUN's; new runs get knn when their members start from ImageNet weights, maha from scratch)")
    p.add_argument("--novelty-pass-rate", type=_pass_rate, default=None,
                   help="share of in-distribution validation images each member's novelty threshold "
                        "lets pass, in (0, 1] (default: the RUN's, else 0.95)")
    p.add_argument("--novelty-thresholds", choices=["per-class", "pooled"], default=None,
                   help="per-class: one threshold per class a member predicts (each class's validation "
                        f"images pass at the pass rate; a class with under {MIN_PER_CLASS} uses the pooled "
                        "one); pooled: one threshold over all validation images (default: the RUN's, else "
                        "per-class)")
    p.add_argument("--novelty-images", default=None, metavar="PATH",
                   help="in-distribution images to set the novelty thresholds on instead of the validation "
                        "data: a folder or dataset, no labels needed, unseen by training. A threshold set on "
                        "30 images of a class passes 93.5%% of new ones on average but under 85.1%% one time in "
                        "20; hundreds per class keep the pass rate asked for (docs/novelty.md)")
    add_device_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from aax.evaluation.calibrate import calibrate
    from aax.evaluation.calibration.files import split_name, validation_split
    from aax.evaluation.tables import tau_text
    from aax.models.ensemble import Ensemble

    try:
        ensemble = Ensemble.load(args.run, device=args.device)
        valdata = args.valdata if args.valdata is not None else validation_split(args.run)
        name = None if args.valdata is not None else split_name(valdata)
        result = calibrate(ensemble, valdata, max_flag_rate=args.max_flag_rate, mc_passes=args.mc_passes,
                           batch_size=args.batch_size, data_name=name, label_map=args.label_map,
                           novelty=args.novelty, novelty_score=args.novelty_score,
                           novelty_pass_rate=args.novelty_pass_rate,
                           novelty_per_class=(None if args.novelty_thresholds is None
                                              else args.novelty_thresholds == "per-class"),
                           fusions=tuple(args.fusions),
                           tau_without_masks=None if args.tau_without_masks == "keep" else args.tau_without_masks,
                           sources=args.map_sources, choose_members=args.choose_members,
                           refines=tuple(args.refines), novelty_images=args.novelty_images)
    except (FileNotFoundError, ValueError) as exc:
        print(f"aax calibrate: {exc}", file=sys.stderr)
        return 2
    prev = result["previous"]
    print(f"theta = {result['theta']:.4g} (was {prev['theta']:.4g}): accuracy on kept images "
          f"{_pct(result['accuracy_kept'])}, flag rate {_pct(result['flag_rate'])} on {result['n']} images")
    if result["iou_mean"] is not None:
        print(f"tau = {tau_text(result['tau'])}, fusion {result['fusion']}, {result.get('source', 'cam')} maps, "
              f"refinement {result.get('refine', 'none')} (was {tau_text(prev['tau'])}, {prev['fusion']}, "
              f"{prev.get('source', 'cam')}, {prev.get('refine', 'none')}): mean IoU "
              f"{_pct(result['iou_mean'])} on {result['n_masks']} masks")
        sets = result.get("member_sets") or []
        if result.get("mask_members"):
            everyone = next((r for r in sets if r["mask_members"] is None), None)
            print(f"masks fuse the maps of {', '.join(result['mask_members'])} only (all members: mean IoU "
                  f"{_pct(everyone and everyone['iou_mean'])}); every member still votes on the class")
        for row in result.get("sources") or []:
            if "skipped" in row:
                print(f"  {row['source']} maps: skipped ({row['skipped']})")
            else:
                print(f"  {row['source']} maps: mean IoU {_pct(row['iou_mean'])} ({row['fusion']}, "
                      f"tau {tau_text(row['tau'])})")
    else:
        print(f"tau = {tau_text(result['tau'])} (no ground-truth masks; was {tau_text(prev['tau'])})")
    print_trivial(result)
    patches = result.get("patches") or {}
    if "skipped" in patches:
        print(f"patch bank: not made ({patches['skipped']})", file=sys.stderr)
    print_novelty(result.get("novelty"))
    if result.get("warning"):
        print(f"warning: {result['warning']}", file=sys.stderr)
    print(f"written to {args.run}/aax.json and {args.run}/calibration/", file=sys.stderr)
    return 0


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def print_trivial(result: dict) -> None:
    """The trivial masks' IoU beside the ensemble's, and the warning when they win."""
    trivial = result.get("trivial")
    if not trivial:
        return
    print("trivial masks on the same images: " + ", ".join(
        f"{name} {_pct(v.get('iou_mean'))}" for name, v in trivial.items()))
    if result.get("mask_warning"):
        print(f"WARNING: {result['mask_warning']}", file=sys.stderr)


def print_novelty(block: dict | None) -> None:
    """One line per member: the novelty threshold and its flag rate on the validation images."""
    if not block:
        return
    if "skipped" in block:
        print(f"novelty: not set ({block['skipped']})", file=sys.stderr)
        return
    score, val = block["score"], block["validation"]
    def limit(entry: dict) -> str:
        by_class = entry.get("by_class") or {}
        own = "; ".join(f"{c} {e['threshold']:.4g}" for c, e in by_class.items())
        return f"{entry['threshold']:.4g}" + (f" [predicted {own}]" if own else "")

    limits = ", ".join(f"{n} {limit(t[score])} (flags {_pct(val['flag_rate'][n])})"
                       for n, t in block["thresholds"].items())
    images = f"images of {val['source']}" if val.get("source") else "validation images"
    print(f"novelty ({score}, {block['pass_rate']:.0%} of {val['n']} {images} pass): {limits}; "
          f"quorum flags {_pct(val['flag_rate_quorum'])}")
    new = block.get("new_images")
    if new:  # what the smallest split lets pass of new images: the figure users plan review by
        of = f"{new['n']} {images}" + (f" predicted {new['class']}" if new.get("class") else "")
        print(f"novelty on new in-distribution images: a threshold set on {of} lets pass "
              f"{_pct(new['expected'])} on average, at least {_pct(new['low'])} "
              f"{round(1 / new['level']) - 1} times in {round(1 / new['level'])}")
    if block.get("warning"):
        print(f"WARNING: {block['warning']}", file=sys.stderr)
