"""Evaluation: the paper's tables 1-4 for any labelled data, from one annotate pass.

One pass of :meth:`Ensemble.annotate` with the saliency maps kept gives everything:
the ensemble's own decisions and masks, and, from the same numbers, what each member
would have answered alone. Members and ensemble are scored by the same code
(:mod:`aax.metrics`), so the comparison cannot drift.

A member alone (the paper's "ResNet50 with XGrad-CAM and Monte Carlo Dropout" rows):
    * its class is the strict argmax of its mean MC probabilities (a tie is no class and
      counts as flagged);
    * it is flagged (review) when its own uncertainty is over theta (``u > theta``, the
      same rule as the protocol's);
    * its mask, when it predicts a positive class, is its own saliency map ``> tau``;
      otherwise it has none (IoU 0 on a positive image).
The ensemble's decision and mask are the record's, as :mod:`aax.decide` made them.

Masks are compared at the image's original size. Records with ``status == "error"`` are
left out of every metric and counted in ``settings.n_errors``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aax.metrics import (
    MaskScores,
    ThetaSweep,
    auroc,
    classification_metrics,
    confusion_matrix,
    risk_coverage,
    theta_candidates,
)
from aax.decide import binarise, parse_tau, tau_for
from aax.openset import member_columns, novelty_summary, table_markdown
from aax.records import REVIEW, AnnotationRecord
from aax.refine import pool_resized_numpy

if TYPE_CHECKING:  # pragma: no cover
    from aax.ensemble import Ensemble

ENSEMBLE = "AAX"  # the ensemble's name in tables
MEMBER_TITLES = {"resnet50": "ResNet-50", "efficientnet-b0": "EfficientNet-B0", "densenet121": "DenseNet-121",
                 "efficientnet-lite0": "EfficientNet-Lite0", "efficientnet-lite1": "EfficientNet-Lite1",
                 "efficientnet-lite2": "EfficientNet-Lite2"}


TRIVIAL_MASKS = ("whole image", "centred box")
"""Masks that need no model, scored beside every mask table: a saliency mask that cannot
beat them says nothing."""


def trivial_mask(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """``"whole image"``: every pixel; ``"centred box"``: the centred box of half the
    height and half the width (a fixed prior, as benchmarks/quality.py scores it)."""
    h, w = shape[:2]
    if name == "whole image":
        return np.ones((h, w), bool)
    if name == "centred box":
        mask = np.zeros((h, w), bool)
        mask[h // 4:h - h // 4, w // 4:w - w // 4] = True
        return mask
    raise ValueError(f"unknown trivial mask {name!r}; expected one of {TRIVIAL_MASKS}")


def _mask_members(ensemble: Any) -> list[str] | None:
    members = getattr(getattr(ensemble, "maps", None), "mask_members", None)
    return None if members is None else list(members)


def masks_text(settings: Mapping[str, Any], members_too: bool = True) -> str:
    """How the masks of these results were made, in words (fusion, mask members,
    refinement; ``members_too``: say that members' own masks are refined as well)."""
    members = settings.get("mask_members")
    among = f" among {', '.join(members)} (chosen on validation masks)" if members else ""
    refined = (", averaged over the image's superpixels" + (" (members' masks too)" if members_too else "")
               if settings.get("refine", "none") == "superpixels" else "")
    return f"AAX's masks: {settings.get('fusion', 'min')} fusion of the agreeing members' maps{among}{refined}."


def method_label(name: str) -> str:
    """How tables, the report and the README name a method: one name everywhere."""
    if name == ENSEMBLE:
        return f"{ENSEMBLE} (fused maps of the agreeing members)"
    return f"{MEMBER_TITLES.get(name, name)} with XGrad-CAM and MC Dropout"


# --------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------

def open_data(data: Any, classes: Sequence[str] | None = None,
              label_map: Mapping[str, str] | None = None) -> Any:
    """A dataset from a path (via :func:`aax.data.open_dataset`) or a dataset as is.

    With ``classes`` (the model's), a sample labelled with another class becomes one of
    the dataset's errors instead of stopping the run. ``label_map`` renames labels as
    they are read (``{"tb": "diseased"}``).
    """
    if isinstance(data, (str, os.PathLike)):
        from aax.data import open_dataset

        return open_dataset(data, classes=classes, label_map=label_map)
    return data


def run_label_map(ensemble: Any) -> dict[str, str] | None:
    """The label map a run was trained with (``aax train --label-map``), if any."""
    manifest = getattr(ensemble, "manifest", None) or {}
    return dict((manifest.get("training") or {}).get("label_map") or {}) or None


def no_labelled_images(data: Any, dataset: Any, classes: Sequence[str]) -> ValueError:
    """The error for data with no usable labelled image; when its labels are not the
    model's classes, it names them and says how to map them."""
    import re
    from collections import Counter

    unknown = Counter()
    for e in getattr(dataset, "errors", None) or []:
        found = re.match(r"unknown label '(.*)' \(allowed", getattr(e, "reason", ""))
        if found:
            unknown[found.group(1)] += 1
    if unknown:
        labels = ", ".join(f"{k!r} ({n} images)" for k, n in sorted(unknown.items()))
        example = ",".join(f"{k}={c}" for k, c in zip(sorted(unknown), classes))
        return ValueError(f"{_describe(data)}: no image has one of the run's classes "
                          f"({', '.join(classes)}); the data's labels are {labels}. Map them with "
                          f"--label-map, e.g. --label-map {example}")
    return ValueError(f"no readable labelled images in {_describe(data)}")


def open_images(source: Any) -> Any:
    """Images for the open-set check: a dataset when ``source`` is in a dataset layout
    (its labels are ignored), else every image file under the folder (unseen data needs
    no labels), or ``source`` itself when it is already a dataset or a list of paths."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    from aax.data import detect_format, find_images

    path = Path(source)
    try:
        detect_format(path)
    except ValueError:
        if not path.is_dir():
            raise
        files = find_images(path)
        if not files:
            raise ValueError(f"{path}: no images found") from None
        return files
    return open_data(path)


def _samples(dataset: Any) -> Iterator[Any]:
    """The dataset's samples, or plain paths wrapped so that ``.mask()`` gives None."""
    for s in dataset:
        yield s if hasattr(s, "image") else _PathSample(Path(s))


@dataclass
class _PathSample:
    image: Path
    label: str | None = None

    def mask(self) -> None:
        return None


def _dataset_errors(dataset: Any) -> list[dict[str, str]]:
    """Entries the dataset itself could not use (bad label files, missing images ...)."""
    out = []
    for e in getattr(dataset, "errors", None) or []:
        if isinstance(e, dict):
            out.append({"image": str(e.get("image", e.get("path", ""))), "error": str(e.get("error", e.get("reason", e)))})
        elif isinstance(e, (tuple, list)) and len(e) == 2:
            out.append({"image": str(e[0]), "error": str(e[1])})
        else:
            out.append({"image": str(getattr(e, "path", getattr(e, "image", ""))),
                        "error": str(getattr(e, "reason", e))})
    return out


def annotate_with(ensemble: Ensemble, images: Any, *, saliency: bool, preview: bool = False,
                  **kwargs: Any) -> Iterator[AnnotationRecord]:
    """``ensemble.annotate`` with the maps (and small previews) kept; ``kwargs`` that
    are None are left to the ensemble's defaults."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return iter(ensemble.annotate(images, keep_saliency=saliency, keep_preview=preview, **kwargs))


def paired(samples: Iterable[Any], records: Iterable[AnnotationRecord]) -> Iterator[tuple[Any, AnnotationRecord]]:
    """Samples and their records (annotate keeps input order), checked image by image."""
    for sample, record in zip(samples, records, strict=True):
        if Path(record.image) != Path(sample.image):
            raise RuntimeError(f"records out of order: {record.image} for sample {sample.image}")
        yield sample, record


# --------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------

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


Tau = float | str | dict[str, float | str]  # one threshold ("otsu": per image), or one per positive class


def tau_text(tau: Tau) -> str:
    """``0.5`` or ``fire: 0.4, smoke: 0.6``."""
    if isinstance(tau, dict):
        return ", ".join(f"{k}: {tau_text(v)}" for k, v in tau.items())
    return tau if isinstance(tau, str) else f"{tau:g}"


def image_regions(record: AnnotationRecord, refine: str) -> np.ndarray | None:
    """The record's superpixel labels (at their own size) when ``refine`` is
    ``"superpixels"`` and it has them (:mod:`aax.refine`), else None: what
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


@dataclass
class Example:
    """One image of the report's grid, kept small (maps downscaled)."""

    image: str
    label: str
    decision: str
    reason: str | None
    correct: bool
    preview: np.ndarray | None  # uint8 RGB
    gt_mask: np.ndarray | None
    saliency: dict[str, np.ndarray]
    member_masks: dict[str, np.ndarray | None]
    member_decisions: dict[str, str]
    member_uncertainty: dict[str, float]
    mask: np.ndarray | None
    iou: float | None = None
    member_iou: dict[str, float | None] = field(default_factory=dict)


class _Scorer:
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
            for name, scores in self.trivial.items():
                box = trivial_mask(name, gt.shape)
                scores.add(box, gt)
                if preds[ENSEMBLE] is not None:
                    self.trivial_given[name].add(box, gt)

        row: dict[str, Any] = {
            "set": "data", "image": record.image, "status": "ok", "error": None, "label": label,
            "decision": record.decision, "reason": record.reason, "agreeing": "+".join(record.agreeing),
            "correct": record.decision == label, "iou": ious.get(ENSEMBLE),
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
        from aax.report.figures import shrink_map, shrink_mask

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
        return m


# --------------------------------------------------------------------------------------
# the open-set check
# --------------------------------------------------------------------------------------

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


def _rate(flags: np.ndarray) -> float | None:
    return float(np.mean(flags)) if len(flags) else None


# --------------------------------------------------------------------------------------
# the entry point
# --------------------------------------------------------------------------------------

def evaluate(ensemble: Ensemble, data: Any, *, unseen: Any = None, theta: float | None = None,
             tau: Tau | None = None, out: str | os.PathLike | None = None,
             mc_passes: int | None = None, batch_size: int | None = None, report: bool = True,
             max_examples: int = 8, workers: int | None = None,
             label_map: Mapping[str, str] | None = None, novelty: bool = True) -> dict[str, Any]:
    """Score the ensemble and each member alone on labelled ``data``.

    Args:
        ensemble: a loaded :class:`aax.ensemble.Ensemble`.
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
    negative = ensemble.negative_class
    refine = getattr(getattr(ensemble, "maps", None), "refine", "none")
    scorer = _Scorer(names, classes, negative, theta, tau, max_examples if (out is not None and report) else 0,
                     refine)
    want_preview = out is not None and report and max_examples > 0
    records = annotate_with(ensemble, dataset, saliency=True, preview=want_preview, theta=theta, tau=tau,
                            mc_passes=mc_passes, batch_size=batch_size, workers=workers,
                            novelty=None if novelty else False)
    for sample, record in paired(_samples(dataset), records):
        scorer.add(sample, record)
    if not scorer.labels:
        raise no_labelled_images(data, dataset, classes)

    probs = np.stack(scorer.probs)
    unc = np.stack(scorer.uncertainty)
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[label] for label in scorer.labels])
    sweep = ThetaSweep.build(probs, unc, ensemble.negative_index, ensemble.quorum)
    curve = risk_coverage(sweep, y, theta_candidates(unc, default=theta, max_candidates=512))

    errors = _dataset_errors(dataset) + scorer.errors
    mc = int(ensemble.mc_passes if mc_passes is None else mc_passes)
    result: dict[str, Any] = {
        "members": {n: scorer.metrics(n) for n in names},
        "ensemble": scorer.metrics(ENSEMBLE),
        "trivial": {n: scorer.trivial_metrics(n) for n in scorer.trivial} if scorer.has_masks else {},
        "settings": {
            "theta": theta, "tau": tau, "mc_passes": mc, "quorum": int(ensemble.quorum),
            "run": str(getattr(ensemble, "run", "")), "data": _describe(data),
            "classes": classes, "negative_class": negative, "n_images": len(scorer.rows),
            "n_errors": len(errors), "has_masks": scorer.has_masks,
            "novelty": _novelty_settings(ensemble) if novelty else None,
            "map_source": getattr(getattr(ensemble, "maps", None), "source", "cam"),
            "fusion": getattr(getattr(ensemble, "maps", None), "fusion", "min"),
            "mask_members": _mask_members(ensemble),
            "refine": refine,
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
        summary["data"] = _describe(unseen)
        summary["novelty"] = novelty_summary(scorer.seen, unseen_records, names, ensemble, theta)
        result["unseen"] = summary
        per_image = per_image + rows
    result["tables"] = tables_markdown(result)
    result["per_image"] = per_image
    if out is not None:
        write_outputs(result, out)
        if report:
            from aax.report import write_report

            write_report(result, scorer.examples(), out)
    return result


def _novelty_settings(ensemble: Any) -> dict[str, Any] | None:
    """The run's novelty step as evaluated: the score, pass rate and member thresholds
    (and, when it has them, the member thresholds per predicted class)."""
    scorer = getattr(ensemble, "novelty", None)
    if scorer is None or not scorer.ready:
        return None
    return {"pass_rate": scorer.pass_rate, **scorer.step()}


def _describe(data: Any) -> str:
    if isinstance(data, (str, os.PathLike)):
        return str(data)
    if isinstance(data, (list, tuple)):
        return f"{len(data)} listed images"
    return str(getattr(data, "source", None) or getattr(data, "root", None) or type(data).__name__)


# --------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------

def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _num(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def members_text(settings: Mapping[str, Any]) -> str:
    """How a member alone is flagged in these tables (it depends on the novelty step)."""
    if settings.get("novelty"):
        return ("A member alone is flagged when its own u > theta or it finds the image novel "
                "(the ensemble's checks with a quorum of one). ")
    return "A member alone is flagged when its own u > theta (no novelty step: the paper's protocol). "


def tables_markdown(result: dict[str, Any]) -> str:
    """The paper's tables for this data: accuracy (tables 1, 3) and IoU (tables 2, 4) of
    each member and of AAX, with the flag rate, and the open-set check when present."""
    s = result["settings"]
    rows = [(method_label(n), m) for n, m in result["members"].items()]
    rows.append((f"**{method_label(ENSEMBLE)}**", result["ensemble"]))
    out = [f"# AAX evaluation: {s['data']}", "",
           f"{s['n_images']} images, {s['n_errors']} input errors (listed in metrics.json), classes {', '.join(s['classes'])} "
           f"(negative: {s['negative_class']}); theta = {s['theta']:g}, tau = {tau_text(s['tau'])}, "
           f"K = {s['mc_passes']} MC passes, quorum {s['quorum']}. Flagged images count as wrong "
           f"in accuracy; 'kept' is the accuracy on the images not flagged. {members_text(s)}{masks_text(s)}", "",
           "## Classification (paper tables 1 and 3)", "",
           "| Method | Accuracy (%) | Accuracy kept (%) | Flag rate (%) | Precision (%) | Recall (%) | F1 (%) |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for label, m in rows:
        out.append(f"| {label} | {_pct(m['accuracy'])} | {_pct(m['accuracy_kept'])} | {_pct(m['flag_rate'])} "
                   f"| {_pct(m['precision'])} | {_pct(m['recall'])} | {_pct(m['f1'])} |")
    out.append("")
    if s.get("has_masks"):
        n_masks = result["ensemble"].get("n_masks", 0)
        out += ["## Masks (paper tables 2 and 4)", "",
                f"On the {n_masks} positive images with a ground-truth mask; an image without a "
                "predicted mask (called negative, or flagged) scores IoU 0. Mean = average of per-image "
                "IoU; micro = summed intersection / summed union. 'Given' = mean IoU of the masks the "
                "method did give, on the images it annotated (n of them): what a reviewer receives; for "
                "a trivial mask, on the images AAX gave a mask for.", "",
                "| Method | IoU mean (%) | IoU micro (%) | Pixel precision (%) | Pixel recall (%) | Pixel F1 (%) "
                "| IoU given (%) (n) |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        trivial = [(f"{name} (trivial)", m) for name, m in (result.get("trivial") or {}).items()]
        for label, m in rows + trivial:
            given = f"{_pct(m['iou_mean_given'])} ({m['n_masks_given']})" if "n_masks_given" in m else ""
            out.append(f"| {label} | {_pct(m.get('iou_mean'))} | {_pct(m.get('iou_micro'))} "
                       f"| {_pct(m.get('pixel_precision'))} | {_pct(m.get('pixel_recall'))} | {_pct(m.get('pixel_f1'))} "
                       f"| {given} |")
        out.append("")
    else:
        out += ["No ground-truth masks in this data: no IoU tables.", ""]
    u = result.get("unseen")
    nov = (u or {}).get("novelty") or {}
    if u and nov.get("available"):
        out += ["## Open set: unseen images", "",
                f"{u['n']} images of a kind never trained on ({u['data']}). Flag rate: "
                f"{_pct(u['flag_rate_unseen'])}% on them vs {_pct(u['flag_rate_seen'])}% on the evaluation data; "
                f"sent to review as novel: {_pct(nov['novel_rate_unseen'])}% vs {_pct(nov['novel_rate_seen'])}%. "
                f"Every score side by side (higher = more novel; flagged = over the stored threshold: theta "
                f"for u, else the {_pct(nov['pass_rate'])}% quantile on the validation split; the protocol "
                f"thresholds {nov['score']}):", "", *table_markdown(nov), ""]
    elif u:
        out += ["## Open set: unseen images", "",
                f"{u['n']} images of a kind never trained on ({u['data']}). Flag rate: "
                f"{_pct(u['flag_rate_unseen'])}% on them vs {_pct(u['flag_rate_seen'])}% on the evaluation data.",
                "", "| Uncertainty score | AUROC seen vs unseen | score > theta, seen (%) | score > theta, unseen (%) |",
                "|---|---:|---:|---:|"]
        for name, value in u["auroc"].items():
            rates = u["over_theta"][name]
            out.append(f"| {name} | {_num(value)} | {_pct(rates['seen'])} | {_pct(rates['unseen'])} |")
        out.append("")
    return "\n".join(out)


CSV_LEAD = ["set", "image", "status", "error", "label", "decision", "reason", "agreeing", "correct", "iou"]


def per_image_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The per-image table as CSV text (fixed leading columns, then per-member ones)."""
    extra: list[str] = []
    for row in rows:
        for k in row:
            if k not in CSV_LEAD and k not in extra:
                extra.append(k)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_LEAD + extra, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue()


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
