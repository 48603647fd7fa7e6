"""Decode a dataset once into an in-memory ``uint8`` tensor at the model's input size.

Datasets here are small (hundreds to a few thousand images), so decoding every image
once and keeping the resized pixels in memory is faster and simpler than a DataLoader
with workers. Pixels are kept as ``uint8`` ``[N, 3, S, S]`` (4x smaller than float;
the rounding, at most half a grey level, is far below the augmentation's jitter) and
normalised per batch. Images that fail to decode are reported and left out.

Reviewed masks (``aax retrain``) are decoded the same way, squashed to ``S x S`` with the
image, as the share of each pixel the mask covers (``uint8``, 255 = all of it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
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
    masks: torch.Tensor | None = None  # [N, 1, S, S] uint8 reviewed masks (zeros where none)
    has_mask: torch.Tensor | None = None  # [N] bool: the image has a reviewed mask

    @property
    def n_masks(self) -> int:
        """Images with a reviewed mask."""
        return 0 if self.has_mask is None else int(self.has_mask.sum())


def _decode(path: object, size: int) -> torch.Tensor:
    from aax.data import read_image  # the data layer; imported late to keep import light

    image = read_image(path, keep_grey=True)  # one channel to resize; prepare expands it
    x = prepare(image, size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def _decode_mask(path: object, size: int) -> torch.Tensor:
    import torch.nn.functional as F

    from aax.data import read_mask

    m = torch.from_numpy(read_mask(path).astype("float32"))[None, None]
    m = F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    return (m.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def decode_samples(dataset: Sequence[object], indices: Sequence[int], classes: Sequence[str],
                   size: int, workers: int | None = None,
                   masks: Mapping[int, object] | None = None) -> Cached:
    """Decode ``dataset[i]`` for ``i`` in ``indices``; failures go to ``errors``, not up.

    ``masks`` maps a dataset index to its reviewed mask file; with it the result carries
    ``masks``/``has_mask`` (an image whose mask cannot be read is kept without one, and
    the reason is listed in ``errors``). Decoding runs in a thread pool (PIL and NumPy
    release the GIL for most of the work).
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

    def one_mask(i: int) -> tuple[torch.Tensor | None, str]:
        try:
            return _decode_mask(masks[i], size), ""
        except Exception as exc:  # the image still trains, on its class alone
            return None, f"reviewed mask {masks[i]}: {getattr(exc, 'reason', None) or exc}"

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(one, indices))
        wanted = [i for i, x, _ in results if x is not None and masks and i in masks]
        decoded = dict(zip(wanted, pool.map(one_mask, wanted)))
    images, labels, kept, errors, mask_list = [], [], [], [], []
    for i, x, reason in results:
        sample = dataset[i]
        if x is None:
            errors.append((str(sample.image), reason))
            continue
        images.append(x)
        labels.append(index_of[sample.label])
        kept.append(i)
        m, why = decoded.get(i, (None, ""))
        if why:
            errors.append((str(sample.image), why))
        mask_list.append(m)
    stacked = torch.stack(images) if images else torch.zeros(0, 3, size, size, dtype=torch.uint8)
    cached = Cached(stacked, torch.tensor(labels, dtype=torch.long), kept, errors)
    if masks:
        cached.has_mask = torch.tensor([m is not None for m in mask_list], dtype=torch.bool)
        cached.masks = torch.stack([m if m is not None else torch.zeros(1, size, size, dtype=torch.uint8)
                                    for m in mask_list]) if mask_list else torch.zeros(0, 1, size, size,
                                                                                       dtype=torch.uint8)
    return cached
