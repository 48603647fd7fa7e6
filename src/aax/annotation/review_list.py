"""The list of images a person must review: every image the protocol flagged.

Flagged images are never annotated silently; this is where a reviewer starts. Each entry
says why the image was flagged (``uncertain``, ``no-consensus``, ``novel``), what each
member predicted with what probability and uncertainty, and where its overlay is (when
``--save-saliency`` kept one). The most uncertain images come first.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from aax.annotation.records import REVIEW
from aax.annotation.store import REVIEW_FILES, AnnotationStore, open_store

CSV_NAME, JSON_NAME = REVIEW_FILES


def review_entries(store: AnnotationStore) -> list[dict[str, Any]]:
    """One entry per flagged image, most uncertain first (largest member uncertainty;
    ties by image name).

    Each entry: ``image`` (the store's key: the path relative to the input root),
    ``path`` (where the image is), ``reason``, ``max_uncertainty``, ``overlay`` (relative
    to the store's folder, or None) and ``members``: each member's ``name``,
    ``predicted``, ``probability`` of that class, ``uncertainty`` and, when the run
    scores novelty, its novelty fields as stored.
    """
    entries = []
    for row in store.rows():
        if row["status"] != "ok" or row["decision"] != REVIEW:
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
                        "reason": row["reason"],
                        "max_uncertainty": max(uncertainties) if uncertainties else None,
                        "overlay": row["saliency"], "label": row["label"], "members": members})
    entries.sort(key=lambda e: (-(e["max_uncertainty"] or 0.0), e["image"]))
    return entries


def _flat(entry: dict[str, Any]) -> dict[str, Any]:
    row = {k: v for k, v in entry.items() if k != "members"}
    for m in entry["members"]:
        for key, value in m.items():
            if key == "name":
                continue
            row[f"{m['name']}:{key}"] = json.dumps(value) if isinstance(value, (dict, list)) else value
    return row


def write_review_list(store: AnnotationStore, to: str | os.PathLike | None = None) -> dict[str, Any]:
    """Write the review list as ``review.csv`` and ``review.json`` into ``to`` (default:
    the store's folder). Returns ``{"n", "files": [paths], "entries"}``."""
    target = Path(to) if to is not None else store.out
    target.mkdir(parents=True, exist_ok=True)
    entries = review_entries(store)
    written = _write(entries, target)
    return {"n": len(entries), "files": written, "entries": entries}


def _write(entries: list[dict[str, Any]], target: Path) -> list[str]:
    rows = [_flat(e) for e in entries]
    columns: list[str] = ["image", "reason", "max_uncertainty", "overlay", "path", "label"]
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


def review_list(out: str | os.PathLike, to: str | os.PathLike | None = None) -> dict[str, Any]:
    """The review list of the annotation folder ``out`` (see :func:`write_review_list`),
    with its entries under ``entries``."""
    store = open_store(out)
    try:
        return write_review_list(store, to)
    finally:
        store.close()
