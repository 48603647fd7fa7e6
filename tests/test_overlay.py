"""The overlay picture: the mask in red, a flagged image's draft in yellow, else nothing."""

from __future__ import annotations

import numpy as np

from aax.annotation.overlay import CAPTION, PANEL, render_record
from aax.annotation.records import AnnotationRecord, MemberResult


def _record(**kw) -> AnnotationRecord:
    names = ["a", "b", "c"]
    return AnnotationRecord(
        image="x.png", decision=kw.pop("decision", "review"), reason="uncertain", size=(32, 32),
        members=[MemberResult(n, [0.4, 0.6], 0.2, "diseased") for n in names],
        preview=np.full((32, 32, 3), 100, np.uint8), saliency={n: np.zeros((32, 32), np.float32) for n in names},
        **kw)


def _last_panel(record: AnnotationRecord) -> np.ndarray:
    return render_record(record, 0.5, 0.1)[CAPTION:, -PANEL:].astype(int)


def test_a_draft_is_tinted_yellow_and_a_mask_red():
    box = np.zeros((32, 32), bool)
    box[8:24, 8:24] = True
    plain = _last_panel(_record())
    draft = _last_panel(_record(draft=box, draft_class="diseased"))
    mask = _last_panel(_record(decision="diseased", mask=box, agreeing=["a", "b"]))
    changed = (draft != plain).any(axis=-1)
    assert changed.any() and changed.mean() < 0.5  # the box only (the panel enlarges 32 px to 192)
    tint = (draft - plain)[changed].mean(axis=0)
    assert tint[0] > 0 and tint[1] > 0 and tint[2] < 0  # towards yellow: red and green up, blue down
    red = (mask - plain)[(mask != plain).any(axis=-1)].mean(axis=0)
    assert red[0] > 0 and red[1] < 0  # the mask's red: green down
