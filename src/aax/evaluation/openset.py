"""The open-set check, side by side: every novelty score against MC Dropout's ``u``.

For seen images (the evaluation data) and unseen ones (a kind never trained on), each
score of each member, and the ensemble's rule for it, is judged by:

- AUROC of telling unseen from seen (higher score = more likely unseen);
- FPR at 95 % TPR: the share of seen images scoring at least as high as the score
  that catches 95 % of the unseen ones;
- flag rates on seen and unseen images at the stored thresholds (``RUN/aax.json``:
  the novelty thresholds from the validation split, the member's predicted class's
  where it has one, as the protocol applies them; for ``u``, theta).

The ensemble rule is the protocol's: an image is flagged when at least ``quorum``
members are over their thresholds; its continuous score (for AUROC) is the
``quorum``-th largest member margin (:func:`aax.models.novelty.margin`), and for ``u`` the
``quorum``-th largest ``u``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from aax.annotation.records import AnnotationRecord
from aax.evaluation.metrics import auroc
from aax.models.novelty import SCORES, limits_for, margin, quorum_margin

ENSEMBLE = "AAX"
U = "u"  # MC Dropout's uncertainty, the paper's score
SCORE_LABELS = {U: "MC-Dropout u", "msp": "max softmax", "energy": "energy", "knn": "KNN",
                "maha": "Mahalanobis (shrunk)", "rmd": "relative Mahalanobis"}


def fpr_at_tpr(negatives: Sequence[float], positives: Sequence[float], tpr: float = 0.95) -> float | None:
    """Share of ``negatives`` at or over the largest threshold that still puts at least
    ``tpr`` of ``positives`` at or over it (higher = more likely positive)."""
    neg = np.asarray(negatives, dtype=float).ravel()
    pos = np.sort(np.asarray(positives, dtype=float).ravel())
    if neg.size == 0 or pos.size == 0:
        return None
    need = math.ceil(tpr * pos.size - 1e-9)
    t = pos[pos.size - need]
    return float(np.mean(neg >= t))


def member_scores(records: Sequence[AnnotationRecord], names: Sequence[str]) -> dict[str, np.ndarray]:
    """score -> ``[N, M]`` over ``ok`` records: ``u`` always, the novelty scores when every
    record carries them."""
    ok = [r for r in records if r.status == "ok"]
    out = {U: np.array([[m.uncertainty for m in r.members] for r in ok], dtype=float).reshape(len(ok), len(names))}
    if ok and all(m.novelty for r in ok for m in r.members):
        for s in SCORES:
            if all(s in m.novelty for r in ok for m in r.members):
                out[s] = np.array([[m.novelty[s] for m in r.members] for r in ok], dtype=float)
    return out


def member_predicted(records: Sequence[AnnotationRecord], names: Sequence[str]) -> np.ndarray:
    """``[N, M]`` each member's predicted class (None on a tie) over ``ok`` records."""
    ok = [r for r in records if r.status == "ok"]
    out = np.empty((len(ok), len(names)), dtype=object)
    for j, r in enumerate(ok):
        out[j] = [m.predicted for m in r.members]
    return out


def member_predicted_from_rows(rows: Sequence[Mapping[str, Any]], names: Sequence[str],
                               part: str = "data") -> np.ndarray:
    """:func:`member_predicted` from evaluation rows (:func:`member_columns`)."""
    ok = [r for r in rows if r.get("set") == part and r.get("status") == "ok"]
    out = np.empty((len(ok), len(names)), dtype=object)
    for j, r in enumerate(ok):
        out[j] = [r.get(f"{n}_predicted") for n in names]
    return out


def member_scores_from_rows(rows: Sequence[Mapping[str, Any]], names: Sequence[str],
                            part: str = "data") -> dict[str, np.ndarray]:
    """:func:`member_scores` from :func:`aax.evaluation.evaluate.evaluate`'s per-image rows of one
    ``part`` (``"data"`` or ``"unseen"``), so another unseen set needs no second pass
    over the data."""
    ok = [r for r in rows if r.get("set") == part and r.get("status") == "ok"]
    out = {U: np.array([[r[f"{n}_{U}"] for n in names] for r in ok], dtype=float).reshape(len(ok), len(names))}
    for s in SCORES:
        if ok and all(f"{n}_{s}" in r for r in ok for n in names):
            out[s] = np.array([[r[f"{n}_{s}"] for n in names] for r in ok], dtype=float)
    return out


def compare(result: Mapping[str, Any], unseen_records: Sequence[AnnotationRecord], ensemble: Any,
            data: str = "") -> dict[str, Any]:
    """The side-by-side summary for another unseen set, against the data of an
    evaluation ``result`` (its per-image rows); ``unseen_records`` are annotated with
    the same settings."""
    names = list(result["members"])
    theta = float(result["settings"]["theta"])
    scorer = getattr(ensemble, "novelty", None)
    seen = member_scores_from_rows(result["per_image"], names)
    unseen = member_scores(unseen_records, names)
    ok = [r for r in unseen_records if r.status == "ok"]
    data_rows = [r for r in result["per_image"] if r.get("set") == "data" and r.get("status") == "ok"]
    return {
        "data": data, "n": len(ok), "available": len(seen) > 1 and len(unseen) > 1,
        "score": None if scorer is None else scorer.score,
        "pass_rate": None if scorer is None else scorer.pass_rate,
        "rows": side_by_side(seen, unseen, names, scorer.thresholds if scorer is not None else {}, theta,
                             int(ensemble.quorum), member_predicted_from_rows(result["per_image"], names),
                             member_predicted(unseen_records, names)),
        "novel_rate_seen": _rate(np.array([r.get("reason") == "novel" for r in data_rows])),
        "novel_rate_unseen": _rate(np.array([r.reason == "novel" for r in ok])),
        "flag_rate_unseen": _rate(np.array([r.flagged for r in ok])),
    }


def _rate(flags: np.ndarray) -> float | None:
    return float(np.mean(flags)) if flags.size else None


def side_by_side(seen: Mapping[str, np.ndarray], unseen: Mapping[str, np.ndarray], names: Sequence[str],
                 thresholds: Mapping[str, Mapping[str, Mapping[str, Any]]], theta: float,
                 quorum: int, predicted_seen: np.ndarray | None = None,
                 predicted_unseen: np.ndarray | None = None) -> list[dict[str, Any]]:
    """One row per score and member, and one per score for the ensemble rule.

    Args:
        seen: :func:`member_scores` of the seen set.
        unseen: :func:`member_scores` of the unseen set.
        names: member names (the columns of the score arrays).
        thresholds: member -> score -> ``{"threshold", "median", "by_class"}`` (the
            run's novelty thresholds; a score without them gets no flag rates).
        theta: the threshold of ``u``.
        quorum: members needed to flag.
        predicted_seen: :func:`member_predicted` of the seen set; with it (and
            ``predicted_unseen``) an image meets its member's predicted class's threshold
            (when that class has one), as in the protocol; without, every image the
            member's threshold.
        predicted_unseen: :func:`member_predicted` of the unseen set.
    """
    def image_limits(entry: Mapping[str, Any], predicted: np.ndarray | None, i: int, n: int) -> tuple[Any, Any]:
        if predicted is None or predicted.shape[0] != n:
            return entry["threshold"], entry["median"]
        return limits_for(entry, list(predicted[:, i]))

    rows: list[dict[str, Any]] = []
    for score in [U, *[s for s in ("msp", "energy", "knn", "maha", "rmd") if s in seen and s in unseen]]:
        s_seen, s_unseen = seen[score], unseen[score]
        if score == U:
            limits = {n: {"threshold": theta, "median": 0.0} for n in names}
        else:
            limits = {n: thresholds[n][score] for n in names if score in thresholds.get(n, {})}
        have = len(limits) == len(names)
        for i, n in enumerate(names):
            if n not in limits:
                rows.append(_row(score, n, s_seen[:, i], s_unseen[:, i], None, None))
                continue
            t_seen = image_limits(limits[n], predicted_seen, i, len(s_seen))[0]
            t_unseen = image_limits(limits[n], predicted_unseen, i, len(s_unseen))[0]
            rows.append(_row(score, n, s_seen[:, i], s_unseen[:, i], s_seen[:, i] > t_seen, s_unseen[:, i] > t_unseen))
        if score == U:
            q_seen, q_unseen = quorum_margin(s_seen, quorum), quorum_margin(s_unseen, quorum)
            f_seen, f_unseen = q_seen > theta, q_unseen > theta
        elif have:
            def ensemble_margin(values: np.ndarray, predicted: np.ndarray | None) -> np.ndarray:
                m = np.stack([margin(values[:, i], *image_limits(limits[n], predicted, i, len(values)))
                              for i, n in enumerate(names)], axis=1)
                return quorum_margin(m, quorum)

            q_seen, q_unseen = ensemble_margin(s_seen, predicted_seen), ensemble_margin(s_unseen, predicted_unseen)
            f_seen, f_unseen = q_seen > 0, q_unseen > 0
        else:
            continue
        rows.append(_row(score, f"{ENSEMBLE} ({quorum} of {len(names)})", q_seen, q_unseen, f_seen, f_unseen))
    return rows


def _row(score: str, method: str, seen: np.ndarray, unseen: np.ndarray,
         flag_seen: np.ndarray | None, flag_unseen: np.ndarray | None) -> dict[str, Any]:
    return {"score": score, "label": SCORE_LABELS.get(score, score), "method": method,
            "auroc": auroc(seen, unseen), "fpr95": fpr_at_tpr(seen, unseen),
            "flag_seen": None if flag_seen is None else _rate(flag_seen),
            "flag_unseen": None if flag_unseen is None else _rate(flag_unseen)}


def novelty_summary(seen_records: Sequence[AnnotationRecord], unseen_records: Sequence[AnnotationRecord],
                    names: Sequence[str], ensemble: Any, theta: float) -> dict[str, Any]:
    """The side-by-side table and the protocol's own rates (share of images sent to
    review with reason ``novel``), for :func:`aax.evaluation.evaluate.evaluate`."""
    quorum = int(ensemble.quorum)
    scorer = getattr(ensemble, "novelty", None)
    thresholds = scorer.thresholds if scorer is not None else {}
    seen, unseen = member_scores(seen_records, names), member_scores(unseen_records, names)
    ok_seen = [r for r in seen_records if r.status == "ok"]
    ok_unseen = [r for r in unseen_records if r.status == "ok"]
    return {
        "available": len(seen) > 1 and len(unseen) > 1,
        "score": None if scorer is None else scorer.score,
        "pass_rate": None if scorer is None else scorer.pass_rate,
        "rows": side_by_side(seen, unseen, names, thresholds, theta, quorum,
                             member_predicted(seen_records, names), member_predicted(unseen_records, names)),
        "novel_rate_seen": _rate(np.array([r.reason == "novel" for r in ok_seen])),
        "novel_rate_unseen": _rate(np.array([r.reason == "novel" for r in ok_unseen])),
    }


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _num(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def table_markdown(summary: Mapping[str, Any]) -> list[str]:
    """The side-by-side table as markdown lines."""
    out = ["| Score | Member / rule | AUROC | FPR at 95% TPR (%) | Flagged, seen (%) | Flagged, unseen (%) |",
           "|---|---|---:|---:|---:|---:|"]
    for r in summary["rows"]:
        method = f"**{r['method']}**" if r["method"].startswith(ENSEMBLE) else r["method"]
        out.append(f"| {r['label']} | {method} | {_num(r['auroc'])} | {_pct(r['fpr95'])} "
                   f"| {_pct(r['flag_seen'])} | {_pct(r['flag_unseen'])} |")
    return out


def member_columns(record: AnnotationRecord) -> dict[str, Any]:
    """Per-image CSV columns: each member's novelty scores, the class it predicts (which
    threshold applies) and whether it found the image novel."""
    row: dict[str, Any] = {}
    for m in record.members:
        for s, v in (m.novelty or {}).items():
            row[f"{m.name}_{s}"] = v
        if m.novelty:
            row[f"{m.name}_predicted"] = m.predicted
        if m.novel is not None:
            row[f"{m.name}_novel"] = m.novel
    return row
