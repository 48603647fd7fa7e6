"""The list of images a person must review: every image the protocol flagged.

Flagged images are never annotated silently; this is where a reviewer starts. Each entry
says why the image was flagged (``uncertain``, ``no-consensus``, ``novel``), what each
member predicted with what probability and uncertainty, and where its overlay is (when
``--save-saliency`` kept one).

The order is the one a team's review budget is best spent in (:data:`ORDERS`):
``uncertainty`` (the most uncertain member first), ``disagreement`` (the images likely
to hold a finding whose members' maps agree least first: :func:`priority`,
:mod:`aax.annotation.agreement`; a reviewed mask teaches most there, docs/reviews.md) or
``random`` (seeded). ``include_all`` lists the images
AAX annotated too, for teams whose budget goes beyond the flagged ones.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from aax.annotation.agreement import disagreement
from aax.annotation.records import REVIEW
from aax.annotation.store import REVIEW_FILES, AnnotationStore, open_store

CSV_NAME, JSON_NAME = REVIEW_FILES


ORDERS = ("uncertainty", "disagreement", "random")
"""The review orders; the first is the default."""
DEFAULT_ORDER = ORDERS[0]


def review_entries(store: AnnotationStore, order: str = DEFAULT_ORDER, include_all: bool = False,
                   seed: int = 0) -> list[dict[str, Any]]:
    """One entry per flagged image (every annotated image with ``include_all``), in
    ``order`` (see the module's description; ties by image name). Images without the
    order's score (maps' agreement was not stored) come after the others, by uncertainty.

    Each entry: ``image`` (the store's key: the path relative to the input root),
    ``path`` (where the image is), ``reason``, ``max_uncertainty``, ``overlay`` and
    ``draft`` (relative to the store's folder, or None; the draft's class in
    ``draft_class``) and ``members``: each member's ``name``,
    ``predicted``, ``probability`` of that class, ``uncertainty`` and, when the run
    scores novelty, its novelty fields as stored; ``disagreement`` is the image's map
    disagreement (or None) and ``p_positive`` the members' mean probability of a
    positive class.
    """
    if order not in ORDERS:
        raise ValueError(f"unknown review order {order!r}; choose from {', '.join(ORDERS)}")
    classes = list(store.settings.get("classes") or [])
    negative = store.settings.get("negative_class")
    negative_index = classes.index(negative) if negative in classes else None
    entries = []
    for row in store.rows():
        if row["status"] != "ok" or (row["decision"] != REVIEW and not include_all):
            continue
        members = []
        for m in row["members"]:
            probs = m.get("probs") or []
            extra = {k: v for k, v in m.items() if k not in ("name", "probs", "uncertainty", "predicted")}
            members.append({"name": m["name"], "predicted": m.get("predicted"),
                            "probability": max(probs) if probs else None,
                            "uncertainty": m.get("uncertainty"), **extra})
        uncertainties = [m["uncertainty"] for m in members if m["uncertainty"] is not None]
        entries.append({"image": row["image"], "path": str(store.resolve(row["image"])),
                        "reason": row["reason"], "decision": row["decision"],
                        "max_uncertainty": max(uncertainties) if uncertainties else None,
                        "disagreement": disagreement([m.get("map_agreement") for m in members]),
                        "p_positive": _p_positive(row["members"], negative_index),
                        "overlay": row["saliency"], "draft": row.get("draft"), "draft_class": row.get("draft_class"),
                        "label": row["label"], "members": members})
    return sort_entries(entries, order, seed)


def sort_entries(entries: list[dict[str, Any]], order: str = DEFAULT_ORDER, seed: int = 0) -> list[dict[str, Any]]:
    """``entries`` in review ``order`` (a new list)."""
    by_uncertainty = sorted(entries, key=lambda e: (-(e["max_uncertainty"] or 0.0), e["image"]))
    if order == "uncertainty":
        return by_uncertainty
    if order == "random":
        import random

        shuffled = sorted(entries, key=lambda e: e["image"])
        random.Random(seed).shuffle(shuffled)
        return shuffled
    scored = [e for e in by_uncertainty if e.get("disagreement") is not None]
    rest = [e for e in by_uncertainty if e.get("disagreement") is None]
    return sorted(scored, key=lambda e: (-priority(e), e["image"])) + rest


def priority(entry: dict[str, Any]) -> float:
    """The ``disagreement`` order's score: the maps' disagreement times the chance that
    the image holds a finding. Maps of a negative image point anywhere, so they disagree
    most; a review of one teaches no location, so it must not come first."""
    p = entry.get("p_positive")
    return float(entry["disagreement"]) * (1.0 if p is None else float(p))


def _p_positive(members: list[dict[str, Any]], negative_index: int | None) -> float | None:
    """The mean over the members of the probability of any positive class."""
    if negative_index is None:
        return None
    values = [1.0 - m["probs"][negative_index] for m in members if len(m.get("probs") or []) > negative_index]
    return float(sum(values) / len(values)) if values else None


def _flat(entry: dict[str, Any]) -> dict[str, Any]:
    row = {k: v for k, v in entry.items() if k != "members"}
    for m in entry["members"]:
        for key, value in m.items():
            if key == "name":
                continue
            row[f"{m['name']}:{key}"] = json.dumps(value) if isinstance(value, (dict, list)) else value
    return row


def write_review_list(store: AnnotationStore, to: str | os.PathLike | None = None,
                      order: str = DEFAULT_ORDER, include_all: bool = False, seed: int = 0) -> dict[str, Any]:
    """Write the review list (:func:`review_entries`) as ``review.csv`` and
    ``review.json`` into ``to`` (default: the store's folder). Returns
    ``{"n", "files": [paths], "entries"}``."""
    target = Path(to) if to is not None else store.out
    target.mkdir(parents=True, exist_ok=True)
    entries = review_entries(store, order, include_all, seed)
    written = _write(entries, target)
    return {"n": len(entries), "files": written, "entries": entries}


def _write(entries: list[dict[str, Any]], target: Path) -> list[str]:
    rows = [_flat(e) for e in entries]
    columns: list[str] = ["image", "reason", "decision", "max_uncertainty", "disagreement", "p_positive", "overlay",
                          "draft", "draft_class", "path", "label"]
    for row in rows:
        columns += [k for k in row if k not in columns]
    csv_path, json_path = target / CSV_NAME, target / JSON_NAME
    tmp = csv_path.with_name(csv_path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, csv_path)
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps({"n": len(entries), "images": entries}, indent=2))
    os.replace(tmp, json_path)
    return [str(csv_path), str(json_path)]


def review_list(out: str | os.PathLike, to: str | os.PathLike | None = None,
                order: str = DEFAULT_ORDER, include_all: bool = False, seed: int = 0) -> dict[str, Any]:
    """The review list of the annotation folder ``out`` (see :func:`write_review_list`),
    with its entries under ``entries``."""
    store = open_store(out)
    try:
        return write_review_list(store, to, order, include_all, seed)
    finally:
        store.close()
