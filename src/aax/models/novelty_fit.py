"""Fitting the novelty scores of a RUN: training features in, thresholds from validation.

``fit_run`` is what ``aax train`` (at its end) and ``aax calibrate`` call:

1. each member's pooled features of the training images (eval mode, no augmentation,
   the same decoding and resizing as annotation) are stored in ``RUN/novelty.npz``
   (float16; at most :data:`aax.models.novelty.MAX_FEATURES` per member, a seeded draw
   stratified by class beyond that);
2. every score of every member is computed on the validation images, and each
   threshold is the score's quantile at ``pass_rate`` there (never on training images):
   over all of them, and over those the member predicts as each class (the threshold
   the protocol uses for an image the member predicts as that class,
   :func:`aax.models.novelty.class_thresholds`);
3. the ``novelty`` block of ``RUN/aax.json`` records the file, the settings, the
   thresholds and what was measured on the validation images.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from aax.models import novelty as nv
from aax.models import runfiles

if TYPE_CHECKING:  # pragma: no cover
    from aax.models.ensemble import Ensemble


@torch.no_grad()
def extract(ensemble: Ensemble, paths: Sequence[str | os.PathLike], batch_size: int = 32,
            ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[int]]:
    """Pooled features ``[n, d]`` and deterministic head logits ``[n, C]`` of every member
    for ``paths``, decoded as annotation decodes them; and the indices of the paths that
    could be read (an unreadable file is left out, not fatal)."""
    from aax.data.batches import decoded_batches

    feats: dict[str, list[np.ndarray]] = {n: [] for n in ensemble.members}
    logits: dict[str, list[np.ndarray]] = {n: [] for n in ensemble.members}
    kept: list[int] = []
    for index, x in decoded_batches(ensemble, paths, batch_size):
        kept += index
        for name, member in ensemble.members.items():
            pooled = member.head.pool(member.features(x).float())
            feats[name].append(pooled.cpu().numpy())
            logits[name].append(member.head.classify(pooled).cpu().numpy())
    cat = (lambda v: np.concatenate(v) if v else np.zeros((0, 0), dtype=np.float32))
    return {n: cat(v) for n, v in feats.items()}, {n: cat(v) for n, v in logits.items()}, kept


def validation_scores(novelty: nv.Novelty, feats: dict[str, np.ndarray],
                      logits: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """member -> score -> ``[n]`` for extracted features and logits."""
    return {n: novelty.members[n].score(torch.from_numpy(feats[n]), torch.from_numpy(logits[n]))
            for n in novelty.members}


def thresholds_from(scores: dict[str, dict[str, np.ndarray]], pass_rate: float,
                    predicted: dict[str, Sequence[str | None]] | None = None) -> dict[str, dict[str, dict]]:
    """member -> score -> :func:`aax.models.novelty.threshold_at` of the validation scores; with
    ``predicted`` (member -> the class it predicts for each validation image) each entry
    also holds ``by_class``, one threshold per predicted class."""
    out: dict[str, dict[str, dict]] = {}
    for n, per in scores.items():
        out[n] = {}
        for s, v in per.items():
            entry = nv.threshold_at(v, pass_rate)
            if predicted is not None:
                entry["by_class"] = nv.class_thresholds(v, predicted[n], pass_rate, min_images=nv.MIN_PER_CLASS)
            out[n][s] = entry
    return out


def small_split_warning(thresholds: dict[str, dict[str, dict]], score: str, pass_rate: float) -> str | None:
    """A warning when a threshold the protocol uses rests on too few validation images
    for ``pass_rate``: the empirical quantile of ``n < pass_rate / (1 - pass_rate)``
    scores is their largest, which lets only about ``n / (n + 1)`` of new in-distribution
    images pass (fire, 11 validation images per class: 10.5 % of 200 new fire frames
    flagged, docs/novelty.md)."""
    if pass_rate >= 1.0:
        return None
    need = math.ceil(pass_rate / (1.0 - pass_rate) - 1e-9)
    n, where = fewest_images(thresholds, score) or (need, None)
    if n >= need:
        return None
    of = f"validation images predicted {where}" if where is not None else "validation images"
    return (f"the novelty thresholds rest on as few as {n} {of}: the {pass_rate:.0%} quantile of so few is "
            f"their largest score, so about {n / (n + 1):.0%} of new in-distribution images pass, not "
            f"{pass_rate:.0%}; a validation split with at least {need} images per class gives the pass rate asked for")


def fewest_images(thresholds: dict[str, dict[str, dict]], score: str) -> tuple[int, str | None] | None:
    """The fewest validation images any threshold of ``score`` rests on, and their class
    (None: the threshold over all of them); None without thresholds."""
    used: list[tuple[int, str | None]] = []
    for per in thresholds.values():
        entry = per[score]
        used += [(int(entry["n"]), None)] + [(int(e["n"]), c) for c, e in (entry.get("by_class") or {}).items()]
    return min(used, key=lambda t: t[0]) if used else None


def on_new_images(thresholds: dict[str, dict[str, dict]], score: str, pass_rate: float) -> dict[str, Any] | None:
    """:func:`aax.models.novelty.pass_rate_on_new_images` for the threshold resting on the
    fewest validation images (the least certain one), with its class."""
    fewest = fewest_images(thresholds, score)
    if fewest is None:
        return None
    return {**nv.pass_rate_on_new_images(fewest[0], pass_rate), "class": fewest[1]}


def predicted_from_logits(logits: dict[str, np.ndarray], classes: Sequence[str]) -> dict[str, list[str]]:
    """member -> the class its deterministic head predicts for each image."""
    return {n: [str(classes[int(i)]) for i in np.asarray(v).argmax(axis=1)] for n, v in logits.items()}


def fit_run(run: str | os.PathLike, train_paths: Sequence[str | os.PathLike], train_labels: Sequence[int],
            val_paths: Sequence[str | os.PathLike], *, ensemble: Ensemble | None = None,
            score: str = nv.DEFAULT_SCORE, pass_rate: float = nv.DEFAULT_PASS_RATE, k: int = nv.DEFAULT_K,
            shrinkage: float | None = None, max_features: int = nv.MAX_FEATURES, seed: int = 0,
            device: str | None = None, reuse_features: bool = True, per_class: bool = True,
            val_name: str | None = None) -> dict[str, Any]:
    """Store the training features of every member and set the thresholds on the
    validation images; write the ``novelty`` block into ``RUN/aax.json`` and return it.

    Args:
        run: the RUN folder.
        train_paths: the training images.
        train_labels: their class indices.
        val_paths: in-distribution validation images (the thresholds' only source).
        ensemble: the loaded ensemble (loaded from ``run`` when None).
        score: the score the protocol thresholds.
        pass_rate: share of validation images each threshold lets pass.
        k: the KNN neighbour.
        shrinkage: Mahalanobis covariance shrinkage (None: Ledoit-Wolf).
        max_features: training features kept per member (stratified, seeded beyond it).
        reuse_features: keep ``RUN/novelty.npz`` when it was made from these very
            checkpoints (only the thresholds are set again).
        per_class: also set one threshold per predicted class (the protocol then uses
            the image's predicted class's); False: one threshold over all images.
        val_name: what ``val_paths`` are, when not the labelled validation data (stored
            as ``validation.source``; ``aax calibrate --novelty-images``).
    """
    from aax.models.ensemble import Ensemble

    if score not in nv.SCORES:
        raise ValueError(f"unknown novelty score {score!r}; choose from {', '.join(nv.SCORES)}")
    if not 0.0 < pass_rate <= 1.0:
        raise ValueError(f"pass_rate must be in (0, 1], got {pass_rate}")
    run = Path(run)
    if ensemble is None:
        with warnings.catch_warnings():  # "no novelty features yet": what this call is making
            warnings.simplefilter("ignore", UserWarning)
            ensemble = Ensemble.load(run, device=device)
    names = list(ensemble.members)
    weights = runfiles.run_fingerprint(ensemble.run, ensemble.manifest)
    manifest = runfiles.read_json(run / runfiles.MANIFEST)
    old = manifest.get("novelty") or {}
    path = run / nv.FEATURES_FILE
    same = (reuse_features and path.is_file() and old.get("weights") == weights
            and old.get("max_features") == max_features)
    if same:
        stored = nv.load_features(path)
        same = all(n in stored for n in names)
    if not same:
        if not train_paths:
            raise ValueError(f"{run}: no training images to take novelty features from")
        keep = nv.stratified_cap(np.asarray(train_labels), max_features, seed)
        paths = [train_paths[i] for i in keep]
        feats, _, kept = extract(ensemble, paths)
        if not kept:
            raise ValueError(f"{run}: none of the training images could be read for novelty features")
        labels = np.asarray(train_labels)[keep][kept]
        nv.save_features(path, feats, {n: labels for n in names})
        stored = {n: (feats[n].astype(np.float16).astype(np.float32), labels) for n in names}
    novelty = nv.Novelty(members={n: nv.MemberNovelty.fit(*stored[n], k=k, shrinkage=shrinkage) for n in names},
                         score=score, pass_rate=pass_rate, k=k)
    vfeats, vlogits, vkept = extract(ensemble, val_paths)
    if not vkept:
        raise ValueError(f"{run}: no readable validation images to set novelty thresholds on")
    scores = validation_scores(novelty, vfeats, vlogits)
    predicted = predicted_from_logits(vlogits, ensemble.classes)
    thresholds = thresholds_from(scores, pass_rate, predicted if per_class else None)
    flags = np.stack([scores[n][score] > nv.limits_for(thresholds[n][score], predicted[n])[0] for n in names], axis=1)
    block = {
        "file": nv.FEATURES_FILE, "score": score, "pass_rate": pass_rate, "per_class": per_class,
        "k": k, "shrinkage": shrinkage,
        "max_features": max_features, "weights": weights,
        "n_features": {n: int(stored[n][0].shape[0]) for n in names},
        "feature_dim": {n: int(stored[n][0].shape[1]) for n in names},
        "thresholds": thresholds,
        "validation": {"n": len(vkept),
                       "flag_rate": {n: float(flags[:, i].mean()) for i, n in enumerate(names)},
                       "flag_rate_quorum": float((flags.sum(axis=1) >= ensemble.quorum).mean()),
                       **({"source": val_name} if val_name else {})},
        "new_images": on_new_images(thresholds, score, pass_rate),
        **({"warning": warning} if (warning := small_split_warning(thresholds, score, pass_rate)) else {}),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    manifest = runfiles.read_json(run / runfiles.MANIFEST)  # fresh: calibration may have written
    manifest["novelty"] = block
    runfiles.write_json(run / runfiles.MANIFEST, manifest)
    return block


def started_pretrained(manifest: dict) -> bool:
    """Whether most of a RUN's members started from pretrained weights (ImageNet, or
    given ``weights``); runs made before ``pretrained`` was recorded started from scratch."""
    training = manifest.get("training") or {}
    names = [m["name"] for m in manifest.get("members") or []]
    given = set(training.get("weights") or {})
    pretrained = [training.get("pretrained") == "imagenet" or n in given for n in names]
    return 2 * sum(pretrained) > len(pretrained)


def calibrate_novelty(ensemble: Ensemble, val_paths: Sequence[str | os.PathLike], *,
                      score: str | None = None, pass_rate: float | None = None,
                      k: int | None = None, per_class: bool | None = None,
                      val_name: str | None = None) -> dict[str, Any]:
    """What ``aax calibrate`` does for novelty: training features from the split the
    manifest records (kept when they were made from these checkpoints), thresholds on
    ``val_paths`` (``val_name``: what they are, when not the labelled validation data);
    the loaded ``ensemble`` gets the new scorers. Settings left None keep the run's (or
    the defaults).

    Raises:
        ValueError: no stored features and no training images to take them from.
    """
    run = Path(ensemble.run)
    manifest = runfiles.read_json(run / runfiles.MANIFEST)
    block = manifest.get("novelty") or {}
    try:
        train_paths, train_labels, _ = runfiles.recorded_split(run)
    except (ValueError, FileNotFoundError, KeyError):  # stored features may still serve
        train_paths, train_labels = [], []
    result = fit_run(run, train_paths, train_labels, val_paths, ensemble=ensemble,
                     score=score or block.get("score") or nv.default_score(started_pretrained(manifest)),
                     pass_rate=float(pass_rate if pass_rate is not None else block.get("pass_rate", nv.DEFAULT_PASS_RATE)),
                     k=int(k if k is not None else block.get("k", nv.DEFAULT_K)),
                     shrinkage=block.get("shrinkage"),
                     per_class=bool(per_class if per_class is not None else block.get("per_class", True)),
                     val_name=val_name)
    ensemble.novelty = nv.load(run, runfiles.read_json(run / runfiles.MANIFEST), list(ensemble.members),
                               ensemble.device)
    return result
