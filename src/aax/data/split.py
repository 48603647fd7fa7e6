"""Seeded, stratified splits: train/validation (:func:`stratified_split`), and a held-out
test part written as two manifests (:func:`split_manifests`, ``aax data split``)."""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from aax.data.layouts import Dataset


def stratified_split(labels: Sequence[str], val_fraction: float,
                     seed: int) -> tuple[list[int], list[int]]:
    """Split sample indices into train and validation sets, class by class.

    Each class puts ``round(n * val_fraction)`` of its ``n`` samples in validation, but
    at least one and at most ``n - 1`` when it has two or more, so that every class with
    two samples is seen on both sides; a class with a single sample goes to training.

    A class's draw depends only on ``seed``, the class name and its indices, so adding a
    class to a dataset leaves the split of the others as it was.

    Args:
        labels: the class name of every sample (e.g. ``Dataset.labels``).
        val_fraction: share of each class to hold out, in ``(0, 1)``.
        seed: any integer; the same seed gives the same split.

    Returns:
        ``(train_indices, val_indices)``, each sorted ascending; together they hold every
        index once.

    Raises:
        ValueError: ``val_fraction`` is not in ``(0, 1)``.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    by_class: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    train: list[int] = []
    val: list[int] = []
    for label in sorted(by_class):
        indices = np.asarray(by_class[label])
        n = len(indices)
        n_val = 0 if n < 2 else min(max(int(round(n * val_fraction)), 1), n - 1)
        # crc32, not hash(): str hashes change between interpreter runs.
        rng = np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(label.encode("utf-8"))])
        order = rng.permutation(n)
        val.extend(indices[order[:n_val]].tolist())
        train.extend(indices[order[n_val:]].tolist())
    return sorted(train), sorted(val)


def split_manifests(dataset: Dataset, out: str | os.PathLike, test_fraction: float = 0.25,
                    seed: int = 0) -> dict[str, tuple[Path, dict[str, int]]]:
    """Write ``OUT/train.csv`` and ``OUT/test.csv``: ``dataset`` split class by class with
    :func:`stratified_split` (``test_fraction`` of each class to test).

    Returns:
        ``{"train": (path, counts per class), "test": (...)}``.

    Raises:
        ValueError: ``test_fraction`` is not in ``(0, 1)``, the dataset is empty, or its
            ground truth is boxes (TBX11K), which a manifest cannot hold.
    """
    from aax.data.layouts import write_manifest

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"the test fraction must be in (0, 1), got {test_fraction}")
    if not len(dataset):
        raise ValueError(f"{dataset.source}: no usable images to split")
    boxed = [s for s in dataset if s.boxes is not None and s.mask_path is None]
    if boxed:
        raise ValueError(f"{boxed[0].image}: its ground truth is boxes, which a CSV manifest cannot hold; "
                         "split box-annotated sets by their own lists (TBX11K: --split train / val)")
    train, test = stratified_split(dataset.labels, test_fraction, seed)
    out = Path(out)
    written = {}
    for part, indices in (("train", train), ("test", test)):
        subset = dataset.subset(indices)
        written[part] = (write_manifest(subset, out / f"{part}.csv"), subset.counts())
    return written
