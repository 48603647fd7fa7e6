#!/usr/bin/env python
"""What reviews buy: AAX retrained on N reviewed images, per review order, against the
same N masks used alone, on a test split no review touched.

A simulated reviewer answers with the data's ground truth:

1. RUN0 is trained on TRAIN (image-level labels only) and calibrated, as ``aax train`` does.
2. RUN0 annotates its own training images (the pool a team would have annotated and
   flagged) into ``OUT/pool``; each review order (:data:`aax.annotation.review_list.ORDERS`)
   ranks every image of it (``aax review --all --order ...``).
3. For each order and budget N, the first N images are "reviewed": their true class and,
   for positives, their true mask. A new RUN is trained on TRAIN with those reviews
   (:func:`aax.training.train.train` with ``reviews``, what ``aax retrain`` calls) and
   calibrated (on the reviewed masks too, from 10 of them).
4. Every RUN is evaluated on TEST (``aax evaluate``): accuracy, kept accuracy, flag rate,
   AAX's and each member's mean IoU over all positives (a flag or a miss scores 0) and of
   the masks given, and over all positives with AAX's drafts counted on the flagged images
   (what a person starts from on every image); the trivial masks (whole image, centred
   box) beside them.
5. The plain supervised baseline: a MONAI UNet trained on the same N reviewed masks alone
   (:mod:`_segbaseline`), mean IoU over the same positives.

Results go to ``OUT/reviews.json`` after every run (a rerun continues where it stopped),
the table to ``OUT/reviews.md`` and the curves to ``OUT/reviews.png``::

    python benchmarks/reviews.py --train busi_split/train.csv --test busi_split/test.csv \\
        --out OUT --negative-class normal --class-weights balanced --size 128 --epochs 8

Rerunning into the same OUT with another ``--localisation-loss`` / ``--localisation-weight``,
``--segmentation-weight`` / ``--segmentation-epochs`` (the heads' refit), or with ``--warm-start`` (retrained runs start from RUN0's members, for ``--retrain-epochs``),
adds rows for that setting (RUN0 and the review lists are reused).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from aax.annotation.annotate import annotate_to_folder  # noqa: E402
from aax.annotation.review_list import ORDERS, review_list  # noqa: E402
from aax.data import open_dataset  # noqa: E402
from aax.evaluation.calibrate import calibrate_run  # noqa: E402
from aax.evaluation.evaluate import evaluate  # noqa: E402
from aax.models.ensemble import Ensemble  # noqa: E402
from aax.training.reviewed import ReviewedImage  # noqa: E402
from aax.training.train import TrainConfig, train  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", required=True, help="training data (a CSV manifest with masks, or a folder)")
    p.add_argument("--test", required=True, help="held-out test data with masks")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--budgets", type=int, nargs="+", default=[25, 50, 100, 200],
                   help="review budgets, run in the order given (default 25 50 100 200)")
    p.add_argument("--orders", nargs="+", choices=ORDERS, default=list(ORDERS))
    p.add_argument("--size", type=int, default=128, help="input side (default 128)")
    p.add_argument("--epochs", type=int, default=8, help="maximum epochs per member (default 8)")
    p.add_argument("--negative-class", default=None)
    p.add_argument("--class-weights", choices=["balanced"], default=None)
    p.add_argument("--localisation-weight", type=float, default=0.1)
    p.add_argument("--localisation-loss", choices=["bce", "spatial"], default="bce")
    p.add_argument("--segmentation-weight", type=float, default=0.0,
                   help="above 0: the retrained members get segmentation heads and masks come from them")
    p.add_argument("--segmentation-epochs", type=int, default=60,
                   help="epochs the heads are refitted on the masks over frozen features (0: none; default 60)")
    p.add_argument("--segmentation-views", type=int, default=14,
                   help="augmented views of each masked image the refit learns from (default 14)")
    p.add_argument("--warm-start", action="store_true",
                   help="retrained runs start from RUN0's members (aax retrain --warm-start)")
    p.add_argument("--retrain-epochs", type=int, default=None,
                   help="maximum epochs per member of the retrained runs (default: --epochs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unet-epochs", type=int, default=60)
    p.add_argument("--no-baseline", action="store_true", help="skip the UNet baseline")
    return p.parse_args(argv)


def _config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(image_size=args.size, epochs=args.epochs, negative_class=args.negative_class,
                       class_weights=args.class_weights, localisation_weight=args.localisation_weight,
                       localisation_loss=args.localisation_loss,
                       seed=args.seed, progress=False)


def _retrain_config(args: argparse.Namespace, config: TrainConfig, run0: Path) -> TrainConfig:
    return TrainConfig(**{**config.__dict__, "epochs": args.retrain_epochs or args.epochs,
                          "segmentation_weight": args.segmentation_weight,
                          "segmentation_epochs": args.segmentation_epochs,
                          "segmentation_views": args.segmentation_views,
                          "warm_start": str(run0.resolve()) if args.warm_start else None})


def _trained(data: Any, out: Path, config: TrainConfig, reviews: list[ReviewedImage] | None = None) -> Path:
    if not (out / "aax.json").is_file() or json.loads((out / "aax.json").read_text()).get("calibration") is None:
        t0 = time.perf_counter()
        train(data, out, TrainConfig(**{**config.__dict__, "resume": True}), reviews=reviews)
        calibrate_run(out)
        print(f"  trained and calibrated {out.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def _scores(run: Path, test: Any) -> dict[str, Any]:
    ensemble = Ensemble.load(run)
    result = evaluate(ensemble, test, report=False)
    e = result["ensemble"]
    positive = set(ensemble.classes) - {ensemble.negative_class}
    return {"given_images": sorted(str(Path(r["image"]).resolve()) for r in result["per_image"]
                                   if r.get("set") == "data" and r.get("status") == "ok" and r["decision"] in positive),
            "accuracy": e["accuracy"], "accuracy_kept": e["accuracy_kept"], "flag_rate": e["flag_rate"],
            "iou_mean": e.get("iou_mean"), "iou_mean_given": e.get("iou_mean_given"),
            "n_masks_given": e.get("n_masks_given"), "iou_mean_with_drafts": e.get("iou_mean_with_drafts"),
            "iou_mean_drafts": e.get("iou_mean_drafts"), "n_drafts": e.get("n_drafts"),
            "members": {n: m.get("iou_mean") for n, m in result["members"].items()},
            "trivial": {n: m.get("iou_mean") for n, m in result["trivial"].items()}}


DEFAULT_LOCALISATION = ("bce", 0.1)


def _setting(args: argparse.Namespace) -> str:
    """The localisation setting as a suffix of row keys and run folders ("" for the default)."""
    tag = "" if (args.localisation_loss, args.localisation_weight) == DEFAULT_LOCALISATION else \
        f"-{args.localisation_loss}{args.localisation_weight:g}"
    if args.segmentation_weight:
        tag += f"-seg{args.segmentation_weight:g}"
        if args.segmentation_epochs:
            tag += f"-refit{args.segmentation_epochs}"
            if args.segmentation_views:
                tag += f"-views{args.segmentation_views}"
    if args.warm_start:
        tag += f"-warm{args.retrain_epochs or args.epochs}"
    return tag


def _reviews(entries: list[dict], n: int, truth: dict[str, Any], negative: str) -> list[ReviewedImage]:
    out = []
    for e in entries[:n]:
        sample = truth[str(Path(e["path"]).resolve())]
        mask = Path(sample.mask_path).resolve() if sample.mask_path and sample.label != negative else None
        out.append(ReviewedImage(Path(e["path"]).resolve(), sample.label, mask, "simulated reviewer"))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "reviews.json"
    results = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
    results["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config = _config(args)
    train_data, test = open_dataset(args.train), open_dataset(args.test)
    negative = config.negative_class or "normal"

    run0 = _trained(args.train, args.out / "run-0", config)
    if "iou_mean_with_drafts" not in results["rows"].get("0", {}):  # new, or stored before drafts
        results["rows"]["0"] = {"budget": 0, "order": None, **_scores(run0, test)}
        path.write_text(json.dumps(results, indent=2))
    manifest = json.loads((run0 / "aax.json").read_text())
    pool = [train_data[i] for i in manifest["data"]["train_indices"]]
    truth = {str(Path(s.image).resolve()): s for s in pool}
    pool_csv = args.out / "pool.csv"
    pool_csv.write_text("image,label\n" + "".join(f"\"{Path(s.image).resolve()}\",{s.label}\n" for s in pool))
    annotate_to_folder(Ensemble.load(run0), pool_csv, args.out / "pool", progress=False)

    positives = [s for s in test if s.label != negative and s.mask_path]
    ranked = {order: review_list(args.out / "pool", args.out / f"order-{order}", order=order, include_all=True,
                                 seed=args.seed)["entries"] for order in args.orders}
    for n in args.budgets:  # budgets outermost: the orders compare at a budget as soon as it is done
        for order, entries in ranked.items():
            key = f"{order}:{n}{_setting(args)}"
            row = results["rows"].get(key)
            if (row is not None and (args.no_baseline or "unet_iou_given" in row)
                    and "iou_mean_with_drafts" in row):
                continue
            reviews = _reviews(entries, n, truth, negative)
            if row is None:
                t0 = time.perf_counter()
                retrain_config = _retrain_config(args, config, run0)
                run = _trained(args.train, args.out / f"run-{order}-{n}{_setting(args)}", retrain_config, reviews)
                row = {"budget": n, "order": order, "n_masks": sum(r.mask is not None for r in reviews),
                       "localisation": {"loss": args.localisation_loss, "weight": args.localisation_weight},
                       "segmentation_weight": args.segmentation_weight,
                       "segmentation_epochs": args.segmentation_epochs if args.segmentation_weight else 0,
                       "segmentation_views": (args.segmentation_views if args.segmentation_weight
                                              and args.segmentation_epochs else 0),
                       "warm_start": args.warm_start, "epochs": retrain_config.epochs, **_scores(run, test)}
                row["seconds"] = round(time.perf_counter() - t0, 1)  # retraining, calibration and scoring
            elif "given_images" not in row or "iou_mean_with_drafts" not in row:
                # a row stored before the given images or the drafts were kept: score its run again
                row.update(_scores(args.out / f"run-{order}-{n}{_setting(args)}", test))
            if not args.no_baseline:  # also for a row stored without it
                # the UNet sees only the reviews: one per order, budget and its own settings
                unet_key = f"{order}:{n}:{args.size}:{args.unet_epochs}:{args.seed}"
                unets = results.setdefault("unet", {})
                if not isinstance(unets.get(unet_key), dict):  # its IoU on each positive test image
                    from _segbaseline import image_ious, train_unet

                    masked = [r for r in reviews if r.mask is not None]
                    net = train_unet([r.path for r in masked], [r.mask for r in masked], args.size,
                                     args.unet_epochs, args.seed)
                    unets[unet_key] = dict(zip((str(Path(s.image).resolve()) for s in positives),
                                               image_ious(net, [s.image for s in positives],
                                                          [s.mask_path for s in positives], args.size)))
                ious = unets[unet_key]
                row["unet_iou_mean"] = sum(ious.values()) / max(1, len(ious))
                # on the images AAX gives a mask for, as "IoU given" is
                given = [ious[p] for p in row["given_images"] if p in ious]
                row["unet_iou_given"] = sum(given) / len(given) if given else None
            results["rows"][key] = row
            path.write_text(json.dumps(results, indent=2))
            print(f"{key}: accuracy {row['accuracy']:.3f}, IoU {row['iou_mean']:.3f}"
                  + (f", UNet {row['unet_iou_mean']:.3f}" if "unet_iou_mean" in row else ""), flush=True)
    (args.out / "reviews.md").write_text(table(results) + "\n")
    figure(results, args.out / "reviews.png")
    print(table(results))
    return 0


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _localisation(row: dict[str, Any]) -> str:
    loc = row.get("localisation") or dict(zip(("loss", "weight"), DEFAULT_LOCALISATION))
    text = f"{loc['loss']} {loc['weight']:g}"
    if row.get("segmentation_weight"):
        text += f" + segmentation head {row['segmentation_weight']:g}"
        refit = row.get("segmentation_epochs", 0)  # rows stored before the refit had none
        views = row.get("segmentation_views", 0)  # rows stored before the views had none
        text += (f", refit {refit}" + (f" ({views} views)" if views else "")) if refit else ", no refit"
    return text + (f", warm start ({row['epochs']} epochs)" if row.get("warm_start") else "")


def table(results: dict[str, Any]) -> str:
    """The markdown table of ``results`` (budget 0 first, then by order, localisation
    setting and budget)."""
    rows = sorted(results["rows"].values(), key=lambda r: (r["order"] or "", _localisation(r), r["budget"]))
    base = results["rows"].get("0")
    lines = ["| reviews | order | localisation (w) | accuracy | kept accuracy | flagged | AAX IoU (all positives) | "
             "IoU given (n) | AAX + drafts (all positives) | UNet on the same masks: all positives | "
             "UNet: AAX's (n) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in ([base] if base else []) + [r for r in rows if r["budget"]]:
        loc = _localisation(r) if r["budget"] else "–"
        lines.append(f"| {r['budget']} | {r['order'] or '–'} | {loc} | {_pct(r['accuracy'])} | "
                     f"{_pct(r['accuracy_kept'])} | "
                     f"{_pct(r['flag_rate'])} | {_pct(r['iou_mean'])} | {_pct(r['iou_mean_given'])} "
                     f"({r['n_masks_given']}) | {_pct(r.get('iou_mean_with_drafts'))} | "
                     f"{_pct(r.get('unet_iou_mean'))} | {_pct(r.get('unet_iou_given'))} |")
    if base:
        trivial = ", ".join(f"{n} {_pct(v)}" for n, v in base["trivial"].items())
        lines.append(f"\nTrivial masks, mean IoU over the same positives: {trivial}.")
    return "\n".join(lines)


def figure(results: dict[str, Any], path: Path) -> None:
    """Mean IoU (over all positives; over the masks AAX gives) and accuracy against the
    review budget, one line per order and setting, each with the UNet baseline on the same
    images (dashed) and the trivial masks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = results["rows"].get("0")
    fig, (ax_iou, ax_given, ax_acc) = plt.subplots(1, 3, figsize=(15, 6))
    lines = sorted({(r["order"], _localisation(r)) for r in results["rows"].values() if r["order"]})
    for order, loc in lines:
        rows = sorted((r for r in results["rows"].values() if r["order"] == order and _localisation(r) == loc),
                      key=lambda r: r["budget"])
        rows = ([base] if base else []) + rows
        budgets = [r["budget"] for r in rows]
        label = f"AAX, {order} order, {loc}"
        (line,) = ax_iou.plot(budgets, [100 * r["iou_mean"] for r in rows], marker="o", label=label)
        colour = line.get_color()  # one colour a setting in every panel
        ax_acc.plot(budgets, [100 * r["accuracy"] for r in rows], marker="o", color=colour)
        ax_given.plot(budgets, [100 * r["iou_mean_given"] for r in rows], marker="o", color=colour)
        drafts = [(r["budget"], 100 * r["iou_mean_with_drafts"]) for r in rows if r.get("iou_mean_with_drafts") is not None]
        if drafts:  # what a person starts from on every image: the flagged ones' drafts counted
            ax_iou.plot(*zip(*drafts), marker="s", alpha=0.45, color=colour, label=f"{label}, drafts counted")
    # the UNet sees only the masks: one line an order (on the images each row gave masks for)
    for order, style in zip(sorted({r["order"] for r in results["rows"].values() if r["order"]}), ("--", ":", "-.")):
        for ax, key in ((ax_iou, "unet_iou_mean"), (ax_given, "unet_iou_given")):
            points = sorted({r["budget"]: 100 * r[key] for r in results["rows"].values()
                             if r["order"] == order and r.get(key) is not None}.items())
            if points:
                ax.plot(*zip(*points), linestyle=style, marker="x", color="black",
                        label=f"UNet on the same masks, {order} order" if ax is ax_iou else None)
    if base:
        for name, value in base["trivial"].items():
            if value is not None:
                ax_iou.axhline(100 * value, color="grey", linestyle=":", linewidth=1)
                ax_iou.text(0, 100 * value, f" {name}", fontsize=8, color="grey", va="bottom")
    ax_iou.set(xlabel="reviewed images", ylabel="mean IoU (%)",
               title="Masks: every positive test image (missed: 0;\nflagged: its draft (pale), else 0)")
    ax_given.set(xlabel="reviewed images", ylabel="mean IoU (%)", title="Masks: the images AAX gives one for")
    ax_acc.set(xlabel="reviewed images", ylabel="accuracy (%)", title="Classification")
    handles, labels = ax_iou.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * ((len(labels) + 1) // 2), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
