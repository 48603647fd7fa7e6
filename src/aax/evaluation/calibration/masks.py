"""Choosing the masks: tau curves over the exact counts of
:mod:`~aax.evaluation.calibration.collect`, and the choice of tau (per class where
several have masks), fusion, refinement and mask members (rule:
:mod:`aax.evaluation.calibrate`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

import numpy as np

from aax.annotation.decide import mask_subset
from aax.evaluation.calibration.collect import Collected
from aax.evaluation.metrics import MaskScores, ThetaSweep
from aax.evaluation.trivial import TRIVIAL_MASKS
from aax.models.mask_settings import FUSIONS, OTSU
from aax.models.refine import REFINES


def member_sets(n_members: int) -> list[tuple[int, ...] | None]:
    """The mask-member sets calibration tries: all members (None) first, then every set
    of at least two members, larger first."""
    sets: list[tuple[int, ...] | None] = [None]
    for k in range(n_members - 1, 1, -1):
        sets += list(combinations(range(n_members), k))
    return sets


def trivial_scores(collected: Collected) -> dict[str, dict[str, Any]]:
    """Mean and micro IoU of each trivial mask (:data:`aax.evaluation.trivial.TRIVIAL_MASKS`) over
    the same validation images as the ensemble's masks."""
    out = {}
    for name in TRIVIAL_MASKS:
        acc = MaskScores()
        for entry in collected.masks.values():
            tp, fp = entry.trivial[name]
            acc.add_counts(tp, fp, entry.gt_pixels - tp)
        out[name] = acc.result()
    return out


def tau_curve(collected: Collected, sweep: ThetaSweep, theta: float, fusion: str = "min",
              label: int | None = None, otsu: bool = False,
              members: tuple[int, ...] | None = None, refine: str = "none") -> list[dict[str, Any]]:
    """Mean and micro IoU of the ensemble's masks (fused by ``fusion``, from the agreeing
    members among ``members``: :func:`aax.annotation.decide.mask_subset`, refined by ``refine``) for every tau of the grid (and, with
    ``otsu``, a last point ``tau="otsu"``), with the decisions at ``theta``, over the
    images of class ``label`` (all when None); an image the ensemble does not call
    positive scores 0."""
    if not collected.masks:
        return []
    agreeing = sweep.agreeing_at(theta)
    n = len(collected.taus) + 1
    scores = [MaskScores() for _ in range(n)]
    for j, entry in collected.masks.items():
        if label is not None and entry.label != label:
            continue
        subset = mask_subset(agreeing[j], members)
        if subset:
            tp, fp = entry.counts[(fusion, subset, refine)]
        else:
            tp = fp = np.zeros(n, dtype=np.int64)
        for t, acc in enumerate(scores):
            acc.add_counts(int(tp[t]), int(fp[t]), entry.gt_pixels - int(tp[t]))
    points = [{"tau": float(tau), **s.result()} for tau, s in zip(collected.taus, scores)]
    if otsu:
        points.append({"tau": OTSU, **scores[-1].result()})
    return points


def choose_tau(curve: Sequence[dict[str, Any]], current: float) -> dict[str, Any] | None:
    """The best mean IoU; ties go to a grid value over Otsu, then to the tau nearest the
    current one, then the smaller."""
    usable = [p for p in curve if p["iou_mean"] is not None]
    if not usable:
        return None

    def key(p: dict[str, Any]) -> tuple:
        if p["tau"] == OTSU:
            return (p["iou_mean"], 0, 0.0, 0.0)
        return (p["iou_mean"], 1, -abs(p["tau"] - current), -p["tau"])

    return max(usable, key=key)


def choose_masks(collected: Collected, sweep: ThetaSweep, theta: float, classes: Sequence[str],
                 current_tau: Any, fusions: Sequence[str] = FUSIONS,
                 sets: Sequence[tuple[int, ...] | None] = (None,),
                 refines: Sequence[str] = ("none",)) -> dict[str, Any] | None:
    """The mask members, fusion, refinement and tau (one per positive class when several
    have masks) with the best mean IoU of the ensemble's masks at ``theta`` (rule: the
    module docstring). ``sets``: the mask-member sets to try (None: all members);
    ``refines``: the refinements (:data:`aax.models.refine.REFINES`). Returns
    ``members`` (a set's member indices, or None), ``fusion``, ``refine``, ``tau``, ``iou_mean``,
    ``iou_micro``, ``n_masks``, ``tau_curve`` (the chosen set and fusion, all classes),
    ``fusions`` (each fusion's best with all members) and ``member_sets`` (each set's
    best), or None without masks."""
    if not collected.masks:
        return None
    order = {f: i for i, f in enumerate(FUSIONS)}
    by_set = []
    for members in sets:
        table = _fusion_table(collected, sweep, theta, classes, current_tau, fusions, members, refines)
        if not table:
            continue
        best = max(table, key=lambda t: (t["iou_mean"] if t["iou_mean"] is not None else -1.0,
                                         -REFINES.index(t["refine"]), -order.get(t["fusion"], len(order))))
        by_set.append({"members": members, **best, "table": table})
    if not by_set:
        return None
    chosen = by_set[0]  # all members unless another set is strictly better
    for row in by_set[1:]:
        if (row["iou_mean"] or 0.0) > (chosen["iou_mean"] or 0.0):
            chosen = row
    everyone = next((r for r in by_set if r["members"] is None), by_set[0])
    result = {k: v for k, v in chosen.items() if k != "table"}
    return {**result, "tau_curve": tau_curve(collected, sweep, theta, chosen["fusion"], members=chosen["members"],
                                             refine=chosen["refine"]),
            "fusions": everyone["table"],
            "member_sets": [{k: v for k, v in r.items() if k != "table"} for r in by_set]}


def _fusion_table(collected: Collected, sweep: ThetaSweep, theta: float, classes: Sequence[str],
                  current_tau: Any, fusions: Sequence[str],
                  members: tuple[int, ...] | None, refines: Sequence[str] = ("none",)) -> list[dict[str, Any]]:
    """Each fusion's (and refinement's) best (per-class) tau and its scores, with masks
    from ``members``."""
    labels = sorted({e.label for e in collected.masks.values()})
    current = _one_tau(current_tau)
    table = []
    for refine, fusion in ((r, f) for r in refines for f in fusions):
        per_class: dict[int, dict[str, Any]] = {}
        for c in labels:
            best = choose_tau(tau_curve(collected, sweep, theta, fusion, c if len(labels) > 1 else None, otsu=True,
                                        members=members, refine=refine), current)
            if best is not None:
                per_class[c] = best
        if not per_class:
            continue
        tau = (per_class[labels[0]]["tau"] if len(labels) == 1
               else {classes[c]: p["tau"] for c, p in per_class.items()})
        index = tau_positions(collected.taus, tau, classes, list(per_class))
        overall = _scores_at(collected, sweep, theta, fusion, index, members, refine)
        table.append({"fusion": fusion, "refine": refine, "tau": tau, **overall})
    return table


def image_counts(collected: Collected, agreeing: Sequence[Sequence[int]], fusion: str,
                 index: Mapping[int, int], members: tuple[int, ...] | None = None,
                 refine: str = "none") -> list[tuple[int, int, int]]:
    """Each masked positive image's TP, FP and FN (in ``collected.masks`` order) with each
    class's tau at grid position ``index[class]`` (the last position: Otsu), given the
    agreeing members per image (:meth:`aax.evaluation.metrics.ThetaSweep.agreeing_at`); an image
    with no agreeing members has no mask."""
    out = []
    for j, entry in collected.masks.items():
        t = index[entry.label]
        subset = mask_subset(agreeing[j], members)
        tp, fp = (int(v[t]) for v in entry.counts[(fusion, subset, refine)]) if subset else (0, 0)
        out.append((tp, fp, entry.gt_pixels - tp))
    return out


def tau_positions(taus: np.ndarray, tau: Any, classes: Sequence[str], labels: Sequence[int]) -> dict[int, int]:
    """Class index -> position of ``tau`` (one value, ``"otsu"``, or one per class name)
    on the grid of :func:`~aax.evaluation.calibration.collect.collect`'s counts."""
    def position(t: Any) -> int:
        return len(taus) if t == OTSU else int(np.argmin(np.abs(taus - float(t))))

    return {c: position(tau[classes[c]] if isinstance(tau, dict) else tau) for c in labels}


def _scores_at(collected: Collected, sweep: ThetaSweep, theta: float, fusion: str,
               index: dict[int, int], members: tuple[int, ...] | None = None,
               refine: str = "none") -> dict[str, Any]:
    """Mean/micro IoU with each class's tau at grid position ``index[class]``."""
    acc = MaskScores()
    for tp, fp, fn in image_counts(collected, sweep.agreeing_at(theta), fusion, index, members, refine):
        acc.add_counts(tp, fp, fn)
    return acc.result()


def _one_tau(tau: Any) -> float:
    """A per-class tau's mean, for breaking ties (Otsu counts as 0.5)."""
    if isinstance(tau, dict):
        values = [_one_tau(v) for v in tau.values()]
        return float(np.mean(values)) if values else 0.5
    return 0.5 if tau == OTSU else float(tau)
