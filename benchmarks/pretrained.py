#!/usr/bin/env python
"""Pretrained against from-scratch members on one held-out split: each member against AAX
and the trivial masks, how often the members disagree, and open-set pairs.

For each configuration (``--configs``) an ensemble is trained on TRAIN with ``aax train``'s
code and calibrated on its validation split (``aax calibrate``), then scored on TEST with
``aax evaluate``'s code: accuracy, kept accuracy, flag rate, mean IoU (the paper's: flagged
or wrong images score 0) and the IoU of the masks given, for each member alone and for
AAX, beside the whole image and a centred box (on all positives, and on the images AAX
gave a mask for). Each ``--unseen NAME=PATH`` set (images of a kind never trained on) is
annotated too: the share sent to review, the share called novel, the AUROC of the run's
novelty score, and the share of seen test images called novel.

Configurations:

- ``pretrained``: the defaults of ``aax train`` (three ImageNet EfficientNet-Lite members),
- ``pretrained-lr1e-4``: the same at the paper's fine-tuning learning rate,
- ``pretrained-no-bn``: the same without re-estimating batch norm after each epoch,
- ``scratch``: the same three members from scratch (``--pretrained none``),
- ``paper-scratch``: ResNet-50, EfficientNet-B0 and DenseNet-121 from scratch,
- ``mix``: EfficientNet-Lite0 and -Lite2 (pretrained) with the paper's EfficientNet-B0
  (pretrained where torch hub can download its weights, from scratch otherwise),
- ``mix-resnet``: the same with ResNet-50 in place of EfficientNet-B0.

    python benchmarks/pretrained.py --train SPLIT/train.csv --test SPLIT/test.csv \\
        --out OUT --configs pretrained scratch --negative-class normal \\
        --class-weights balanced --unseen bsdata=BSDATA/test.csv

Runs are kept in OUT and reused; ``OUT/pretrained.json`` and ``OUT/pretrained.md`` hold the
tables.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

from aax.data import find_images, open_dataset
from aax.evaluation.calibrate import calibrate_run
from aax.evaluation.evaluate import evaluate
from aax.evaluation.openset import compare
from aax.models.ensemble import Ensemble
from aax.models.members import DEFAULT_MEMBERS, PAPER_MEMBERS
from aax.training.train import TrainConfig, train

CONFIGS: dict[str, dict[str, Any]] = {
    "pretrained": {},
    "pretrained-lr1e-4": {"lr": 1e-4},
    "pretrained-no-bn": {"recalibrate_bn": False},
    "scratch": {"pretrained": None},
    "paper-scratch": {"pretrained": None, "members": PAPER_MEMBERS},
    "mix": {"members": ("efficientnet-lite0", "efficientnet-lite2", "efficientnet-b0")},
    "mix-resnet": {"members": ("efficientnet-lite0", "efficientnet-lite2", "resnet50")},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=Path, required=True, help="training data (a manifest or folder)")
    p.add_argument("--test", type=Path, required=True, help="held-out test data with masks")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["pretrained", "scratch"])
    p.add_argument("--unseen", nargs="*", default=[], metavar="NAME=PATH",
                   help="images of a kind never trained on (a manifest, a folder of images)")
    p.add_argument("--image-size", type=int, default=None, help="default: aax train's")
    p.add_argument("--epochs", type=int, default=None, help="default: aax train's")
    p.add_argument("--scratch-epochs", type=int, default=None,
                   help="maximum epochs of the from-scratch configurations (default: aax train's)")
    p.add_argument("--negative-class", default=None)
    p.add_argument("--class-weights", choices=["balanced"], default=None)
    p.add_argument("--no-hflip", action="store_true")
    p.add_argument("--weights", nargs="*", default=[], metavar="NAME=PATH",
                   help="a member's pretrained checkpoint, where its installed one is not to be used")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def train_config(name: str, args: argparse.Namespace) -> TrainConfig:
    """The training settings of configuration ``name``."""
    settings: dict[str, Any] = {"seed": args.seed, "device": args.device, "progress": False,
                                "negative_class": args.negative_class, "class_weights": args.class_weights,
                                "hflip": not args.no_hflip, **CONFIGS[name]}
    settings.setdefault("members", DEFAULT_MEMBERS)
    if args.image_size:
        settings["image_size"] = args.image_size
    scratch = settings.get("pretrained", "imagenet") is None
    epochs = args.scratch_epochs if scratch and args.scratch_epochs else args.epochs
    if epochs:
        settings["epochs"] = epochs
    if settings.get("pretrained", "imagenet") is not None:
        given = dict(item.split("=", 1) for item in args.weights)
        settings["weights"] = {k: v for k, v in given.items() if k in settings["members"]}
        if not _downloadable(settings["members"], settings["weights"]):
            # Members whose weights are installed start from them; the others from scratch.
            settings["weights"].update(_installed(settings["members"], settings["weights"]))
            settings["pretrained"] = None
    return TrainConfig(**settings)


def _installed(members: tuple[str, ...], weights: dict[str, str]) -> dict[str, str]:
    """Member -> its installed ImageNet checkpoint, for members without given weights."""
    from aax.models.members.weights import IMAGENET_PACKAGES, imagenet_source

    return {m: imagenet_source(m) for m in members if m in IMAGENET_PACKAGES and m not in weights}


def _downloadable(members: tuple[str, ...], weights: dict[str, str]) -> bool:
    """Whether every member without given weights has an ImageNet checkpoint here."""
    from aax.models.members.weights import IMAGENET_PACKAGES

    return all(m in weights or m in IMAGENET_PACKAGES for m in members)


def disagreement(per_image: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """How often the members' predicted classes differ: on any pair, and for each pair."""
    rows = [r for r in per_image if r.get("set") == "data" and r.get("status") == "ok"]
    preds = [[r.get(f"{n}_predicted", r.get(f"{n}_decision")) for n in names] for r in rows]
    out: dict[str, Any] = {"n": len(rows),
                           "any": sum(len(set(p)) > 1 for p in preds) / max(1, len(rows)), "pairs": {}}
    for (i, a), (j, b) in itertools.combinations(enumerate(names), 2):
        out["pairs"][f"{a} / {b}"] = sum(p[i] != p[j] for p in preds) / max(1, len(rows))
    return out


def open_set(ensemble: Ensemble, result: dict[str, Any], name: str, path: str) -> dict[str, Any]:
    """Flag and novelty rates of AAX on an unseen set, and the AUROC of the run's score."""
    source = Path(path)
    images = ([s.image for s in open_dataset(source)] if source.suffix == ".csv"
              else find_images(source))
    records = list(ensemble.annotate(images, theta=result["settings"]["theta"]))
    summary = compare(result, records, ensemble, data=path)
    score = summary.get("score")
    rows = [r for r in summary["rows"] if r.get("score") == score]
    quorum = [r for r in rows if str(r.get("method", "")).startswith("AAX")]
    return {"name": name, "n": summary["n"], "score": score,
            "sent_to_review": summary["flag_rate_unseen"], "novel_unseen": summary["novel_rate_unseen"],
            "novel_seen": summary["novel_rate_seen"],
            "auroc_members": {r["method"]: r["auroc"] for r in rows if r not in quorum},
            "auroc_aax": quorum[0]["auroc"] if quorum else None}


def run_config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    config = train_config(name, args)
    run = args.out / name
    t0 = time.perf_counter()
    if not (run / "aax.json").is_file() or '"status": "complete"' not in (run / "aax.json").read_text():
        config.resume = run.exists()
        train(args.train, run, config)
        calibrate_run(run, device=args.device)
    seconds = time.perf_counter() - t0
    ensemble = Ensemble.load(run, device=args.device)
    result = evaluate(ensemble, args.test, out=args.out / f"{name}-eval", report=False)
    names = list(result["members"])
    manifest = json.loads((run / "aax.json").read_text())
    return {
        "config": name, "members": names, "train_seconds": round(seconds, 1),
        "init": {m["name"]: m.get("init") for m in manifest["members"]},
        "image_size": manifest["image_size"], "theta": result["settings"]["theta"],
        "scores": {**{n: result["members"][n] for n in names}, "AAX": result["ensemble"]},
        "trivial": result.get("trivial", {}),
        "disagreement": disagreement(result["per_image"], names),
        "open_set": [open_set(ensemble, result, *item.split("=", 1)) for item in args.unseen],
    }


def _pct(v: Any) -> str:
    return "" if v is None else f"{100 * v:.1f}"


def _num(v: Any) -> str:
    return "" if v is None else f"{v:.3f}"


def markdown(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        lines += [f"### {r['config']} ({r['image_size']} px; {', '.join(f'{k}: {v}' for k, v in r['init'].items())}; "
                  f"trained and calibrated in {r['train_seconds']:.0f} s)", "",
                  "| | accuracy | kept accuracy | flagged | IoU mean (paper's) | IoU given (n) |",
                  "|---|---|---|---|---|---|"]
        for n, s in r["scores"].items():
            lines.append(f"| {n} | {_pct(s['accuracy'])} | {_pct(s['accuracy_kept'])} | {_pct(s['flag_rate'])} "
                         f"| {_pct(s['iou_mean'])} | {_pct(s.get('iou_mean_given'))} ({s.get('n_masks_given')}) |")
        for n, s in r["trivial"].items():
            lines.append(f"| {n} | | | | {_pct(s['iou_mean'])} | {_pct(s.get('iou_mean_given'))} "
                         f"({s.get('n_masks_given')}) |")
        d = r["disagreement"]
        lines += ["", f"Members disagree on {_pct(d['any'])} % of test images "
                  f"({', '.join(f'{k} {_pct(v)} %' for k, v in d['pairs'].items())})."]
        for o in r["open_set"]:
            lines.append(f"Open set `{o['name']}` ({o['n']} images): {_pct(o['sent_to_review'])} % sent to review, "
                         f"{_pct(o['novel_unseen'])} % called novel (seen test images: {_pct(o['novel_seen'])} %); "
                         f"{o['score']} AUROC AAX {_num(o['auroc_aax'])}, members "
                         f"{', '.join(f'{v:.3f}' for v in o['auroc_members'].values() if v is not None)}.")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.configs:
        print(f"== {name}", flush=True)
        results.append(run_config(name, args))
        (args.out / "pretrained.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        text = markdown(results)
        (args.out / "pretrained.md").write_text(text + "\n")
        print(markdown(results[-1:]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
