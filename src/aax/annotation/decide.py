"""The decision protocol (paper 3.3, Algorithm 1) and mask intersection.

Pure NumPy: no torch, no I/O, so every branch is testable from a table.

0. (ours, optional) at least ``quorum`` members find the image novel
   (far from their training data in feature space, :mod:`aax.models.novelty`)
                                                             -> review ("novel")
1. at least ``quorum`` members with ``u > theta``           -> review ("uncertain")
2. else at least ``quorum`` confident members (``u <= theta``) predict the same positive
   class                                                     -> that class ("consensus");
   the mask is the intersection of those members' maps
3. else at least ``quorum`` confident members predict the negative class
                                                             -> negative ("consensus")
4. else                                                      -> review ("no-consensus")

Masks (:func:`fuse`, :func:`binarise`): the agreeing members' maps are fused into one
score map and thresholded. ``min`` is the paper's intersection (``min_i S_i > tau``);
``mean`` thresholds the mean map; ``vote`` keeps a pixel when at least ``votes`` maps
exceed tau. ``tau`` is a number in [0, 1], or ``"otsu"``: Otsu's threshold of each
image's own fused map (a data-driven threshold for runs without ground-truth masks).

Drafts (ours, :func:`draft_members`): a flagged image whose members together think a
finding more likely than not (mean probability of the negative class below 0.5) gets a
*draft* mask from all members' maps, fused and thresholded as a mask is (none when no
pixel passes). It stays a review: the draft is what the reviewer starts from, never an
annotation. Novel images get one too: the novelty threshold is a quantile of ordinary
images' scores, so it also flags a share of ordinary images, and on a truly foreign one
a reviewer deletes it.

Step 4 departs from the paper, whose pseudocode calls this case healthy: one uncertain
member and two that disagree is not a consensus, so a person looks at it.
A member predicts the class of its strictly highest mean probability; a member whose
top probabilities tie predicts nothing (as the paper's ``p > 0.5`` rule for two classes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from aax.models.mask_settings import FUSIONS, OTSU

NOVEL = "novel"
UNCERTAIN = "uncertain"
CONSENSUS = "consensus"
NO_CONSENSUS = "no-consensus"
NO_PREDICTION = -1


@dataclass(frozen=True)
class Decision:
    """The protocol's answer for one image.

    ``label`` is a class index, or None when the image goes to review; ``agreeing`` are
    the indices of the members whose maps form the mask (positive decisions only).
    """

    label: int | None
    review: bool
    reason: str
    agreeing: tuple[int, ...] = ()


def predicted_classes(probs: np.ndarray) -> np.ndarray:
    """Each member's class: strict argmax of its mean probabilities, ``-1`` on a tie."""
    probs = np.asarray(probs, dtype=float)
    top = probs.max(axis=1, keepdims=True)
    winners = probs == top
    return np.where(winners.sum(axis=1) == 1, probs.argmax(axis=1), NO_PREDICTION)


def decide(probs: np.ndarray, uncertainty: np.ndarray, theta: float, negative_index: int,
           quorum: int = 2, novel: np.ndarray | None = None) -> Decision:
    """Apply the protocol to one image.

    Args:
        probs: ``[M, C]`` mean MC probabilities of the M members.
        uncertainty: ``[M]`` MC uncertainties.
        theta: uncertainty threshold; a member is confident when ``u <= theta``.
        negative_index: index of the negative class (e.g. healthy).
        quorum: members needed to flag, or to agree (2 of 3 by default).
        novel: ``[M]`` bool, whether each member finds the image novel; None skips
            the novelty step (the paper's protocol).
    """
    probs = np.asarray(probs, dtype=float)
    uncertainty = np.asarray(uncertainty, dtype=float)
    if probs.ndim != 2 or uncertainty.shape != (probs.shape[0],):
        raise ValueError(f"probs must be [M, C] and uncertainty [M]; got {probs.shape}, {uncertainty.shape}")
    if novel is not None:
        novel = np.asarray(novel, dtype=bool)
        if novel.shape != uncertainty.shape:
            raise ValueError(f"novel must be [M] like uncertainty; got {novel.shape}")
        if np.count_nonzero(novel) >= quorum:
            return Decision(None, True, NOVEL)
    if np.count_nonzero(uncertainty > theta) >= quorum:
        return Decision(None, True, UNCERTAIN)
    confident = uncertainty <= theta
    predicted = predicted_classes(probs)
    votes = {int(c): np.flatnonzero(confident & (predicted == c))
             for c in np.unique(predicted[confident]) if c != NO_PREDICTION}
    positive = {c: v for c, v in votes.items() if c != negative_index and len(v) >= quorum}
    if positive:
        most = max(len(v) for v in positive.values())
        best = [c for c, v in positive.items() if len(v) == most]
        if len(best) == 1:
            return Decision(best[0], False, CONSENSUS, tuple(int(i) for i in positive[best[0]]))
        return Decision(None, True, NO_CONSENSUS)  # two positive classes tie (M >= 4)
    if len(votes.get(negative_index, ())) >= quorum:
        return Decision(negative_index, False, CONSENSUS)
    return Decision(None, True, NO_CONSENSUS)


def mask_subset(agreeing: Sequence[int], mask_members: Sequence[int] | None) -> tuple[int, ...]:
    """The members whose maps form an image's mask: its agreeing members among the
    run's mask members (``maps.mask_members``; None: all), or all its agreeing members
    when none of them is one."""
    agreeing = tuple(agreeing)
    if mask_members is None:
        return agreeing
    return tuple(i for i in agreeing if i in mask_members) or agreeing


def draft_members(decision: Decision, probs: np.ndarray, negative_index: int,
                  mask_members: Sequence[int] | None = None) -> tuple[int, ...]:
    """The members whose maps form a flagged image's draft mask (see the module
    docstring), or ``()`` for no draft: decided images, and flagged images that the
    members' mean probabilities call negative."""
    if not decision.review:
        return ()
    probs = np.asarray(probs, dtype=float)
    if probs.mean(axis=0)[negative_index] >= 0.5:
        return ()
    return mask_subset(range(probs.shape[0]), mask_members)


def intersect(maps: np.ndarray, tau: float) -> np.ndarray:
    """Binary mask where every map exceeds ``tau``: ``min_i S_i > tau``.

    Args:
        maps: ``[M', H, W]`` saliency maps in [0, 1] of the agreeing members.
        tau: threshold in [0, 1].
    """
    maps = np.asarray(maps)
    if maps.ndim != 3 or maps.shape[0] == 0:
        raise ValueError(f"maps must be a non-empty [M, H, W] stack, got shape {maps.shape}")
    return maps.min(axis=0) > tau


def fuse(maps: np.ndarray, fusion: str = "min", votes: int = 2) -> np.ndarray:
    """One score map ``[H, W]`` from ``[M, H, W]`` maps, such that ``score > tau`` is the mask.

    ``min``: every map exceeds tau (intersection); ``mean``: the mean map exceeds tau;
    ``vote``: at least ``votes`` maps exceed tau, i.e. the ``votes``-th largest value
    does (``votes >= M`` is the intersection).
    """
    maps = np.asarray(maps, dtype=float)
    if maps.ndim != 3 or maps.shape[0] == 0:
        raise ValueError(f"maps must be a non-empty [M, H, W] stack, got shape {maps.shape}")
    if fusion == "min":
        return maps.min(axis=0)
    if fusion == "mean":
        return maps.mean(axis=0)
    if fusion == "vote":
        v = min(max(1, int(votes)), maps.shape[0])
        return np.sort(maps, axis=0)[maps.shape[0] - v]
    raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: the split of a ``bins``-bin histogram with the
    largest between-class variance. Returned as the midpoint between the largest value
    below the split and the smallest above it, so that ``values > t`` is exactly the upper
    class. A constant input gives its value (nothing exceeds it)."""
    v = np.asarray(values, dtype=float).ravel()
    if v.size == 0:
        raise ValueError("otsu_threshold needs at least one value")
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return hi
    split = _otsu_split(v, bins, (0.0, 1.0) if lo >= 0.0 and hi <= 1.0 else (lo, hi))
    if split is None:  # every value in one bin of [0, 1] (a map all but 0): bins over its own range
        split = _otsu_split(v, bins, (lo, hi))
    below, above = v[v < split], v[v >= split]
    return float((below.max() + above.min()) / 2.0)


def _otsu_split(v: np.ndarray, bins: int, value_range: tuple[float, float]) -> float | None:
    """The bin edge with the largest between-class variance; None where no edge has values
    on both sides."""
    counts, edges = np.histogram(v, bins=bins, range=value_range)
    centres = (edges[:-1] + edges[1:]) / 2.0
    w0 = np.cumsum(counts)[:-1].astype(float)
    w1 = v.size - w0
    s0 = np.cumsum(counts * centres)[:-1]
    m0 = s0 / np.maximum(w0, 1)
    m1 = (float((counts * centres).sum()) - s0) / np.maximum(w1, 1)
    between = np.where((w0 > 0) & (w1 > 0), w0 * w1 * (m0 - m1) ** 2, -1.0)
    k = int(between.argmax())  # bins 0..k below the split
    return float(edges[k + 1]) if between[k] >= 0.0 else None


def binarise(score: np.ndarray, tau: float | str) -> np.ndarray:
    """``score > tau``; with ``tau == "otsu"``, ``score > otsu_threshold(score)``."""
    score = np.asarray(score)
    return score > (otsu_threshold(score) if tau == OTSU else float(tau))


def map_class(probs: np.ndarray, negative_index: int) -> int:
    """The class every member's saliency map shows: the positive class with the highest
    mean probability over the members (with two classes, always the positive one)."""
    mean = np.asarray(probs, dtype=float).mean(axis=0).copy()
    mean[negative_index] = -np.inf
    return int(mean.argmax())
