"""``aax annotate RUN INPUT --out OUT``: annotate a folder or dataset with a trained ensemble."""

from __future__ import annotations

import argparse
import json
import sys

from aax.cli._common import (add_device_argument, add_ray_arguments, non_negative_int, positive_float,
                             positive_int, unit_float)
from aax.models.mask_settings import MAP_SOURCES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("annotate", help="annotate images with a trained ensemble",
                       description="Run a trained ensemble over INPUT: a decision, uncertainties and "
                                   "saliency maps per image, and a mask where members agree with confidence.")
    p.add_argument("run", help="RUN folder written by `aax train`")
    p.add_argument("input", help="a folder of images (searched recursively), a CSV manifest or a TBX11K folder")
    p.add_argument("--out", required=True, help="output folder (annotations.sqlite, masks/, summary.json)")
    p.add_argument("--mc-passes", type=positive_int, default=None, help="MC Dropout passes K (default: the RUN's, 30)")
    p.add_argument("--theta", type=unit_float, default=None, help="uncertainty threshold (default: the RUN's)")
    p.add_argument("--tau", type=_tau, default=None,
                   help="saliency threshold for masks in [0, 1], or 'otsu' (each image's own; default: the RUN's)")
    p.add_argument("--map-stride", type=int, choices=[32, 16, 8], default=None,
                   help="output stride of the pass the maps come from (default: the RUN's)")
    p.add_argument("--fusion", choices=["min", "mean", "vote"], default=None,
                   help="how agreeing members' maps form the mask (default: the RUN's; min = intersection)")
    p.add_argument("--map-source", choices=list(MAP_SOURCES), default=None,
                   help="the maps masks are fused from: cam = XGrad-CAM (the paper's), patch = where the "
                        "features are far from every patch of the negative training images (needs the "
                        "RUN's patch bank, which `aax calibrate RUN --map-sources cam patch` makes; docs/quality.md), "
                        "segmentation = the members' segmentation heads (a RUN retrained on 10 or more reviewed "
                        "masks; docs/reviews.md). Default: the RUN's")
    p.add_argument("--refine", choices=["none", "superpixels"], default=None,
                   help="average the fused map over the image's superpixels before tau (superpixels), or "
                        "threshold it as it is (none, the paper's). Default: the RUN's (new runs: superpixels)")
    p.add_argument("--tta-scales", type=positive_float, nargs="+", default=None, metavar="S",
                   help="CAM test-time augmentation: input scales whose maps are averaged, e.g. 1 1.5 2")
    p.add_argument("--tta-flip", action=argparse.BooleanOptionalAction, default=None,
                   help="CAM test-time augmentation: average the mirrored image's map too")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="images per batch (default: chosen for the device and input size)")
    p.add_argument("--workers", type=non_negative_int, default=None,
                   help="decoding worker processes (default: none on a CPU with 2 cores or fewer, "
                        "where the models use every core; 1 with more; up to 4 with CUDA)")
    p.add_argument("--save-saliency", action="store_true", help="also write saliency overlays to OUT/saliency/")
    p.add_argument("--overwrite", action="store_true", help="start afresh when OUT holds other settings")
    p.add_argument("--amp", action="store_true", help="mixed precision backbones (CUDA)")
    p.add_argument("--no-novelty", dest="novelty", action="store_false",
                   help="skip the novelty step (images far from the training data go to review as "
                        "'novel'); the scores are still recorded")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory format (default: on for CPUs, off for CUDA)")
    add_device_argument(p)
    add_ray_arguments(p, "annotate in a pool of actors")
    p.set_defaults(func=run)


def _tau(text: str) -> float | str:
    if text == "otsu":
        return text
    try:
        return unit_float(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc}; or 'otsu'") from None


def run(args: argparse.Namespace) -> int:
    """Run ``aax annotate``: 0 when every input was annotated, 1 when some could not be
    read (each is listed), 2 when the run could not start, 130 on Ctrl-C."""
    from aax.annotation.annotate import annotate_to_folder
    from aax.models.ensemble import Ensemble

    if args.actors is not None and args.ray is None:
        raise ValueError("--actors needs --ray")
    if args.ray is not None:
        from aax.scale.cluster import require_ray

        require_ray()  # before the models load: a missing extra is one line, at once
    # with --ray the driver only reads the run's settings: the actors run the models
    driver_device = "cpu" if args.ray is not None else args.device
    ensemble = Ensemble.load(args.run, device=driver_device, channels_last=args.channels_last)
    changes = {k: v for k, v in (("map_stride", args.map_stride), ("fusion", args.fusion),
                                 ("source", args.map_source), ("refine", args.refine),
                                 ("tta_scales", args.tta_scales), ("tta_flip", args.tta_flip)) if v is not None}
    ensemble.maps = ensemble.maps.replace(**changes)
    try:
        options = dict(theta=args.theta, tau=args.tau, mc_passes=args.mc_passes, batch_size=args.batch_size,
                       save_saliency=args.save_saliency, overwrite=args.overwrite, novelty=args.novelty,
                       amp=args.amp)
        if args.ray is not None:
            from aax.scale.annotate import annotate_to_folder_ray

            summary = annotate_to_folder_ray(ensemble, args.input, args.out, address=args.ray, actors=args.actors,
                                             threads=args.threads, **options,
                                             gpus=False if args.device and args.device.startswith("cpu") else None)
        else:
            summary = annotate_to_folder(ensemble, args.input, args.out, workers=args.workers, **options)
    except KeyboardInterrupt:
        print(f"\naax annotate: interrupted; {_stored(args.out)} images are stored in {args.out}. "
              "Run the same command again to resume: nothing stored is done twice.", file=sys.stderr)
        return 130
    shown = {k: summary.get(k) for k in ("images", "annotated", "errors", "masks", "drafts", "decisions", "flag_rate")}
    print(json.dumps(shown, indent=2))
    for err in summary["error_list"]:
        print(f"error: {err['image']}: {err['error']}", file=sys.stderr)
    if summary.get("skipped_already_done"):
        print(f"resumed: {summary['skipped_already_done']} images were already done and were skipped",
              file=sys.stderr)
    quality = summary.get("mask_quality") or {}
    if quality.get("warning"):
        print(f"WARNING: {quality['warning']}", file=sys.stderr)
    flagged = summary["decisions"].get("review", 0)
    drafts = f", drafts for the reviewer: {args.out}/drafts/" if summary.get("drafts") else ""
    print(f"annotations: {args.out}/annotations.sqlite, masks: {args.out}/masks/{drafts}", file=sys.stderr)
    print(f"review list ({flagged} flagged images, most uncertain first): {summary['review_list'][0]}",
          file=sys.stderr)
    return 1 if summary["errors"] else 0


def _stored(out: str) -> int:
    import sqlite3
    from pathlib import Path

    from aax.annotation.store import DB_NAME

    try:
        with sqlite3.connect(Path(out) / DB_NAME) as db:
            return int(db.execute("SELECT COUNT(*) FROM annotations").fetchone()[0])
    except sqlite3.Error:
        return 0
