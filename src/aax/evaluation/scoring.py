"""Scoring one record at a time: the ensemble's answer and what each member would have
answered alone, by the same code (:mod:`aax.evaluation.metrics`), so the comparison cannot drift.

A member alone (the paper's "ResNet50 with XGrad-CAM and Monte Carlo Dropout" rows):
    * its class is the strict argmax of its mean MC probabilities (a tie is no class and
      counts as flagged);
    * it is flagged (review) when its own uncertainty is over theta (``u > theta``, the
      same rule as the protocol's);
    * its mask, when it predicts a positive class, is its own saliency map ``> tau``;
      otherwise it has none (IoU 0 on a positive image).
The ensemble's decision and mask are the record's, as :mod:`aax.annotation.decide` made them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from aax.annotation.decide import binarise
from aax.annotation.records import REVIEW, AnnotationRecord
from aax.evaluation.metrics import MaskScores, classification_metrics
from aax.evaluation.openset import member_columns
from aax.evaluation.report.example import Example
from aax.evaluation.tables import ENSEMBLE, Tau
from aax.evaluation.trivial import TRIVIAL_MASKS, trivial_mask
from aax.models.mask_settings import tau_for
from aax.models.refine import pool_resized_numpy


def ground_truth(sample: Any, record: AnnotationRecord, label: str,
                 negative: str) -> tuple[np.ndarray | None, dict[str, str] | None]:
    """The ground-truth mask of a positive image, at the image's size, or None.

    A mask that cannot be read, or whose size is not the image's, is reported (second
    value) and the image is scored without one: bad input never stops a run.
    """
    if label == negative or not hasattr(sample, "mask"):
        return None, None
    from aax.data import ImageError

    try:
        gt = sample.mask()
    except (ImageError, OSError, ValueError) as exc:
        return None, {"image": record.image, "error": f"ground-truth mask: {getattr(exc, 'reason', exc)}"}
    if gt is None:
        return None, None
    gt = np.asarray(gt, dtype=bool)
    if record.size is not None and gt.shape != tuple(record.size):
        return None, {"image": record.image,
                      "error": f"ground-truth mask is {gt.shape[1]}x{gt.shape[0]}, the image "
                               f"{record.size[1]}x{record.size[0]}; scored without it"}
    return gt, None


def member_decision(record: AnnotationRecord, index: int, theta: float, novel: bool | None = None) -> str:
    """What member ``index`` answers alone: its class, or ``review`` when its own
    uncertainty is over theta, its top probabilities tie, or it finds the image novel.

    A member alone runs the ensemble's checks with a quorum of one, so that "member vs
    AAX" compares like with like: when the novelty step ran (the member's ``novel`` is
    True or False) an image the member finds novel goes to review, as it would for a
    user running that member by itself; without the step (``novel`` None, e.g.
    ``aax evaluate --no-novelty``) only theta flags, as in the paper's tables. ``novel``
    overrides the record's verdict (benchmarks re-deriving the step with other thresholds).
    """
    m = record.members[index]
    novel = m.novel if novel is None else novel
    if m.uncertainty > theta or m.predicted is None or novel:
        return REVIEW
    return m.predicted


def image_regions(record: AnnotationRecord, refine: str) -> np.ndarray | None:
    """The record's superpixel labels (at their own size) when ``refine`` is
    ``"superpixels"`` and it has them (:mod:`aax.models.refine`), else None: what
    :func:`member_mask` pools a member's map over, as annotation pools the fused one."""
    if refine != "superpixels" or record.regions is None or record.size is None:
        return None
    return record.regions


def member_mask(record: AnnotationRecord, index: int, decision: str, negative: str,
                tau: Tau, regions: np.ndarray | None = None) -> np.ndarray | None:
    """A member's own mask: its saliency map ``> tau`` when it alone predicts a positive
    class; with ``regions`` (:func:`image_regions`) the map is first averaged over the
    image's regions, as a refining run's fused map is."""
    if decision in (REVIEW, negative) or record.saliency is None:
        return None
    score = record.saliency[record.members[index].name]
    if regions is not None:
        score = pool_resized_numpy(score, regions)
    return binarise(score, tau_for(tau, decision))


class Scorer:
    """Accumulates the ensemble's and the members' metrics one record at a time."""

    def __init__(self, names: Sequence[str], classes: Sequence[str], negative: str,
                 theta: float, tau: Tau, max_examples: int, refine: str = "none") -> None:
        self.names, self.classes, self.negative = list(names), list(classes), negative
        self.positive = [c for c in classes if c != negative]
        self.theta, self.tau, self.refine = theta, tau, refine
        self.labels: list[str] = []
        self.predictions: dict[str, list[str]] = {n: [] for n in [ENSEMBLE, *names]}
        self.masks: dict[str, MaskScores] = {n: MaskScores() for n in [ENSEMBLE, *names]}
        # the masks a method did give (the images it annotated), as a user receives them
        self.given: dict[str, MaskScores] = {n: MaskScores() for n in [ENSEMBLE, *names]}
        self.trivial: dict[str, MaskScores] = {n: MaskScores() for n in TRIVIAL_MASKS}
        # AAX's masks with its drafts in place of nothing on the flagged images: what a
        # person starts from on every image (a confident miss still scores 0)
        self.with_drafts, self.drafts = MaskScores(), MaskScores()
        # the trivial masks on the images AAX gave a mask for: do the masks a reviewer
        # receives beat a box there? (a method that abstains scores 0 on what it flags)
        self.trivial_given: dict[str, MaskScores] = {n: MaskScores() for n in TRIVIAL_MASKS}
        self.probs: list[np.ndarray] = []
        self.uncertainty: list[np.ndarray] = []
        self.seen: list[AnnotationRecord] = []  # the members' answers only, for the open-set table
        self.rows: list[dict[str, Any]] = []
        self.errors: list[dict[str, str]] = []
        self.has_masks = False
        self.max_examples = max_examples
        self.kept: dict[str, list[Example]] = {"wrong": [], "correct_pos": [], "correct_neg": []}

    def add(self, sample: Any, record: AnnotationRecord) -> None:
        if record.status != "ok":
            self.errors.append({"image": record.image, "error": record.error or "unknown error"})
            self.rows.append({"set": "data", "image": record.image, "status": record.status,
                              "error": record.error, "label": record.label})
            return
        label = record.label if record.label is not None else getattr(sample, "label", None)
        if label not in self.classes:
            raise ValueError(f"{record.image}: label {label!r} is not one of the model's classes {self.classes}")
        self.labels.append(label)
        self.probs.append(np.array([m.probs for m in record.members], dtype=float))
        self.uncertainty.append(np.array([m.uncertainty for m in record.members], dtype=float))
        self.seen.append(AnnotationRecord(image=record.image, decision=record.decision, reason=record.reason,
                                          members=record.members))
        decisions = {ENSEMBLE: record.decision}
        preds = {ENSEMBLE: record.mask}
        regions = image_regions(record, self.refine)
        for i, name in enumerate(self.names):
            decisions[name] = member_decision(record, i, self.theta)
            preds[name] = member_mask(record, i, decisions[name], self.negative, self.tau, regions)
        for name, d in decisions.items():
            self.predictions[name].append(d)

        ious: dict[str, float | None] = {}
        gt, problem = ground_truth(sample, record, label, self.negative)
        if problem:
            self.errors.append(problem)
        if gt is not None:
            self.has_masks = True
            for name, pred in preds.items():
                ious[name] = self.masks[name].add(pred, gt)
                if pred is not None:
                    self.given[name].add(pred, gt)
            self.with_drafts.add(record.mask if record.mask is not None else record.draft, gt)
            if record.draft is not None:
                ious["draft"] = self.drafts.add(record.draft, gt)
            for name, scores in self.trivial.items():
                box = trivial_mask(name, gt.shape)
                scores.add(box, gt)
                if preds[ENSEMBLE] is not None:
                    self.trivial_given[name].add(box, gt)

        row: dict[str, Any] = {
            "set": "data", "image": record.image, "status": "ok", "error": None, "label": label,
            "decision": record.decision, "reason": record.reason, "agreeing": "+".join(record.agreeing),
            "correct": record.decision == label, "iou": ious.get(ENSEMBLE),
            "draft_class": record.draft_class, "draft_iou": ious.get("draft"),
        }
        for i, m in enumerate(record.members):
            row[f"{m.name}_decision"] = decisions[m.name]
            row[f"{m.name}_u"] = m.uncertainty
            for c, p in zip(self.classes, m.probs):
                row[f"{m.name}_p_{c}"] = p
            row[f"{m.name}_iou"] = ious.get(m.name)
        row.update(member_columns(record))
        self.rows.append(row)
        self._maybe_keep(record, label, gt, decisions, preds, ious)

    def _maybe_keep(self, record: AnnotationRecord, label: str, gt: np.ndarray | None,
                    decisions: dict[str, str], preds: dict[str, np.ndarray | None],
                    ious: dict[str, float | None]) -> None:
        """Keep the first few correct and wrong images (small copies) for the report."""
        if self.max_examples <= 0 or record.saliency is None:
            return
        correct = record.decision == label
        group = "wrong" if not correct else ("correct_pos" if label != self.negative else "correct_neg")
        if len(self.kept[group]) >= self.max_examples:
            return
        from aax.evaluation.report.figures import shrink_map, shrink_mask

        self.kept[group].append(Example(
            image=record.image, label=label, decision=record.decision, reason=record.reason,
            correct=correct, preview=getattr(record, "preview", None),
            gt_mask=None if gt is None else shrink_mask(gt),
            saliency={n: shrink_map(s) for n, s in record.saliency.items()},
            member_masks={n: None if preds[n] is None else shrink_mask(preds[n]) for n in self.names},
            member_decisions={n: decisions[n] for n in self.names},
            member_uncertainty={m.name: m.uncertainty for m in record.members},
            mask=None if record.mask is None else shrink_mask(record.mask),
            iou=ious.get(ENSEMBLE), member_iou={n: ious.get(n) for n in self.names},
            draft=None if record.draft is None else shrink_mask(record.draft), draft_iou=ious.get("draft"),
        ))

    def examples(self) -> list[Example]:
        """Up to ``max_examples`` rows: wrong and flagged ones (at most half, unless
        there are too few correct ones), then correct positives (they show masks), and
        one correct negative or more when there is room."""
        k = self.max_examples
        pos, neg = self.kept["correct_pos"], self.kept["correct_neg"]
        wrong = self.kept["wrong"][: max(k // 2, k - len(pos) - len(neg))]
        room = k - len(wrong)
        shown_pos = pos[: max(0, room - (1 if neg else 0))]
        return wrong + shown_pos + neg[: room - len(shown_pos)]

    def trivial_metrics(self, name: str) -> dict[str, Any]:
        """A trivial mask's scores on every positive, and ("given") on the positives AAX
        gave a mask for."""
        m = self.trivial[name].result()
        given = self.trivial_given[name].result()
        m["iou_mean_given"], m["n_masks_given"] = given["iou_mean"], given["n_masks"]
        return m

    def metrics(self, name: str) -> dict[str, Any]:
        m = classification_metrics(self.labels, self.predictions[name], self.positive)
        if self.has_masks:
            m.update(self.masks[name].result())
            given = self.given[name].result()
            m["iou_mean_given"], m["n_masks_given"] = given["iou_mean"], given["n_masks"]
            if name == ENSEMBLE:
                drafts = self.drafts.result()
                m["iou_mean_with_drafts"] = self.with_drafts.result()["iou_mean"]
                m["iou_mean_drafts"], m["n_drafts"] = drafts["iou_mean"], drafts["n_masks"]
        return m
