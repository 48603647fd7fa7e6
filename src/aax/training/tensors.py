"""Decode a dataset once into an in-memory ``uint8`` tensor at the model's input size.

Datasets here are small (hundreds to a few thousand images), so decoding every image
once and keeping the resized pixels in memory is faster and simpler than a DataLoader
with workers. Pixels are kept as ``uint8`` ``[N, 3, S, S]`` (4x smaller than float;
the rounding, at most half a grey level, is far below the augmentation's jitter) and
normalised per batch. Images that fail to decode are reported and left out.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from aax.data.transforms import prepare


@dataclass
class Cached:
    """Decoded images and labels for a list of dataset indices."""

    images: torch.Tensor  # [N, 3, S, S] uint8
    labels: torch.Tensor  # [N] int64 class indices
    indices: list[int]  # dataset indices kept, in order
    errors: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) left out


def _decode(path: object, size: int) -> torch.Tensor:
    from aax.data import read_image  # the data layer; imported late to keep import light

    image = read_image(path, keep_grey=True)  # one channel to resize; prepare expands it
    x = prepare(image, size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def decode_samples(dataset: Sequence[object], indices: Sequence[int], classes: Sequence[str],
                   size: int, workers: int | None = None) -> Cached:
    """Decode ``dataset[i]`` for ``i`` in ``indices``; failures go to ``errors``, not up.

    Decoding runs in a thread pool (PIL and NumPy release the GIL for most of the work).
    """
    index_of = {c: i for i, c in enumerate(classes)}
    workers = workers or min(8, os.cpu_count() or 1)

    def one(i: int) -> tuple[int, torch.Tensor | None, str]:
        sample = dataset[i]
        try:
            return i, _decode(sample.image, size), ""
        except Exception as exc:  # any decoder failure: the run goes on without the image
            reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
            return i, None, str(reason)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(one, indices))
    images, labels, kept, errors = [], [], [], []
    for i, x, reason in results:
        sample = dataset[i]
        if x is None:
            errors.append((str(sample.image), reason))
            continue
        images.append(x)
        labels.append(index_of[sample.label])
        kept.append(i)
    stacked = torch.stack(images) if images else torch.zeros(0, 3, size, size, dtype=torch.uint8)
    return Cached(stacked, torch.tensor(labels, dtype=torch.long), kept, errors)
