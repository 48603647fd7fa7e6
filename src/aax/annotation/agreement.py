"""How much the members' saliency maps agree on an image: the signal the
``disagreement`` review order ranks by.

Each member's map (at the feature grid, before upsampling, min-max normalised) is compared
with the mean of the other members' maps by their soft IoU, ``sum(min) / sum(max)``: 1 when
they point at the same place with the same strength, near 0 when they point at different
places. Where the maps disagree, a mask made from them is least trustworthy and a
reviewed mask teaches the most (docs/reviews.md).
"""

from __future__ import annotations

import numpy as np
import torch


def map_agreement(raw: torch.Tensor) -> np.ndarray:
    """``[B, M]`` soft IoU of each member's map with the mean of the others' maps.

    Args:
        raw: ``[B, M, h, w]`` saliency maps (any scale; each is min-max normalised here).

    Returns:
        ``float`` array in [0, 1]; all ones with a single member.
    """
    b, m = raw.shape[:2]
    if m < 2:
        return np.ones((b, m))
    flat = raw.detach().float().reshape(b, m, -1)
    low = flat.amin(dim=2, keepdim=True)
    span = (flat.amax(dim=2, keepdim=True) - low).clamp_min(1e-12)
    maps = (flat - low) / span
    others = (maps.sum(dim=1, keepdim=True) - maps) / (m - 1)
    inter = torch.minimum(maps, others).sum(dim=2)
    union = torch.maximum(maps, others).sum(dim=2).clamp_min(1e-12)
    return (inter / union).cpu().numpy()


def disagreement(agreements: list[float | None]) -> float | None:
    """An image's map disagreement: ``1 - `` the mean of its members' agreements (None
    when the store holds none, as in folders annotated before agreements were kept)."""
    values = [a for a in agreements if a is not None]
    return None if not values else 1.0 - float(np.mean(values))
