"""The trivial masks (the whole image, a centred box), scored beside every mask table,
and the warning given when the ensemble's masks do not beat them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


TRIVIAL_MASKS = ("whole image", "centred box")
"""Masks that need no model, scored beside every mask table: a saliency mask that cannot
beat them says nothing."""


def trivial_mask(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """``"whole image"``: every pixel; ``"centred box"``: the centred box of half the
    height and half the width (a fixed prior, as benchmarks/quality.py scores it)."""
    h, w = shape[:2]
    if name == "whole image":
        return np.ones((h, w), bool)
    if name == "centred box":
        mask = np.zeros((h, w), bool)
        mask[h // 4:h - h // 4, w // 4:w - w // 4] = True
        return mask
    raise ValueError(f"unknown trivial mask {name!r}; expected one of {TRIVIAL_MASKS}")


def trivial_warning(iou_mean: float | None, trivial: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The warning to give when the ensemble's masks do not beat the best trivial mask on
    validation data (None when they do, or without masks)."""
    scored = {k: v["iou_mean"] for k, v in trivial.items() if v.get("iou_mean") is not None}
    if iou_mean is None or not scored:
        return None
    name = max(scored, key=scored.get)  # type: ignore[arg-type]
    if iou_mean > scored[name]:
        return None
    return (f"the masks do not beat a trivial {name} on the validation masks (mean IoU {iou_mean:.3f} vs "
            f"{scored[name]:.3f}): use them as rough locations, not outlines, and review them; "
            "docs/quality.md says what helps (pretrained members, a larger --image-size, more images)")
