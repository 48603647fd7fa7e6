"""What the decision protocol's flags cost the masks: each member alone vs AAX on one
labelled test set, as theta and the novelty step vary, from one annotate pass.

    python benchmarks/protocol_levers.py RUN TEST [--pool POOL] [--out levers.json]

The RUN annotates TEST once (maps, superpixels, MC probabilities, uncertainties and
novelty scores kept); every row then re-derives the protocol (:func:`aax.annotation.decide.decide`)
and the masks (the run's fusion, mask members, refinement and tau) from those numbers,
and scores members alone as ``aax evaluate`` does (:func:`aax.evaluation.scoring.member_decision`,
:func:`aax.evaluation.scoring.member_mask`: a member is flagged by its own ``u > theta`` or its own
novel flag), and again flagged by theta alone (the last column: how members were scored
when the novelty step was charged to AAX only). Rows: theta as
calibrated, x2, x4 and none (no uncertainty flags); the novelty step with the run's
thresholds, off (the paper's protocol), and, with ``--pool``, with thresholds set on the
POOL's images as ``aax calibrate --novelty-images POOL`` sets them. Trivial masks (whole
image, centred box) are printed beside. docs/quality.md and
docs/novelty.md quote its figures. Keeps every map of TEST in memory: a few hundred
images of a few hundred pixels.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from aax.annotation.decide import binarise, decide, fuse, mask_subset
from aax.annotation.records import REVIEW
from aax.data import open_dataset
from aax.evaluation.inputs import open_images
from aax.evaluation.metrics import MaskScores
from aax.evaluation.scoring import image_regions, member_decision, member_mask
from aax.evaluation.trivial import TRIVIAL_MASKS, trivial_mask
from aax.models.ensemble import Ensemble
from aax.models.mask_settings import tau_for
from aax.models.novelty import limits_for
from aax.models.novelty_fit import thresholds_from
from aax.models.refine import pool_resized_numpy


def collect(ensemble: Ensemble, test: str) -> list[dict[str, Any]]:
    """One annotate pass: per image its record, label and ground-truth mask."""
    samples = list(open_dataset(test))
    out = []
    for s, r in zip(samples, ensemble.annotate(samples, keep_saliency=True, keep_regions=True)):
        if r.status != "ok":
            continue
        gt = s.mask() if s.label != ensemble.negative_class and s.has_mask else None
        out.append({"record": r, "label": s.label, "gt": None if gt is None else np.asarray(gt, bool)})
    return out


def pool_thresholds(ensemble: Ensemble, pool: str) -> dict[str, dict[str, Any]]:
    """Each member's novelty threshold entry set on the POOL's images (per predicted
    class, as :func:`aax.models.novelty_fit.fit_run` sets them from validation images)."""
    score = ensemble.novelty.step()["score"]
    records = [r for r in ensemble.annotate(open_images(pool), novelty=False) if r.status == "ok"]
    names = list(ensemble.members)
    scores = {n: {score: np.array([r.members[i].novelty[score] for r in records])} for i, n in enumerate(names)}
    predicted = {n: [r.members[i].predicted for r in records] for i, n in enumerate(names)}
    entries = thresholds_from(scores, float(ensemble.novelty.pass_rate), predicted)
    return {n: entries[n][score] for n in names}


def novel_flags(ensemble: Ensemble, rows: list[dict[str, Any]], mode: str,
                pool: dict[str, dict[str, Any]] | None) -> list[np.ndarray | None]:
    """Each image's members' novel flags: as annotated (``run``), none (``off``), or over
    the POOL's thresholds (``pool``)."""
    if mode == "off":
        return [None] * len(rows)
    if mode == "run":
        return [np.array([bool(m.novel) for m in row["record"].members]) for row in rows]
    score = ensemble.novelty.step()["score"]
    out = []
    for row in rows:
        members = row["record"].members
        out.append(np.array([m.novelty[score] > limits_for(pool[m.name], [m.predicted])[0][0] for m in members]))
    return out


def score_setting(ensemble: Ensemble, rows: list[dict[str, Any]], theta: float,
                  novel: list[np.ndarray | None]) -> dict[str, dict[str, Any]]:
    """Accuracy (a flag counts wrong), flag rate and mean IoU (a positive without a mask
    scores 0) of AAX and of each member alone at ``theta``, with ``novel`` flags.

    Members alone are scored as ``aax evaluate`` scores them (flagged by their own
    ``u > theta`` or their own novel flag), and again under ``"<name> (theta only)"``
    flagged by theta alone (how ``aax evaluate`` once scored them)."""
    names, classes = list(ensemble.members), list(ensemble.classes)
    maps, negative = ensemble.maps, ensemble.negative_class
    chosen = None if maps.mask_members is None else [names.index(m) for m in maps.mask_members]
    keys = ["AAX", *names, *(f"{n} (theta only)" for n in names)]
    right = {k: 0 for k in keys}
    flagged = {k: 0 for k in keys}
    masks = {k: MaskScores() for k in keys}
    for row, flags in zip(rows, novel):
        r = row["record"]
        probs = np.array([m.probs for m in r.members])
        unc = np.array([m.uncertainty for m in r.members])
        d = decide(probs, unc, theta, ensemble.negative_index, ensemble.quorum, flags)
        label = None if d.label is None else classes[d.label]
        answers = {"AAX": label}
        preds: dict[str, np.ndarray | None] = {"AAX": None}
        regions = image_regions(r, maps.refine)
        if label is not None and label != negative:
            subset = list(mask_subset(d.agreeing, chosen))
            fused = fuse(np.stack([r.saliency[names[i]] for i in subset]), maps.fusion, ensemble.quorum)
            if regions is not None:
                fused = pool_resized_numpy(fused, regions)
            preds["AAX"] = binarise(fused, tau_for(ensemble.tau, label))
        for i, name in enumerate(names):
            plain = member_decision(r, i, theta, novel=False)
            charged = member_decision(r, i, theta, novel=False if flags is None else bool(flags[i]))
            mask = member_mask(r, i, plain, negative, ensemble.tau, regions)
            for key, answer in ((name, charged), (f"{name} (theta only)", plain)):
                answers[key] = None if answer == REVIEW else answer
                preds[key] = mask if answer == plain else None
        for k in keys:
            right[k] += answers[k] == row["label"]
            flagged[k] += answers[k] is None
            if row["gt"] is not None:
                masks[k].add(preds[k], row["gt"])
    n = len(rows)
    return {k: {"accuracy": right[k] / n, "flag_rate": flagged[k] / n, "iou_mean": masks[k].result()["iou_mean"]}
            for k in keys}


def trivial(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    out = {}
    for name in TRIVIAL_MASKS:
        acc = MaskScores()
        for row in rows:
            if row["gt"] is not None:
                acc.add(trivial_mask(name, row["gt"].shape), row["gt"])
        out[name] = acc.result()["iou_mean"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("test", help="labelled test data with masks")
    p.add_argument("--pool", default=None, help="unlabelled in-distribution images for novelty thresholds")
    p.add_argument("--out", default=None, help="write the table as JSON")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    ensemble = Ensemble.load(args.run, device=args.device)
    rows = collect(ensemble, args.test)
    ready = getattr(ensemble, "novelty", None) is not None and ensemble.novelty.ready
    modes = (["run", "off"] if ready else ["off"]) + (["pool"] if args.pool and ready else [])
    pool = pool_thresholds(ensemble, args.pool) if "pool" in modes else None
    theta = float(ensemble.theta)
    names = list(ensemble.members)
    table = []
    print(f"{args.run} on {args.test}: {len(rows)} images; trivial masks "
          + ", ".join(f"{k} {100 * v:.1f} %" for k, v in trivial(rows).items() if v is not None))
    print("| novelty | theta | AAX acc / flag / IoU (%) | " + " | ".join(names)
          + " | AAX - best member | AAX - best member flagged by theta only |")
    print("|---|---|---|" + "---|" * len(names) + "---|---|")
    for mode in modes:
        novel = novel_flags(ensemble, rows, mode, pool)
        for label, value in (("calibrated", theta), ("x2", 2 * theta), ("x4", 4 * theta), ("none", float("inf"))):
            res = score_setting(ensemble, rows, value, novel)
            cells = [f"{100 * res[k]['accuracy']:.1f} / {100 * res[k]['flag_rate']:.1f} / "
                     f"{100 * (res[k]['iou_mean'] or 0.0):.1f}" for k in ["AAX", *names]]
            margins = [100 * ((res["AAX"]["iou_mean"] or 0.0) - max((res[n]["iou_mean"] or 0.0) for n in group))
                       for group in (names, [f"{n} (theta only)" for n in names])]
            print(f"| {mode} | {label} | " + " | ".join(cells) + f" | {margins[0]:+.1f} | {margins[1]:+.1f} |",
                  flush=True)
            table.append({"novelty": mode, "theta": label, "theta_value": value, **res})
    if args.out:
        Path(args.out).write_text(json.dumps({"run": args.run, "test": args.test, "pool": args.pool,
                                              "trivial": trivial(rows), "rows": table}, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
