"""Classification, mask and open-set metrics (paper 4.2), pure NumPy.

The ensemble and every single member are scored by the same functions, so the paper's
tables 1-4 (each member vs AAX) come out of one run.

Conventions (chosen so that no number quietly flatters a model):

Classification (one prediction per image: a class name, or ``"review"`` when flagged)
    * ``accuracy`` counts a flagged image as wrong: it is the share of all images that
      got the right class. ``accuracy_kept`` is the accuracy on the images that were
      not flagged; it is ``None`` when every image was flagged.
    * ``flag_rate`` is the share of images flagged; ``coverage = 1 - flag_rate``.
    * For a positive class ``c``: ``TP`` = predicted ``c`` and labelled ``c``; ``FP`` =
      predicted ``c``, labelled otherwise; ``FN`` = labelled ``c``, predicted anything
      else *including review* (a flagged positive is a miss, as in ``accuracy``).
      ``precision = TP / (TP + FP)`` is ``None`` when nothing was predicted ``c``;
      ``recall = TP / (TP + FN)`` is ``None`` when no image is labelled ``c``;
      ``f1 = 2 TP / (2 TP + FP + FN)`` (the harmonic mean of the two when both exist,
      0 when one of them is 0) is ``None`` only when ``TP + FP + FN == 0``.
    * With one positive class these are that class's values; with several they are the
      macro average over the positive classes whose value is defined (``None`` if none).
    * ``n == 0`` gives ``None`` for every rate.

Masks (boolean arrays of the same shape; ``None`` as a prediction means "no mask")
    * Scored on positive ground-truth images that have a ground-truth mask. An image
      with no predicted mask (negative, flagged, or missing) scores as an all-empty
      prediction: IoU 0 when its ground truth has pixels.
    * Per-image ``IoU = |P & G| / |P | G|`` is ``None`` when both masks are empty
      (nothing to find and nothing found); such images are left out of ``iou_mean``
      (they add nothing to the summed counts either, so ``iou_micro`` agrees).
    * ``iou_micro = sum |P & G| / sum |P | G|`` over the scored images;
      ``pixel_precision = TP / (TP + FP)``, ``pixel_recall = TP / (TP + FN)``,
      ``pixel_f1 = 2 TP / (2 TP + FP + FN)`` from pixel counts summed over the same
      images; each is ``None`` when its denominator is 0.

Open set
    * :func:`auroc` is the rank (Mann-Whitney) AUROC, ties counted as one half;
      ``None`` when either group is empty.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

REVIEW = "review"


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def _mean_defined(values: Iterable[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def classification_metrics(labels: Sequence[str], predictions: Sequence[str],
                           positive_classes: Sequence[str], *,
                           review: str = REVIEW) -> dict[str, float | int | None]:
    """Accuracy, precision, recall, F1, flag rate, coverage and kept accuracy.

    Args:
        labels: ground-truth class name per image.
        predictions: predicted class name per image, or ``review`` when flagged.
        positive_classes: the classes whose precision/recall/F1 are reported (every
            class but the negative one); macro-averaged when there are several.
        review: the prediction string that means "flagged for a person".

    Returns:
        ``n, accuracy, precision, recall, f1, flag_rate, coverage, accuracy_kept,
        n_flagged`` (see the module docstring for the edge cases).
    """
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    y = np.asarray(list(labels), dtype=object)
    p = np.asarray(list(predictions), dtype=object)
    n = len(y)
    flagged = p == review
    correct = (p == y) & ~flagged
    kept = int(n - flagged.sum())
    per_class = []
    for c in positive_classes:
        tp = int(np.sum((p == c) & (y == c)))
        fp = int(np.sum((p == c) & (y != c)))
        fn = int(np.sum((y == c) & (p != c)))
        per_class.append((_ratio(tp, tp + fp), _ratio(tp, tp + fn), _ratio(2 * tp, 2 * tp + fp + fn)))
    flag_rate = _ratio(flagged.sum(), n)
    return {
        "n": n,
        "n_flagged": int(flagged.sum()),
        "accuracy": _ratio(correct.sum(), n),
        "precision": _mean_defined(c[0] for c in per_class),
        "recall": _mean_defined(c[1] for c in per_class),
        "f1": _mean_defined(c[2] for c in per_class),
        "flag_rate": flag_rate,
        "coverage": None if flag_rate is None else 1.0 - flag_rate,
        "accuracy_kept": _ratio(correct.sum(), kept),
    }


def confusion_matrix(labels: Sequence[str], predictions: Sequence[str], classes: Sequence[str], *,
                     review: str = REVIEW) -> np.ndarray:
    """Counts ``[C, C + 1]``: rows are true classes, columns predicted classes then review.

    Labels or predictions outside ``classes`` (and not ``review``) raise ``ValueError``.
    """
    index = {c: i for i, c in enumerate(classes)}
    index_pred = dict(index, **{review: len(classes)})
    out = np.zeros((len(classes), len(classes) + 1), dtype=np.int64)
    for y, p in zip(labels, predictions, strict=True):
        if y not in index or p not in index_pred:
            raise ValueError(f"unknown class in pair (label={y!r}, prediction={p!r}); classes: {list(classes)}")
        out[index[y], index_pred[p]] += 1
    return out


def mask_counts(pred: np.ndarray | None, gt: np.ndarray) -> tuple[int, int, int]:
    """Pixel ``(TP, FP, FN)`` of a predicted mask against a ground-truth mask.

    ``pred=None`` stands for an empty prediction. Shapes must match: masks are compared
    at the image's own size, never silently resized here.
    """
    gt = np.asarray(gt, dtype=bool)
    if pred is None:
        return 0, 0, int(gt.sum())
    pred = np.asarray(pred, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: predicted {pred.shape}, ground truth {gt.shape}")
    tp = int(np.count_nonzero(pred & gt))
    return tp, int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(gt)) - tp


def iou(pred: np.ndarray | None, gt: np.ndarray) -> float | None:
    """Intersection over union of two boolean masks; ``None`` when both are empty."""
    tp, fp, fn = mask_counts(pred, gt)
    return _ratio(tp, tp + fp + fn)


@dataclass
class MaskScores:
    """Streaming accumulator of mask metrics: ``add`` one image at a time, then
    ``result()``. Keeps only counts, so memory does not grow with image size."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    n: int = 0  # images scored (positive ground truth with a mask)
    n_undefined: int = 0  # of which both masks were empty (left out of iou_mean)
    iou_sum: float = 0.0

    def add(self, pred: np.ndarray | None, gt: np.ndarray) -> float | None:
        """Score one image; returns its IoU (``None`` when both masks are empty)."""
        return self.add_counts(*mask_counts(pred, gt))

    def add_counts(self, tp: int, fp: int, fn: int) -> float | None:
        """Score one image from its pixel counts; returns its IoU."""
        self.tp += tp
        self.fp += fp
        self.fn += fn
        self.n += 1
        value = _ratio(tp, tp + fp + fn)
        if value is None:
            self.n_undefined += 1
        else:
            self.iou_sum += value
        return value

    def result(self) -> dict[str, float | int | None]:
        """``n_masks, iou_mean, iou_micro, pixel_precision, pixel_recall, pixel_f1``."""
        tp, fp, fn = self.tp, self.fp, self.fn
        return {
            "n_masks": self.n,
            "iou_mean": _ratio(self.iou_sum, self.n - self.n_undefined),
            "iou_micro": _ratio(tp, tp + fp + fn),
            "pixel_precision": _ratio(tp, tp + fp),
            "pixel_recall": _ratio(tp, tp + fn),
            "pixel_f1": _ratio(2 * tp, 2 * tp + fp + fn),
        }


def mask_metrics(preds: Sequence[np.ndarray | None], gts: Sequence[np.ndarray]) -> dict[str, float | int | None]:
    """Mask metrics over pairs of (predicted or ``None``, ground truth) masks.

    The caller chooses the images (positive ground truth with a mask); see the module
    docstring for the edge cases.
    """
    scores = MaskScores()
    for pred, gt in zip(preds, gts, strict=True):
        scores.add(pred, gt)
    return scores.result()


def auroc(negatives: Sequence[float], positives: Sequence[float]) -> float | None:
    """Area under the ROC curve for telling ``positives`` (e.g. unseen images) from
    ``negatives`` by a score where higher means "more likely positive".

    It is the probability that a random positive scores above a random negative, ties
    counting one half (Mann-Whitney U / (n_pos n_neg), with average ranks).
    ``None`` when either group is empty; NaN scores raise ``ValueError``.
    """
    neg = np.asarray(negatives, dtype=float).ravel()
    pos = np.asarray(positives, dtype=float).ravel()
    if neg.size == 0 or pos.size == 0:
        return None
    scores = np.concatenate([neg, pos])
    if np.isnan(scores).any():
        raise ValueError("auroc scores contain NaN")
    # average (1-based) ranks, ties sharing the mean of their ranks (as scipy's rankdata)
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    new_run = np.r_[True, sorted_scores[1:] != sorted_scores[:-1]]
    dense = np.empty(scores.size, dtype=np.int64)
    dense[order] = np.cumsum(new_run)
    bounds = np.r_[np.flatnonzero(new_run), scores.size]
    ranks = 0.5 * (bounds[dense] + bounds[dense - 1] + 1)
    u = ranks[neg.size:].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


# --------------------------------------------------------------------------------------
# Selective prediction: the protocol's decisions as theta moves
# --------------------------------------------------------------------------------------

NO_LABEL = -1  # code for "review" in the label tables below


@dataclass
class ThetaSweep:
    """The ensemble's decision of every image for *every* theta, from one pass.

    For one image the set of members with ``u > theta`` only changes when theta crosses
    one of that image's M uncertainties, so its decision is constant on the M + 1
    intervals ``theta < u_(1)``, ``u_(1) <= theta < u_(2)``, ... ``theta >= u_(M)``
    (sorted uncertainties). :func:`aax.annotation.decide.decide` is called once per interval; any
    theta is then a lookup, exactly as if the protocol had been rerun with it.
    """

    bounds: np.ndarray  # [n, M] each image's member uncertainties, sorted
    labels: np.ndarray  # [n, M + 1] decided class index per interval, NO_LABEL = review
    agreeing: list[list[tuple[int, ...]]]  # [n][M + 1] members whose maps form the mask

    @classmethod
    def build(cls, probs: np.ndarray, uncertainty: np.ndarray, negative_index: int,
              quorum: int = 2) -> ThetaSweep:
        """From ``probs [n, M, C]`` and ``uncertainty [n, M]`` of n images."""
        from aax.annotation.decide import decide

        probs = np.asarray(probs, dtype=float)
        uncertainty = np.asarray(uncertainty, dtype=float)
        if probs.ndim != 3 or uncertainty.shape != probs.shape[:2]:
            raise ValueError(f"probs must be [n, M, C] and uncertainty [n, M]; got {probs.shape}, {uncertainty.shape}")
        n, m = uncertainty.shape
        bounds = np.sort(uncertainty, axis=1)
        labels = np.full((n, m + 1), NO_LABEL, dtype=np.int64)
        agreeing: list[list[tuple[int, ...]]] = []
        for j in range(n):
            row = []
            for k in range(m + 1):
                # a theta inside interval k: below the smallest u, or equal to the k-th
                theta = np.nextafter(bounds[j, 0], -np.inf) if k == 0 else bounds[j, k - 1]
                d = decide(probs[j], uncertainty[j], float(theta), negative_index, quorum)
                labels[j, k] = NO_LABEL if d.label is None else d.label
                row.append(d.agreeing)
            agreeing.append(row)
        return cls(bounds=bounds, labels=labels, agreeing=agreeing)

    def __len__(self) -> int:
        return self.bounds.shape[0]

    def interval(self, theta: float) -> np.ndarray:
        """Per image, the interval theta falls in: how many members have ``u <= theta``."""
        return np.count_nonzero(self.bounds <= theta, axis=1)

    def labels_at(self, theta: float) -> np.ndarray:
        """``[n]`` decided class index at ``theta`` (``NO_LABEL`` for review)."""
        return self.labels[np.arange(len(self)), self.interval(theta)]

    def agreeing_at(self, theta: float) -> list[tuple[int, ...]]:
        """Per image, the members whose maps form the mask at ``theta``."""
        return [row[k] for row, k in zip(self.agreeing, self.interval(theta))]


def theta_candidates(uncertainty: np.ndarray, default: float | None = None,
                     max_candidates: int = 2048) -> np.ndarray:
    """Candidate thresholds: every observed member uncertainty (each one is where some
    decision changes) plus ``default``; evenly spaced quantiles of them when there are
    more than ``max_candidates`` (the sweep is O(candidates x images))."""
    values = np.unique(np.asarray(uncertainty, dtype=float).ravel())
    if values.size > max_candidates:
        values = np.unique(np.quantile(values, np.linspace(0.0, 1.0, max_candidates), method="nearest"))
    if default is not None:
        values = np.unique(np.r_[values, float(default)])
    return values


def risk_coverage(sweep: ThetaSweep, labels: np.ndarray, thetas: Sequence[float]) -> list[dict[str, float | None]]:
    """Accuracy on the kept images against coverage as theta moves.

    Args:
        sweep: the decisions of n images for every theta.
        labels: ``[n]`` ground-truth class index per image.
        thetas: thresholds to evaluate, e.g. from :func:`theta_candidates`.

    Returns:
        One point per theta: ``theta, coverage, flag_rate, accuracy`` (flagged counted
        wrong) and ``accuracy_kept`` (``None`` when every image is flagged).
    """
    labels = np.asarray(labels)
    n = len(sweep)
    if labels.shape != (n,):
        raise ValueError(f"labels must be [{n}], got {labels.shape}")
    points = []
    for theta in thetas:
        decided = sweep.labels_at(float(theta))
        kept = decided != NO_LABEL
        correct = int(np.count_nonzero(kept & (decided == labels)))
        flag_rate = _ratio(n - kept.sum(), n)
        points.append({
            "theta": float(theta),
            "coverage": None if flag_rate is None else 1.0 - flag_rate,
            "flag_rate": flag_rate,
            "accuracy": _ratio(correct, n),
            "accuracy_kept": _ratio(correct, kept.sum()),
        })
    return points
