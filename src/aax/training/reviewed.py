"""Reviewed labels and masks as training data: what ``aax retrain`` learns from.

A review (``aax import``, or Label Studio's webhook through ``aax serve --store``) is a
person's final answer for one image of an annotation folder OUT: a class and, for a
positive class, a mask. Here those answers are read back from one or more OUT folders
and merged into the dataset a run trains on:

- a reviewed image of the dataset takes the reviewed class (a correction replaces the
  dataset's label) and always trains: if the split had put it in validation, it moves
  to training, since a reviewed image must never be scored as held-out data;
- a reviewed image that is not in the dataset joins the training images;
- a reviewed mask teaches the member where to look (:func:`aax.training.loop.localisation_loss`).

The RUN records every reviewed file (``manifest["reviews"]``), so that evaluation can
refuse test images that were reviewed into training (:func:`reviewed_files`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

MIN_REVIEWED_MASKS = 10
"""Reviewed masks a run needs before calibration also uses them (theta, tau, fusion)."""


@dataclass(frozen=True)
class ReviewedImage:
    """One reviewed image: where it is, the reviewed class, the reviewed mask file."""

    path: Path
    label: str
    mask: Path | None
    source: str  # the annotation folder the review is stored in


@dataclass
class Merged:
    """A dataset with reviews merged in (see the module's description).

    Attributes:
        dataset: the samples: the original ones (reviewed labels replacing theirs),
            then the reviewed images the dataset did not hold.
        masks: dataset index -> reviewed mask file.
        reviewed: dataset indices of every reviewed image.
        added: dataset indices of the reviewed images the dataset did not hold.
        corrected: reviewed images whose dataset label the review changed.
        record: what the manifest keeps under ``reviews``.
    """

    dataset: Any
    masks: dict[int, Path] = field(default_factory=dict)
    reviewed: set[int] = field(default_factory=set)
    added: list[int] = field(default_factory=list)
    corrected: int = 0
    record: dict[str, Any] = field(default_factory=dict)


def read_reviews(outs: Sequence[str | os.PathLike]) -> list[ReviewedImage]:
    """Every review stored in the annotation folders ``outs``.

    An image reviewed in two folders keeps the later folder's answer.

    Raises:
        ValueError: a folder that is not an annotation folder, or one without reviews.
    """
    from aax.annotation.store import open_store
    from aax.interop.reviews import reviews_by_image

    by_path: dict[Path, ReviewedImage] = {}
    for out in outs:
        store = open_store(out)
        try:
            reviews = reviews_by_image(store)
            if not reviews:
                raise ValueError(f"{out}: no reviews stored; import a tool's export first "
                                 f"(aax import {out} EXPORT)")
            for image, review in reviews.items():
                path = Path(store.resolve(image)).resolve()
                mask = (store.out / review["mask"]).resolve() if review.get("mask") else None
                by_path[path] = ReviewedImage(path, review["decision"], mask, str(Path(out).resolve()))
        finally:
            store.close()
    return list(by_path.values())


def merge_reviews(dataset: Any, reviews: Sequence[ReviewedImage], negative_class: str) -> Merged:
    """``dataset`` with ``reviews`` merged in.

    Masks of the negative class are ignored (a negative image has no finding to point at).

    Raises:
        ValueError: a reviewed class the dataset does not have.
    """
    from aax.data.layouts import Dataset, Sample

    classes = list(dataset.classes)
    unknown = sorted({r.label for r in reviews} - set(classes))
    if unknown:
        example = next(r for r in reviews if r.label in unknown)
        raise ValueError(f"reviewed classes {unknown} are not among the dataset's {classes} "
                         f"(e.g. {example.path}, reviewed in {example.source})")
    samples = list(dataset)
    index = {Path(s.image).resolve(): i for i, s in enumerate(samples)}
    merged = Merged(dataset=None)
    for r in reviews:
        i = index.get(r.path)
        if i is None:
            i = len(samples)
            samples.append(Sample(image=r.path, label=r.label))
            index[r.path] = i
            merged.added.append(i)
        elif samples[i].label != r.label:
            samples[i] = replace(samples[i], label=r.label)
            merged.corrected += 1
        merged.reviewed.add(i)
        if r.mask is not None and r.label != negative_class:
            merged.masks[i] = r.mask
    merged.dataset = Dataset(samples, classes=classes, errors=getattr(dataset, "errors", []),
                             source=getattr(dataset, "source", ""), format=getattr(dataset, "format", ""))
    merged.record = {
        "sources": sorted({r.source for r in reviews}),
        "n": len(reviews), "n_masks": len(merged.masks), "corrected": merged.corrected,
        "added": len(merged.added),
        "images": [{"path": str(r.path), "label": r.label,
                    "mask": str(r.mask) if r.mask is not None and r.label != negative_class else None}
                   for r in sorted(reviews, key=lambda r: str(r.path))],
    }
    return merged


def reviewed_split(train_idx: Sequence[int], val_idx: Sequence[int], merged: Merged) -> tuple[list[int], list[int]]:
    """The split with every reviewed image in training (moved out of validation) and
    the added images appended to training."""
    val = [i for i in val_idx if i not in merged.reviewed]
    moved = [i for i in val_idx if i in merged.reviewed]
    return list(train_idx) + moved + list(merged.added), val


def reviewed_files(manifest: Mapping[str, Any]) -> set[str]:
    """The resolved paths of every image a RUN learned from reviews (empty: none)."""
    block = manifest.get("reviews") or {}
    return {str(Path(item["path"]).resolve()) for item in block.get("images", [])}


def reviewed_masks(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The reviewed images of a RUN that have a mask (``path``, ``label``, ``mask``)."""
    block = manifest.get("reviews") or {}
    return [item for item in block.get("images", []) if item.get("mask")]
