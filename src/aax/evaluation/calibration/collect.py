"""One annotate pass over validation data, kept as exact pixel counts.

Per positive image with a ground-truth mask, the pixel counts of ``score > tau`` are
computed once for every tau of the grid (and the image's own Otsu threshold), for every
set of members that can agree on it, every fusion and every refinement, at the image's
own size: the sweeps of :mod:`aax.evaluation.calibration.masks` are then exact without
running the network again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from aax.annotation.decide import fuse, mask_subset, otsu_threshold
from aax.evaluation.inputs import annotate_with, no_labelled_images, open_data, paired, samples
from aax.evaluation.metrics import ThetaSweep
from aax.evaluation.scoring import ground_truth
from aax.evaluation.trivial import TRIVIAL_MASKS, trivial_mask
from aax.models.mask_settings import FUSIONS
from aax.models.refine import pool_resized_numpy

if TYPE_CHECKING:  # pragma: no cover
    from aax.models.ensemble import Ensemble


TAU_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 .. 0.95


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
    for sample, record in paired(samples(dataset), records):
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
