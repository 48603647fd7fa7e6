"""Calibration: theta and tau chosen from validation data by a fixed procedure.

The paper sets theta = 0.1 "empirically using validation data"; this module makes that
a command whose result and evidence land in the RUN folder.

Procedure (one annotate pass over the validation images, saliency maps kept):

1. **theta.** Candidates are the observed member uncertainties (each is a point where
   some decision changes; evenly spaced quantiles of them beyond 2048) plus the run's
   current theta. For each candidate the protocol's decisions are re-derived exactly
   (:class:`aax.metrics.ThetaSweep`; the network is not run again). Among the candidates
   whose flag rate is at most ``max_flag_rate``, the one with the best accuracy on the
   kept (not flagged) images wins; ties go to the larger coverage, then to the smaller
   theta (the more cautious of equals). If no candidate meets the flag-rate bound
   (the "no-consensus" flags do not fall as theta grows), the one with the lowest flag
   rate is taken and ``constraint_met`` is false. The winner is then moved to the middle
   of the interval up to the next observed uncertainty (:func:`settle_theta`): same
   decisions on the validation images, but no member sits exactly on the threshold.
2. **tau**, where the validation data has ground-truth masks: at the chosen theta, tau
   sweeps 0.05, 0.10, ..., 0.95; the best mean IoU of the ensemble's masks (as
   :mod:`aax.evaluate` scores them) wins, ties going to the value nearest the current
   tau. Per image, the pixel counts of ``min_i S_i > tau`` are computed once for every
   set of members that can agree on it, at the image's own size, so the sweep is exact.
   Without masks tau is left as it is (or set to ``tau_without_masks``, e.g. ``"otsu"``).
3. **fusion and per-class tau**, where masks exist: the same exact counts are made for
   each fusion of :data:`aax.decide.FUSIONS` (intersection, mean, 2-of-3 vote) and for
   Otsu's per-image threshold beside the grid. The fusion with the best mean IoU wins
   (ties: the intersection, the paper's, then mean, then vote); with more than one
   positive class, each class gets its own tau (the best for its images; overall mean
   IoU is then the best too, since each image counts for its own class only). Otsu is
   taken over a grid value only when strictly better.
4. **mask members**, where masks exist and the run has more than two members: each set
   of at least two members is tried as the only maps a mask may be fused from (an
   image's mask then fuses the maps of its agreeing members that are in the set, or of
   all its agreeing members when none is), with every fusion and tau as above. A set
   other than all members is kept only when its mean IoU is strictly better (ties: all
   members, the paper's). The class decision is untouched: every member still votes.
   A member whose maps mislead on validation masks thus stops spoiling the masks
   (docs/quality.md: the demo's EfficientNet-B0).
5. **refinement**, where masks exist: each fusion above is also counted with its fused
   map averaged over the image's superpixels (:mod:`aax.refine`); the refinement is
   one more choice in the same table, and "none" (the paper's) wins ties.

Results: ``theta``/``tau`` and a ``calibration`` entry (what was measured, on what, and
when) are written into ``RUN/aax.json`` atomically; the risk-coverage curve (accuracy on
kept images vs coverage as theta moves) goes to ``RUN/calibration/risk_coverage.json``
and ``.png``. The uncertainty depends on the number of MC passes K, so the calibration
records K; annotate with the same K.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aax.decide import FUSIONS, OTSU, fuse, mask_subset, otsu_threshold
from aax.evaluate import (TRIVIAL_MASKS, _describe, _samples, annotate_with, ground_truth, no_labelled_images,
                          open_data, open_images, paired, run_label_map, trivial_mask)
from aax.metrics import MaskScores, ThetaSweep, risk_coverage, theta_candidates
from aax.patch_maps import SOURCES
from aax.refine import REFINES, pool_resized_numpy

if TYPE_CHECKING:  # pragma: no cover
    from aax.ensemble import Ensemble

TAU_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 .. 0.95
MAX_FLAG_RATE = 0.2
CALIBRATION_DIR = "calibration"
MANIFEST = "aax.json"


@dataclass
class _ImageMasks:
    """One positive validation image with a ground-truth mask: its pixel counts for each
    fusion, refinement and set of members that can form its mask (``(fusion, subset,
    refine) -> [tau] TP, FP``, the last entry at the image's own Otsu threshold), and its
    class index."""

    gt_pixels: int
    counts: dict[tuple[str, tuple[int, ...], str], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    label: int = -1
    trivial: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> TP, FP


@dataclass
class Collected:
    """What one annotate pass over validation data leaves for calibration."""

    labels: np.ndarray  # [n] ground-truth class index
    probs: np.ndarray  # [n, M, C]
    uncertainty: np.ndarray  # [n, M]
    masks: dict[int, _ImageMasks]  # image index -> counts (positives with a GT mask)
    taus: np.ndarray
    n_errors: int


def _counts_over_taus(values_in: np.ndarray, values_out: np.ndarray,
                      taus: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TP and FP of ``map > tau`` for every tau, from the map's values inside and
    outside the ground truth (sorted once, then one search per tau)."""
    vin, vout = np.sort(values_in, axis=None), np.sort(values_out, axis=None)
    tp = vin.size - np.searchsorted(vin, taus, side="right")
    fp = vout.size - np.searchsorted(vout, taus, side="right")
    return tp.astype(np.int64), fp.astype(np.int64)


def _counts_with_otsu(score: np.ndarray, gt: np.ndarray, taus: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tp, fp = _counts_over_taus(score[gt], score[~gt], taus)
    above = score > otsu_threshold(score)
    return (np.append(tp, np.count_nonzero(above & gt)).astype(np.int64),
            np.append(fp, np.count_nonzero(above & ~gt)).astype(np.int64))


def collect(ensemble: Ensemble, data: Any, *, taus: Sequence[float] = TAU_GRID,
            mc_passes: int | None = None, batch_size: int | None = None, workers: int | None = None,
            label_map: Mapping[str, str] | None = None, fusions: Sequence[str] = FUSIONS,
            sets: Sequence[tuple[int, ...] | None] = (None,), refines: Sequence[str] = ("none",)) -> Collected:
    """Annotate ``data`` once (maps kept) and keep only what the sweeps need: the
    members' probabilities and uncertainties, and per-tau pixel counts of every mask
    the ensemble could form on each positive image with a ground-truth mask, for each
    mask-member set of ``sets`` (None: all members) and refinement of ``refines``."""
    classes = list(ensemble.classes)
    index = {c: i for i, c in enumerate(classes)}
    dataset = open_data(data, classes, label_map)
    taus_arr = np.asarray(taus, dtype=float)
    labels, probs, unc = [], [], []
    masks: dict[int, _ImageMasks] = {}
    n_errors = len(getattr(dataset, "errors", None) or [])
    records = annotate_with(ensemble, dataset, saliency=True, mc_passes=mc_passes,
                            batch_size=batch_size, workers=workers, keep_regions="superpixels" in refines)
    for sample, record in paired(_samples(dataset), records):
        if record.status != "ok":
            n_errors += 1
            continue
        label = record.label if record.label is not None else sample.label
        if label not in index:
            raise ValueError(f"{record.image}: label {label!r} is not one of the model's classes {classes}")
        p = np.array([m.probs for m in record.members], dtype=float)
        u = np.array([m.uncertainty for m in record.members], dtype=float)
        j = len(labels)
        labels.append(index[label])
        probs.append(p)
        unc.append(u)
        gt, _problem = ground_truth(sample, record, label, ensemble.negative_class)
        if gt is None or record.saliency is None:
            continue  # (a bad mask is left out here; aax evaluate lists it)
        maps = [record.saliency[m.name] for m in record.members]
        regions = None  # a record without regions (an ensemble that cuts none) refines nothing
        if "superpixels" in refines and record.regions is not None:
            regions = record.regions
        entry = _ImageMasks(gt_pixels=int(gt.sum()), label=index[label])
        for name in TRIVIAL_MASKS:
            box = trivial_mask(name, gt.shape)
            entry.trivial[name] = (int(np.count_nonzero(box & gt)), int(np.count_nonzero(box & ~gt)))
        # the member sets that can agree on this image, whatever theta turns out to be
        row = ThetaSweep.build(p[None], u[None], ensemble.negative_index, ensemble.quorum).agreeing[0]
        for subset in {mask_subset(s, members) for s in row if s for members in sets}:
            stack = np.stack([maps[i] for i in subset])
            for fusion in fusions:
                score = fuse(stack, fusion, ensemble.quorum)
                for refine in refines:
                    refined = (pool_resized_numpy(score, regions) if refine == "superpixels" and regions is not None
                               else score)
                    entry.counts[(fusion, subset, refine)] = _counts_with_otsu(refined, gt, taus_arr)
        masks[j] = entry
    if not labels:
        raise no_labelled_images(data, dataset, classes)
    m, c = len(ensemble.members), len(classes)
    return Collected(labels=np.array(labels), probs=np.stack(probs).reshape(-1, m, c),
                     uncertainty=np.stack(unc).reshape(-1, m), masks=masks, taus=taus_arr, n_errors=n_errors)


def member_sets(n_members: int) -> list[tuple[int, ...] | None]:
    """The mask-member sets calibration tries: all members (None) first, then every set
    of at least two members, larger first."""
    sets: list[tuple[int, ...] | None] = [None]
    for k in range(n_members - 1, 1, -1):
        sets += list(combinations(range(n_members), k))
    return sets


def trivial_scores(collected: Collected) -> dict[str, dict[str, Any]]:
    """Mean and micro IoU of each trivial mask (:data:`aax.evaluate.TRIVIAL_MASKS`) over
    the same validation images as the ensemble's masks."""
    out = {}
    for name in TRIVIAL_MASKS:
        acc = MaskScores()
        for entry in collected.masks.values():
            tp, fp = entry.trivial[name]
            acc.add_counts(tp, fp, entry.gt_pixels - tp)
        out[name] = acc.result()
    return out


def trivial_warning(iou_mean: float | None, trivial: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The warning to give when the ensemble's masks do not beat the best trivial mask on
    validation data (None when they do, or without masks)."""
    scored = {k: v["iou_mean"] for k, v in trivial.items() if v.get("iou_mean") is not None}
    if iou_mean is None or not scored:
        return None
    name = max(scored, key=scored.get)  # type: ignore[arg-type]
    if iou_mean > scored[name]:
        return None
    return (f"the masks do not beat a trivial {name} on the validation masks (mean IoU {iou_mean:.3f} vs "
            f"{scored[name]:.3f}): use them as rough locations, not outlines, and review them; "
            "docs/quality.md says what helps (pretrained members, a larger --image-size, more images)")


def choose_theta(curve: Sequence[dict[str, Any]], max_flag_rate: float) -> tuple[dict[str, Any], bool]:
    """The risk-coverage point to use, and whether it meets the flag-rate bound
    (see the module docstring for the rule)."""
    usable = [p for p in curve if p["accuracy_kept"] is not None]
    feasible = [p for p in usable if p["flag_rate"] <= max_flag_rate + 1e-12]
    if feasible:
        return max(feasible, key=lambda p: (p["accuracy_kept"], p["coverage"], -p["theta"])), True
    pool = usable or list(curve)
    return min(pool, key=lambda p: (p["flag_rate"], -(p["accuracy_kept"] or 0.0), p["theta"])), False


def settle_theta(theta: float, uncertainty: np.ndarray) -> float:
    """Move the winning candidate to the middle of its interval.

    Decisions on the validation images are the same for every theta from the winner (an
    observed uncertainty) up to the next observed uncertainty; at the winner itself a
    member sits exactly on the threshold, and MC noise in a new pass flips it half the
    time. The midpoint keeps the validation decisions and adds margin on both sides.
    At or beyond the largest observed uncertainty the winner is kept.
    """
    values = np.unique(np.asarray(uncertainty, dtype=float))
    above = values[values > theta]
    return float(theta) if above.size == 0 else float((theta + above[0]) / 2.0)


def tau_curve(collected: Collected, sweep: ThetaSweep, theta: float, fusion: str = "min",
              label: int | None = None, otsu: bool = False,
              members: tuple[int, ...] | None = None, refine: str = "none") -> list[dict[str, Any]]:
    """Mean and micro IoU of the ensemble's masks (fused by ``fusion``, from the agreeing
    members among ``members``: :func:`aax.decide.mask_subset`, refined by ``refine``) for every tau of the grid (and, with
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
    ``refines``: the refinements (:data:`aax.refine.REFINES`). Returns
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
    agreeing members per image (:meth:`aax.metrics.ThetaSweep.agreeing_at`); an image
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
    on the grid of :func:`collect`'s counts."""
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


def _brief(chosen: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    return {"mask_members": _member_names(chosen.get("members"), names),
            **{k: chosen[k] for k in ("fusion", "refine", "tau", "iou_mean", "iou_micro", "n_masks")}}


def _member_names(members: Sequence[int] | None, names: Sequence[str]) -> list[str] | None:
    return None if members is None else [names[i] for i in members]


def _one_tau(tau: Any) -> float:
    """A per-class tau's mean, for breaking ties (Otsu counts as 0.5)."""
    if isinstance(tau, dict):
        values = [_one_tau(v) for v in tau.values()]
        return float(np.mean(values)) if values else 0.5
    return 0.5 if tau == OTSU else float(tau)


def _load(ensemble_or_run: Any, device: str | None) -> Ensemble:
    if isinstance(ensemble_or_run, (str, os.PathLike)):
        from aax.ensemble import Ensemble

        return Ensemble.load(ensemble_or_run, device=device)
    return ensemble_or_run


def calibrate(ensemble_or_run: Any, valdata: Any, *, max_flag_rate: float = MAX_FLAG_RATE,
              taus: Sequence[float] = TAU_GRID, mc_passes: int | None = None, batch_size: int | None = None,
              device: str | None = None, workers: int | None = None, write: bool = True,
              data_name: str | None = None, label_map: Mapping[str, str] | None = None,
              novelty: bool = True, novelty_score: str | None = None,
              novelty_pass_rate: float | None = None, novelty_per_class: bool | None = None,
              fusions: Sequence[str] = FUSIONS, tau_without_masks: float | str | None = None,
              sources: Sequence[str] | None = None, choose_members: bool = True,
              refines: Sequence[str] = REFINES, novelty_images: Any = None) -> dict[str, Any]:
    """Choose theta (and tau, where ground-truth masks exist) on validation data.

    Args:
        ensemble_or_run: a loaded ensemble or its RUN folder.
        valdata: labelled validation images (a dataset or a path ``open_dataset`` reads).
        max_flag_rate: the largest share of validation images theta may flag.
        taus: the tau grid (default 0.05 .. 0.95).
        mc_passes: K for the pass (default: the run's); recorded with the result.
        device: where to load the members when given a RUN folder (a loaded ensemble
            keeps its own).
        batch_size: passed to annotate.
        workers: passed to annotate.
        write: write theta, tau and the ``calibration`` entry into ``RUN/aax.json`` and
            the risk-coverage curve into ``RUN/calibration/``.
        data_name: how the entry names the data (default: its path or source).
        label_map: renames the labels of ``valdata`` as it is read (default: the map
            the run was trained with).
        novelty: with ``write``, also store the novelty features (from the training split
            the manifest records) and set the novelty thresholds on ``valdata``
            (:mod:`aax.novelty_fit`); ``novelty_score``/``novelty_pass_rate`` override
            the run's (default ``maha``, 0.95); ``novelty_per_class`` too (default
            True: one threshold per predicted class, :func:`aax.novelty.class_thresholds`).
        fusions: the fusions to choose from where masks exist (``("min",)`` keeps the
            paper's intersection).
        tau_without_masks: the tau to set when the data has no masks (``"otsu"``: each
            image's own Otsu threshold); None leaves the run's tau.
        sources: the map sources to choose from where masks exist (default: the run's
            own). With ``"patch"`` among them and ``write``, the run's patch bank is made
            first (:func:`aax.patch_maps.fit_run`, from the negative training images);
            each source is calibrated as above and the one with the best validation mean
            IoU is kept (ties: the first listed). Without masks the run's source is kept.
        choose_members: where masks exist, also choose the mask members (step 4 of the
            module docstring); False fuses every agreeing member's map, as the paper does.
        refines: the refinements of the fused map to choose from where masks exist
            (step 5; ``("none",)`` keeps the paper's thresholded map). Without masks the
            run's refinement is kept.
        novelty_images: in-distribution images to set the novelty thresholds on instead
            of ``valdata`` (a folder, a dataset whose labels are ignored, or paths; no
            labels needed, as each threshold is taken over the images a member predicts
            as a class). The thresholds' pass rate on new images holds within a few
            points only with hundreds of images per class
            (:func:`aax.novelty.pass_rate_on_new_images`); the labelled validation split
            is rarely that large. They must be unseen by training and free of the
            images the step is meant to flag.

    Returns:
        The calibration entry: ``theta``, ``tau``, ``previous``, ``n``, ``n_errors``,
        ``accuracy``, ``accuracy_kept``, ``flag_rate``, ``coverage``, ``constraint_met``,
        ``iou_mean``/``iou_micro``/``n_masks`` (None without masks), ``n_candidates``,
        ``tau_curve``, ``risk_coverage`` (the points), ``mc_passes``, ``date``,
        ``mask_members`` (member names, or None for all), ``member_sets`` (each set's
        best, where masks exist) and ``refine``; with
        ``write`` and ``novelty``, ``novelty``: the manifest's novelty block, or
        ``{"skipped": why}``.
    """
    if not 0.0 <= max_flag_rate <= 1.0:
        raise ValueError(f"max_flag_rate must be in [0, 1], got {max_flag_rate}")
    ensemble = _load(ensemble_or_run, device)
    k = int(ensemble.mc_passes if mc_passes is None else mc_passes)
    maps = getattr(ensemble, "maps", None)
    previous_source = getattr(maps, "source", "cam")
    sources = tuple(sources or (previous_source,))
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise ValueError(f"unknown map source {unknown[0]!r}; expected one of {SOURCES}")
    refines = tuple(refines)
    if not refines or any(r not in REFINES for r in refines):
        raise ValueError(f"refines must name some of {REFINES}, got {list(refines)}")
    patch_block = None
    if write and "patch" in sources and getattr(ensemble, "run", None) is not None:
        from aax.patch_maps import fit_run as fit_patches

        patch_block = fit_patches(ensemble)
    label_map = run_label_map(ensemble) if label_map is None else label_map
    names = list(ensemble.members)
    sets = member_sets(len(names)) if choose_members else [None]
    collected = collect(ensemble, valdata, taus=taus, mc_passes=k, batch_size=batch_size, workers=workers,
                        label_map=label_map, fusions=fusions, sets=sets, refines=refines)
    sweep = ThetaSweep.build(collected.probs, collected.uncertainty, ensemble.negative_index, ensemble.quorum)
    candidates = theta_candidates(collected.uncertainty, default=float(ensemble.theta))
    curve = risk_coverage(sweep, collected.labels, candidates)
    point, met = choose_theta(curve, max_flag_rate)
    theta = settle_theta(point["theta"], collected.uncertainty)
    previous_tau = ensemble.tau  # a float, or one per class (kept as is when no masks)
    previous_fusion = getattr(maps, "fusion", "min")
    previous_members = getattr(maps, "mask_members", None)
    previous_refine = getattr(maps, "refine", "none")
    best_tau, source, by_source = None, previous_source, []
    for candidate in sources:
        if candidate == previous_source:
            chosen = choose_masks(collected, sweep, theta, ensemble.classes, previous_tau, fusions, sets, refines)
        elif candidate == "patch" and not getattr(ensemble, "patches", None):
            by_source.append({"source": candidate, "skipped": "the run has no patch bank"})
            continue
        else:
            ensemble.maps = maps.replace(source=candidate)
            try:  # the class decisions do not depend on the source: only the masks are recounted
                again = collect(ensemble, valdata, taus=taus, mc_passes=k, batch_size=batch_size,
                                workers=workers, label_map=label_map, fusions=fusions, sets=sets, refines=refines)
            finally:
                ensemble.maps = maps
            chosen = choose_masks(again, sweep, theta, ensemble.classes, previous_tau, fusions, sets, refines)
        if chosen is None:  # no masks: nothing to choose by
            break
        by_source.append({"source": candidate, **_brief(chosen, names)})
        if best_tau is None or (chosen["iou_mean"] or 0.0) > (best_tau["iou_mean"] or 0.0):
            best_tau, source = chosen, candidate
    taus_curve = [] if best_tau is None else best_tau["tau_curve"]
    if best_tau is not None:
        tau, fusion, refine = best_tau["tau"], best_tau["fusion"], best_tau["refine"]
        mask_members = _member_names(best_tau["members"], names)
    else:
        tau = previous_tau if tau_without_masks is None else tau_without_masks
        fusion, mask_members, refine = previous_fusion, previous_members, previous_refine

    result: dict[str, Any] = {
        "theta": theta, "tau": tau, "theta_candidate": point["theta"],
        "fusion": fusion, "source": source, "refine": refine,
        "mask_members": None if mask_members is None else list(mask_members),
        "previous": {"theta": float(ensemble.theta), "tau": previous_tau, "fusion": previous_fusion,
                     "source": previous_source, "refine": previous_refine},
        "fusions": None if best_tau is None else best_tau["fusions"],
        "member_sets": None if best_tau is None else [_brief(r, names) for r in best_tau["member_sets"]],
        "sources": by_source or None,
        "data": data_name or _describe(valdata), "n": int(len(collected.labels)), "n_errors": collected.n_errors,
        "mc_passes": k, "max_flag_rate": max_flag_rate, "constraint_met": met,
        "accuracy": point["accuracy"], "accuracy_kept": point["accuracy_kept"],
        "flag_rate": point["flag_rate"], "coverage": point["coverage"],
        "n_candidates": len(candidates),
        "n_masks": None if best_tau is None else best_tau["n_masks"],
        "iou_mean": None if best_tau is None else best_tau["iou_mean"],
        "iou_micro": None if best_tau is None else best_tau["iou_micro"],
        "tau_grid": [float(t) for t in collected.taus] if taus_curve else None,
        "tau_curve": taus_curve,
        "risk_coverage": curve,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "procedure": "theta: best accuracy on kept images with flag rate <= max_flag_rate over the observed "
                     "uncertainties (ties: larger coverage, smaller theta); tau: best mean IoU of the "
                     "ensemble masks at that theta over tau_grid and Otsu's per-image threshold, for each "
                     "fusion and refinement, per positive class (ties: no refinement, the intersection, a grid "
                     "value, nearest the previous tau); mask members: all, or a set of >= 2 members only when "
                     "strictly better",
    }
    if best_tau is not None:
        result["trivial"] = trivial_scores(collected)  # ground truth only: the same for every source
        warning = trivial_warning(best_tau["iou_mean"], result["trivial"])
        result["beats_trivial"] = warning is None
        if warning:
            result["mask_warning"] = warning
    if not met:
        result["warning"] = (f"no theta keeps the flag rate at or below {max_flag_rate:g} on this data; "
                             f"took the lowest flag rate, {point['flag_rate']:.3f}")
    if patch_block is not None:
        result["patches"] = patch_block
    run = getattr(ensemble, "run", None)
    if write:
        if run is None:
            raise ValueError("write=True needs an ensemble loaded from a RUN folder")
        write_calibration(Path(run), result)
        if novelty:
            result["novelty"] = _novelty(ensemble, valdata if novelty_images is None else novelty_images,
                                         novelty_score, novelty_pass_rate, novelty_per_class,
                                         labelled=novelty_images is None)
    return result


def _novelty(ensemble: Ensemble, images: Any, score: str | None, pass_rate: float | None,
             per_class: bool | None = None, labelled: bool = True) -> dict[str, Any] | None:
    """Novelty features and thresholds (:func:`aax.novelty_fit.calibrate_novelty`) on
    ``images`` (the labelled validation data, or with ``labelled=False`` any images:
    :func:`aax.evaluate.open_images`); a run whose training images cannot be found again,
    and that has no features, keeps working without the step, and the entry says why."""
    from aax.novelty_fit import calibrate_novelty

    if not isinstance(getattr(ensemble, "manifest", None), dict):
        return {"skipped": "not an ensemble loaded from a RUN folder"}
    source = open_data(images, list(ensemble.classes)) if labelled else open_images(images)
    paths = [str(s.image) for s in _samples(source)]
    try:
        return calibrate_novelty(ensemble, paths, score=score, pass_rate=pass_rate, per_class=per_class,
                                 val_name=None if labelled else f"{_describe(images)} (unlabelled)")
    except (ValueError, OSError) as exc:  # e.g. the training images are gone: the run works without
        return {"skipped": str(exc)}


def write_calibration(run: Path, result: dict[str, Any]) -> Path:
    """Write theta, tau and the ``calibration`` entry into ``RUN/aax.json`` (atomically:
    tmp file + ``os.replace``), and the risk-coverage curve (JSON + PNG) into
    ``RUN/calibration/``. Returns the manifest's path."""
    from aax.report.figures import figure_png, risk_coverage_figure

    folder = run / CALIBRATION_DIR
    folder.mkdir(parents=True, exist_ok=True)
    curves = {"theta": result["theta"], "theta_candidate": result.get("theta_candidate"), "tau": result["tau"],
              "risk_coverage": result["risk_coverage"],
              "tau_curve": result["tau_curve"]}
    _atomic_write(folder / "risk_coverage.json", json.dumps(curves, indent=2) + "\n")
    # marked at the winning candidate: the settled theta has the same decisions
    fig = risk_coverage_figure(result["risk_coverage"], result.get("theta_candidate", result["theta"]),
                               title=f"Validation: accuracy on kept images vs coverage (n={result['n']})")
    _atomic_write_bytes(folder / "risk_coverage.png", figure_png(fig))

    manifest_path = run / MANIFEST
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))  # fresh: others may have written
    entry = {k: v for k, v in result.items() if k not in ("risk_coverage", "tau_curve")}
    entry["curves"] = f"{CALIBRATION_DIR}/risk_coverage.json"
    manifest["theta"], manifest["tau"] = result["theta"], result["tau"]
    if result.get("fusion") is not None:
        manifest["maps"] = {**(manifest.get("maps") or {}), "fusion": result["fusion"]}
        manifest["maps"].pop("mask_members", None)  # all members: the default, as runs made before the option
        if result.get("mask_members"):
            manifest["maps"]["mask_members"] = list(result["mask_members"])
        manifest["maps"].pop("refine", None)  # none: the default, as runs made before the option
        if result.get("refine", "none") != "none":
            manifest["maps"]["refine"] = result["refine"]
    if result.get("source") is not None:
        manifest["maps"] = {**(manifest.get("maps") or {}), "source": result["source"]}
        if result["source"] == "cam":
            manifest["maps"].pop("source")  # the default, as runs made before the option
    manifest["calibration"] = entry
    _atomic_write(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return manifest_path


def _atomic_write(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode("utf-8"))


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    # same folder, so os.replace is atomic; fsync so a crash never leaves half a manifest
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def validation_split(run: str | os.PathLike) -> Any:
    """The validation images a RUN was trained with, as a dataset.

    ``aax train`` records the source, its layout and the validation files (relative to
    ``root``) under ``manifest["data"]``; the same files are picked again by name, so
    images added to the source later do not shift the split.
    """
    from aax.data import open_dataset

    manifest = json.loads((Path(run) / MANIFEST).read_text(encoding="utf-8"))
    d = manifest.get("data") or {}
    if not d.get("source") or d.get("val_files") is None:
        raise ValueError(f"{run}: the manifest records no validation split (data.source / data.val_files); "
                         "calibrate on a validation folder instead: aax calibrate RUN VALDATA")
    label_map = (manifest.get("training") or {}).get("label_map") or None
    dataset = open_dataset(d["source"], format=d.get("format"), label_map=label_map)
    root = Path(d.get("root") or d["source"])

    def key(path: Path) -> str:
        try:
            return Path(path).resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            return str(path)

    by_name = {key(s.image): i for i, s in enumerate(dataset)}
    missing = [f for f in d["val_files"] if f not in by_name]
    if missing:
        raise ValueError(f"{run}: {len(missing)} validation images are no longer in {d['source']}, "
                         f"e.g. {missing[0]}")
    return dataset.subset([by_name[f] for f in d["val_files"]])


def calibrate_run(run_dir: str | os.PathLike, *, max_flag_rate: float = MAX_FLAG_RATE,
                  ensemble: Ensemble | None = None, device: str | None = None,
                  batch_size: int | None = None, novelty_images: Any = None) -> dict[str, Any]:
    """Calibrate a RUN on the validation split recorded in its manifest (what
    ``aax train`` calls at the end) and write the result into the RUN;
    ``novelty_images``: as :func:`calibrate`'s."""
    val = validation_split(run_dir)
    return calibrate(ensemble if ensemble is not None else run_dir, val, max_flag_rate=max_flag_rate,
                     device=device, batch_size=batch_size, write=True, data_name=split_name(val),
                     novelty_images=novelty_images)


def split_name(val: Any) -> str:
    """How a calibration entry names the recorded validation split."""
    return f"{getattr(val, 'source', '?')} (the RUN's validation split, {len(val)} images)"
