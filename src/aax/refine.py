"""Superpixel refinement: the fused map averaged over the image's own regions.

XGrad-CAM maps are placed about right but are as smooth as the feature grid they come
from (one cell per 16 x 16 pixels at map stride 16), so a thresholded map is a blob that
ignores the finding's outline. The outline is in the image: Felzenszwalb and
Huttenlocher's graph segmentation (2004; ``skimage.segmentation.felzenszwalb``) cuts the
image into regions of similar intensity, split where the image has edges. Each pixel's
fused score becomes the mean score of its region, so ``score > tau`` keeps or drops whole
regions, and the mask's outline follows the image's edges where the map is undecided.

Unlike a dense CRF (tried, docs/quality.md: it spreads a mask over every region of similar
intensity in the image), pooling never moves score between regions: a region far from
the map's support stays at its (low) mean.

The regions are computed on the image as the members see it (the de-normalised model
input), brought to 128 x 128 pixels, so they depend neither on the file's resolution nor
on the run's input size. The labels are then resized (nearest) to each image's own size,
where masks are made.
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


def resize_labels(labels: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """A label image brought to ``size`` ``(height, width)`` by nearest neighbour (the
    source pixel ``floor(i * in / out)``, as ``F.interpolate(mode="nearest")``)."""
    labels = np.asarray(labels)
    h, w = (int(v) for v in size)
    if labels.shape == (h, w):
        return labels
    rows = np.minimum((np.arange(h) * (labels.shape[0] / h)).astype(np.int64), labels.shape[0] - 1)
    cols = np.minimum((np.arange(w) * (labels.shape[1] / w)).astype(np.int64), labels.shape[1] - 1)
    return labels[rows[:, None], cols[None, :]]


def pool(score: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each pixel's ``score`` replaced by the mean score of its region (``labels``, same
    shape and device)."""
    flat = labels.reshape(-1)
    n = int(flat.max()) + 1 if flat.numel() else 0
    sums = torch.zeros(n, dtype=score.dtype, device=score.device).index_add_(0, flat, score.reshape(-1))
    counts = torch.bincount(flat, minlength=n).to(score.dtype)
    return (sums / counts.clamp_min(1))[labels]


def pool_numpy(score: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """:func:`pool` in NumPy (the reference the tests compare with)."""
    flat = labels.ravel()
    sums = np.bincount(flat, weights=np.asarray(score, dtype=float).ravel())
    counts = np.bincount(flat)
    return (sums / np.maximum(counts, 1))[labels]
