"""The decision protocol, branch by branch, from a table."""

from __future__ import annotations

import numpy as np
import pytest

from aax.annotation.decide import Decision, decide, draft_members, intersect, map_class, predicted_classes
from aax.models.mask_settings import tau_for

H, D = [0.9, 0.1], [0.2, 0.8]  # healthy (index 0, negative) / diseased (index 1)
TIE = [0.5, 0.5]
THETA = 0.1

CASES = [
    # (id, probs, uncertainty, expected Decision)
    ("all confident diseased", [D, D, D], [0.01, 0.02, 0.03], Decision(1, False, "consensus", (0, 1, 2))),
    ("two confident diseased, one healthy", [D, D, H], [0.01, 0.02, 0.03], Decision(1, False, "consensus", (0, 1))),
    ("two confident diseased, third uncertain", [D, H, D], [0.01, 0.5, 0.03], Decision(1, False, "consensus", (0, 2))),
    ("all confident healthy", [H, H, H], [0.0, 0.0, 0.0], Decision(0, False, "consensus")),
    ("two healthy one diseased", [H, D, H], [0.05, 0.05, 0.05], Decision(0, False, "consensus")),
    ("two uncertain flag even if they agree", [D, D, D], [0.2, 0.3, 0.0], Decision(None, True, "uncertain")),
    ("all uncertain", [H, H, H], [0.5, 0.5, 0.5], Decision(None, True, "uncertain")),
    ("one uncertain, two disagree", [D, H, D], [0.01, 0.01, 0.5], Decision(None, True, "no-consensus")),
    ("uncertain diseased does not vote", [D, D, H], [0.01, 0.5, 0.01], Decision(None, True, "no-consensus")),
    # theta is inclusive for confidence: u == theta is confident, only u > theta flags
    ("u equal to theta is confident", [D, D, H], [THETA, THETA, THETA], Decision(1, False, "consensus", (0, 1))),
    ("u just over theta flags", [D, D, H], [THETA + 1e-9, THETA + 1e-9, 0.0], Decision(None, True, "uncertain")),
    # a probability tie predicts nothing (the paper's strict p > 0.5)
    ("tied member does not vote", [TIE, D, H], [0.0, 0.0, 0.0], Decision(None, True, "no-consensus")),
    ("two ties, one diseased", [TIE, TIE, D], [0.0, 0.0, 0.0], Decision(None, True, "no-consensus")),
    ("tie does not block a quorum", [TIE, D, D], [0.0, 0.0, 0.0], Decision(1, False, "consensus", (1, 2))),
]


@pytest.mark.parametrize("probs,uncertainty,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_protocol_table(probs, uncertainty, expected):
    assert decide(np.array(probs), np.array(uncertainty), THETA, negative_index=0) == expected


NOVEL_CASES = [
    # (id, probs, uncertainty, novel, expected): the novelty step comes before the paper's
    ("two novel flag even when confident and agreeing", [D, D, D], [0.0, 0.0, 0.0], [True, True, False],
     Decision(None, True, "novel")),
    ("all novel", [H, H, H], [0.0, 0.0, 0.0], [True, True, True], Decision(None, True, "novel")),
    ("novel wins over uncertain", [D, D, D], [0.5, 0.5, 0.5], [True, False, True], Decision(None, True, "novel")),
    ("one novel member: the paper's protocol decides", [D, D, H], [0.01, 0.02, 0.03], [True, False, False],
     Decision(1, False, "consensus", (0, 1))),
    ("one novel, two uncertain -> uncertain", [D, D, D], [0.2, 0.3, 0.0], [False, False, True],
     Decision(None, True, "uncertain")),
    ("nothing novel: unchanged", [H, D, H], [0.05, 0.05, 0.05], [False, False, False], Decision(0, False, "consensus")),
    ("novel=None skips the step", [D, D, D], [0.0, 0.0, 0.0], None, Decision(1, False, "consensus", (0, 1, 2))),
]


@pytest.mark.parametrize("probs,uncertainty,novel,expected", [c[1:] for c in NOVEL_CASES],
                         ids=[c[0] for c in NOVEL_CASES])
def test_protocol_table_novel(probs, uncertainty, novel, expected):
    novel = None if novel is None else np.array(novel)
    assert decide(np.array(probs), np.array(uncertainty), THETA, negative_index=0, novel=novel) == expected


def test_novel_quorum_and_shape():
    probs, unc = np.array([D, D, D, D]), np.zeros(4)
    assert decide(probs, unc, THETA, 0, quorum=3, novel=np.array([True, True, False, False])).reason == "consensus"
    assert decide(probs, unc, THETA, 0, quorum=3, novel=np.array([True, True, True, False])).reason == "novel"
    with pytest.raises(ValueError):
        decide(np.array([D, D, D]), np.zeros(3), THETA, 0, novel=np.array([True, False]))


A, B, N = [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.8, 0.1, 0.1]  # three classes, negative = 0
MULTI = [
    ("two agree on positive class 2", [B, B, A], [0, 0, 0], 2, Decision(2, False, "consensus", (0, 1))),
    ("three positive classes differ", [A, B, N], [0, 0, 0], 2, Decision(None, True, "no-consensus")),
    ("negative wins when positives split", [A, N, N], [0, 0, 0], 2, Decision(0, False, "consensus")),
    ("four members, positive classes tie", [A, A, B, B], [0, 0, 0, 0], 2, Decision(None, True, "no-consensus")),
    ("four members, quorum 3", [A, A, A, N], [0, 0, 0, 0], 3, Decision(1, False, "consensus", (0, 1, 2))),
    ("four members, majority positive beats pair", [A, A, A, B], [0, 0, 0, 0], 2, Decision(1, False, "consensus", (0, 1, 2))),
]


@pytest.mark.parametrize("probs,uncertainty,quorum,expected", [c[1:] for c in MULTI], ids=[c[0] for c in MULTI])
def test_protocol_multiclass(probs, uncertainty, quorum, expected):
    assert decide(np.array(probs), np.array(uncertainty, float), THETA, 0, quorum=quorum) == expected


def test_negative_class_need_not_be_index_zero():
    # classes sorted: ["diseased", "healthy"]: the negative class is index 1
    d, h = [0.8, 0.2], [0.1, 0.9]
    assert decide(np.array([d, d, h]), np.zeros(3), THETA, negative_index=1) == Decision(0, False, "consensus", (0, 1))
    assert decide(np.array([h, h, d]), np.zeros(3), THETA, negative_index=1) == Decision(1, False, "consensus")


def test_shape_errors():
    with pytest.raises(ValueError):
        decide(np.zeros((3, 2)), np.zeros(2), THETA, 0)


def test_predicted_classes_ties():
    assert predicted_classes(np.array([H, D, TIE])).tolist() == [0, 1, -1]


def test_intersect_is_min_over_maps():
    maps = np.array([[[0.9, 0.6], [0.2, 0.51]], [[0.7, 0.4], [0.9, 0.6]]])
    assert intersect(maps, 0.5).tolist() == [[True, False], [False, True]]
    assert intersect(maps, 0.0).all() and not intersect(maps, 0.95).any()
    with pytest.raises(ValueError):
        intersect(np.zeros((0, 2, 2)), 0.5)


def test_map_class_skips_negative():
    assert map_class(np.array([H, H, H]), negative_index=0) == 1
    assert map_class(np.array([N, B, A, B]), negative_index=0) == 2


# --- fusion and thresholds ---------------------------------------------------------------

def test_fuse_by_hand() -> None:
    from aax.annotation.decide import fuse

    maps = np.array([[[0.9, 0.2, 0.6]], [[0.8, 0.7, 0.1]], [[0.3, 0.9, 0.7]]])
    np.testing.assert_allclose(fuse(maps, "min"), [[0.3, 0.2, 0.1]])
    np.testing.assert_allclose(fuse(maps, "mean"), [[2.0 / 3, 0.6, 1.4 / 3]])
    # 2-of-3 vote: the second largest value; > tau exactly when two maps are > tau
    np.testing.assert_allclose(fuse(maps, "vote", votes=2), [[0.8, 0.7, 0.6]])
    assert (fuse(maps, "vote", votes=2) > 0.65).tolist() == [[True, True, False]]
    np.testing.assert_allclose(fuse(maps, "vote", votes=3), fuse(maps, "min"))
    np.testing.assert_allclose(fuse(maps[:2], "vote", votes=2), fuse(maps[:2], "min"))  # 2 agreeing: all
    np.testing.assert_allclose(fuse(maps, "vote", votes=1), maps.max(axis=0))
    with pytest.raises(ValueError, match="fusion"):
        fuse(maps, "median")


def test_intersect_is_the_min_fusion() -> None:
    from aax.annotation.decide import fuse

    rng = np.random.default_rng(0)
    maps = rng.random((3, 5, 5))
    assert np.array_equal(intersect(maps, 0.4), fuse(maps, "min") > 0.4)


def test_otsu_by_hand() -> None:
    from aax.annotation.decide import otsu_threshold

    # two clusters: the threshold falls between them
    t = otsu_threshold(np.array([0.1] * 5 + [0.9] * 5))
    assert 0.1 < t < 0.9
    # values 0, 0, 0, .4, 1, 1: splitting after 0 gives between-class variance
    # .5 * .5 * (0 - .8)^2 = .16; after .4 gives (4/6)(2/6)(.1 - 1)^2 = .18: the latter wins
    v = np.array([0.0, 0.0, 0.0, 0.4, 1.0, 1.0])
    t = otsu_threshold(v)
    assert (v > t).tolist() == [False, False, False, False, True, True]
    assert t == pytest.approx(0.7)  # midway between .4 and 1
    assert otsu_threshold(np.full(4, 0.3)) == 0.3  # constant: nothing above
    # a map all but 0 (a confident segmentation head's background): every value in the first
    # of the 256 bins of [0, 1], still split in two
    v = np.array([1e-5, 2e-5, 3e-5, 9e-4, 1e-3])
    t = otsu_threshold(v)
    assert (v > t).tolist() == [False, False, False, True, True]


def test_binarise_and_tau_parsing() -> None:
    from aax.annotation.decide import binarise
    from aax.models.mask_settings import OTSU, parse_tau

    score = np.array([[0.0, 0.0, 0.0], [0.4, 1.0, 1.0]])
    assert binarise(score, 0.3).tolist() == [[False] * 3, [True] * 3]
    assert binarise(score, OTSU).tolist() == [[False] * 3, [False, True, True]]
    assert parse_tau("otsu") == OTSU and parse_tau("0.25") == 0.25
    assert parse_tau({"a": 0.4, "b": "otsu"}) == {"a": 0.4, "b": OTSU}
    assert tau_for({"a": "otsu"}, "a") == OTSU and tau_for({"a": "otsu"}, "b") == 0.5


def test_mask_subset_narrows_the_agreeing_members_by_hand():
    from aax.annotation.decide import mask_subset

    assert mask_subset((0, 1, 2), None) == (0, 1, 2)
    assert mask_subset((0, 1, 2), [0, 2]) == (0, 2)
    assert mask_subset((1, 2), [0, 2]) == (2,)
    assert mask_subset((1,), [0, 2]) == (1,)  # no agreeing member is a mask member: all of them
    assert mask_subset((), [0, 2]) == ()


def test_drafts_only_for_flagged_images_the_members_lean_positive_on():
    leaning = np.array([[0.3, 0.7], [0.6, 0.4], [0.2, 0.8]])  # negative index 0; mean p(negative) 0.37
    uncertain = Decision(None, True, "uncertain")
    assert draft_members(uncertain, leaning, 0) == (0, 1, 2)
    assert draft_members(Decision(None, True, "no-consensus"), leaning, 0, mask_members=[0, 2]) == (0, 2)
    assert draft_members(Decision(None, True, "novel"), leaning, 0) == (0, 1, 2)  # the reason says why it is flagged
    assert draft_members(Decision(1, False, "consensus", (0, 2)), leaning, 0) == ()  # decided: a mask, no draft
    assert draft_members(uncertain, leaning[:, ::-1], 0) == ()  # the members lean negative
    three = np.array([[0.5, 0.3, 0.2], [0.4, 0.1, 0.5], [0.5, 0.25, 0.25]])  # p(negative) 0.47: positives 0.53
    assert draft_members(uncertain, three, 0) == (0, 1, 2)
    assert draft_members(uncertain, np.array([[0.5, 0.5], [0.5, 0.5]]), 0) == ()  # an even split is no lean
