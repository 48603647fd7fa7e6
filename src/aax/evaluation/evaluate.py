"""Evaluation: the paper's tables 1-4 for any labelled data, from one annotate pass.

One pass of :meth:`Ensemble.annotate` with the saliency maps kept gives everything:
the ensemble's own decisions and masks, and, from the same numbers, what each member
would have answered alone (:mod:`aax.evaluation.scoring`). Optional unseen images add
the open-set check. The result is plain data (a dict); the markdown tables
(:mod:`aax.evaluation.tables`) and the HTML report (:mod:`aax.evaluation.report`) are
made from it.

A RUN that learned from reviews (``aax retrain``) lists the reviewed images; evaluation
refuses data that holds any of them (:class:`ReviewedTestImages`), since a reviewed image
trained the members and would flatter every figure, unless told to leave them out
(``reviewed="exclude"``, ``aax evaluate --exclude-reviewed``).

Masks are compared at the image's original size. Records with ``status == "error"`` are
left out of every metric and counted in ``settings.n_errors``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aax.annotation.records import REVIEW, AnnotationRecord
from aax.models.mask_settings import parse_tau
from aax.evaluation.inputs import (annotate_with, dataset_errors, describe, no_labelled_images, open_data,
                                   open_images, paired, run_label_map, samples)
from aax.evaluation.metrics import ThetaSweep, auroc, confusion_matrix, risk_coverage, theta_candidates
from aax.evaluation.openset import member_columns, novelty_summary
from aax.evaluation.scoring import Scorer
from aax.evaluation.tables import ENSEMBLE, Tau, per_image_csv, tables_markdown

if TYPE_CHECKING:  # pragma: no cover
    from aax.models.ensemble import Ensemble


def _mask_members(ensemble: Any) -> list[str] | None:
    members = getattr(getattr(ensemble, "maps", None), "mask_members", None)
    return None if members is None else list(members)


def _quorum_uncertainty(unc: np.ndarray, quorum: int) -> np.ndarray:
    """The ``quorum``-th largest member uncertainty: the protocol flags an image as
    uncertain exactly when this is over theta, so it is the ensemble's own score."""
    q = min(max(quorum, 1), unc.shape[1])
    return np.sort(unc, axis=1)[:, -q]


def open_set(seen_unc: np.ndarray, seen_flagged: np.ndarray, unseen_records: Sequence[AnnotationRecord],
             names: Sequence[str], theta: float, quorum: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Flag rates on seen vs unseen images and the AUROC of each uncertainty score for
    telling them apart (higher = more likely unseen). Returns (summary, per-image rows)."""
    ok = [r for r in unseen_records if r.status == "ok"]
    rows = []
    for r in unseen_records:
        row: dict[str, Any] = {"set": "unseen", "image": r.image, "status": r.status, "error": r.error,
                               "label": r.label}
        if r.status == "ok":
            row.update(decision=r.decision, reason=r.reason, agreeing="+".join(r.agreeing))
            for m in r.members:
                row[f"{m.name}_u"] = m.uncertainty
                row[f"{m.name}_decision"] = REVIEW if (m.uncertainty > theta or m.predicted is None) else m.predicted
            row.update(member_columns(r))
        rows.append(row)
    unseen_unc = np.array([[m.uncertainty for m in r.members] for r in ok], dtype=float).reshape(len(ok), len(names))
    scores = {n: (seen_unc[:, i], unseen_unc[:, i]) for i, n in enumerate(names)}
    scores[f"{ENSEMBLE} (quorum-th largest u)"] = (_quorum_uncertainty(seen_unc, quorum),
                                                    _quorum_uncertainty(unseen_unc, quorum))
    scores[f"{ENSEMBLE} (mean u)"] = (seen_unc.mean(axis=1), unseen_unc.mean(axis=1))
    scores[f"{ENSEMBLE} (max u)"] = (seen_unc.max(axis=1), unseen_unc.max(axis=1))
    unseen_flagged = np.array([r.flagged for r in ok], dtype=bool)
    # the share of images whose score is over theta; for the quorum-th largest u that
    # is exactly the share the protocol flags as "uncertain"
    over_theta = {k: {"seen": _rate(s > theta), "unseen": _rate(u > theta)} for k, (s, u) in scores.items()}
    decisions: dict[str, int] = {}
    for r in ok:
        decisions[r.decision] = decisions.get(r.decision, 0) + 1
    summary = {
        "n": len(ok),
        "n_errors": len(unseen_records) - len(ok),
        "flag_rate_unseen": _rate(unseen_flagged),
        "flag_rate_seen": _rate(seen_flagged),
        "over_theta": over_theta,
        "auroc": {k: auroc(s, u) for k, (s, u) in scores.items()},
        "decisions": decisions,
    }
    return summary, rows


class ReviewedTestImages(ValueError):
    """The test data holds images the RUN learned from reviews."""


def drop_reviewed(ensemble: Any, dataset: Any, mode: str = "refuse", also: Sequence[Any] = ()) -> tuple[Any, int]:
    """``dataset`` without the images that ``ensemble``'s RUN (or any RUN in ``also``,
    manifests or ensembles) learned from reviews, and how many were left out.

    With ``mode="refuse"`` (the default) any such image raises :class:`ReviewedTestImages`,
    which names them; ``"exclude"`` leaves them out.
    """
    from aax.training.reviewed import reviewed_files

    if mode not in ("refuse", "exclude"):
        raise ValueError(f"reviewed must be 'refuse' or 'exclude', got {mode!r}")
    files: set[str] = set()
    for source in (ensemble, *also):
        manifest = getattr(source, "manifest", source)
        files |= reviewed_files(manifest if isinstance(manifest, Mapping) else {})
    if not files:
        return dataset, 0
    keep = [i for i, s in enumerate(dataset) if str(Path(s.image).resolve()) not in files]
    leaked = len(dataset) - len(keep)
    if not leaked:
        return dataset, 0
    if mode == "refuse":
        kept = set(keep)
        shown = [str(dataset[i].image) for i in range(len(dataset)) if i not in kept][:3]
        raise ReviewedTestImages(
            f"{leaked} of the {len(dataset)} test images were reviewed into training of "
            f"{getattr(ensemble, 'run', 'the RUN')} (e.g. {', '.join(shown)}): their figures would "
            "not be held-out figures. Evaluate on other images, or leave these out with "
            "--exclude-reviewed (reviewed='exclude')")
    return dataset.subset(keep), leaked


def _rate(flags: np.ndarray) -> float | None:
    return float(np.mean(flags)) if len(flags) else None


def evaluate(ensemble: Ensemble, data: Any, *, unseen: Any = None, theta: float | None = None,
             tau: Tau | None = None, out: str | os.PathLike | None = None,
             mc_passes: int | None = None, batch_size: int | None = None, report: bool = True,
             max_examples: int = 8, workers: int | None = None,
             label_map: Mapping[str, str] | None = None, novelty: bool = True,
             reviewed: str = "refuse", reviewed_runs: Sequence[Any] = ()) -> dict[str, Any]:
    """Score the ensemble and each member alone on labelled ``data``.

    Args:
        ensemble: a loaded :class:`aax.models.ensemble.Ensemble`.
        data: a dataset (``aax.data`` Dataset) or a path :func:`aax.data.open_dataset` reads.
        unseen: optional images of a kind never trained on (a dataset, a folder, or a
            list of paths); adds the open-set check (flag rates, uncertainty AUROC).
        theta: overrides the run's theta.
        tau: overrides the run's tau (one value, or one per class).
        out: folder for ``metrics.json``, ``tables.md``, ``per_image.csv`` and (with
            ``report``) ``report.html``; nothing is written when None.
        mc_passes: passed to :meth:`Ensemble.annotate` (the device is the
            ensemble's, chosen when it was loaded).
        batch_size: passed to :meth:`Ensemble.annotate`.
        workers: passed to :meth:`Ensemble.annotate`.
        report: write ``report.html`` into ``out``.
        max_examples: rows of the report's example grid.
        label_map: renames the labels of ``data`` as it is read (``{"tb": "diseased"}``);
            default: the map the run was trained with.
        novelty: apply the run's novelty step (False: the paper's protocol alone, as its
            tables were made; the novelty scores are still reported with ``unseen``).
        reviewed: ``"refuse"`` data holding images the RUN learned from reviews
            (:class:`ReviewedTestImages`), or ``"exclude"`` them (counted in
            ``settings.excluded_reviewed``).
        reviewed_runs: other RUNs (folders, manifests or ensembles) whose reviewed images
            are left out too, so that two runs compared side by side see the same images.

    Returns:
        The content of ``metrics.json`` (``members``, ``ensemble``, ``settings``,
        ``confusion``, ``risk_coverage``, ``errors`` and, with ``unseen``, ``unseen``)
        plus ``tables`` (markdown) and ``per_image`` (the rows of ``per_image.csv``).
    """
    theta = float(ensemble.theta if theta is None else theta)
    tau = ensemble.tau if tau is None else tau
    tau = parse_tau(tau)
    names = list(ensemble.members)
    classes = list(ensemble.classes)
    dataset = open_data(data, classes, run_label_map(ensemble) if label_map is None else label_map)
    dataset, excluded = drop_reviewed(ensemble, dataset, reviewed, [_manifest_of(r) for r in reviewed_runs])
    negative = ensemble.negative_class
    refine = getattr(getattr(ensemble, "maps", None), "refine", "none")
    scorer = Scorer(names, classes, negative, theta, tau, max_examples if (out is not None and report) else 0,
                     refine)
    want_preview = out is not None and report and max_examples > 0
    records = annotate_with(ensemble, dataset, saliency=True, preview=want_preview, theta=theta, tau=tau,
                            mc_passes=mc_passes, batch_size=batch_size, workers=workers,
                            novelty=None if novelty else False)
    for sample, record in paired(samples(dataset), records):
        scorer.add(sample, record)
    if not scorer.labels:
        raise no_labelled_images(data, dataset, classes)

    probs = np.stack(scorer.probs)
    unc = np.stack(scorer.uncertainty)
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[label] for label in scorer.labels])
    sweep = ThetaSweep.build(probs, unc, ensemble.negative_index, ensemble.quorum)
    curve = risk_coverage(sweep, y, theta_candidates(unc, default=theta, max_candidates=512))

    errors = dataset_errors(dataset) + scorer.errors
    mc = int(ensemble.mc_passes if mc_passes is None else mc_passes)
    result: dict[str, Any] = {
        "members": {n: scorer.metrics(n) for n in names},
        "ensemble": scorer.metrics(ENSEMBLE),
        "trivial": {n: scorer.trivial_metrics(n) for n in scorer.trivial} if scorer.has_masks else {},
        "settings": {
            "theta": theta, "tau": tau, "mc_passes": mc, "quorum": int(ensemble.quorum),
            "run": str(getattr(ensemble, "run", "")), "data": describe(data),
            "classes": classes, "negative_class": negative, "n_images": len(scorer.rows),
            "n_errors": len(errors), "has_masks": scorer.has_masks,
            "novelty": _novelty_settings(ensemble) if novelty else None,
            "map_source": getattr(getattr(ensemble, "maps", None), "source", "cam"),
            "fusion": getattr(getattr(ensemble, "maps", None), "fusion", "min"),
            "mask_members": _mask_members(ensemble),
            "refine": refine,
            "excluded_reviewed": excluded,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        },
        "confusion": {
            "rows": classes, "columns": [*classes, REVIEW],
            "ensemble": confusion_matrix(scorer.labels, scorer.predictions[ENSEMBLE], classes).tolist(),
            "members": {n: confusion_matrix(scorer.labels, scorer.predictions[n], classes).tolist() for n in names},
        },
        "risk_coverage": curve,
        "errors": errors,
    }
    per_image = scorer.rows
    if unseen is not None:
        unseen_images = open_images(unseen)
        unseen_records = list(annotate_with(ensemble, unseen_images, saliency=False, theta=theta, tau=tau,
                                            mc_passes=mc_passes, batch_size=batch_size, workers=workers,
                                            novelty=None if novelty else False))
        seen_flagged = np.array([p == REVIEW for p in scorer.predictions[ENSEMBLE]])
        summary, rows = open_set(unc, seen_flagged, unseen_records, names, theta, int(ensemble.quorum))
        summary["data"] = describe(unseen)
        summary["novelty"] = novelty_summary(scorer.seen, unseen_records, names, ensemble, theta)
        result["unseen"] = summary
        per_image = per_image + rows
    result["tables"] = tables_markdown(result)
    result["per_image"] = per_image
    if out is not None:
        write_outputs(result, out)
        if report:
            from aax.evaluation.report import write_html

            write_html(result, scorer.examples(), out)
    return result


def _manifest_of(run: Any) -> Mapping[str, Any]:
    if isinstance(run, (str, os.PathLike)):
        from aax.models import runfiles

        return runfiles.read_json(Path(run) / runfiles.MANIFEST)
    return getattr(run, "manifest", run)


def _novelty_settings(ensemble: Any) -> dict[str, Any] | None:
    """The run's novelty step as evaluated: the score, pass rate and member thresholds
    (and, when it has them, the member thresholds per predicted class)."""
    scorer = getattr(ensemble, "novelty", None)
    if scorer is None or not scorer.ready:
        return None
    return {"pass_rate": scorer.pass_rate, **scorer.step()}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_outputs(result: dict[str, Any], out: str | os.PathLike) -> Path:
    """Write ``metrics.json``, ``tables.md`` and ``per_image.csv`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {k: v for k, v in result.items() if k not in ("tables", "per_image")}
    _atomic_write(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    _atomic_write(out / "tables.md", result["tables"] + "\n")
    _atomic_write(out / "per_image.csv", per_image_csv(result["per_image"]))
    return out
