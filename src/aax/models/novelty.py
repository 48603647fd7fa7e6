"""Open-set (novelty) scores in feature space, beside MC Dropout (docs/novelty.md).

MC Dropout on the head cannot see an image that is far from the training data: every
stochastic pass shares one pooled feature, so such an image can get a stable, confident
softmax. The scores here look at the pooled feature (and the head's logits) directly.
Every score is "higher = more novel":

- ``knn``: distance to the k-th nearest neighbour among the L2-normalised training
  features (Sun et al., ICML 2022), on the normalised query feature.
- ``maha`` (the score the protocol thresholds by default): Mahalanobis distance to the
  nearest class mean, with one shared within-class covariance shrunk towards a
  multiple of the identity (Ledoit-Wolf, floored), so that it is well defined when the
  images are fewer than the feature dimensions.
- ``rmd``: relative Mahalanobis (Ren et al., 2021): ``maha`` minus the Mahalanobis
  distance to the mean of all training features under their own (shrunk) covariance.
- ``energy``: ``-logsumexp(logits)`` (Liu et al., 2020), of the deterministic head.
- ``msp``: ``-max softmax`` (Hendrycks & Gimpel, 2017), of the deterministic head.

Each scorer has a scikit-learn-like ``fit`` (NumPy, float64) and ``score`` (torch, on
any device); the fitted state is a few arrays rebuilt from the stored training features
when a RUN is loaded. A member calls an image novel when its score is over the member's
threshold: the score's quantile at ``pass_rate`` on the in-distribution validation split,
taken among the validation images the member predicts as the same class (one threshold
per class, :func:`class_thresholds`), or over all of them for a class with too few.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

FEATURE_SCORES: tuple[str, ...] = ("knn", "maha", "rmd")
LOGIT_SCORES: tuple[str, ...] = ("energy", "msp")
SCORES: tuple[str, ...] = FEATURE_SCORES + LOGIT_SCORES
DEFAULT_SCORE = "maha"
"""The score of runs whose members were trained from scratch, and of runs that stored
none (made before the score was a setting)."""
PRETRAINED_SCORE = "knn"
"""The score of runs whose members start from ImageNet weights. On BUSI (docs/novelty.md)
KNN told a finding never trained on (malignant, to a normal/benign run) from seen images
at AUROC 0.81 against Mahalanobis's 0.59, and far-OOD sets about as well (0.97-1.00)."""


def default_score(pretrained: bool) -> str:
    """The score a new run's novelty step thresholds: :data:`PRETRAINED_SCORE` when its
    members start from pretrained weights, :data:`DEFAULT_SCORE` otherwise."""
    return PRETRAINED_SCORE if pretrained else DEFAULT_SCORE

DEFAULT_K = 1
"""Sun et al. use k = 50 for 50 000 CIFAR images and scale k with the share kept; at
the :data:`MAX_FEATURES` kept here that is k = 1 (measured on the demo: k = 1 best of
1, 3, 5, 10, 20, 50 for two of three members; docs/novelty.md)."""
MIN_SHRINKAGE = 0.1
"""Floor of the Ledoit-Wolf shrinkage. With fewer images than dimensions LW picks a
small value (the features span few directions), every direction outside the training
span then gets a tiny variance, and the relative Mahalanobis score becomes the
difference of two huge, unrelated terms (measured on the demo: far-OOD AUROC 0.001 and
0.08 for two members; 0.999 and 1.0 with the floor)."""
DEFAULT_PASS_RATE = 0.95
MIN_PER_CLASS = 10
"""Validation images a member must predict as a class for that class to get its own
threshold (below it the quantile is too coarse: at 0.95, ten images put it at their
largest score); a class with fewer uses the threshold over all validation images."""
MAX_FEATURES = 1000
"""Training features kept per member (a seeded draw, stratified by class, beyond it)."""
FEATURES_FILE = "novelty.npz"


# --------------------------------------------------------------------------------------
# the scores
# --------------------------------------------------------------------------------------

def energy_score(logits: torch.Tensor) -> torch.Tensor:
    """``-logsumexp(logits)`` per row (higher = more novel)."""
    return -torch.logsumexp(logits.float(), dim=-1)


def msp_score(logits: torch.Tensor) -> torch.Tensor:
    """``-max softmax`` per row (higher = more novel)."""
    return -logits.float().softmax(dim=-1).amax(dim=-1)


def l2_normalise(x: np.ndarray | torch.Tensor, eps: float = 1e-12) -> Any:
    """Rows scaled to unit length (a zero row stays zero)."""
    if isinstance(x, torch.Tensor):
        return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


class KNNScore:
    """Distance to the k-th nearest training feature, both L2-normalised (Sun et al. 2022).

    Cost: one ``[B, d] x [d, n]`` product and a top-k per batch; memory: the ``n x d``
    bank (float32).

    Args:
        k: which neighbour; clamped to the number of training features.
    """

    def __init__(self, k: int = DEFAULT_K) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = int(k)
        self.bank: torch.Tensor | None = None

    def fit(self, features: np.ndarray) -> KNNScore:
        """Keep the normalised training features ``[n, d]``."""
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[0] == 0:
            raise ValueError(f"need a non-empty [n, d] feature array, got shape {features.shape}")
        self.bank = torch.from_numpy(l2_normalise(features).astype(np.float32))
        return self

    def to(self, device: torch.device | str) -> KNNScore:
        if self.bank is not None:
            self.bank = self.bank.to(device)
        return self

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, d]`` pooled features -> ``[B]`` distances in ``[0, 2]``."""
        if self.bank is None:
            raise RuntimeError("KNNScore.score before fit")
        bank = self.bank.to(features.device)
        sims = l2_normalise(features.float()) @ bank.T
        k = min(self.k, bank.shape[0])
        kth = sims.topk(k, dim=1).values[:, -1]
        return (2.0 - 2.0 * kth).clamp_min(0.0).sqrt()


def ledoit_wolf_shrinkage(centred: np.ndarray, small: np.ndarray | None = None) -> float:
    """The Ledoit-Wolf (2004) shrinkage of the sample covariance of ``centred`` ``[n, d]``
    (rows already centred) towards ``mu * I``, ``mu = trace / d``: a number in [0, 1].

    Computed from the ``n x n`` Gram matrix when ``n < d`` and from the ``d x d`` sample
    covariance otherwise (``small``: that product, when the caller has it), so it is
    cheap either way.
    """
    x = np.asarray(centred, dtype=np.float64)
    n, d = x.shape
    if n < 2:
        return 1.0
    if small is None:
        small = x @ x.T if n < d else x.T @ x
    s_fro2 = float(np.sum(small * small)) / n**2  # ||S||_F^2, S = x^T x / n
    mu = float(np.sum(x * x)) / (n * d)
    delta2 = (s_fro2 - d * mu**2) / d  # ||S - mu I||_F^2 / d
    if delta2 <= 0.0:
        return 1.0
    row4 = float(np.sum(np.sum(x * x, axis=1) ** 2))
    beta2 = max(0.0, (row4 / n - s_fro2) / (n * d))  # (1/n^2) sum_i ||x_i x_i^T - S||^2 / d
    return float(min(1.0, beta2 / delta2))


class ShrunkPrecision:
    """The quadratic form of an inverse shrunk covariance, ``q(z) = z^T Sigma^-1 z``, with
    ``Sigma = (1 - a) S + a mu I`` (``S = X^T X / n`` of centred rows).

    With fewer rows than dimensions, ``Sigma^-1`` comes from the Woodbury identity
    through the ``n x n`` Gram matrix: ``q(z) = (|z|^2 - |R z|^2) / s`` with ``R`` of
    shape ``[n, d]``; otherwise ``q(z) = |R z|^2`` with ``R = L^-1``, ``Sigma = L L^T``.
    Either way the memory is at most ``min(n, d) x d`` and the cost per image one product
    with ``R``.

    Args:
        shrinkage: ``a``; None: Ledoit-Wolf's, at least :data:`MIN_SHRINKAGE`.
    """

    def __init__(self, shrinkage: float | None = None) -> None:
        self.shrinkage = shrinkage
        self.alpha = float("nan")
        self.a = 0.0  # weight of |z|^2
        self.b = 1.0  # weight of |R z|^2
        self.r: torch.Tensor | None = None
        self.r32: torch.Tensor | None = None  # float32 copy for the per-image product

    def fit(self, centred: np.ndarray) -> ShrunkPrecision:
        x = np.asarray(centred, dtype=np.float64)
        n, d = x.shape
        small = x @ x.T if n < d else x.T @ x  # the one O(n d min(n, d)) product
        alpha = (max(MIN_SHRINKAGE, ledoit_wolf_shrinkage(x, small)) if self.shrinkage is None
                 else float(self.shrinkage))
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {alpha}")
        mu = float(np.sum(x * x)) / (n * d)
        mu = mu if mu > 0 else 1.0
        alpha = max(alpha, 1e-6)  # never exactly singular
        s = alpha * mu
        c = (1.0 - alpha) / n
        self.alpha = alpha
        if c <= 0.0:
            self.a, self.b, self.r = 1.0 / s, 0.0, torch.zeros(1, d, dtype=torch.float64)
        elif n < d:
            chol = np.linalg.cholesky((s / c) * np.eye(n) + small)
            self.a, self.b = 1.0 / s, -1.0 / s
            self.r = torch.from_numpy(np.linalg.solve(chol, x))
        else:
            chol = np.linalg.cholesky(s * np.eye(d) + c * small)
            self.a, self.b = 0.0, 1.0
            self.r = torch.from_numpy(np.linalg.solve(chol, np.eye(d)))
        return self

    def to(self, device: torch.device | str) -> ShrunkPrecision:
        if self.r is not None:
            self.r = self.r.to(device)
            self.r32 = self.r.float()
        return self

    def quad(self, z: torch.Tensor) -> torch.Tensor:
        """``[..., d]`` (already centred) -> ``[...]`` quadratic form (float64)."""
        if self.r is None:
            raise RuntimeError("ShrunkPrecision.quad before fit")
        z = z.to(self.r.device, torch.float64)
        rz = z @ self.r.T
        out = self.b * (rz * rz).sum(dim=-1)
        if self.a:
            out = out + self.a * (z * z).sum(dim=-1)
        return out.clamp_min(0.0)

    def quad_to(self, z: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        """``q(z - c)`` for every row of ``z`` ``[B, d]`` and centre ``c`` ``[K, d]``:
        ``[B, K]``. The form is linear inside, so ``R z`` is computed once for all
        centres (one ``[B, d] x [d, r]`` product, not K)."""
        if self.r is None:
            raise RuntimeError("ShrunkPrecision.quad_to before fit")
        # the product (the cost) in float32, the sums whose difference is taken in float64
        r32 = self.r32 if self.r32 is not None and self.r32.device == self.r.device else self.r.float()
        self.r32 = r32
        z32 = z.to(r32.device, torch.float32)
        c32 = centres.to(r32.device, torch.float32)
        diff = ((z32 @ r32.T)[:, None, :] - (c32 @ r32.T)[None]).double()
        out = self.b * (diff * diff).sum(dim=-1)
        if self.a:
            gap = z32.double()[:, None, :] - c32.double()[None]
            out = out + self.a * (gap * gap).sum(dim=-1)
        return out.clamp_min(0.0)


class MahalanobisScore:
    """Class-conditional Mahalanobis score with a shared, shrunk covariance, and its
    relative variant (Ren et al. 2021).

    ``maha(z) = min_c (z - mu_c)^T Sigma^-1 (z - mu_c)`` with ``Sigma`` the shrunk
    within-class covariance; ``rmd(z) = min_c [maha_c(z)] - (z - mu_0)^T Sigma_0^-1 (z - mu_0)``
    with ``mu_0, Sigma_0`` the mean and shrunk covariance of all training features.
    (The minimum is taken before the subtraction; since the background term does not
    depend on the class, that is the same as ``min_c`` of the differences.)

    Args:
        shrinkage: covariance shrinkage in [0, 1]; None: Ledoit-Wolf's, at least
            :data:`MIN_SHRINKAGE`.
    """

    def __init__(self, shrinkage: float | None = None) -> None:
        self.shrinkage = shrinkage
        self.means: torch.Tensor | None = None
        self.mean0: torch.Tensor | None = None
        self.within = ShrunkPrecision(shrinkage)
        self.background = ShrunkPrecision(shrinkage)

    def fit(self, features: np.ndarray, labels: np.ndarray) -> MahalanobisScore:
        """Fit on training features ``[n, d]`` and their class indices ``[n]``."""
        x = np.asarray(features, dtype=np.float64)
        y = np.asarray(labels)
        if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] < 2:
            raise ValueError(f"need [n, d] features (n >= 2) and [n] labels, got {x.shape}, {y.shape}")
        classes = np.unique(y)
        means = np.stack([x[y == c].mean(axis=0) for c in classes])
        within = x - means[np.searchsorted(classes, y)]
        mean0 = x.mean(axis=0)
        self.within.fit(within)
        self.background.fit(x - mean0)
        self.means = torch.from_numpy(means)
        self.mean0 = torch.from_numpy(mean0)
        return self

    def to(self, device: torch.device | str) -> MahalanobisScore:
        self.within.to(device)
        self.background.to(device)
        if self.means is not None:
            self.means, self.mean0 = self.means.to(device), self.mean0.to(device)
        return self

    def score(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[B, d]`` -> ``{"maha": [B], "rmd": [B]}`` (float64)."""
        if self.means is None:
            raise RuntimeError("MahalanobisScore.score before fit")
        z = features.to(self.means.device, torch.float64)
        maha = self.within.quad_to(z, self.means).amin(dim=1)
        return {"maha": maha, "rmd": maha - self.background.quad_to(z, self.mean0[None])[:, 0]}


# --------------------------------------------------------------------------------------
# thresholds
# --------------------------------------------------------------------------------------

def threshold_at(scores: np.ndarray, pass_rate: float = DEFAULT_PASS_RATE) -> dict[str, float]:
    """The threshold that lets ``pass_rate`` of in-distribution ``scores`` pass
    (``score <= threshold``), and the median (for :func:`margin`).

    The threshold is an observed score (the smallest one with at least ``pass_rate`` of
    the scores at or below it), so exactly that share passes on these images.
    """
    s = np.sort(np.asarray(scores, dtype=float).ravel())
    s = s[np.isfinite(s)]
    if s.size == 0:
        raise ValueError("no finite scores to set a threshold from")
    if not 0.0 < pass_rate <= 1.0:
        raise ValueError(f"pass_rate must be in (0, 1], got {pass_rate}")
    index = min(s.size - 1, max(0, math.ceil(pass_rate * s.size) - 1))
    return {"threshold": float(s[index]), "median": float(np.median(s)), "n": int(s.size),
            "pass_rate": float(pass_rate)}


def pass_rate_on_new_images(n: int, pass_rate: float = DEFAULT_PASS_RATE,
                            level: float = 0.05) -> dict[str, float]:
    """What a threshold set by :func:`threshold_at` on ``n`` validation scores lets pass
    of *new* in-distribution images: ``expected`` on average, and ``low``, the share it
    stays above with probability ``1 - level`` (``level = 0.05``: 19 times in 20).

    The threshold is the k-th smallest of the n scores (``k = ceil(pass_rate * n)``), so
    for images exchangeable with the validation ones the share at or below it is
    Beta(k, n + 1 - k) distributed, whatever the score's distribution (order statistics of
    uniforms): mean ``k / (n + 1)``. Why it matters: with 30 validation images per class
    a 95 % threshold passes 93.5 % on average but less than 85.1 % one time in 20, and on
    the fire frames at 256 px the members called 16-28 % of 200 new no-fire frames novel
    (docs/novelty.md). Hundreds of validation images per class are needed for the asked
    pass rate to hold within a few points.
    """
    from scipy.stats import beta  # scikit-image's dependency

    if n < 1:
        raise ValueError(f"need at least one validation score, got n={n}")
    if not 0.0 < pass_rate <= 1.0 or not 0.0 < level < 1.0:
        raise ValueError(f"pass_rate must be in (0, 1] and level in (0, 1); got {pass_rate}, {level}")
    k = min(n, max(1, math.ceil(pass_rate * n)))  # as threshold_at picks it
    return {"n": int(n), "expected": k / (n + 1), "low": float(beta.ppf(level, k, n + 1 - k)), "level": float(level)}


def class_thresholds(scores: np.ndarray, predicted: Sequence[str | None], pass_rate: float = DEFAULT_PASS_RATE,
                     min_images: int = MIN_PER_CLASS) -> dict[str, dict[str, float]]:
    """One :func:`threshold_at` per class, over the validation images the member predicts
    as that class (classes predicted for fewer than ``min_images`` are left out).

    Why: a positive class is far more varied than the negative one (a finding of any
    size, anywhere), so its images score higher on every feature-space score. One
    quantile over all validation images then passes nearly every negative image and far
    fewer than ``pass_rate`` of the positive ones: on the synthetic lesions 4 of 40 test
    images with a lesion were called novel and none of 40 healthy ones (docs/novelty.md).
    A threshold per predicted class lets ``pass_rate`` of each class pass (Mondrian,
    class-conditional conformal prediction).
    """
    scores = np.asarray(scores, dtype=float).ravel()
    predicted = np.asarray([p if p is not None else "" for p in predicted], dtype=object)
    if predicted.shape != scores.shape:
        raise ValueError(f"one predicted class per score needed; got {predicted.shape} for {scores.shape}")
    out = {}
    for c in sorted({p for p in predicted if p}):
        chosen = scores[(predicted == c) & np.isfinite(scores)]
        if chosen.size >= min_images:
            out[str(c)] = threshold_at(chosen, pass_rate)
    return out


def per_image(default: float, by_class: Mapping[str, float], predicted: Sequence[str | None]) -> np.ndarray:
    """Each image's value: its predicted class's in ``by_class`` when that class has one,
    else ``default`` (also for an image whose member predicts no class)."""
    return np.array([by_class.get(p, default) if p is not None else default for p in predicted], dtype=float)


def limits_for(entry: Mapping[str, Any], predicted: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """Each image's threshold and median from one stored threshold ``entry``
    (``{"threshold", "median", "by_class": {class: {...}}}``): its predicted class's when
    that class has one, else the entry's own (every class's, and runs calibrated before
    thresholds per class existed)."""
    by_class = entry.get("by_class") or {}
    return tuple(per_image(float(entry[k]), {c: float(e[k]) for c, e in by_class.items()}, predicted)
                 for k in ("threshold", "median"))


def margin(scores: np.ndarray, threshold: float | np.ndarray, median: float | np.ndarray) -> np.ndarray:
    """``(score - threshold) / (threshold - median)``: over 0 exactly when the score is
    over the threshold, in units of the validation spread, so that members' scores can be
    compared and combined (the ensemble rule's continuous score). ``threshold`` and
    ``median`` may be one per score (:func:`limits_for`)."""
    threshold = np.asarray(threshold, dtype=float)
    scale = threshold - np.asarray(median, dtype=float)
    scale = np.where(scale > 0, scale, np.maximum(np.abs(threshold), 1e-12))
    return (np.asarray(scores, dtype=float) - threshold) / scale


def quorum_margin(margins: np.ndarray, quorum: int) -> np.ndarray:
    """The ``quorum``-th largest member margin ``[N, M] -> [N]``: over 0 exactly when at
    least ``quorum`` members call the image novel."""
    q = min(max(int(quorum), 1), margins.shape[1])
    return np.sort(margins, axis=1)[:, -q]


# --------------------------------------------------------------------------------------
# per member and per ensemble
# --------------------------------------------------------------------------------------

@dataclass
class MemberNovelty:
    """The fitted scores of one member."""

    knn: KNNScore
    maha: MahalanobisScore
    n_features: int

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, k: int = DEFAULT_K,
            shrinkage: float | None = None) -> MemberNovelty:
        return cls(knn=KNNScore(k).fit(features), maha=MahalanobisScore(shrinkage).fit(features, labels),
                   n_features=int(np.asarray(features).shape[0]))

    def to(self, device: torch.device | str) -> MemberNovelty:
        self.knn.to(device)
        self.maha.to(device)
        return self

    def score(self, pooled: torch.Tensor, logits: torch.Tensor) -> dict[str, np.ndarray]:
        """Every score for a batch: ``[B, d]`` pooled features, ``[B, C]`` logits."""
        out = {"knn": self.knn.score(pooled)}
        out.update(self.maha.score(pooled))
        out["energy"] = energy_score(logits)
        out["msp"] = msp_score(logits)
        return {k: v.detach().double().cpu().numpy() for k, v in out.items()}


@dataclass
class Novelty:
    """An ensemble's novelty scorers and, once calibrated, its thresholds.

    Attributes:
        members: member name -> fitted scorers.
        score: the score the protocol thresholds (one of :data:`SCORES`).
        pass_rate: share of in-distribution validation images each threshold passes.
        thresholds: member -> score -> ``{"threshold", "median", ...}``; empty until
            thresholds were set on validation data.
        k: the KNN neighbour.
    """

    members: dict[str, MemberNovelty]
    score: str = DEFAULT_SCORE
    pass_rate: float = DEFAULT_PASS_RATE
    thresholds: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    k: int = DEFAULT_K

    @property
    def ready(self) -> bool:
        """Whether every member has a threshold for the chosen score."""
        return bool(self.members) and all(self.score in self.thresholds.get(n, {}) for n in self.members)

    def member_thresholds(self) -> dict[str, float]:
        """Member -> threshold of the chosen score over all validation images."""
        return {n: float(self.thresholds[n][self.score]["threshold"]) for n in self.members}

    def member_class_thresholds(self) -> dict[str, dict[str, float]]:
        """Member -> predicted class -> threshold of the chosen score, for the classes
        that have their own (:func:`class_thresholds`); the protocol uses these first."""
        return {n: {c: float(e["threshold"]) for c, e in (self.thresholds[n][self.score].get("by_class") or {}).items()}
                for n in self.members}

    def step(self) -> dict[str, Any]:
        """The novelty step as the protocol applies it (and as annotation stores record
        it in their fingerprint): score, member thresholds and, when any, the member
        thresholds per predicted class."""
        out: dict[str, Any] = {"score": self.score, "thresholds": self.member_thresholds()}
        by_class = self.member_class_thresholds()
        if any(by_class.values()):
            out["by_class"] = by_class
        return out

    def score_member(self, name: str, pooled: torch.Tensor, logits: torch.Tensor) -> dict[str, np.ndarray]:
        return self.members[name].score(pooled, logits)

    def to(self, device: torch.device | str) -> Novelty:
        for m in self.members.values():
            m.to(device)
        return self


# --------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------

def stratified_cap(labels: np.ndarray, cap: int, seed: int = 0) -> np.ndarray:
    """Indices of at most ``cap`` rows, each class keeping its share (at least one row
    per class), drawn with a seeded generator; all rows, in order, when under the cap."""
    labels = np.asarray(labels)
    n = labels.size
    if n <= cap:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    keep = []
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.maximum(1, np.floor(counts * cap / n).astype(int))
    for c, q in zip(classes, quota):
        rows = np.flatnonzero(labels == c)
        keep.append(rng.choice(rows, size=min(q, rows.size), replace=False))
    return np.sort(np.concatenate(keep))


def save_features(path: str | os.PathLike, features: Mapping[str, np.ndarray],
                  labels: Mapping[str, np.ndarray]) -> Path:
    """Write ``member -> [n, d]`` features (float16) and their labels to an ``.npz``
    (plain arrays, read back with ``allow_pickle=False``), atomically."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    for name, feats in features.items():
        arrays[f"{name}.features"] = np.asarray(feats, dtype=np.float16)
        arrays[f"{name}.labels"] = np.asarray(labels[name], dtype=np.int16)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_features(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``member -> (features float32 [n, d], labels [n])`` from :func:`save_features`."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as data:
        for key in data.files:
            if key.endswith(".features"):
                name = key[: -len(".features")]
                out[name] = (data[key].astype(np.float32), data[f"{name}.labels"].astype(np.int64))
    return out


def load(run: str | os.PathLike, manifest: Mapping[str, Any], names: Sequence[str],
         device: torch.device | str = "cpu") -> Novelty | None:
    """The run's novelty scorers, or None when it has no stored features (a run trained
    before novelty existed, or one whose features do not cover every member)."""
    block = manifest.get("novelty") or {}
    path = Path(run) / block.get("file", FEATURES_FILE)
    if not path.is_file():
        return None
    try:
        stored = load_features(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path}: cannot be read as novelty features ({exc})") from exc
    if any(n not in stored for n in names):
        return None
    k = int(block.get("k", DEFAULT_K))
    shrinkage = block.get("shrinkage")
    members = {n: MemberNovelty.fit(*stored[n], k=k, shrinkage=shrinkage).to(device) for n in names}
    thresholds = {n: dict(v) for n, v in (block.get("thresholds") or {}).items() if n in names}
    return Novelty(members=members, score=str(block.get("score", DEFAULT_SCORE)),
                   pass_rate=float(block.get("pass_rate", DEFAULT_PASS_RATE)), thresholds=thresholds, k=k)
