"""Annotations out, in the formats annotation tools read: COCO (compressed RLE) and PNG.

Label Studio and CVAT have their own modules (:mod:`aax.interop.labelstudio`, :mod:`aax.interop.cvat`).
Every format prefers reviewed annotations (:func:`aax.interop.reviews.reviewed_rows`).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path, PurePosixPath

import numpy as np

from aax.annotation.store import AnnotationStore, open_store
from aax.interop.reviews import reviewed_rows


def _load_mask(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L")) > 127


def _open(out: str | os.PathLike) -> AnnotationStore:
    return open_store(out)


def export_coco(out: str | os.PathLike, to: str | os.PathLike) -> dict:
    """Write the annotations of folder ``out`` as a COCO JSON file ``to``.

    Every annotated image is listed (negatives and images flagged for review too, with
    the decision under ``aax``); each mask is one annotation with a compressed RLE
    ``segmentation`` (string ``counts``), ``area``, ``bbox``, ``iscrowd=0`` and ``score``,
    the mean probability of the decided class over the agreeing members.
    """
    from pycocotools import mask as mask_utils

    store = _open(out)
    settings = store.settings
    negative = settings.get("negative_class")
    classes = [c for c in settings.get("classes", []) if c != negative]
    categories = [{"id": i + 1, "name": c, "supercategory": "finding"} for i, c in enumerate(classes)]
    category_id = {c["name"]: c["id"] for c in categories}
    images, annotations = [], []
    for row in reviewed_rows(store):
        if row["status"] != "ok":
            continue
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": row["image"], "height": row["height"],
                       "width": row["width"],
                       "aax": {"decision": row["decision"], "reason": row["reason"],
                               "members": row["members"], "reviewed": row["reviewed"]}})
        if not row["mask"]:
            continue
        mask = _load_mask(Path(out) / row["mask"])
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        cls_index = settings["classes"].index(row["decision"])
        agreeing = [m for m in row["members"] if m["name"] in row["agreeing"]]
        score = float(np.mean([m["probs"][cls_index] for m in agreeing])) if agreeing else None
        annotations.append({
            "id": len(annotations) + 1, "image_id": image_id, "category_id": category_id[row["decision"]],
            "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "area": float(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            "iscrowd": 0, "score": score})
    store.close()
    coco = {"info": {"description": "AAX annotations", "settings": settings},
            "images": images, "annotations": annotations, "categories": categories}
    Path(to).parent.mkdir(parents=True, exist_ok=True)
    Path(to).write_text(json.dumps(coco))
    return {"images": len(images), "annotations": len(annotations), "file": str(to)}


def export_png(out: str | os.PathLike, to: str | os.PathLike) -> dict:
    """Copy the masks of folder ``out`` into the flat folder ``to`` with ``index.csv``
    (``mask,image,decision,reason,mask_area,height,width``)."""
    store = _open(out)
    target = Path(to)
    target.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(target / "index.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["mask", "image", "decision", "reason", "mask_area", "height", "width"])
        for row in reviewed_rows(store):
            if not row["mask"]:
                continue
            n += 1
            name = f"{n:06d}_{PurePosixPath(row['image']).stem}.png"
            shutil.copyfile(Path(out) / row["mask"], target / name)
            writer.writerow([name, row["image"], row["decision"], row["reason"], row["mask_area"],
                             row["height"], row["width"]])
    store.close()
    return {"masks": n, "folder": str(target)}
