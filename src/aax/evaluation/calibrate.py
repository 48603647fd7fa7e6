"""Calibration: theta and tau chosen from validation data by a fixed procedure.

The paper sets theta = 0.1 "empirically using validation data"; this module makes that
a command whose result and evidence land in the RUN folder.

Procedure (one annotate pass over the validation images, saliency maps kept):

1. **theta.** Candidates are the observed member uncertainties (each is a point where
   some decision changes; evenly spaced quantiles of them beyond 2048) plus the run's
   current theta. For each candidate the protocol's decisions are re-derived exactly
   (:class:`aax.evaluation.metrics.ThetaSweep`; the network is not run again). Among the candidates
   whose flag rate is at most ``max_flag_rate``, the one with the best accuracy on the
   kept (not flagged) images wins; ties go to the larger coverage, then to the smaller
   theta (the more cautious of equals). If no candidate meets the flag-rate bound
   (the "no-consensus" flags do not fall as theta grows), the one with the lowest flag
   rate is taken and ``constraint_met`` is false. The winner is then moved to the middle
   of the interval up to the next observed uncertainty (:func:`~aax.evaluation.calibration.theta.settle_theta`): same
   decisions on the validation images, but no member sits exactly on the threshold.
2. **tau**, where the validation data has ground-truth masks: at the chosen theta, tau
   sweeps 0.05, 0.10, ..., 0.95; the best mean IoU of the ensemble's masks (as
   :mod:`aax.evaluation.evaluate` scores them) wins, ties going to the value nearest the current
   tau. Per image, the pixel counts of ``min_i S_i > tau`` are computed once for every
   set of members that can agree on it, at the image's own size, so the sweep is exact.
   Without masks tau is left as it is (or set to ``tau_without_masks``, e.g. ``"otsu"``).
3. **fusion and per-class tau**, where masks exist: the same exact counts are made for
   each fusion of :data:`aax.models.mask_settings.FUSIONS` (intersection, mean, 2-of-3 vote) and for
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
   map averaged over the image's superpixels (:mod:`aax.models.refine`); the refinement is
   one more choice in the same table, and "none" (the paper's) wins ties.

Results: ``theta``/``tau`` and a ``calibration`` entry (what was measured, on what, and
when) are written into ``RUN/aax.json`` atomically; the risk-coverage curve (accuracy on
kept images vs coverage as theta moves) goes to ``RUN/calibration/risk_coverage.json``
and ``.png``. The uncertainty depends on the number of MC passes K, so the calibration
records K; annotate with the same K.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aax.evaluation.calibration.collect import TAU_GRID, collect
from aax.evaluation.calibration.files import calibration_split, split_name, validation_split, write_calibration
from aax.evaluation.calibration.masks import choose_masks, member_sets, trivial_scores
from aax.evaluation.calibration.theta import MAX_FLAG_RATE, choose_theta, settle_theta
from aax.evaluation.inputs import describe, open_data, open_images, run_label_map, samples
from aax.evaluation.metrics import ThetaSweep, risk_coverage, theta_candidates
from aax.evaluation.trivial import trivial_warning
from aax.models.mask_settings import FUSIONS, MAP_SOURCES
from aax.models.refine import REFINES

if TYPE_CHECKING:  # pragma: no cover
    from aax.models.ensemble import Ensemble


def _load(ensemble_or_run: Any, device: str | None) -> Ensemble:
    if isinstance(ensemble_or_run, (str, os.PathLike)):
        from aax.models.ensemble import Ensemble

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
              refines: Sequence[str] = REFINES, novelty_images: Any = None,
              novelty_valdata: Any = None) -> dict[str, Any]:
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
            (:mod:`aax.models.novelty_fit`); ``novelty_score``/``novelty_pass_rate`` override
            the run's (default ``maha``, 0.95); ``novelty_per_class`` too (default
            True: one threshold per predicted class, :func:`aax.models.novelty.class_thresholds`).
        fusions: the fusions to choose from where masks exist (``("min",)`` keeps the
            paper's intersection).
        tau_without_masks: the tau to set when the data has no masks (``"otsu"``: each
            image's own Otsu threshold); None leaves the run's tau.
        sources: the map sources to choose from where masks exist (default: the run's
            own). With ``"patch"`` among them and ``write``, the run's patch bank is made
            first (:func:`aax.models.patch_maps.fit_run`, from the negative training images);
            each source is calibrated as above and the one with the best validation mean
            IoU is kept (ties: the first listed). Without masks the run's source is kept.
        choose_members: where masks exist, also choose the mask members (step 4 of the
            module docstring); False fuses every agreeing member's map, as the paper does.
        refines: the refinements of the fused map to choose from where masks exist
            (step 5; ``("none",)`` keeps the paper's thresholded map). Without masks the
            run's refinement is kept.
        novelty_valdata: labelled images to set the novelty thresholds on instead of
            ``valdata`` (the validation split alone when ``valdata`` also holds reviewed
            training images).
        novelty_images: in-distribution images to set the novelty thresholds on instead
            of ``valdata`` (a folder, a dataset whose labels are ignored, or paths; no
            labels needed, as each threshold is taken over the images a member predicts
            as a class). The thresholds' pass rate on new images holds within a few
            points only with hundreds of images per class
            (:func:`aax.models.novelty.pass_rate_on_new_images`); the labelled validation split
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
    unknown = [s for s in sources if s not in MAP_SOURCES]
    if unknown:
        raise ValueError(f"unknown map source {unknown[0]!r}; expected one of {MAP_SOURCES}")
    refines = tuple(refines)
    if not refines or any(r not in REFINES for r in refines):
        raise ValueError(f"refines must name some of {REFINES}, got {list(refines)}")
    patch_block = None
    if write and "patch" in sources and getattr(ensemble, "run", None) is not None:
        from aax.models.patch_maps import fit_run as fit_patches

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
        elif candidate == "segmentation" and any(getattr(m, "seg", None) is None
                                                  for m in ensemble.members.values()):
            by_source.append({"source": candidate, "skipped": "the members have no segmentation head"})
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
        "data": data_name or describe(valdata), "n": int(len(collected.labels)), "n_errors": collected.n_errors,
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
            labelled_novelty = valdata if novelty_valdata is None else novelty_valdata
            result["novelty"] = _novelty(ensemble, labelled_novelty if novelty_images is None else novelty_images,
                                         novelty_score, novelty_pass_rate, novelty_per_class,
                                         labelled=novelty_images is None)
    return result


def _novelty(ensemble: Ensemble, images: Any, score: str | None, pass_rate: float | None,
             per_class: bool | None = None, labelled: bool = True) -> dict[str, Any] | None:
    """Novelty features and thresholds (:func:`aax.models.novelty_fit.calibrate_novelty`) on
    ``images`` (the labelled validation data, or with ``labelled=False`` any images:
    :func:`aax.evaluation.inputs.open_images`); a run whose training images cannot be found again,
    and that has no features, keeps working without the step, and the entry says why."""
    from aax.models.novelty_fit import calibrate_novelty

    if not isinstance(getattr(ensemble, "manifest", None), dict):
        return {"skipped": "not an ensemble loaded from a RUN folder"}
    source = open_data(images, list(ensemble.classes)) if labelled else open_images(images)
    paths = [str(s.image) for s in samples(source)]
    try:
        return calibrate_novelty(ensemble, paths, score=score, pass_rate=pass_rate, per_class=per_class,
                                 val_name=None if labelled else f"{describe(images)} (unlabelled)")
    except (ValueError, OSError) as exc:  # e.g. the training images are gone: the run works without
        return {"skipped": str(exc)}


def _brief(chosen: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    return {"mask_members": _member_names(chosen.get("members"), names),
            **{k: chosen[k] for k in ("fusion", "refine", "tau", "iou_mean", "iou_micro", "n_masks")}}


def _member_names(members: Sequence[int] | None, names: Sequence[str]) -> list[str] | None:
    return None if members is None else [names[i] for i in members]


def calibrate_run(run_dir: str | os.PathLike, *, max_flag_rate: float = MAX_FLAG_RATE,
                  ensemble: Ensemble | None = None, device: str | None = None,
                  batch_size: int | None = None, novelty_images: Any = None) -> dict[str, Any]:
    """Calibrate a RUN on the validation split recorded in its manifest, with its reviewed
    masks when it has enough (:func:`~aax.evaluation.calibration.files.calibration_split`;
    what ``aax train`` calls at the end) and write the result into the RUN;
    ``novelty_images``: as :func:`calibrate`'s."""
    val = calibration_split(run_dir)
    # reviewed images trained the members: novelty thresholds stay on the unseen ones
    unseen = validation_split(run_dir) if getattr(val, "reviewed_masks", 0) else None
    return calibrate(ensemble if ensemble is not None else run_dir, val, max_flag_rate=max_flag_rate,
                     device=device, batch_size=batch_size, write=True, data_name=split_name(val),
                     novelty_images=novelty_images, novelty_valdata=unseen)
