"""Reviewed labels in the store, beside the model's: the ``reviews`` table, the merged
view exports read, and the agreement between model and reviewer.

A review is one person's final answer for one image: a decision (a class) and, for
positive classes, the mask they accepted or drew. The model's row is never changed;
``reviews`` sits beside ``annotations`` (created with ``CREATE TABLE IF NOT EXISTS``,
so stores made before it open unchanged), and its mask files live under
``OUT/reviews/masks/``. As for the model's rows, files are written first and rows
second.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

import numpy as np

from aax.annotation.locations import image_name
from aax.annotation.records import REVIEW
from aax.annotation.store import TMP_SUFFIX, AnnotationStore

REVIEWS_SCHEMA = """
CREATE TABLE IF NOT EXISTS reviews (
    id INTEGER PRIMARY KEY,
    image TEXT NOT NULL UNIQUE,
    decision TEXT NOT NULL,
    mask TEXT,
    mask_area INTEGER,
    note TEXT,
    reviewer TEXT,
    tool TEXT NOT NULL,
    tool_ref TEXT,
    reviewed_at TEXT,
    imported_at TEXT NOT NULL,
    digest TEXT NOT NULL
);
"""
REVIEW_MASK_DIR = "reviews/masks"
REVIEWED = "reviewed"  # the reason exports give a reviewed decision


class ReviewImportError(ValueError):
    """An export that cannot be imported into this store (named images it does not hold)."""


@dataclass
class Review:
    """A reviewer's answer for one stored image, as read from a tool's export.

    ``image`` is the store's key for the image (``annotations.image``); ``mask`` is a
    boolean ``[H, W]`` array at the image's own size, or None.
    """

    image: str
    decision: str
    mask: np.ndarray | None = None
    note: str | None = None
    reviewer: str | None = None
    tool: str = ""
    tool_ref: str | None = None
    reviewed_at: str | None = None

    def digest(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([self.decision, self.note]).encode())
        if self.mask is not None:
            mask = np.asarray(self.mask, dtype=bool)
            h.update(repr(mask.shape).encode())
            h.update(np.packbits(mask).tobytes())
        return h.hexdigest()[:20]


def ensure_table(store: AnnotationStore) -> None:
    """Create the ``reviews`` table when the store has none yet."""
    store.db.executescript(REVIEWS_SCHEMA)


def load_mask(path: Path) -> np.ndarray:
    """A stored mask PNG as a boolean array."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L")) > 127


def _write_mask(path: Path, mask: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    Image.fromarray(np.asarray(mask, dtype=bool)).save(tmp, format="PNG")
    os.replace(tmp, path)


def import_reviews(store: AnnotationStore, reviews: Sequence[Review], source: str | os.PathLike) -> dict:
    """Record ``reviews`` in ``store``: new ones are added, changed ones replace the
    earlier review of their image, identical ones are left alone (so importing the same
    export twice changes nothing).

    Raises:
        ReviewImportError: when ``reviews`` name images the store does not hold, or an
            image twice; nothing is written then.
    """
    ensure_table(store)
    known = {r[0]: (r[1], r[2]) for r in store.db.execute(
        "SELECT image, height, width FROM annotations WHERE status = 'ok'")}
    unknown = [r.image for r in reviews if r.image not in known]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise ReviewImportError(
            f"{source}: {len(unknown)} of {len(reviews)} reviewed images are not in {store.out}: {shown}; "
            "is this the export of another AAX output folder?")
    seen: set[str] = set()
    for r in reviews:
        if r.image in seen:
            raise ReviewImportError(f"{source}: {r.image} is reviewed twice")
        seen.add(r.image)
        h, w = known[r.image]
        if r.mask is not None and h is not None and tuple(np.shape(r.mask)) != (h, w):
            raise ReviewImportError(f"{source}: the mask of {r.image} is {np.shape(r.mask)}, the image {h}x{w}")
    old = {row[0]: (row[1], row[2]) for row in store.db.execute("SELECT image, digest, mask FROM reviews")}
    counts = {"added": 0, "updated": 0, "unchanged": 0}
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    store.db.execute("BEGIN")
    try:
        for r in reviews:
            digest = r.digest()
            before = old.get(r.image)
            if before is not None and before[0] == digest:
                counts["unchanged"] += 1
                continue
            mask_rel = None
            if r.mask is not None:
                name = PurePosixPath(image_name(store, {"image": r.image}))
                mask_rel = f"{REVIEW_MASK_DIR}/{name.with_suffix('.png')}"
                _write_mask(store.out / mask_rel, r.mask)
            store.db.execute(
                "INSERT OR REPLACE INTO reviews (image, decision, mask, mask_area, note, reviewer, tool,"
                " tool_ref, reviewed_at, imported_at, digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (r.image, r.decision, mask_rel,
                 int(np.count_nonzero(r.mask)) if r.mask is not None else None, r.note, r.reviewer,
                 r.tool, r.tool_ref, r.reviewed_at, now, digest))
            if before is not None and before[1] and before[1] != mask_rel:
                (store.out / before[1]).unlink(missing_ok=True)
            counts["added" if before is None else "updated"] += 1
        store.db.execute("COMMIT")
    except BaseException:
        store.db.execute("ROLLBACK")
        raise
    counts["reviews_in_store"] = store.db.execute("SELECT COUNT(*) FROM reviews").fetchone()[0]
    return counts


def remove_annotation_reviews(store: AnnotationStore, annotation_ids: Sequence[int]) -> list[str]:
    """Remove the Label Studio reviews that came from the annotations ``annotation_ids``
    (their ``tool_ref`` is ``task T annotation A``) and their mask files; returns the
    images whose review was removed."""
    ensure_table(store)
    wanted = {f"annotation {int(i)}" for i in annotation_ids}
    rows = [(image, mask) for image, ref, mask in store.db.execute(
        "SELECT image, tool_ref, mask FROM reviews WHERE tool = 'label-studio'")
        if ref and " ".join(ref.split()[-2:]) in wanted]
    if not rows:
        return []
    store.db.execute("BEGIN")
    store.db.executemany("DELETE FROM reviews WHERE image = ?", [(image,) for image, _ in rows])
    store.db.execute("COMMIT")
    for _, mask in rows:
        if mask:
            (store.out / mask).unlink(missing_ok=True)
    return [image for image, _ in rows]


def reviews_by_image(store: AnnotationStore) -> dict[str, dict]:
    """Every review, by image."""
    ensure_table(store)
    cursor = store.db.execute("SELECT * FROM reviews ORDER BY id")
    columns = [c[0] for c in cursor.description]
    return {row[1]: dict(zip(columns, row)) for row in cursor}


def reviewed_rows(store: AnnotationStore) -> Iterator[dict]:
    """The store's rows with reviewed answers preferred: a reviewed image's row carries
    the reviewer's ``decision`` and ``mask`` (reason ``reviewed``, no agreeing members),
    with the model's kept under ``model``; every row gets ``reviewed`` (bool)."""
    reviews = reviews_by_image(store)
    for row in store.rows():
        review = reviews.get(row["image"])
        if review is None or row["status"] != "ok":
            row["reviewed"] = False
            yield row
            continue
        model = {k: row.get(k) for k in ("decision", "reason", "agreeing", "mask", "mask_area", "draft", "draft_class")}
        row.update(decision=review["decision"], reason=REVIEWED, agreeing=[], mask=review["mask"],
                   draft=None, draft_class=None,
                   mask_area=review["mask_area"], reviewed=True, model=model,
                   review_note=review["note"], reviewer=review["reviewer"])
        yield row


def _iou(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    return int(np.count_nonzero(a & b)), int(np.count_nonzero(a | b))


def review_stats(store: AnnotationStore) -> dict:
    """Agreement between the model and the reviewers, over the reviewed images.

    - ``decision_accuracy``: share of the model's own decisions (images it did not flag)
      that the reviewer kept;
    - ``mask_iou_mean`` / ``mask_iou_micro``: IoU of the model's mask and the reviewed
      one, over images where both are positive with a mask (mean of per-image IoUs, and
      total intersection over total union);
    - ``flagged_hard``: flagged images whose ensemble answer (the class of the highest
      mean probability over the members) the reviewer did not keep, i.e. where
      annotating instead of flagging would have been wrong; ``flagged_hard_rate`` is
      their share of the reviewed flagged images, ``unflagged_error_rate`` the
      matching share among decided images (1 - ``decision_accuracy``);
    - ``drafts_compared`` / ``draft_iou_mean``: IoU of a flagged image's draft (what the
      reviewer started from) and the reviewed mask, over flagged images with both;
      ``drafts_dropped``: flagged images with a draft that the reviewer left without a mask;
    - ``confusion``: counts of (model decision, reviewed decision) pairs.
    """
    classes = store.settings.get("classes", [])
    reviews = reviews_by_image(store)
    n = kept = decided = flagged = hard = 0
    ious: list[float] = []
    inter_total = union_total = 0
    only_model = only_reviewer = drafts_dropped = 0
    draft_ious: list[float] = []
    confusion: dict[str, int] = {}
    by_reason: dict[str, dict[str, int]] = {}
    for row in store.rows():
        review = reviews.get(row["image"])
        if review is None or row["status"] != "ok":
            continue
        n += 1
        model, human = row["decision"], review["decision"]
        key = f"{model} -> {human}"
        confusion[key] = confusion.get(key, 0) + 1
        reason = by_reason.setdefault(row["reason"] or "", {"reviewed": 0, "kept": 0})
        reason["reviewed"] += 1
        if model == REVIEW:
            flagged += 1
            probs = np.mean([m["probs"] for m in row["members"]], axis=0) if row["members"] else None
            answer = classes[int(np.argmax(probs))] if probs is not None and classes else None
            hard += answer != human
            reason["kept"] += answer == human
            if row.get("draft") and review["mask"]:
                i, u = _iou(load_mask(store.out / row["draft"]), load_mask(store.out / review["mask"]))
                draft_ious.append(i / u if u else 1.0)
            elif row.get("draft"):
                drafts_dropped += 1
            continue
        decided += 1
        kept += model == human
        reason["kept"] += model == human
        if model == human and (row["mask"] or review["mask"]):
            if row["mask"] and review["mask"]:
                i, u = _iou(load_mask(store.out / row["mask"]), load_mask(store.out / review["mask"]))
                ious.append(i / u if u else 1.0)
                inter_total += i
                union_total += u
            elif row["mask"]:
                only_model += 1
            else:
                only_reviewer += 1
    return {
        "images": store.db.execute("SELECT COUNT(*) FROM annotations WHERE status = 'ok'").fetchone()[0],
        "reviewed": n,
        "decided_reviewed": decided,
        "decision_accuracy": kept / decided if decided else None,
        "unflagged_error_rate": 1 - kept / decided if decided else None,
        "masks_compared": len(ious),
        "mask_iou_mean": float(np.mean(ious)) if ious else None,
        "mask_iou_micro": inter_total / union_total if union_total else None,
        "mask_only_model": only_model,
        "mask_only_reviewer": only_reviewer,
        "flagged_reviewed": flagged,
        "flagged_hard": hard,
        "flagged_hard_rate": hard / flagged if flagged else None,
        "drafts_compared": len(draft_ious),
        "draft_iou_mean": float(np.mean(draft_ious)) if draft_ious else None,
        "drafts_dropped": drafts_dropped,
        "by_reason": by_reason,
        "confusion": dict(sorted(confusion.items())),
    }
