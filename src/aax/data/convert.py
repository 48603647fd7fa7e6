"""Converters from common public layouts to AAX's CSV manifest (``image,label,mask``).

Two layouts that pixel-labelled sets with a true negative class often come in:

* **masks beside images** (BUSI, "Dataset_BUSI_with_GT"): one folder per class, each
  image ``NAME.png`` with one or more masks ``NAME_mask.png``, ``NAME_mask_1.png``, ...
  either in the same folder or in ``images/`` and ``mask/`` (or ``masks/``) subfolders.
  Several masks of one image are merged (union). :func:`convert_masks_beside`.
* **labelme polygons** (BSData): a folder of images and a folder of labelme JSON files
  named after them; an image with polygons takes their label (lower-cased) and their
  union as its mask; an image without a JSON file, or with no shapes, is of the negative
  class. :func:`convert_labelme`.

The images are not copied: the manifest points at them. Merged or rasterised masks are
written as PNG under ``OUT/masks/`` and the manifest as ``OUT/manifest.csv``, which
:func:`aax.data.open_dataset` (and every ``aax`` command) then reads. An image whose
mask cannot be made is listed in the returned errors, with the reason, and left out.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from aax.data.imageio import image_size, is_image_file, read_mask
from aax.data.layouts import DataError

MANIFEST_NAME = "manifest.csv"
_MASK_NAME = re.compile(r"^(?P<stem>.+)_mask(_\d+)?$")


@dataclass
class Converted:
    """What a converter wrote: the manifest, the rows per class and the files left out."""

    manifest: Path
    counts: dict[str, int] = field(default_factory=dict)
    errors: list[DataError] = field(default_factory=list)


def _write(out: Path, rows: list[tuple[Path, str, Path | None]], errors: list[DataError]) -> Converted:
    out.mkdir(parents=True, exist_ok=True)
    path = out / MANIFEST_NAME
    base = out.resolve()

    def rel(p: Path) -> str:
        return Path(os.path.relpath(Path(p).resolve(), base)).as_posix()

    counts: dict[str, int] = {}
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "label", "mask"])
        for image, label, mask in rows:
            writer.writerow([rel(image), label, rel(mask) if mask is not None else ""])
            counts[label] = counts.get(label, 0) + 1
    return Converted(manifest=path, counts=counts, errors=errors)


def _save_mask(mask: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    return path


def convert_masks_beside(root: str | os.PathLike, out: str | os.PathLike) -> Converted:
    """Write a manifest for the "masks beside images" layout (BUSI), merging the masks of
    an image into one (see the module docstring). Every class folder under ``root`` is a
    class; an image without a mask keeps no ground truth."""
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    rows: list[tuple[Path, str, Path | None]] = []
    errors: list[DataError] = []
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class folders")
    for class_dir in classes:
        image_dir = class_dir / "images" if (class_dir / "images").is_dir() else class_dir
        mask_dirs = [d for d in (class_dir / "mask", class_dir / "masks", image_dir) if d.is_dir()]
        masks: dict[str, list[Path]] = {}
        for d in mask_dirs:
            for p in sorted(d.iterdir()):
                m = _MASK_NAME.match(p.stem)
                if m and is_image_file(p):
                    masks.setdefault(m.group("stem"), []).append(p)
        for image in sorted(p for p in image_dir.iterdir() if is_image_file(p) and not _MASK_NAME.match(p.stem)):
            found = masks.get(image.stem, [])
            if not found:
                rows.append((image, class_dir.name, None))
                continue
            try:
                merged = np.logical_or.reduce([read_mask(p) for p in found])
            except (ValueError, OSError) as exc:  # unreadable, or masks of different sizes
                errors.append(DataError(str(found[0]), f"mask cannot be merged: {exc}"))
                continue
            target = out / "masks" / class_dir.name / f"{image.stem}.png"
            rows.append((image, class_dir.name, _save_mask(merged, target)))
    return _write(out, rows, errors)


def labelme_mask(data: dict, height: int, width: int) -> tuple[np.ndarray, list[str]]:
    """The union of a labelme file's polygons (and rectangles) at ``height x width``, and
    the labels of its shapes."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    labels = []
    for shape in data.get("shapes") or []:
        points = [(float(x), float(y)) for x, y in shape.get("points", [])]
        kind = shape.get("shape_type") or "polygon"
        if kind == "rectangle" and len(points) == 2:
            (x0, y0), (x1, y1) = points
            draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], fill=255)
        elif len(points) >= 3:
            draw.polygon(points, fill=255)
        else:
            continue
        labels.append(str(shape.get("label", "")).strip().lower())
    return np.asarray(canvas) > 0, labels


def convert_labelme(images: str | os.PathLike, labels: str | os.PathLike, out: str | os.PathLike,
                    negative: str = "no_defect") -> Converted:
    """Write a manifest for images with labelme annotations (BSData): see the module
    docstring. An image whose shapes carry more than one label takes the most frequent."""
    images, labels, out = Path(images), Path(labels), Path(out)
    for folder in (images, labels):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder")
    rows: list[tuple[Path, str, Path | None]] = []
    errors: list[DataError] = []
    for image in sorted(p for p in images.iterdir() if is_image_file(p)):
        annotation = labels / f"{image.stem}.json"
        if not annotation.is_file():
            rows.append((image, negative, None))
            continue
        try:
            data = json.loads(annotation.read_text(encoding="utf-8"))
            height, width = image_size(image)
            mask, names = labelme_mask(data, height, width)
        except (ValueError, OSError) as exc:
            errors.append(DataError(str(annotation), f"cannot be read as a labelme file: {exc}"))
            continue
        if not names:
            rows.append((image, negative, None))
            continue
        label = max(sorted(set(names)), key=names.count)
        target = out / "masks" / label / f"{image.stem}.png"
        rows.append((image, label, _save_mask(mask, target)))
    return _write(out, rows, errors)
