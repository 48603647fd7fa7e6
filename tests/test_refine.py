"""Superpixel refinement (aax.models.refine): regions, pooling, and its use in masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from aax.annotation.annotate import _maps_and_masks
from aax.annotation.decide import Decision
from aax.models.explain import Grid
from aax.models.maps import MapOptions
from aax.models.refine import (REFINES, WORK_SIDE, input_superpixels, pool_numpy, pool_resized, pool_resized_numpy,
                        resize_labels, superpixels)


def two_halves(h: int = 64, w: int = 64) -> np.ndarray:
    image = np.full((h, w, 3), 0.2)
    image[:, w // 2:] = 0.8
    return image


def test_superpixels_split_at_the_edge():
    labels = superpixels(two_halves())
    assert labels.shape == (64, 64) and labels.dtype == np.int64
    # the smoothing blurs the edge itself; either side of it is one region each
    left, right = np.unique(labels[:, :30]), np.unique(labels[:, 34:])
    assert len(left) == 1 and len(right) == 1 and left[0] != right[0]


def rand_agreement(a: np.ndarray, b: np.ndarray, pairs: int = 20000) -> float:
    """Share of pixel pairs that both partitions put together, or both apart."""
    idx = np.random.default_rng(3).integers(0, a.size, (pairs, 2))
    fa, fb = a.ravel(), b.ravel()
    return float(np.mean((fa[idx[:, 0]] == fa[idx[:, 1]]) == (fb[idx[:, 0]] == fb[idx[:, 1]])))


@pytest.mark.parametrize("k", [2, 3])
def test_superpixels_cut_a_resized_copy_alike(k):
    """Scale, smallest region and smoothing grow with the image: a k-times copy is cut
    into the same regions (up to slivers along the edges)."""
    rng = np.random.default_rng(0)
    small = np.repeat(np.repeat(rng.random((8, 8, 3)), 8, axis=0), 8, axis=1)  # 64 px, flat 8 px blocks
    big = np.repeat(np.repeat(small, k, axis=0), k, axis=1)
    a, b = superpixels(small), superpixels(big)
    assert len(np.unique(a)) >= 32
    assert rand_agreement(a, b[k // 2::k, k // 2::k]) > 0.98


def test_superpixels_reject_a_bad_shape():
    with pytest.raises(ValueError, match="image"):
        superpixels(np.zeros((4,)))


def normalised(image: np.ndarray, mean, std) -> torch.Tensor:
    return ((torch.from_numpy(image).permute(2, 0, 1).float() - torch.tensor(mean).view(3, 1, 1))
            / torch.tensor(std).view(3, 1, 1))


def test_input_superpixels_cut_the_denormalised_input_at_the_working_size():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    image = two_halves(WORK_SIDE, WORK_SIDE)
    (labels,) = input_superpixels(normalised(image, mean, std)[None], mean, std)
    np.testing.assert_array_equal(labels, superpixels(image.astype(np.float32)))
    # any input size is cut at WORK_SIDE: the same two regions from a 64 and a 224 px input
    for side in (64, 224):
        (labels,) = input_superpixels(normalised(two_halves(side, side), mean, std)[None], mean, std)
        assert labels.shape == (WORK_SIDE, WORK_SIDE)
        left, right = np.unique(labels[:, :WORK_SIDE // 2 - 3]), np.unique(labels[:, WORK_SIDE // 2 + 3:])
        assert len(left) == 1 and len(right) == 1 and left[0] != right[0]


def test_pool_by_hand_and_against_numpy():
    labels = np.array([[0, 0, 1], [2, 2, 1]])
    score = np.array([[0.2, 0.4, 1.0], [0.0, 0.6, 0.5]])
    expected = np.array([[0.3, 0.3, 0.75], [0.3, 0.3, 0.75]])
    np.testing.assert_allclose(pool_numpy(score, labels), expected)
    np.testing.assert_allclose(pool_resized(torch.tensor(score), labels).numpy(), expected)
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 7, (20, 30))
    score = rng.random((20, 30)).astype(np.float32)
    np.testing.assert_allclose(pool_resized(torch.from_numpy(score), torch.from_numpy(labels)).numpy(),
                               pool_numpy(score, labels), rtol=1e-6)


@pytest.mark.parametrize("size", [(64, 64), (100, 37), (13, 200), (32, 32)])
def test_resize_labels_is_nearest_as_torch(size):
    labels = np.random.default_rng(2).integers(0, 50, (32, 32))
    ref = F.interpolate(torch.from_numpy(labels)[None, None].float(), size=size, mode="nearest")[0, 0].long().numpy()
    np.testing.assert_array_equal(resize_labels(labels, size), ref)


@pytest.mark.parametrize("size", [(128, 128), (300, 451), (97, 128), (40, 250), (7, 5)])
def test_pool_resized_is_pool_over_the_resized_labels(size):
    # up, down, mixed and tiny sizes: labels a cell of the image never samples must not count
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 40, (WORK_SIDE, WORK_SIDE))
    score = rng.random(size)
    expected = pool_numpy(score, resize_labels(labels, size))
    np.testing.assert_allclose(pool_resized_numpy(score, labels), expected, rtol=1e-12)
    got = pool_resized(torch.from_numpy(score), labels)
    assert got.shape == size and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    got32 = pool_resized(torch.from_numpy(score.astype(np.float32)), torch.from_numpy(labels))
    np.testing.assert_allclose(got32.numpy(), expected, rtol=1e-5)


def test_map_options_refine_round_trip_and_validation():
    options = MapOptions(class_stride=32, map_stride=16, refine="superpixels")
    assert options.to_dict()["refine"] == "superpixels"
    assert MapOptions.from_dict(options.to_dict()) == options
    assert "refine" not in MapOptions().to_dict()  # the paper's: left out, as in older runs
    assert MapOptions.from_dict({}).refine == "none" and REFINES == ("none", "superpixels")
    with pytest.raises(ValueError, match="refine"):
        MapOptions(refine="crf")


def test_masks_follow_the_regions():
    """A blob-shaped score that spills over a square finding: thresholded as it is, the
    mask is the blob; averaged over the regions (the square, the rest), the square."""
    s = 32
    yy, xx = np.mgrid[:s, :s]
    blob = np.clip(1.0 - np.hypot(yy - 16, xx - 16) / 14, 0, 1).astype(np.float32)
    square = np.zeros((s, s), np.int64)
    square[10:22, 10:22] = 1
    raw = torch.from_numpy(np.stack([blob, blob]))[None]  # [1, 2, s, s]: two members, same map
    grids = [Grid.pixels((s, s))] * 2  # the maps are already at the image's size
    decision = Decision(0, False, "consensus", (0, 1))
    plain, _ = _maps_and_masks(raw, grids, [(s, s)], [0], [decision.agreeing], [0.5], False)
    refined, _ = _maps_and_masks(raw, grids, [(s, s)], [0], [decision.agreeing], [0.5], False, regions={0: square})
    assert plain[0].sum() > (square == 1).sum()  # the blob spills over the square
    np.testing.assert_array_equal(refined[0], square == 1)
    # regions at the model's input size are resized to the image's own
    refined2, _ = _maps_and_masks(raw, grids, [(s, s)], [0], [decision.agreeing], [0.5], False,
                                  regions={0: square[::2, ::2]})
    np.testing.assert_array_equal(refined2[0], resize_labels(square[::2, ::2], (s, s)) == 1)


def test_evaluate_refines_the_members_masks_as_the_runs():
    """Members' own masks are made as the ensemble's: with a refining run, each member's
    map is averaged over the image's regions before its threshold."""
    import tempfile
    from pathlib import Path

    from test_calibrate import REGIONS, SQUARES
    from test_evaluate import NAMES, FakeEnsemble, fake_data

    from aax.evaluation.evaluate import evaluate
    from aax.evaluation.tables import masks_text

    regions = dict.fromkeys(("p1.png", "p2.png"), REGIONS)
    with tempfile.TemporaryDirectory() as tmp:
        data = fake_data(Path(tmp), SQUARES)
        plain = FakeEnsemble(spec=SQUARES, tau=0.45, regions=regions)
        refined = FakeEnsemble(spec=SQUARES, tau=0.45, regions=regions)
        refined.maps = MapOptions(refine="superpixels")
        before = evaluate(plain, data, report=False)
        after = evaluate(refined, data, report=False)
    for name in NAMES:
        assert before["members"][name]["iou_mean"] == pytest.approx(0.75)  # the strong part only
        assert after["members"][name]["iou_mean"] == pytest.approx(1.0)  # the square's region
    assert before["settings"]["refine"] == "none" and after["settings"]["refine"] == "superpixels"
    assert "superpixels" in masks_text(after["settings"]) and "superpixels" not in masks_text(before["settings"])


def test_report_examples_refine_the_members_masks_as_the_runs():
    """The report's grid (aax.evaluation.examples.example_from_record) makes members' masks as the
    evaluation does: pooled over the regions when the run refines."""
    from pathlib import Path

    from test_calibrate import GT, REGIONS, SQUARES
    from test_evaluate import NAMES, FakeEnsemble

    from aax.evaluation.examples import example_from_record

    (record,) = FakeEnsemble(spec=SQUARES, regions={"p1.png": REGIONS}).annotate([Path("p1.png")],
                                                                                  keep_saliency=True)
    settings = {"theta": 0.1, "tau": 0.45, "negative_class": "healthy"}
    plain = example_from_record(record, {"settings": {**settings, "refine": "none"}}, GT)
    refined = example_from_record(record, {"settings": {**settings, "refine": "superpixels"}}, GT)
    for name in NAMES:
        assert plain.member_iou[name] == pytest.approx(0.75)
        assert refined.member_iou[name] == pytest.approx(1.0)
