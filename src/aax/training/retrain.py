"""Retraining from reviews: a new RUN on an old RUN's data and settings, plus reviews.

:func:`retrain` reads what the old RUN's manifest records (the dataset, its layout and
every training setting) and calls :func:`aax.training.train.train` with the reviews
(:mod:`aax.training.reviewed`). By default members start again from their initial weights
(ImageNet by default) rather than from the old RUN's: the old members have fit the old
labels, including the ones the reviewers corrected. ``warm_start=True`` starts them from
the old RUN's members instead, which needs fewer epochs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aax.models import runfiles
from aax.training.train import TrainConfig, train


def config_of(run: str | os.PathLike, **changes: Any) -> TrainConfig:
    """The :class:`TrainConfig` a RUN was trained with (its manifest's ``training``),
    with ``changes`` (those that are not None) applied."""
    stored = runfiles.read_json(Path(run) / runfiles.MANIFEST).get("training") or {}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    base = {k: v for k, v in stored.items() if k in names}
    if "members" in base:
        base["members"] = tuple(base["members"])
    base.update({k: v for k, v in changes.items() if v is not None})
    return TrainConfig(**base)


def retrain(run: str | os.PathLike, out: str | os.PathLike, reviews: Sequence[Any], *,
            data: Any = None, localisation_weight: float | None = None, localisation_loss: str | None = None,
            segmentation_weight: float | None = None, segmentation_epochs: int | None = None,
            segmentation_views: int | None = None, epochs: int | None = None, warm_start: bool = False,
            device: str | None = None, resume: bool = False, progress: bool = True) -> Path:
    """Train a new RUN ``out`` like ``run``, learning from ``reviews``
    (:func:`aax.training.reviewed.read_reviews`).

    Args:
        run: the RUN whose data and settings are reused.
        out: the new RUN folder.
        reviews: the reviewed images.
        data: the dataset (default: the source ``run``'s manifest records).
        localisation_weight: overrides the stored weight of the localisation loss.
        localisation_loss: overrides its stored form (``"bce"`` or ``"spatial"``).
        segmentation_weight: overrides the stored weight of the segmentation head's loss
            (above 0: the members get segmentation heads and the masks come from them).
        segmentation_epochs: overrides the stored epochs of the heads' refit on the masks
            (:mod:`aax.training.seg_refit`).
        segmentation_views: overrides the stored number of augmented views the refit learns from.
        epochs: overrides the stored maximum epochs.
        warm_start: start every member from ``run``'s trained member rather than from its
            initial weights (fewer epochs are then enough; see docs/reviews.md).
        device: where to train.
        resume: continue an interrupted retraining in ``out``.
        progress: show progress bars.

    Raises:
        ValueError: ``run`` records no data source and none is given.
    """
    manifest = runfiles.read_json(Path(run) / runfiles.MANIFEST)
    if data is None:
        data = (manifest.get("data") or {}).get("source")
        if not data:
            raise ValueError(f"{run}: the manifest records no data source; pass the dataset (--data)")
    config = config_of(run, localisation_weight=localisation_weight, localisation_loss=localisation_loss,
                       segmentation_weight=segmentation_weight, segmentation_epochs=segmentation_epochs,
                       segmentation_views=segmentation_views, epochs=epochs,
                       data_format=(manifest.get("data") or {}).get("format"))
    config = dataclasses.replace(config, device=device, resume=resume, progress=progress,
                                 warm_start=str(Path(run).resolve()) if warm_start else None)
    return train(data, out, config, reviews=reviews)
