"""Converters of public layouts (masks beside images; labelme) to a CSV manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from aax.data import open_dataset, read_mask
from aax.data.convert import convert_labelme, convert_masks_beside


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_masks_beside_images_are_merged(tmp_path: Path) -> None:
    root = tmp_path / "busi"
    img = np.full((20, 30, 3), 90, np.uint8)
    a, b = np.zeros((20, 30), np.uint8), np.zeros((20, 30), np.uint8)
    a[2:5, 2:5], b[10:12, 20:25] = 255, 255
    # BUSI's split layout (images/ + mask/) for one class, the original flat one for another
    _png(root / "benign" / "images" / "benign (1).png", img)
    _png(root / "benign" / "mask" / "benign (1)_mask.png", a)
    _png(root / "benign" / "mask" / "benign (1)_mask_1.png", b)
    _png(root / "normal" / "normal (1).png", img)
    _png(root / "normal" / "normal (1)_mask.png", np.zeros((20, 30), np.uint8))
    _png(root / "normal" / "normal (2).png", img)  # no mask: no ground truth
    out = convert_masks_beside(root, tmp_path / "out")
    assert out.counts == {"benign": 1, "normal": 2} and out.errors == []
    ds = open_dataset(out.manifest)
    assert not ds.errors and sorted(ds.classes) == ["benign", "normal"]
    by_name = {s.image.name: s for s in ds}
    merged = by_name["benign (1).png"].mask()
    assert merged.sum() == 9 + 10 and merged[3, 3] and merged[11, 22]
    assert by_name["normal (1).png"].mask().sum() == 0
    assert by_name["normal (2).png"].mask() is None


def test_labelme_polygons_and_negatives(tmp_path: Path) -> None:
    images, labels = tmp_path / "data", tmp_path / "label"
    for name in ("a", "b", "c"):
        _png(images / f"{name}.png", np.zeros((40, 60, 3), np.uint8))
    labels.mkdir()
    shape = {"label": "Pitting", "points": [[10, 10], [30, 10], [30, 20], [10, 20]], "shape_type": "polygon"}
    (labels / "a.json").write_text(json.dumps({"shapes": [shape], "imageHeight": 40, "imageWidth": 60}))
    (labels / "b.json").write_text(json.dumps({"shapes": []}))
    (labels / "broken.json").write_text("{")  # names no image: ignored
    out = convert_labelme(images, labels, tmp_path / "out")
    assert out.counts == {"pitting": 1, "no_defect": 2}
    ds = open_dataset(out.manifest)
    a = next(s for s in ds if s.image.name == "a.png")
    mask = read_mask(a.mask_path)
    assert a.label == "pitting" and mask.shape == (40, 60)
    assert mask[15, 20] and not mask[5, 5] and 200 <= mask.sum() <= 21 * 11
    assert all(s.mask_path is None for s in ds if s.label == "no_defect")


def test_labelme_bad_file_is_reported(tmp_path: Path) -> None:
    images, labels = tmp_path / "data", tmp_path / "label"
    _png(images / "a.png", np.zeros((8, 8, 3), np.uint8))
    labels.mkdir()
    (labels / "a.json").write_text("{not json")
    out = convert_labelme(images, labels, tmp_path / "out")
    assert out.counts == {} and len(out.errors) == 1 and "a.json" in out.errors[0].path
