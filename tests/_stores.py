"""A small hand-made output folder for the export / import tests: known decisions,
masks and member answers, no network involved (``make_store``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from aax.annotation.records import AnnotationRecord, MemberResult
from aax.annotation.store import AnnotationStore

H, W = 32, 40
CLASSES = ["diseased", "healthy"]
SETTINGS = {"run": "/runs/lesion-run", "weights": "0123456789abcdef", "classes": CLASSES,
            "negative_class": "healthy", "theta": 0.1, "tau": 0.5, "mc_passes": 8, "quorum": 2}


def box(top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[top:bottom, left:right] = True
    return mask


MODEL_MASKS = {"diseased/d0.png": box(4, 4, 20, 24), "diseased/d1.png": box(10, 10, 30, 30)}
DRAFTS = {"diseased/d2.png": box(6, 8, 18, 20)}  # flagged, the members lean to "diseased"

# name: (decision, reason, per-member p(diseased), per-member uncertainty)
ROWS = {
    "diseased/d0.png": ("diseased", "consensus", [0.9, 0.8, 0.4], [0.01, 0.02, 0.05]),
    "diseased/d1.png": ("diseased", "consensus", [0.7, 0.8, 0.9], [0.03, 0.02, 0.01]),
    "diseased/d2.png": ("review", "uncertain", [0.7, 0.6, 0.3], [0.20, 0.30, 0.01]),
    "healthy/h0.png": ("healthy", "consensus", [0.1, 0.2, 0.1], [0.01, 0.01, 0.01]),
    "healthy/h1.png": ("healthy", "consensus", [0.3, 0.1, 0.2], [0.02, 0.01, 0.03]),
    "healthy/h2.png": ("review", "no-consensus", [0.6, 0.2, 0.3], [0.02, 0.15, 0.05]),
}
MEMBERS = ["resnet50", "efficientnet-b0", "densenet121"]


def short(image: str) -> str:
    """``class/file.png`` of a stored image key, however the store spells the key."""
    return "/".join(Path(image).parts[-2:])


def make_store(root: Path) -> tuple[Path, Path]:
    """Images under ``root/input`` and their annotations in ``root/out``."""
    images = root / "input"
    rng = np.random.default_rng(0)
    for name in ROWS:
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(images / name)
    out = root / "out"
    store = AnnotationStore(out, {**SETTINGS, "input": str(images.resolve())}, input_root=images)
    for name, (decision, reason, p, u) in ROWS.items():
        members = [MemberResult(m, [pi, 1 - pi], ui, "diseased" if pi > 0.5 else "healthy")
                   for m, pi, ui in zip(MEMBERS, p, u)]
        agreeing = [m.name for m in members if m.predicted == decision and m.uncertainty <= 0.1]
        store.add(AnnotationRecord(image=str(images / name), decision=decision, reason=reason,
                                   agreeing=agreeing if decision != "review" else [], members=members,
                                   mask=MODEL_MASKS.get(name), size=(H, W), draft=DRAFTS.get(name),
                                   draft_class="diseased" if name in DRAFTS else None))
    store.close()
    return images, out
