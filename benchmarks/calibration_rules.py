"""Does calibration's choice of mask options hold on new images? Each selection rule
picks the mask options on a run's validation split; the pick is scored on a test set.

    python benchmarks/calibration_rules.py RUN TEST [RUN TEST ...] [--out rules.json]

For each RUN, :func:`aax.evaluation.calibration.collect.collect` counts every mask the ensemble could form
(every fusion of :data:`aax.models.mask_settings.FUSIONS`, mask-member set and refinement) once on the
RUN's validation split and once on TEST, at the RUN's theta. Each option then gets its
tau (one per positive class) as calibration sets it (:func:`aax.evaluation.calibration.masks._fusion_table`),
and a per-image IoU on both sets (0 where the ensemble gives no mask). Rules:

* ``paper``: the intersection of all agreeing members' maps, no refinement (tau still
  calibrated);
* ``calibrate``: what ``aax calibrate`` picks (:func:`aax.evaluation.calibration.masks.choose_masks`: the
  best validation mean IoU, ties to the paper's);
* ``gain > k SE``: calibrate's pick only when its validation gain over ``paper``
  exceeds k standard errors of the paired per-image differences, else ``paper``;
* ``simplest within k SE``: among options whose validation mean is within k paired
  standard errors of the best, the one with the fewest departures from ``paper``
  (fusion, member set, refinement; ties to the higher validation mean), the
  "one-standard-error rule" of model selection;
* ``oracle``: the best option on TEST itself (with validation's tau), a bound.

docs/quality.md quotes its figures. Keeps only pixel counts: cheap in memory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from aax.evaluation.calibration.collect import Collected, collect
from aax.evaluation.calibration.files import validation_split
from aax.evaluation.calibration.masks import _fusion_table, choose_masks, image_counts, member_sets, tau_positions
from aax.evaluation.metrics import ThetaSweep
from aax.models.ensemble import Ensemble
from aax.models.mask_settings import FUSIONS
from aax.models.refine import REFINES

PAPER = ("min", None, "none")
SE_LEVELS = (1.0, 2.0)


def per_image_iou(collected: Collected, agreeing: list, option: tuple, tau: Any,
                  classes: list[str]) -> np.ndarray:
    """Each masked positive image's IoU (0 without a mask) for ``option = (fusion,
    members, refine)`` at ``tau``, counted as calibration counts it."""
    fusion, members, refine = option
    labels = sorted({e.label for e in collected.masks.values()})
    index = tau_positions(collected.taus, tau, classes, labels)
    return np.array([tp / max(1, tp + fp + fn)
                     for tp, fp, fn in image_counts(collected, agreeing, fusion, index, members, refine)])


def departures(option: tuple) -> int:
    fusion, members, refine = option
    return int(fusion != PAPER[0]) + int(members is not None) + int(refine != PAPER[2])


def paired_se(d: np.ndarray) -> float:
    return float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("inf")


def measure(run: str, test: str, theta: float | None = None) -> dict[str, Any]:
    """Collect RUN's validation split and TEST once, and score every rule at ``theta``
    (default: the RUN's, which ``aax train`` and ``aax calibrate`` set on the same split)."""
    ensemble = Ensemble.load(run)
    sets = member_sets(len(ensemble.members))
    parts = {name: collect(ensemble, data, fusions=FUSIONS, sets=sets, refines=REFINES)
             for name, data in (("validation", validation_split(run)), ("test", test))}
    classes = list(ensemble.classes)
    theta = float(ensemble.theta if theta is None else theta)
    sweeps = {k: ThetaSweep.build(c.probs, c.uncertainty, ensemble.negative_index, ensemble.quorum)
              for k, c in parts.items()}
    agreeing = {k: s.agreeing_at(theta) for k, s in sweeps.items()}
    val = parts["validation"]
    options: dict[tuple, dict[str, Any]] = {}
    for members in sets:
        for row in _fusion_table(val, sweeps["validation"], theta, classes, ensemble.tau, FUSIONS, members, REFINES):
            option = (row["fusion"], members, row["refine"])
            options[option] = {"tau": row["tau"],
                               **{k: per_image_iou(parts[k], agreeing[k], option, row["tau"], classes) for k in parts}}
    names = list(ensemble.members)
    chosen = choose_masks(val, sweeps["validation"], theta, classes, ensemble.tau, FUSIONS, sets, REFINES)
    picks = {"paper": PAPER, "calibrate": (chosen["fusion"], chosen["members"], chosen["refine"])}
    best = picks["calibrate"]
    mean = {o: float(v["validation"].mean()) for o, v in options.items()}
    for k in SE_LEVELS:
        d = options[best]["validation"] - options[PAPER]["validation"]
        picks[f"gain > {k:g} SE"] = best if d.mean() > k * paired_se(d) else PAPER
        near = [o for o in options
                if mean[best] - mean[o] <= k * paired_se(options[best]["validation"] - options[o]["validation"])]
        picks[f"simplest within {k:g} SE"] = min(near, key=lambda o: (departures(o), -mean[o]))
    picks["oracle"] = max(options, key=lambda o: options[o]["test"].mean())

    def label(option: tuple) -> str:
        fusion, members, refine = option
        who = "all" if members is None else "+".join(names[i] for i in members)
        return f"{fusion} of {who}, refine {refine}"

    rows = {rule: {"option": label(o), "tau": options[o]["tau"],
                   "validation_iou": 100 * mean[o], "test_iou": 100 * float(options[o]["test"].mean())}
            for rule, o in picks.items()}
    return {"run": run, "test": test, "theta": theta,
            "n_validation_masks": int(options[PAPER]["validation"].size),
            "n_test_masks": int(options[PAPER]["test"].size), "rules": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", nargs="+", help="RUN TEST [RUN TEST ...]")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    if len(args.pairs) % 2:
        parser.error("give RUN TEST pairs")
    results = []
    for run, test in zip(args.pairs[::2], args.pairs[1::2]):
        result = measure(run, test)
        results.append(result)
        print(f"\n{run} on {test}: {result['n_validation_masks']} validation / "
              f"{result['n_test_masks']} test images with a mask; mean IoU (%)")
        for rule, row in result["rules"].items():
            print(f"  {rule:22s} validation {row['validation_iou']:5.1f}  test {row['test_iou']:5.1f}  "
                  f"{row['option']}, tau {row['tau']}")
    if len(results) > 1:
        print("\ntest IoU minus the paper's options, per run, and the mean:")
        for rule in results[0]["rules"]:
            gains = [r["rules"][rule]["test_iou"] - r["rules"]["paper"]["test_iou"] for r in results]
            print(f"  {rule:22s} " + " ".join(f"{g:+6.1f}" for g in gains) + f"   mean {np.mean(gains):+5.1f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
