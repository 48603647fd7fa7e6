"""The one record type for an image's result.

It flows from annotation through the store, evaluation and export; nothing downstream
re-derives a decision, an uncertainty or a mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

REVIEW = "review"


@dataclass
class MemberResult:
    """What one ensemble member said about one image."""

    name: str
    probs: list[float]  # mean class probabilities over the K MC passes (p_i)
    uncertainty: float  # std over passes of the predicted class's probability (u_i)
    predicted: str | None  # class of the strictly highest probability; None on a tie
    novelty: dict[str, float] | None = None  # score name -> value (aax.models.novelty; higher = more novel)
    novel: bool | None = None  # over this member's novelty threshold; None: no threshold
    map_agreement: float | None = None  # soft IoU of its map with the others' (aax.annotation.agreement)

    def to_json(self) -> dict:
        out = {"name": self.name, "probs": self.probs, "uncertainty": self.uncertainty,
               "predicted": self.predicted}
        if self.map_agreement is not None:
            out["map_agreement"] = self.map_agreement
        if self.novelty is not None:  # absent for runs without novelty data: rows stay as they were
            out["novelty"] = self.novelty
            out["novel"] = self.novel
        return out


@dataclass
class AnnotationRecord:
    """The result for one input image.

    ``decision`` is a class name or ``"review"``; ``mask`` (bool, at the image's own
    size) is set only for positive decisions; ``saliency`` maps member name to its
    XGrad-CAM map in [0, 1] at the image's own size, kept only when asked for, and with
    them (when the run refines its masks, or when asked: ``keep_regions``) ``regions``:
    the image's superpixel labels (:func:`aax.models.refine.input_superpixels`), which
    evaluation and calibration pool the maps over. ``draft`` is set only for flagged
    images the members lean positive on (:func:`aax.annotation.decide.draft_members`):
    a mask of ``draft_class`` for the reviewer to correct, never an annotation.
    """

    image: str
    status: str = "ok"  # "ok" | "error"
    error: str | None = None
    decision: str | None = None
    reason: str | None = None
    agreeing: list[str] = field(default_factory=list)
    members: list[MemberResult] = field(default_factory=list)
    mask: np.ndarray | None = None
    saliency: dict[str, np.ndarray] | None = None
    size: tuple[int, int] | None = None  # (height, width) of the original image
    label: str | None = None  # ground-truth class, when the input carries one
    mask_path: str | None = None  # set by the store, relative to its folder
    preview: np.ndarray | None = None  # small uint8 RGB copy of the image, for overlays
    regions: np.ndarray | None = None  # superpixel labels [128, 128], see above
    draft: np.ndarray | None = None  # flagged images only: a mask for the reviewer to start from
    draft_class: str | None = None  # the positive class the draft shows
    draft_path: str | None = None  # set by the store, relative to its folder

    @property
    def flagged(self) -> bool:
        return self.decision == REVIEW
