"""Novelty scores against hand-computed cases (aax.models.novelty)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aax.models import novelty as nv


def test_knn_kth_distance_by_hand():
    bank = np.array([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])  # normalised: (1,0), (0,1), (-1,0)
    knn = nv.KNNScore(k=1).fit(bank)
    q = torch.tensor([[5.0, 0.0], [1.0, 1.0]])
    # (1,0) sits on a training point; (1,1)/sqrt2 is at distance sqrt(2 - sqrt2) from (1,0) and (0,1)
    assert knn.score(q).tolist() == pytest.approx([0.0, math.sqrt(2 - math.sqrt(2))], abs=1e-6)
    knn3 = nv.KNNScore(k=3).fit(bank)  # third neighbour of (1,0) is (-1,0): distance 2
    assert knn3.score(q[:1]).item() == pytest.approx(2.0, abs=1e-6)
    assert nv.KNNScore(k=10).fit(bank).score(q[:1]).item() == pytest.approx(2.0, abs=1e-6)  # k clamped to n
    with pytest.raises(ValueError):
        nv.KNNScore(k=0)


def _lw_reference(x: np.ndarray) -> float:
    """Ledoit-Wolf from the d x d covariance, written out term by term."""
    n, d = x.shape
    s = x.T @ x / n
    mu = np.trace(s) / d
    delta2 = np.sum((s - mu * np.eye(d)) ** 2) / d
    beta2 = sum(np.sum((np.outer(r, r) - s) ** 2) for r in x) / n**2 / d
    return float(min(beta2, delta2) / delta2)


@pytest.mark.parametrize("n,d", [(6, 10), (30, 4)])  # fewer rows than dims (Gram path), and more
def test_ledoit_wolf_matches_reference(n, d):
    x = np.random.default_rng(0).normal(size=(n, d)) * np.linspace(0.5, 3, d)
    x -= x.mean(axis=0)
    assert nv.ledoit_wolf_shrinkage(x) == pytest.approx(_lw_reference(x), rel=1e-9)


def test_ledoit_wolf_isotropic_data_shrinks_hard():
    x = np.random.default_rng(1).normal(size=(20, 50))
    assert nv.ledoit_wolf_shrinkage(x - x.mean(0)) > 0.8


@pytest.mark.parametrize("n,d", [(5, 12), (40, 6)])
def test_shrunk_precision_equals_direct_inverse(n, d):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(n, d))
    x -= x.mean(axis=0)
    alpha = 0.3
    p = nv.ShrunkPrecision(shrinkage=alpha).fit(x)
    mu = np.sum(x * x) / (n * d)
    sigma = (1 - alpha) * x.T @ x / n + alpha * mu * np.eye(d)
    z = rng.normal(size=(4, d))
    want = np.einsum("bi,ij,bj->b", z, np.linalg.inv(sigma), z)
    assert p.quad(torch.from_numpy(z)).numpy() == pytest.approx(want, rel=1e-8)


def test_mahalanobis_and_relative_by_hand():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(0, 1, (8, 3)), rng.normal(4, 1, (8, 3))])
    y = np.array([0] * 8 + [1] * 8)
    alpha = 0.2
    scorer = nv.MahalanobisScore(shrinkage=alpha).fit(x, y)

    def shrunk_inv(c):
        n, d = c.shape
        mu = np.sum(c * c) / (n * d)
        return np.linalg.inv((1 - alpha) * c.T @ c / n + alpha * mu * np.eye(d))

    means = np.stack([x[y == 0].mean(0), x[y == 1].mean(0)])
    within = x - means[y]
    pw, p0 = shrunk_inv(within), shrunk_inv(x - x.mean(0))
    z = np.array([[0.0, 0.0, 0.0], [4.0, 4.0, 4.0], [20.0, -20.0, 0.0]])
    md = np.array([[(zi - m) @ pw @ (zi - m) for m in means] for zi in z]).min(axis=1)
    md0 = np.array([(zi - x.mean(0)) @ p0 @ (zi - x.mean(0)) for zi in z])
    got = scorer.score(torch.from_numpy(z))
    # the per-image product runs in float32: agreement to float32's precision
    assert got["maha"].numpy() == pytest.approx(md, rel=1e-5)
    assert got["rmd"].numpy() == pytest.approx(md - md0, rel=1e-4, abs=1e-4)
    assert got["maha"][2] > 10 * got["maha"][:2].max()  # far from both classes


def test_mahalanobis_with_fewer_images_than_dimensions_is_finite():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(10, 256)).astype(np.float32)
    scorer = nv.MahalanobisScore().fit(x, np.arange(10) % 2)
    out = scorer.score(torch.from_numpy(rng.normal(size=(3, 256)).astype(np.float32)))
    assert all(torch.isfinite(v).all() for v in out.values())
    assert (out["maha"] > 0).all()


def test_energy_and_msp_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)], [10.0, 10.0]])
    assert nv.msp_score(logits).tolist() == pytest.approx([-0.75, -0.5])
    assert nv.energy_score(logits).tolist() == pytest.approx([-math.log(4.0), -(10 + math.log(2.0))])


def test_threshold_passes_the_asked_share():
    scores = np.arange(1, 21, dtype=float)
    t = nv.threshold_at(scores, 0.95)
    assert t["threshold"] == 19.0 and t["median"] == 10.5 and t["n"] == 20
    assert np.mean(scores <= t["threshold"]) == pytest.approx(0.95)
    assert nv.threshold_at(scores, 1.0)["threshold"] == 20.0
    assert nv.threshold_at(scores, 0.5)["threshold"] == 10.0
    with pytest.raises(ValueError):
        nv.threshold_at(scores, 0.0)
    with pytest.raises(ValueError):
        nv.threshold_at(np.array([np.nan]), 0.9)


def test_margin_and_quorum_margin():
    m = nv.margin(np.array([10.0, 19.0, 28.0]), threshold=19.0, median=10.0)
    assert m.tolist() == [-1.0, 0.0, 1.0]
    margins = np.array([[0.5, -1.0, 2.0], [-0.1, -0.2, 3.0]])
    assert nv.quorum_margin(margins, 2).tolist() == [0.5, -0.1]  # second largest
    assert (nv.quorum_margin(margins, 2) > 0).tolist() == [True, False]


def test_class_thresholds_let_each_predicted_class_pass_at_the_rate():
    # healthy images score low and tight, diseased high and spread: one pooled threshold
    # passes every healthy image and only 18 of 20 diseased ones
    healthy, diseased = np.linspace(1.0, 2.0, 20), np.linspace(1.0, 10.0, 20)
    pooled = nv.threshold_at(np.concatenate([healthy, diseased]), 0.95)
    assert np.mean(diseased <= pooled["threshold"]) == 0.9 and np.mean(healthy <= pooled["threshold"]) == 1.0
    scores = np.concatenate([healthy, diseased, [50.0, 60.0]])
    predicted = ["healthy"] * 20 + ["diseased"] * 20 + ["sick", None]
    by = nv.class_thresholds(scores, predicted, 0.95, min_images=10)
    assert set(by) == {"healthy", "diseased"}  # "sick": 1 image (< 10), None: no class
    assert by["healthy"] == nv.threshold_at(healthy, 0.95) and by["diseased"] == nv.threshold_at(diseased, 0.95)
    assert np.mean(diseased <= by["diseased"]["threshold"]) == 0.95 == np.mean(healthy <= by["healthy"]["threshold"])
    assert set(nv.class_thresholds(scores, predicted, 0.95, min_images=21)) == set()
    with pytest.raises(ValueError, match="one predicted class per score"):
        nv.class_thresholds(scores, predicted[:-1])


def test_limits_for_uses_the_predicted_class_else_the_pooled_threshold():
    entry = {"threshold": 5.0, "median": 2.0,
             "by_class": {"diseased": {"threshold": 9.0, "median": 4.0}, "healthy": {"threshold": 1.5, "median": 1.0}}}
    t, m = nv.limits_for(entry, ["diseased", "healthy", "sick", None])
    assert t.tolist() == [9.0, 1.5, 5.0, 5.0] and m.tolist() == [4.0, 1.0, 2.0, 2.0]
    old = {"threshold": 5.0, "median": 2.0}  # calibrated before thresholds per class
    assert nv.limits_for(old, ["diseased", "healthy"])[0].tolist() == [5.0, 5.0]
    # margins in each image's own units: 9 is on the diseased threshold, over the healthy one
    assert nv.margin(np.array([9.0, 9.0]), *nv.limits_for(entry, ["diseased", "healthy"])).tolist() == [0.0, 15.0]


def test_novelty_step_carries_thresholds_per_class_only_when_set():
    entry = {"threshold": 5.0, "median": 2.0, "by_class": {"diseased": {"threshold": 9.0, "median": 4.0}}}
    scorer = nv.Novelty(members={"a": None, "b": None}, score="knn",
                        thresholds={"a": {"knn": entry}, "b": {"knn": {"threshold": 3.0, "median": 1.0}}})
    assert scorer.step() == {"score": "knn", "thresholds": {"a": 5.0, "b": 3.0}, "by_class": {"a": {"diseased": 9.0}, "b": {}}}
    scorer.thresholds["a"]["knn"] = {"threshold": 5.0, "median": 2.0}
    assert scorer.step() == {"score": "knn", "thresholds": {"a": 5.0, "b": 3.0}}  # as stores made before


def test_small_validation_split_warning():
    from aax.models.novelty_fit import small_split_warning

    entry = lambda n, **by: {"knn": {"threshold": 1.0, "median": 0.5, "n": n,
                                     "by_class": {c: {"threshold": 1.0, "median": 0.5, "n": k} for c, k in by.items()}}}
    # 0.95 needs 19 images: the quantile of fewer is their largest
    assert small_split_warning({"a": entry(40, x=20, y=20)}, "knn", 0.95) is None
    text = small_split_warning({"a": entry(40, x=20, y=20), "b": entry(40, x=11, y=29)}, "knn", 0.95)
    assert "as few as 11 validation images predicted x" in text and "92%" in text
    assert "as few as 12 validation images:" in small_split_warning({"a": entry(12)}, "knn", 0.95)
    assert small_split_warning({"a": entry(12)}, "knn", 0.9) is None  # 0.90 needs 9
    assert small_split_warning({"a": entry(3)}, "knn", 1.0) is None


def test_pass_rate_on_new_images_is_that_of_the_order_statistic():
    # by hand: the threshold is the 29th of 30 scores; P(share <= x) = P(Binomial(30, x) >= 29)
    got = nv.pass_rate_on_new_images(30, 0.95)
    assert got["expected"] == pytest.approx(29 / 31)
    x = got["low"]
    assert 30 * x ** 29 * (1 - x) + x ** 30 == pytest.approx(0.05, abs=1e-9)
    assert 0.84 < x < 0.86
    # simulated: thresholds set as threshold_at sets them on 30 uniform scores; the share
    # of new uniform scores at or below one is the threshold itself
    rng = np.random.default_rng(0)
    shares = np.array([nv.threshold_at(rng.random(30), 0.95)["threshold"] for _ in range(4000)])
    assert shares.mean() == pytest.approx(got["expected"], abs=0.004)
    assert np.mean(shares < got["low"]) == pytest.approx(0.05, abs=0.012)
    # more images: closer to the rate asked for; the largest of n: n / (n + 1)
    assert nv.pass_rate_on_new_images(300, 0.95)["low"] > 0.92 > got["low"]
    assert nv.pass_rate_on_new_images(10, 0.95)["expected"] == pytest.approx(10 / 11)
    with pytest.raises(ValueError):
        nv.pass_rate_on_new_images(0)


def test_stratified_cap_keeps_class_shares():
    labels = np.array([0] * 90 + [1] * 10)
    keep = nv.stratified_cap(labels, 20, seed=0)
    assert len(keep) == 20 and np.sum(labels[keep] == 1) == 2 and len(set(keep)) == 20
    assert nv.stratified_cap(labels, 200).tolist() == list(range(100))
    assert nv.stratified_cap(labels, 20, seed=0).tolist() == keep.tolist()  # seeded


def test_features_file_round_trip_without_pickle(tmp_path):
    feats = {"a": np.random.default_rng(0).normal(size=(5, 4)), "b": np.ones((5, 3))}
    labels = {"a": np.arange(5) % 2, "b": np.arange(5) % 2}
    path = nv.save_features(tmp_path / "novelty.npz", feats, labels)
    back = nv.load_features(path)
    assert set(back) == {"a", "b"}
    assert back["a"][0] == pytest.approx(feats["a"], abs=1e-2)  # float16 on disk
    assert back["b"][1].tolist() == [0, 1, 0, 1, 0]
    with np.load(path, allow_pickle=False) as data:
        assert data["a.features"].dtype == np.float16


def test_load_returns_none_without_features(tmp_path):
    assert nv.load(tmp_path, {}, ["a"]) is None
    nv.save_features(tmp_path / nv.FEATURES_FILE, {"a": np.ones((3, 2))}, {"a": np.zeros(3)})
    assert nv.load(tmp_path, {}, ["a", "b"]) is None  # a member without features
    assert not nv.load(tmp_path, {"novelty": {"score": "maha", "thresholds": {"a": {"knn": {"threshold": 0.1}}}}},
                       ["a"]).ready  # no threshold for the score the protocol uses
    found = nv.load(tmp_path, {"novelty": {"score": "knn", "k": 2, "thresholds": {"a": {"knn": {"threshold": 0.1}}}}},
                    ["a"])
    assert found is not None and found.ready and found.k == 2
    assert found.member_thresholds() == {"a": 0.1}


def test_the_default_score_follows_how_members_start():
    assert nv.default_score(pretrained=True) == nv.PRETRAINED_SCORE == "knn"
    assert nv.default_score(pretrained=False) == nv.DEFAULT_SCORE == "maha"
