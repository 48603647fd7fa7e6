"""The side-by-side open-set table (aax.evaluation.openset) on hand-made scores."""

from __future__ import annotations

import numpy as np
import pytest

from aax.evaluation.openset import (fpr_at_tpr, member_columns, member_predicted, member_predicted_from_rows, member_scores,
                         member_scores_from_rows, side_by_side, table_markdown)
from aax.annotation.records import AnnotationRecord, MemberResult


def test_fpr_at_95_tpr_by_hand():
    unseen = np.arange(1, 21, dtype=float)  # 1..20: catching 95 % (19 of 20) needs t = 2
    seen = np.array([0.0, 1.5, 2.0, 3.0])
    assert fpr_at_tpr(seen, unseen) == pytest.approx(0.5)  # 2.0 and 3.0 are >= 2
    assert fpr_at_tpr(seen, unseen, tpr=1.0) == pytest.approx(0.75)  # t = 1
    assert fpr_at_tpr([0.0, 0.1], [5.0, 6.0]) == 0.0
    assert fpr_at_tpr([], [1.0]) is None


NAMES = ["a", "b", "c"]
THRESHOLDS = {n: {"knn": {"threshold": 1.0, "median": 0.5}} for n in NAMES}


def test_side_by_side_rows_by_hand():
    seen = {"u": np.array([[0.0, 0.2, 0.0], [0.05, 0.0, 0.3]]),
            "knn": np.array([[0.4, 0.6, 1.2], [0.5, 1.1, 0.5]])}
    unseen = {"u": np.array([[0.0, 0.0, 0.0], [0.2, 0.2, 0.0]]),
              "knn": np.array([[2.0, 1.5, 0.9], [1.2, 0.2, 3.0]])}
    rows = side_by_side(seen, unseen, NAMES, THRESHOLDS, theta=0.1, quorum=2)
    by = {(r["score"], r["method"]): r for r in rows}
    assert [r["score"] for r in rows] == ["u"] * 4 + ["knn"] * 4
    a = by[("knn", "a")]
    assert a["auroc"] == 1.0 and a["flag_seen"] == 0.0 and a["flag_unseen"] == 1.0
    c = by[("knn", "c")]  # seen .5 1.2, unseen .9 3.0: 3 of 4 pairs won
    assert c["auroc"] == pytest.approx(0.75) and c["flag_seen"] == 0.5 and c["flag_unseen"] == 0.5
    rule = by[("knn", "AAX (2 of 3)")]
    # members over 1.0: seen rows (c), (b) -> one each, never flagged; unseen (a,b), (a,c) -> both flagged
    assert rule["flag_seen"] == 0.0 and rule["flag_unseen"] == 1.0 and rule["auroc"] == 1.0
    u_rule = by[("u", "AAX (2 of 3)")]  # 2nd largest u: seen 0, .05; unseen 0, .2 -> one over theta
    assert u_rule["flag_seen"] == 0.0 and u_rule["flag_unseen"] == 0.5
    text = "\n".join(table_markdown({"rows": rows}))
    assert "| KNN | **AAX (2 of 3)** | 1.000 | 0.0 | 0.0 | 100.0 |" in text


def test_side_by_side_flags_with_the_predicted_class_threshold():
    # member a: pooled 1.0, but 3.0 for images it predicts "x" -> the 2.0 seen image passes
    limits = {n: {"knn": {"threshold": 1.0, "median": 0.5,
                          "by_class": {"x": {"threshold": 3.0, "median": 1.0}}}} for n in NAMES}
    seen = {"u": np.zeros((2, 3)), "knn": np.array([[2.0, 2.0, 2.0], [0.2, 0.2, 0.2]])}
    unseen = {"u": np.zeros((1, 3)), "knn": np.array([[2.0, 2.0, 2.0]])}
    pred_seen = np.array([["x", "x", "y"], ["y", "y", "y"]], dtype=object)
    pred_unseen = np.array([["y", "y", None]], dtype=object)
    rows = side_by_side(seen, unseen, NAMES, limits, 0.1, 2, pred_seen, pred_unseen)
    by = {(r["score"], r["method"]): r for r in rows}
    assert by[("knn", "a")]["flag_seen"] == 0.0 and by[("knn", "c")]["flag_seen"] == 0.5
    assert by[("knn", "a")]["flag_unseen"] == 1.0 and by[("knn", "c")]["flag_unseen"] == 1.0  # None: pooled
    # seen image 1: only c over its threshold -> not flagged by the rule; unseen: all three
    assert by[("knn", "AAX (2 of 3)")]["flag_seen"] == 0.0 and by[("knn", "AAX (2 of 3)")]["flag_unseen"] == 1.0
    # without predicted classes: the pooled thresholds, as before
    pooled = {(r["score"], r["method"]): r for r in side_by_side(seen, unseen, NAMES, limits, 0.1, 2)}
    assert pooled[("knn", "a")]["flag_seen"] == 0.5 and pooled[("knn", "AAX (2 of 3)")]["flag_seen"] == 0.5


def test_scores_without_thresholds_get_no_flag_rates():
    seen = {"u": np.zeros((2, 3)), "energy": np.zeros((2, 3))}
    unseen = {"u": np.ones((2, 3)), "energy": np.ones((2, 3))}
    rows = side_by_side(seen, unseen, NAMES, {}, theta=0.1, quorum=2)
    energy = [r for r in rows if r["score"] == "energy"]
    assert len(energy) == 3 and all(r["flag_seen"] is None and r["auroc"] == 1.0 for r in energy)


def _record(u, knn):
    return AnnotationRecord(image="x", decision="review", reason="novel",
                            members=[MemberResult(n, [0.5, 0.5], uu, "x" if k > 1 else None, novelty={"knn": k},
                                                  novel=k > 1)
                                     for n, uu, k in zip(NAMES, u, knn)])


def test_member_scores_from_records_and_rows_agree():
    records = [_record([0.1, 0.2, 0.3], [1.0, 2.0, 3.0]), _record([0.0, 0.0, 0.1], [0.5, 0.6, 0.7])]
    a = member_scores(records, NAMES)
    rows = [{"set": "data", "status": "ok", **{f"{n}_u": m.uncertainty for n, m in zip(NAMES, r.members)},
             **{f"{n}_knn": m.novelty["knn"] for n, m in zip(NAMES, r.members)}} for r in records]
    b = member_scores_from_rows(rows, NAMES)
    assert set(a) == set(b) == {"u", "knn"}
    assert (a["knn"] == b["knn"]).all() and (a["u"] == b["u"]).all()
    rows = [{**row, **member_columns(r)} for row, r in zip(rows, records)]
    assert (member_predicted(records, NAMES) == member_predicted_from_rows(rows, NAMES)).all()
    old = [AnnotationRecord(image="y", members=[MemberResult(n, [1.0, 0.0], 0.0, None) for n in NAMES])]
    assert set(member_scores(old, NAMES)) == {"u"}  # a run without novelty: u only
