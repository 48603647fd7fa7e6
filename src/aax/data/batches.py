"""Image files to model batches: decoding and resizing in DataLoader workers.

Annotation, novelty fitting and patch banks all read images the same way, through
:class:`Decoded` (one item per file; a bad file becomes an error entry, never an
exception) and :func:`collate`. :func:`decoded_batches` is the plain loop for the fitting
code; the annotation core builds its own loader (workers, pinned memory, prefetch) on the
same two pieces.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

PREVIEW_SIDE = 256  # longest side of the copy of each image kept for saliency overlays


@dataclass
class InputItem:
    """One image to annotate: its path and, when the input carries one, its label."""

    path: Path
    label: str | None = None


class Decoded(TorchDataset):
    """Reads and prepares images in DataLoader workers; a bad file becomes an error entry.

    ``regions``: a function of the prepared input ``[1, C, S, S]`` run in the worker
    beside decoding (the superpixel cut of runs that refine their masks), so that its
    cost overlaps with the models'; it must be picklable (a module-level function or a
    ``functools.partial`` of one) for workers that spawn.
    """

    def __init__(self, items: Sequence[InputItem], size: int, mean: Sequence[float],
                 std: Sequence[float], preview: bool,
                 regions: Callable[[torch.Tensor], np.ndarray] | None = None) -> None:
        self.items, self.size, self.mean, self.std, self.preview = items, size, mean, std, preview
        self.regions = regions

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        from aax.data import read_image
        from aax.data.transforms import prepare

        try:
            image = read_image(self.items[i].path, keep_grey=True)  # prepare expands it
        except Exception as exc:  # noqa: BLE001 - any failure is this file's, not the run's
            return {"index": i, "error": getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"}
        out = {"index": i, "x": prepare(image, self.size, self.mean, self.std), "size": image.shape[:2]}
        if self.regions is not None:
            out["regions"] = self.regions(out["x"][None])
        if self.preview:
            out["preview"] = thumbnail(image)
        return out


def thumbnail(image: np.ndarray) -> np.ndarray:
    """A uint8 RGB copy of ``image`` whose longest side is at most :data:`PREVIEW_SIDE`."""
    h, w = image.shape[:2]
    scale = min(1.0, PREVIEW_SIDE / max(h, w))
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
    if scale < 1.0:
        x = torch.nn.functional.interpolate(x, size=(max(1, round(h * scale)), max(1, round(w * scale))),
                                            mode="bilinear", antialias=True, align_corners=False)
    x = x.expand(-1, 3, -1, -1)  # grey images arrive as one channel
    return (x[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.uint8)


def collate(batch: list[dict]) -> dict:
    """:class:`Decoded` items as one batch: the readable images stacked, the errors apart."""
    ok = [b for b in batch if "x" in b]
    return {
        "x": torch.stack([b["x"] for b in ok]) if ok else None,
        "index": [b["index"] for b in ok],
        "size": [tuple(int(v) for v in b["size"]) for b in ok],
        "preview": [b.get("preview") for b in ok],
        "regions": [b["regions"] for b in ok] if ok and all("regions" in b for b in ok) else None,
        "errors": [(b["index"], b["error"]) for b in batch if "error" in b],
    }


def decoded_batches(ensemble: Any, paths: Sequence[str | os.PathLike],
                    batch_size: int = 32) -> Iterator[tuple[list[int], torch.Tensor]]:
    """``paths`` decoded and resized as annotation does, in batches on the ensemble's
    device (channels-last when the ensemble is): ``(indices of the readable paths, x)``.
    An unreadable file is left out, not fatal.

    ``ensemble`` is anything with ``normalisation``, ``image_size`` and ``device`` (an
    :class:`aax.models.ensemble.Ensemble`); the data layer needs no more of it.
    """
    mean, std = ensemble.normalisation
    source = Decoded([InputItem(Path(p)) for p in paths], ensemble.image_size, mean, std, False)
    for batch in DataLoader(source, batch_size=batch_size, num_workers=0, collate_fn=collate):
        if batch["x"] is None:
            continue
        x = batch["x"].to(ensemble.device)
        if getattr(ensemble, "channels_last", False):
            x = x.contiguous(memory_format=torch.channels_last)
        yield list(batch["index"]), x
