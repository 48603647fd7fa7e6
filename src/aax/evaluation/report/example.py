"""What the report's example grid shows of one image: plain data, kept small (maps
downscaled). Evaluation makes these (:mod:`aax.evaluation.scoring`,
:mod:`aax.evaluation.examples`); the report only renders them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Example:
    """One image of the report's grid, kept small (maps downscaled)."""

    image: str
    label: str
    decision: str
    reason: str | None
    correct: bool
    preview: np.ndarray | None  # uint8 RGB
    gt_mask: np.ndarray | None
    saliency: dict[str, np.ndarray]
    member_masks: dict[str, np.ndarray | None]
    member_decisions: dict[str, str]
    member_uncertainty: dict[str, float]
    mask: np.ndarray | None
    iou: float | None = None
    member_iou: dict[str, float | None] = field(default_factory=dict)
    draft: np.ndarray | None = None  # a flagged image's draft for the reviewer
    draft_iou: float | None = None
