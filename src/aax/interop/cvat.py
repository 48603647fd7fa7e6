"""CVAT for images 1.1: ``annotations.xml`` out, reviewed annotations back.

Each positive image gets a ``<mask>`` (CVAT's mask RLE over the mask's bounding box:
run lengths, row by row, starting with a background run), each other image a
``<tag>`` naming its decision (a class, or ``review``). Both carry the decision's
reason, the ensemble's confidence and each member's probabilities and uncertainty (and
novelty scores, when the store has them) as text attributes, declared on every label
in ``<meta>`` as CVAT requires. Image names are paths relative to the input root.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np

from aax.annotation.records import REVIEW
from aax.interop.labelstudio import PALETTE, confidence, member_fields
from aax.interop.reviews import Review

ANNOTATIONS_FILE = "annotations.xml"


def mask_to_rle(mask: np.ndarray) -> tuple[str, int, int, int, int] | None:
    """A boolean mask as CVAT's ``(rle, left, top, width, height)``; None when empty."""
    mask = np.asarray(mask, dtype=bool)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    top, bottom, left, right = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    crop = mask[top:bottom + 1, left:right + 1].ravel()
    change = np.flatnonzero(crop[1:] != crop[:-1]) + 1
    bounds = np.concatenate(([0], change, [crop.size]))
    runs = np.diff(bounds).tolist()
    if crop[0]:
        runs.insert(0, 0)  # CVAT's runs start with background
    return ",".join(map(str, runs)), left, top, right - left + 1, bottom - top + 1


def rle_to_mask(rle: str, left: int, top: int, width: int, height: int,
                image_height: int, image_width: int) -> np.ndarray:
    """CVAT's mask RLE back to a boolean ``[image_height, image_width]`` mask."""
    runs = np.array([int(v) for v in rle.split(",") if v.strip()], dtype=np.int64)
    if runs.sum() != width * height:
        raise ValueError(f"mask RLE covers {runs.sum()} pixels; its box is {width}x{height}")
    values = np.arange(runs.size) % 2 == 1
    crop = np.repeat(values, runs).reshape(height, width)
    out = np.zeros((image_height, image_width), dtype=bool)
    out[top:top + height, left:left + width] = crop[:max(0, image_height - top), :max(0, image_width - left)]
    return out


def _attributes(row: dict, classes: Sequence[str]) -> dict[str, str]:
    score = 1.0 if row.get("reviewed") else confidence(row["decision"], row["members"], row["agreeing"], classes)
    attrs = {"decision": row["decision"], "reason": row["reason"] or "", "score": f"{score:.6f}"}
    for key, value in member_fields(row["members"], classes).items():
        attrs[key.removeprefix("aax_")] = "" if value is None else str(value)
    return attrs


def export_cvat(out: str | os.PathLike, to: str | os.PathLike) -> dict:
    """Write the annotations of ``out`` as ``to/annotations.xml`` (CVAT for images 1.1).

    Reviewed images carry the reviewed decision and mask.
    """
    from aax.annotation.locations import image_name
    from aax.interop.export import _open
    from aax.interop.reviews import load_mask, reviewed_rows

    store = _open(out)
    settings = store.settings
    classes, negative = list(settings.get("classes", [])), settings.get("negative_class")
    rows = [r for r in reviewed_rows(store) if r["status"] == "ok"]
    names = [image_name(store, r) for r in rows]
    store.close()
    attr_names: list[str] = []
    attributes = [_attributes(r, classes) for r in rows]
    for a in attributes:
        attr_names.extend(k for k in a if k not in attr_names)

    root = ET.Element("annotations")
    ET.SubElement(root, "version").text = "1.1"
    meta = ET.SubElement(root, "meta")
    task = ET.SubElement(meta, "task")
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for tag, text in (("id", "0"), ("name", f"AAX {Path(settings.get('run', 'run')).name}"),
                      ("size", str(len(rows))), ("mode", "annotation"), ("overlap", "0"),
                      ("bugtracker", ""), ("created", now), ("updated", now), ("subset", "default"),
                      ("start_frame", "0"), ("stop_frame", str(max(0, len(rows) - 1))), ("frame_filter", "")):
        ET.SubElement(task, tag).text = text
    labels = ET.SubElement(task, "labels")
    for i, name in enumerate([*classes, REVIEW]):
        label = ET.SubElement(labels, "label")
        ET.SubElement(label, "name").text = name
        ET.SubElement(label, "color").text = PALETTE[i % len(PALETTE)]
        ET.SubElement(label, "type").text = "any"
        attrs = ET.SubElement(label, "attributes")
        for a in attr_names:
            attribute = ET.SubElement(attrs, "attribute")
            for tag, text in (("name", a), ("mutable", "False"), ("input_type", "text"),
                              ("default_value", ""), ("values", "")):
                ET.SubElement(attribute, tag).text = text
    ET.SubElement(meta, "dumped").text = now

    masks = 0
    for frame, (row, name, attrs) in enumerate(zip(rows, names, attributes)):
        image = ET.SubElement(root, "image", id=str(frame), name=name, width=str(row["width"]),
                              height=str(row["height"]))
        encoded = mask_to_rle(load_mask(Path(out) / row["mask"])) if row["mask"] else None
        if encoded is not None and row["decision"] != negative and row["decision"] != REVIEW:
            rle, left, top, width, height = encoded
            shape = ET.SubElement(image, "mask", label=row["decision"], source="auto" if not row.get("reviewed")
                                  else "manual", occluded="0", rle=rle, left=str(left), top=str(top),
                                  width=str(width), height=str(height), z_order="0")
            masks += 1
        else:
            shape = ET.SubElement(image, "tag", label=row["decision"],
                                  source="auto" if not row.get("reviewed") else "manual")
        for key, value in attrs.items():
            ET.SubElement(shape, "attribute", name=key).text = value
    target = Path(to)
    target.mkdir(parents=True, exist_ok=True)
    ET.indent(root)
    tmp = target / (ANNOTATIONS_FILE + ".tmp")
    ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)
    os.replace(tmp, target / ANNOTATIONS_FILE)
    return {"images": len(rows), "masks": masks, "file": str(target / ANNOTATIONS_FILE)}


def _polygon_mask(points: str, height: int, width: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    xy = [tuple(float(v) for v in p.split(",")) for p in points.split(";") if p.strip()]
    canvas = Image.new("1", (width, height), 0)
    ImageDraw.Draw(canvas).polygon(xy, fill=1, outline=1)
    return np.asarray(canvas, dtype=bool)


def read_annotations(path: str | os.PathLike, classes: Sequence[str], negative: str,
                     key_of: dict[str, str]) -> tuple[list[Review], list[str]]:
    """Reviews from a CVAT for images 1.1 file.

    Every ``<image>`` counts as reviewed unless it still carries a ``review`` tag. Its
    decision is the label of its masks or polygons (their union is the mask), else the
    class of its tag, else (no annotation left) the negative class; images with labels
    that are no class, or masks of two classes, are skipped with a note. ``key_of`` maps
    the image names of the file to the store's keys; names it lacks are refused by the
    import.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise ValueError(f"{path}: not a CVAT XML file ({exc})") from None
    if root.tag != "annotations":
        raise ValueError(f"{path}: the root element is <{root.tag}>, not <annotations>")
    reviews, notes = [], []
    for image in root.iter("image"):
        name = image.get("name", "")
        h, w = int(image.get("height", 0)), int(image.get("width", 0))
        mask, shape_labels, tags = None, set(), []
        try:
            for shape in image:
                label = shape.get("label")
                if shape.tag == "mask":
                    layer = rle_to_mask(shape.get("rle", ""), int(shape.get("left")), int(shape.get("top")),
                                        int(shape.get("width")), int(shape.get("height")), h, w)
                elif shape.tag == "polygon":
                    layer = _polygon_mask(shape.get("points", ""), h, w)
                elif shape.tag == "tag":
                    tags.append(label)
                    continue
                else:
                    continue
                shape_labels.add(label)
                mask = layer if mask is None else mask | layer
        except (TypeError, ValueError) as exc:
            notes.append(f"{name}: bad shape ({exc})")
            continue
        if REVIEW in tags and not shape_labels:
            notes.append(f"{name}: still tagged 'review'")
            continue
        strangers = sorted({t for t in tags if t not in classes and t != REVIEW} |
                           {s for s in shape_labels if s not in classes})
        if strangers:
            notes.append(f"{name}: {strangers} not among the classes {list(classes)}")
            continue
        if len(shape_labels) > 1:
            notes.append(f"{name}: masks of several classes ({sorted(shape_labels)})")
            continue
        decision = next(iter(shape_labels)) if shape_labels else next(
            (t for t in tags if t in classes), negative)
        reviews.append(Review(image=key_of.get(name, name), decision=decision,
                              mask=mask if decision != negative else None, tool="cvat",
                              tool_ref=f"frame {image.get('id')}"))
    return reviews, notes
