"""Metrics against hand-computed cases, edge cases included."""

from __future__ import annotations

import numpy as np
import pytest

from aax.annotation.decide import decide
from aax.evaluation.metrics import (
    NO_LABEL,
    MaskScores,
    ThetaSweep,
    auroc,
    classification_metrics,
    confusion_matrix,
    iou,
    mask_counts,
    mask_metrics,
    risk_coverage,
    theta_candidates,
)

POS = ["diseased"]


def test_classification_hand_computed():
    labels = ["diseased", "diseased", "diseased", "healthy", "healthy", "healthy"]
    preds = ["diseased", "healthy", "review", "healthy", "diseased", "review"]
    m = classification_metrics(labels, preds, POS)
    # TP=1, FP=1, FN=2 (one predicted healthy, one flagged); correct: 0 and 3
    assert m["n"] == 6 and m["n_flagged"] == 2
    assert m["accuracy"] == pytest.approx(2 / 6)
    assert m["accuracy_kept"] == pytest.approx(2 / 4)
    assert m["precision"] == pytest.approx(1 / 2)
    assert m["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    assert m["flag_rate"] == pytest.approx(2 / 6)
    assert m["coverage"] == pytest.approx(4 / 6)


def test_all_flagged():
    m = classification_metrics(["diseased", "healthy"], ["review", "review"], POS)
    assert m["accuracy"] == 0.0
    assert m["accuracy_kept"] is None
    assert m["flag_rate"] == 1.0 and m["coverage"] == 0.0
    assert m["precision"] is None  # nothing predicted diseased
    assert m["recall"] == 0.0  # the diseased image was missed (flagged)
    assert m["f1"] == 0.0


def test_no_positives_anywhere():
    m = classification_metrics(["healthy", "healthy"], ["healthy", "healthy"], POS)
    assert m["accuracy"] == 1.0 and m["accuracy_kept"] == 1.0
    assert m["precision"] is None and m["recall"] is None and m["f1"] is None


def test_no_positive_labels_but_false_positive():
    m = classification_metrics(["healthy", "healthy"], ["diseased", "healthy"], POS)
    assert m["precision"] == 0.0
    assert m["recall"] is None
    assert m["f1"] == 0.0


def test_empty_input():
    m = classification_metrics([], [], POS)
    assert m["n"] == 0
    assert all(m[k] is None for k in ("accuracy", "precision", "recall", "f1", "flag_rate", "coverage", "accuracy_kept"))


def test_macro_over_positive_classes():
    labels = ["a", "a", "b", "n"]
    preds = ["a", "b", "b", "n"]
    m = classification_metrics(labels, preds, ["a", "b"])
    # a: P=1/1, R=1/2 ; b: P=1/2, R=1/1
    assert m["precision"] == pytest.approx((1 + 0.5) / 2)
    assert m["recall"] == pytest.approx((0.5 + 1) / 2)
    assert m["f1"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    # a class with no labels and no predictions is left out of the macro average
    m2 = classification_metrics(["a", "n"], ["a", "n"], ["a", "b"])
    assert m2["precision"] == 1.0 and m2["recall"] == 1.0


def test_confusion_matrix_has_review_column():
    cm = confusion_matrix(["d", "d", "h", "h"], ["d", "review", "d", "h"], ["d", "h"])
    assert cm.tolist() == [[1, 0, 1], [1, 1, 0]]
    with pytest.raises(ValueError):
        confusion_matrix(["x"], ["d"], ["d", "h"])


def test_mask_counts_and_iou():
    gt = np.zeros((4, 4), bool)
    gt[:2, :2] = True  # 4 pixels
    pred = np.zeros((4, 4), bool)
    pred[1:3, 1:3] = True  # 4 pixels, 1 overlap
    assert mask_counts(pred, gt) == (1, 3, 3)
    assert iou(pred, gt) == pytest.approx(1 / 7)
    assert iou(gt, gt) == 1.0
    assert iou(None, gt) == 0.0  # no predicted mask on a positive image scores 0
    assert mask_counts(None, gt) == (0, 0, 4)
    empty = np.zeros((4, 4), bool)
    assert iou(empty, empty) is None  # both empty: undefined, not 1
    assert iou(None, empty) is None
    assert iou(pred, empty) == 0.0
    with pytest.raises(ValueError):
        mask_counts(np.zeros((3, 4), bool), gt)


def test_mask_metrics_mean_vs_micro():
    gt1 = np.zeros((10, 10), bool)
    gt1[:5] = True  # 50 px
    pred1 = gt1.copy()  # IoU 1
    gt2 = np.zeros((10, 10), bool)
    gt2[0, 0] = True  # 1 px, missed
    empty = np.zeros((10, 10), bool)
    m = mask_metrics([pred1, None, empty], [gt1, gt2, empty])
    assert m["n_masks"] == 3
    assert m["iou_mean"] == pytest.approx((1.0 + 0.0) / 2)  # the both-empty image is left out
    assert m["iou_micro"] == pytest.approx(50 / 51)
    assert m["pixel_precision"] == 1.0
    assert m["pixel_recall"] == pytest.approx(50 / 51)
    assert m["pixel_f1"] == pytest.approx(100 / 101)


def test_mask_metrics_nothing_predicted_or_nothing_scored():
    gt = np.ones((3, 3), bool)
    m = mask_metrics([None, None], [gt, gt])
    assert m["iou_mean"] == 0.0 and m["iou_micro"] == 0.0
    assert m["pixel_precision"] is None and m["pixel_recall"] == 0.0 and m["pixel_f1"] == 0.0
    m0 = MaskScores().result()
    assert m0["n_masks"] == 0 and m0["iou_mean"] is None and m0["iou_micro"] is None


def test_auroc_hand_computed():
    assert auroc([0.1, 0.2], [0.3, 0.4]) == 1.0
    assert auroc([0.3, 0.4], [0.1, 0.2]) == 0.0
    assert auroc([0.1, 0.3], [0.2, 0.4]) == pytest.approx(3 / 4)
    assert auroc([0.5, 0.5], [0.5]) == 0.5  # ties count a half
    assert auroc([0.1, 0.5], [0.5, 0.9]) == pytest.approx((1 + 0.5 + 1 + 1) / 4)
    assert auroc([], [0.1]) is None
    with pytest.raises(ValueError):
        auroc([float("nan")], [0.1])


def test_auroc_matches_pairwise_count():
    rng = np.random.default_rng(0)
    neg = rng.integers(0, 5, 40) / 4
    pos = rng.integers(1, 6, 30) / 4
    pairs = [(p > q) + 0.5 * (p == q) for p in pos for q in neg]
    assert auroc(neg, pos) == pytest.approx(np.mean(pairs))


def test_theta_sweep_equals_rerunning_decide():
    rng = np.random.default_rng(1)
    n, m, c = 60, 3, 3
    probs = rng.dirichlet(np.ones(c), size=(n, m))
    unc = rng.choice([0.0, 0.05, 0.1, 0.15, 0.2, 0.3], size=(n, m))  # many ties on purpose
    sweep = ThetaSweep.build(probs, unc, negative_index=0, quorum=2)
    for theta in [-1.0, 0.0, 0.04, 0.05, 0.1, 0.12, 0.2, 0.25, 0.3, 1.0]:
        expected = [decide(probs[j], unc[j], theta, 0, 2) for j in range(n)]
        got = sweep.labels_at(theta)
        assert got.tolist() == [NO_LABEL if d.label is None else d.label for d in expected]
        assert sweep.agreeing_at(theta) == [d.agreeing for d in expected]


def test_risk_coverage_points():
    h, d = [0.9, 0.1], [0.1, 0.9]
    probs = np.array([[d, d, d], [h, h, h], [d, d, h]])
    unc = np.array([[0.05, 0.05, 0.05], [0.2, 0.2, 0.2], [0.1, 0.1, 0.3]])
    labels = np.array([1, 0, 0])  # the third image is wrong when decided
    sweep = ThetaSweep.build(probs, unc, negative_index=0)
    pts = {p["theta"]: p for p in risk_coverage(sweep, labels, [0.0, 0.05, 0.1, 0.2])}
    assert pts[0.0]["coverage"] == 0.0 and pts[0.0]["accuracy_kept"] is None
    assert pts[0.05]["coverage"] == pytest.approx(1 / 3) and pts[0.05]["accuracy_kept"] == 1.0
    assert pts[0.1]["coverage"] == pytest.approx(2 / 3) and pts[0.1]["accuracy_kept"] == 0.5
    assert pts[0.2]["coverage"] == 1.0 and pts[0.2]["accuracy_kept"] == pytest.approx(2 / 3)
    assert pts[0.2]["accuracy"] == pytest.approx(2 / 3)


def test_theta_candidates():
    unc = np.array([[0.3, 0.1], [0.1, 0.2]])
    assert theta_candidates(unc, default=0.1).tolist() == [0.1, 0.2, 0.3]
    assert theta_candidates(unc, default=0.15).tolist() == [0.1, 0.15, 0.2, 0.3]
    big = np.linspace(0, 1, 10_000)
    cands = theta_candidates(big, max_candidates=100)
    assert len(cands) <= 100 and cands[0] == 0.0 and cands[-1] == 1.0
