#!/usr/bin/env python
"""Mask quality of each lever on real and synthetic data: the paper's tables, side by side.

For each data set given (a CSV manifest, as ``aax data convert`` writes for BUSI and
BSData, or ``--lesion`` / ``--fire`` for ``aax synth``), a seeded, stratified subsample
is split into train+validation and a held-out test part. The ensemble (``aax train``'s
members) is trained at output stride 32 and at 16, from ImageNet weights and from
scratch (``--init``; short runs: see the printed settings), and for each lever:

- the map settings are set (:class:`aax.models.maps.MapOptions`; the "patch maps" levers use
  the patch-feature novelty maps of :mod:`aax.models.patch_maps`, with a bank fitted from the
  run's negative training images when the run has none),
- theta, tau, the fusion, the mask members and the refinement (superpixels or none)
  are calibrated on the run's validation split (:func:`aax.evaluation.calibrate.calibrate`,
  nothing written to the RUN),
- the test part is evaluated (:func:`aax.evaluation.evaluate.evaluate`): each member alone vs AAX,
  accuracy, flag rate, mean IoU,
- the annotation cost is timed: ``annotate_batch`` on one batch of test images, the
  best of ``--repeats``, relative to stride 32 without augmentation.

Trivial masks are scored beside them: the whole image, and a centred box of half the
image's side. Prints one markdown table per data set and writes everything to
``OUT/quality.json`` (and ``OUT/quality.md``).

    python benchmarks/quality.py --lesion --busi BUSI/manifest.csv \\
        --bsdata BSDATA/manifest.csv --out OUT
    python benchmarks/quality.py --given busi RUN busi_split/test.csv --out OUT   # a trained RUN
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aax.annotation.annotate import AnnotateSettings, annotate_batch
from aax.data import open_dataset, read_image, stratified_split
from aax.data.transforms import prepare
from aax.evaluation.calibrate import calibrate
from aax.evaluation.calibration.files import validation_split
from aax.evaluation.evaluate import evaluate
from aax.evaluation.metrics import MaskScores
from aax.models.ensemble import Ensemble
from aax.models.maps import MapOptions
from aax.models.patch_maps import fit_run as fit_patches
from aax.training.train import TrainConfig, train

# name, trained stride, map options (fusion is calibrated)
LEVERS: list[tuple[str, int, dict[str, Any]]] = [
    ("stride 32 (today)", 32, dict(class_stride=32, map_stride=32)),
    ("32 -> map 16 (2 passes)", 32, dict(class_stride=32, map_stride=16)),
    ("32 -> 16 (1 pass)", 32, dict(class_stride=16, map_stride=16)),
    ("32 -> map 8 (2 passes)", 32, dict(class_stride=32, map_stride=8)),
    ("trained 16", 16, dict(class_stride=16, map_stride=16)),
    ("trained 16 -> map 8", 16, dict(class_stride=16, map_stride=8)),
    ("patch maps (trained 32)", 32, dict(class_stride=32, map_stride=32, source="patch")),
    ("patch maps (trained 16)", 16, dict(class_stride=16, map_stride=16, source="patch")),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lesion", action="store_true", help="synthetic lesions (aax synth --kind lesion)")
    p.add_argument("--fire", action="store_true",
                   help="synthetic fire frames (aax synth --kind fire), at --lesion-size, trained here")
    p.add_argument("--lesion-run", type=Path, default=None,
                   help="use this trained stride-32 RUN for the lesions (e.g. make demo's) instead of training")
    p.add_argument("--lesion-run16", type=Path, default=None,
                   help="with --lesion-run: a RUN trained at output stride 16 on the same data, for the "
                        "'trained 16' rows (aax train --output-stride 16)")
    p.add_argument("--lesion-test", type=Path, default=None, help="the lesion test images (with --lesion-run)")
    p.add_argument("--init", nargs="+", choices=["imagenet", "scratch"], default=["imagenet", "scratch"],
                   help="how the members trained here start: ImageNet weights (aax train's default), "
                        "from scratch (--pretrained none), or both side by side")
    p.add_argument("--given", nargs=3, action="append", default=[], metavar=("NAME", "RUN", "TEST"),
                   help="a trained stride-32 RUN (e.g. aax train's defaults) and its held-out TEST data: "
                        "the levers on that run, no training here (repeatable)")
    p.add_argument("--busi", type=Path, default=None, help="BUSI manifest (aax data convert busi)")
    p.add_argument("--bsdata", type=Path, default=None, help="BSData manifest (aax data convert labelme)")
    p.add_argument("--out", type=Path, required=True, help="results folder (runs are kept there and reused)")
    p.add_argument("--size", type=int, default=96, help="model input side for the real sets")
    p.add_argument("--lesion-size", type=int, default=128, help="model input side for the lesions")
    p.add_argument("--per-class", type=int, default=80, help="images per class in the subsample")
    p.add_argument("--test-fraction", type=float, default=0.3)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--tta-scales", type=float, nargs="+", default=[1.0, 1.5, 2.0])
    p.add_argument("--repeats", type=int, default=3, help="timed annotate_batch calls per lever")
    p.add_argument("--mc-passes", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--levers", nargs="+", default=None, help="lever names to run (default: all)")
    p.add_argument("--refines", nargs="+", choices=["none", "superpixels"], default=["none", "superpixels"],
                   help="refinements calibration may choose from (default both; each row also shows AAX "
                        "calibrated without refinement)")
    p.add_argument("--extras-on", default=None,
                   help="the lever the intersection-only, Otsu and TTA rows use (default: the best on validation)")
    return p.parse_args(argv)


def subsample(dataset: Any, per_class: int, test_fraction: float, seed: int) -> tuple[Any, Any]:
    """A stratified subsample of ``per_class`` images per class, split train+val / test."""
    rng = np.random.default_rng(seed)
    labels = [s.label for s in dataset]
    chosen = []
    for c in sorted(set(labels)):
        idx = [i for i, lab in enumerate(labels) if lab == c]
        chosen += sorted(rng.choice(idx, size=min(per_class, len(idx)), replace=False).tolist())
    keep, test = stratified_split([labels[i] for i in chosen], test_fraction, seed)
    return dataset.subset([chosen[i] for i in keep]), dataset.subset([chosen[i] for i in test])


def trivial_rows(test: Any, negative: str) -> dict[str, dict[str, Any]]:
    """Mean IoU of the whole image and of a centred half-side box, on the positive test
    images with a mask."""
    whole, box = MaskScores(), MaskScores()
    for s in test:
        if s.label == negative or not s.has_mask:
            continue
        gt = s.mask()
        h, w = gt.shape
        centred = np.zeros_like(gt)
        centred[h // 4:h - h // 4, w // 4:w - w // 4] = True
        whole.add(np.ones_like(gt), gt)
        box.add(centred, gt)
    return {"whole image": whole.result(), "centred box": box.result()}


def annotate_cost(ensemble: Ensemble, test: Any, settings: AnnotateSettings, repeats: int) -> float:
    """Seconds per image of ``annotate_batch`` on one batch of 8 test images (best of ``repeats``)."""
    mean, std = ensemble.normalisation
    samples = list(test)[:8]
    x = torch.stack([prepare(read_image(s.image, keep_grey=True), ensemble.image_size, mean, std) for s in samples])
    sizes = [tuple(read_image(s.image).shape[:2]) for s in samples]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        annotate_batch(ensemble, x, sizes, settings, keep_saliency=False, seeds=list(range(len(samples))))
        best = min(best, time.perf_counter() - t0)
    return best / len(samples)


def run_lever(ensemble: Ensemble, val: Any, test: Any, options: MapOptions, args: argparse.Namespace,
              fusions: tuple[str, ...] = ("min", "mean", "vote"), tau: Any = None) -> dict[str, Any]:
    """Calibrate ``options`` on ``val`` (theta, tau, fusion, mask members, refinement) and
    evaluate on ``test``; AAX is also evaluated with every member's map in the masks
    (``aax_all``: the best fusion and tau calibration found for all members) and without
    refinement (``aax_plain``: calibrated with ``refines=("none",)``), so each row shows
    what choosing the mask members and the superpixels add."""
    ensemble.maps = options
    ensemble.theta, ensemble.tau = 0.1, 0.5
    cal = calibrate(ensemble, val, write=False, fusions=fusions, mc_passes=args.mc_passes,
                    sources=(options.source,), refines=args.refines)

    def row(m: dict[str, Any]) -> dict[str, Any]:
        return {k: m.get(k) for k in ("accuracy", "accuracy_kept", "flag_rate", "iou_mean", "iou_micro", "n_masks")}

    aax_plain = None
    if cal["refine"] != "none":
        plain = calibrate(ensemble, val, write=False, fusions=fusions, mc_passes=args.mc_passes,
                          sources=(options.source,), refines=("none",))
        ensemble.theta, ensemble.tau = plain["theta"], plain["tau"] if tau is None else tau
        ensemble.maps = options.replace(fusion=plain["fusion"], mask_members=plain.get("mask_members"))
        aax_plain = row(evaluate(ensemble, test, report=False, mc_passes=args.mc_passes)["ensemble"])
    ensemble.theta = cal["theta"]
    everyone = next((r for r in cal["member_sets"] or [] if r["mask_members"] is None), None)
    aax_all = None
    if cal.get("mask_members") and everyone is not None:
        ensemble.tau = everyone["tau"] if tau is None else tau
        ensemble.maps = options.replace(fusion=everyone["fusion"], refine=everyone["refine"])
        aax_all = row(evaluate(ensemble, test, report=False, mc_passes=args.mc_passes)["ensemble"])
    ensemble.tau = cal["tau"] if tau is None else tau
    ensemble.maps = options.replace(fusion=cal["fusion"], mask_members=cal.get("mask_members"),
                                    refine=cal["refine"])
    ev = evaluate(ensemble, test, report=False, mc_passes=args.mc_passes)
    settings = AnnotateSettings.from_ensemble(ensemble, mc_passes=args.mc_passes)
    cost = annotate_cost(ensemble, test, settings, args.repeats)
    aax = row(ev["ensemble"])
    return {"maps": ensemble.maps.to_dict(), "theta": cal["theta"], "tau": ensemble.tau,
            "val_iou": cal["iou_mean"], "val_fusions": cal["fusions"], "val_member_sets": cal["member_sets"],
            "members": {n: row(m) for n, m in ev["members"].items()}, "aax": aax,
            "aax_all": aax_all or aax, "aax_plain": aax_plain or aax, "seconds_per_image": cost}


def run_dataset(name: str, source: Any, image_size: int, args: argparse.Namespace,
                runs: dict[int, Path] | None = None, test: Any = None,
                pretrained: str | None = "imagenet") -> dict[str, Any]:
    """Every lever on one data set; ``runs`` (stride -> RUN) and ``test`` given: no
    training, and only the levers of those runs."""
    out = args.out / name
    out.mkdir(parents=True, exist_ok=True)
    dataset = open_dataset(source)
    if test is None:
        trainval, test = subsample(dataset, args.per_class, args.test_fraction, args.seed)
    else:
        trainval = []  # the given runs' own training data (its size is in their manifest)
    print(f"\n## {name}: {len(trainval)} train+val, {len(test)} test images at {image_size} px", flush=True)
    results: dict[str, Any] = {}
    wanted = [lv for lv in LEVERS if (args.levers is None or lv[0] in args.levers)
              and (runs is None or lv[1] in runs)]
    given = runs is not None
    runs = dict(runs or {})
    for stride in sorted({lv[1] for lv in wanted}, reverse=True):
        if given:
            continue
        run = out / f"run-os{stride}"
        if not (run / "aax.json").is_file() or json.loads((run / "aax.json").read_text()).get("status") != "complete":
            t0 = time.perf_counter()
            train(trainval, run, TrainConfig(epochs=args.epochs, patience=args.epochs, image_size=image_size,
                                             output_stride=stride, seed=args.seed, progress=False,
                                             pretrained=pretrained, resume=run.exists()))
            print(f"trained stride {stride} in {time.perf_counter() - t0:.0f} s", flush=True)
        runs[stride] = run
    negative = None
    for stride in {lv[1] for lv in wanted if lv[2].get("source") == "patch"}:
        ensemble = Ensemble.load(runs[stride], device="cpu")
        if ensemble.patches is None:  # the negative training images' patches (aax.models.patch_maps)
            # the training split only (its indices are into trainval): validation stays unseen
            split = ensemble.manifest["data"].get("train_indices") or []
            negatives = [str(trainval[int(i)].image) for i in split if len(trainval) > int(i)
                         and trainval[int(i)].label == ensemble.negative_class] or None
            print(f"patch bank for stride {stride}: {fit_patches(ensemble, negatives)}", flush=True)
    for lever, stride, opts in wanted:
        ensemble = Ensemble.load(runs[stride], device="cpu")
        negative = ensemble.negative_class
        val = validation_split(runs[stride])
        t0 = time.perf_counter()
        results[lever] = run_lever(ensemble, val, test, MapOptions(**opts), args)
        partial(args, name, results)
        print(f"{lever}: AAX IoU {results[lever]['aax']['iou_mean']}, {time.perf_counter() - t0:.0f} s", flush=True)
    # the best lever on validation IoU (or the one asked for), with the intersection
    # alone, Otsu, and CAM TTA
    best = args.extras_on if args.extras_on in results else max(results, key=lambda k: results[k]["val_iou"] or 0.0)
    lever_opts = {lv[0]: (lv[1], lv[2]) for lv in LEVERS}
    stride, opts = lever_opts[best]
    ensemble = Ensemble.load(runs[stride], device="cpu")
    val = validation_split(runs[stride])
    extra = {
        f"{best}, intersection only": dict(options=MapOptions(**opts), fusions=("min",)),
        f"{best}, intersection, tau Otsu": dict(options=MapOptions(**opts), fusions=("min",), tau="otsu"),
        f"{best} + TTA flip x {args.tta_scales}": dict(
            options=MapOptions(**opts, tta_scales=tuple(args.tta_scales), tta_flip=True)),
    }
    for lever, kw in extra.items():
        t0 = time.perf_counter()
        results[lever] = run_lever(ensemble, val, test, kw.pop("options"), args, **kw)
        partial(args, name, results)
        print(f"{lever}: AAX IoU {results[lever]['aax']['iou_mean']}, {time.perf_counter() - t0:.0f} s", flush=True)
    base = results.get("stride 32 (today)", {}).get("seconds_per_image")
    for r in results.values():
        r["relative_cost"] = None if not base else r["seconds_per_image"] / base
    manifest = json.loads((runs[32 if 32 in runs else stride] / "aax.json").read_text())
    n_trainval = len(trainval) or manifest["data"]["n_train"] + manifest["data"]["n_val"]
    return {"settings": {"image_size": image_size, "n_trainval": n_trainval, "n_test": len(test),
                         "training": {k: manifest["training"].get(k)
                                      for k in ("members", "pretrained", "epochs", "image_size", "lr")},
                         "per_class": args.per_class, "epochs": args.epochs, "seed": args.seed,
                         "mc_passes": args.mc_passes, "source": str(source), "classes": list(dataset.classes)},
            "best_on_validation": best, "levers": results, "trivial": trivial_rows(test, negative)}


def partial(args: argparse.Namespace, name: str, results: dict[str, Any]) -> None:
    """Keep what is measured so far (``OUT/<set>/partial.json``), in case the run is cut short."""
    (args.out / name / "partial.json").write_text(json.dumps(results, indent=2) + "\n")


def pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def table(name: str, result: dict[str, Any]) -> str:
    levers = result["levers"]
    members = list(next(iter(levers.values()))["members"])
    lines = [f"### {name}", "", f"settings: {json.dumps(result['settings'])}", "",
             "| lever | fusion, tau | cost x | " + " | ".join(f"{m} acc / IoU" for m in members)
             + " | AAX acc kept / flag / IoU | AAX IoU, all members' maps | AAX IoU, no refinement | AAX val IoU |",
             "|---|---|---|" + "---|" * len(members) + "---|---|---|---|"]
    for lever, r in levers.items():
        tau = r["tau"] if isinstance(r["tau"], str) else json.dumps(r["tau"])
        cells = [f"{pct(r['members'][m]['accuracy'])} / {pct(r['members'][m]['iou_mean'])}" for m in members]
        a = r["aax"]
        cost = "-" if r["relative_cost"] is None else f"{r['relative_cost']:.2f}"
        fused = r["maps"]["fusion"]
        if r["maps"].get("mask_members"):
            fused += " of " + "+".join(r["maps"]["mask_members"])
        if r["maps"].get("refine", "none") != "none":
            fused += " + " + r["maps"]["refine"]
        everyone = (r.get("aax_all") or a)["iou_mean"]
        plain = (r.get("aax_plain") or a)["iou_mean"]
        lines.append(f"| {lever} | {fused}, {tau} | {cost} | " + " | ".join(cells)
                     + f" | {pct(a['accuracy_kept'])} / {pct(a['flag_rate'])} / {pct(a['iou_mean'])} | {pct(everyone)} "
                     f"| {pct(plain)} | {pct(r['val_iou'])} |")
    for t, m in result["trivial"].items():
        lines.append(f"| trivial: {t} | | | " + " | ".join("" for _ in members)
                     + f" | - / - / {pct(m['iou_mean'])} | | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    args.out.mkdir(parents=True, exist_ok=True)
    sets: list[tuple[str, Any, int]] = []
    if args.lesion_run:
        sets.append(("lesion", args.lesion_run, 0))
    given = {name: (Path(run), Path(test)) for name, run, test in args.given}
    sets += [(name, test, 0) for name, (_, test) in given.items()]
    generated = [kind for kind, wanted in (("lesion", args.lesion and not args.lesion_run), ("fire", args.fire))
                 if wanted]
    for kind in generated:  # aax synth's data, made once in OUT and trained on here
        from aax.data import synth

        folder = args.out / f"{kind}-data"
        if not (folder / "images").is_dir():
            synth.generate(kind, folder, n_per_class=args.per_class, size=args.lesion_size, seed=args.seed)
        sets.append((kind, folder, args.lesion_size))
    if args.busi:
        sets.append(("busi", args.busi, args.size))
    if args.bsdata:
        sets.append(("bsdata", args.bsdata, args.size))
    if not sets:
        print("nothing to do: give --lesion, --fire, --busi or --bsdata", file=sys.stderr)
        return 2
    path = args.out / "quality.json"
    everything = json.loads(path.read_text()) if path.is_file() else {}
    for name, source, size in sets:
        if name == "lesion" and args.lesion_run:
            run = Path(source)
            size = json.loads((run / "aax.json").read_text())["image_size"]
            runs = {32: run, **({16: args.lesion_run16} if args.lesion_run16 else {})}
            done = {name: run_dataset(name, args.lesion_test, size, args, runs=runs,
                                      test=open_dataset(args.lesion_test))}
        elif name in given:
            run, test = given[name]
            size = json.loads((run / "aax.json").read_text())["image_size"]
            done = {name: run_dataset(name, test, size, args, runs={32: run}, test=open_dataset(test))}
        else:  # aax train's members from ImageNet weights, and from scratch
            done = {}
            for init in args.init:
                key = name if init == "imagenet" else f"{name}-scratch"
                done[key] = run_dataset(key, source, size, args, pretrained=None if init == "scratch" else "imagenet")
        for key, result in done.items():
            everything[key] = result
            path.write_text(json.dumps(everything, indent=2) + "\n")
            (args.out / "quality.md").write_text("\n".join(table(n, r) for n, r in everything.items()))
            print(table(key, result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
