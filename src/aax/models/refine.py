"""Superpixel refinement: the fused map averaged over the image's own regions.

XGrad-CAM maps are placed about right but are as smooth as the feature grid they come
from (one cell per 16 x 16 pixels at map stride 16), so a thresholded map is a blob that
ignores the finding's outline. The outline is in the image: Felzenszwalb and
Huttenlocher's graph segmentation (2004; ``skimage.segmentation.felzenszwalb``) cuts the
image into regions of similar intensity, split where the image has edges. Each pixel's
fused score becomes the mean score of its region, so ``score > tau`` keeps or drops whole
regions, and the mask's outline follows the image's edges where the map is undecided.

Unlike a dense CRF (measured, CHANGELOG.md: it spreads a mask over every region of similar
intensity in the image), pooling never moves score between regions: a region far from
the map's support stays at its (low) mean.

The regions are computed on the image as the members see it (the de-normalised model
input), brought to 128 x 128 pixels, so they depend neither on the file's resolution nor
on the run's input size. Masks are made at each image's own size, where the labels
stand for their nearest-neighbour resize (:func:`resize_labels`); :func:`pool_resized`
averages over them without making that full-size label image (an int64 image of 96 MB
for a 12-megapixel photograph).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.nn import functional as F

REFINES: tuple[str, ...] = ("none", "superpixels")
"""Refinements of the fused map: ``none`` (the paper's), ``superpixels`` (region means)."""

SCALE = 200.0
"""Felzenszwalb's scale (larger: larger regions) at 128 x 128 pixels."""

SIGMA = 0.5
"""Gaussian smoothing before segmenting, in pixels at 128 x 128 (scikit-image's default: 0.8)."""

MIN_SIZE = 20
"""Smallest region, in pixels at 128 x 128 (scaled with the area)."""

WORK_SIDE = 128
"""The side model inputs are cut at (:func:`input_superpixels`), and the side the
parameters above are given at. Cut at their own size, larger inputs give fewer regions
(their edges are spread over more pixels), e.g. 33 regions per lesion image at 128 px
and 15 at 224 px."""


def superpixels(image: np.ndarray, scale: float | None = None) -> np.ndarray:
    """Felzenszwalb-Huttenlocher regions of ``image`` (``[H, W]`` or ``[H, W, C]``,
    values in [0, 1]) as an int64 label image ``[H, W]`` (labels 0 .. n-1).

    ``scale`` (default :data:`SCALE`), the smallest region and the smoothing are given
    at 128 x 128 pixels and grow with the image (area, area, side), so an image and its
    resized copy are cut alike.
    """
    from skimage.segmentation import felzenszwalb  # lazily: only runs that refine need it

    image = np.asarray(image, dtype=np.float64)
    if image.ndim not in (2, 3) or min(image.shape[:2]) < 2:
        raise ValueError(f"superpixels needs an [H, W] or [H, W, C] image, got shape {image.shape}")
    f = image.shape[0] * image.shape[1] / (WORK_SIDE * WORK_SIDE)
    labels = felzenszwalb(image, scale=float(SCALE if scale is None else scale) * f, sigma=SIGMA * f ** 0.5,
                          min_size=max(5, round(MIN_SIZE * f)),
                          channel_axis=-1 if image.ndim == 3 else None)
    return labels.astype(np.int64)


def input_superpixels(x: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                      scale: float | None = None) -> list[np.ndarray]:
    """Regions of each image of a normalised model batch ``x`` ``[B, C, S, S]``, cut on
    the de-normalised input (what the members see) resized to :data:`WORK_SIDE` pixels:
    the same regions whatever the run's input size, at the same cost (about 13 ms per
    image on one CPU core). The labels are ``WORK_SIDE`` square; :func:`resize_labels`
    brings them to an image's size."""
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    images = (x.detach().float().cpu() * s + m).clamp(0.0, 1.0)
    if images.shape[-2:] != (WORK_SIDE, WORK_SIDE):
        images = F.interpolate(images, size=(WORK_SIDE, WORK_SIDE), mode="bilinear", align_corners=False,
                               antialias=images.shape[-1] > WORK_SIDE).clamp(0.0, 1.0)
    return [superpixels(image.permute(1, 2, 0).numpy(), scale) for image in images]


def nearest_index(out: int, size: int) -> np.ndarray:
    """For each of ``out`` pixels, the source pixel of a nearest-neighbour resize from
    ``size`` pixels: ``floor(i * size / out)``, as ``F.interpolate(mode="nearest")``."""
    return np.minimum((np.arange(int(out)) * (int(size) / int(out))).astype(np.int64), int(size) - 1)


def resize_labels(labels: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """A label image brought to ``size`` ``(height, width)`` by nearest neighbour
    (:func:`nearest_index`)."""
    labels = np.asarray(labels)
    h, w = (int(v) for v in size)
    if labels.shape == (h, w):
        return labels
    rows, cols = nearest_index(h, labels.shape[0]), nearest_index(w, labels.shape[1])
    return labels[rows[:, None], cols[None, :]]


def pool_resized(score: torch.Tensor, labels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Each pixel's ``score`` replaced by the mean score of its region: ``labels``
    resized to ``score``'s size (:func:`resize_labels`), without making that full-size
    label image.

    ``score`` is ``[H, W]`` at the image's size, ``labels`` the regions at their own
    (small) size. A nearest-neighbour resize copies each label cell onto a block of
    pixels (rows ``nearest_index(H, h) == i``, columns ``... == j``), so the regions'
    sums are the sums of the cells' blocks: two scatter-adds bring ``score`` to the
    labels' size, the region means are taken there and copied back by indexing. Memory
    beyond the result: the labels' size, not the image's.
    """
    h, w = score.shape
    device = score.device
    labels = torch.as_tensor(labels, device=device).long()
    lh, lw = labels.shape
    rows = torch.from_numpy(nearest_index(h, lh)).to(device)
    cols = torch.from_numpy(nearest_index(w, lw)).to(device)
    cell = torch.zeros(lh, w, dtype=score.dtype, device=device).index_add_(0, rows, score)
    cell = torch.zeros(lh, lw, dtype=score.dtype, device=device).index_add_(1, cols, cell)
    count = (torch.bincount(rows, minlength=lh)[:, None] * torch.bincount(cols, minlength=lw)[None, :]).to(score.dtype)
    flat = labels.reshape(-1)
    n = int(flat.max()) + 1 if flat.numel() else 0
    sums = torch.zeros(n, dtype=score.dtype, device=device).index_add_(0, flat, cell.reshape(-1))
    counts = torch.zeros(n, dtype=score.dtype, device=device).index_add_(0, flat, count.reshape(-1))
    means = (sums / counts.clamp_min(1))[labels]  # [lh, lw]
    return means.index_select(0, rows).index_select(1, cols)


def pool_resized_numpy(score: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """:func:`pool_resized` in NumPy (``score`` ``[H, W]``, ``labels`` at their own size)."""
    score = np.asarray(score, dtype=float)
    labels = np.asarray(labels)
    h, w = score.shape
    lh, lw = labels.shape
    rows, cols = nearest_index(h, lh), nearest_index(w, lw)
    cell = _block_sums(_block_sums(score, rows, lh, axis=0), cols, lw, axis=1)
    count = np.bincount(rows, minlength=lh)[:, None] * np.bincount(cols, minlength=lw)[None, :]
    flat = labels.ravel()
    sums = np.bincount(flat, weights=cell.ravel())
    counts = np.bincount(flat, weights=count.ravel().astype(float))
    means = (sums / np.maximum(counts, 1))[labels]
    return means[rows][:, cols]


def _block_sums(a: np.ndarray, index: np.ndarray, n: int, axis: int) -> np.ndarray:
    """Sums of ``a`` along ``axis`` over the runs of the non-decreasing ``index`` (one
    per value, ``n`` values; values never taken sum to 0)."""
    values, starts = np.unique(index, return_index=True)
    shape = list(a.shape)
    shape[axis] = n
    out = np.zeros(shape, dtype=a.dtype)
    sums = np.add.reduceat(a, starts, axis=axis)
    if axis == 0:
        out[values] = sums
    else:
        out[:, values] = sums
    return out


def pool_numpy(score: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each pixel's ``score`` replaced by the mean score of its region, ``labels`` of the
    same shape: the plain definition the tests compare :func:`pool_resized` with."""
    flat = labels.ravel()
    sums = np.bincount(flat, weights=np.asarray(score, dtype=float).ravel())
    counts = np.bincount(flat)
    return (sums / np.maximum(counts, 1))[labels]
