"""CVAT for images 1.1: the mask RLE, the exported file read back by Datumaro (CVAT's
own dataset library), and a reviewer's edited file imported into the store."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from _stores import MODEL_MASKS, ROWS, box, make_store, short

from aax.cli import main
from aax.interop.cvat import export_cvat, mask_to_rle, rle_to_mask
from aax.interop.review_import import import_file
from aax.interop.reviews import ReviewImportError, load_mask

CHECK = Path(__file__).parent / "interop" / "datumaro_check.py"


@pytest.mark.parametrize("mask", [
    box(3, 5, 9, 20),
    np.ones((6, 7), bool),
    np.eye(9, dtype=bool),
    np.random.default_rng(0).random((17, 23)) > 0.6,
])
def test_rle_round_trip(mask):
    rle, left, top, width, height = mask_to_rle(mask)
    runs = [int(v) for v in rle.split(",")]
    assert sum(runs) == width * height
    assert np.array_equal(rle_to_mask(rle, left, top, width, height, *mask.shape), mask)


def test_rle_starts_with_background_and_empty_is_none():
    rle, left, top, width, height = mask_to_rle(box(2, 3, 4, 5))
    assert (rle, left, top, width, height) == ("0,4", 3, 2, 2, 2)
    assert mask_to_rle(np.zeros((4, 4), bool)) is None
    with pytest.raises(ValueError, match="box is 2x2"):
        rle_to_mask("1,2", 0, 0, 2, 2, 4, 4)


@pytest.fixture()
def store(tmp_path):
    return make_store(tmp_path)


def test_export_lists_every_image_with_decision_and_scores(store, tmp_path):
    _, out = store
    result = export_cvat(out, tmp_path / "cvat")
    assert result == {"images": 6, "masks": 2, "file": str(tmp_path / "cvat" / "annotations.xml")}
    root = ET.parse(tmp_path / "cvat" / "annotations.xml").getroot()
    images = {i.get("name"): i for i in root.iter("image")}
    assert set(images) == set(ROWS)
    d0 = images["diseased/d0.png"][0]
    assert d0.tag == "mask" and d0.get("label") == "diseased"
    attrs = {a.get("name"): a.text for a in d0}
    assert attrs["reason"] == "consensus" and float(attrs["u_resnet50"]) == pytest.approx(0.01)
    h2 = images["healthy/h2.png"][0]
    assert (h2.tag, h2.get("label")) == ("tag", "review")
    assert {a.get("name"): a.text for a in h2}["reason"] == "no-consensus"


def test_datumaro_reads_back_the_same_masks(store, tmp_path, datumaro_python):
    images, out = store
    assert main(["export", str(out), "--format", "cvat", "--to", str(tmp_path / "cvat")]) == 0
    (tmp_path / "cvat" / "images").symlink_to(images)  # Datumaro wants the images beside the file
    subprocess.run([str(datumaro_python), str(CHECK), str(tmp_path / "cvat"), str(tmp_path / "dm")],
                   check=True, capture_output=True, text=True)
    masks = np.load(tmp_path / "dm.npz")
    items = json.loads((tmp_path / "dm.json").read_text())
    assert sorted(masks.files) == sorted(n.removesuffix(".png") for n in MODEL_MASKS)
    for name, mask in MODEL_MASKS.items():
        assert np.array_equal(masks[name.removesuffix(".png")], mask), name
    assert items["healthy/h0"] == [{"type": "label", "label": "healthy", "attributes": items["healthy/h0"][0]["attributes"]}]
    assert items["healthy/h2"][0]["label"] == "review"
    assert items["diseased/d0"][0]["attributes"]["decision"] == "diseased"


def _reviewed_file(src: Path, dst: Path) -> None:
    """What a reviewer hands back: d0's mask redrawn as a polygon, d1 turned healthy,
    d2 (flagged) given a mask, h2 left as 'review', h1 with a stray unknown label."""
    tree = ET.parse(src)
    images = {i.get("name"): i for i in tree.getroot().iter("image")}

    def clear(image):
        for child in list(image):
            image.remove(child)

    clear(images["diseased/d0.png"])
    ET.SubElement(images["diseased/d0.png"], "polygon", label="diseased", points="4,6;24,6;24,20;4,20")
    clear(images["diseased/d1.png"])
    ET.SubElement(images["diseased/d1.png"], "tag", label="healthy")
    clear(images["diseased/d2.png"])
    rle, left, top, width, height = mask_to_rle(box(0, 0, 8, 8))
    ET.SubElement(images["diseased/d2.png"], "mask", label="diseased", rle=rle, left=str(left), top=str(top),
                  width=str(width), height=str(height))
    clear(images["healthy/h1.png"])
    ET.SubElement(images["healthy/h1.png"], "tag", label="cat")
    tree.write(dst)


def test_import_reviewed_cvat_file(store, tmp_path):
    _, out = store
    export_cvat(out, tmp_path / "cvat")
    _reviewed_file(tmp_path / "cvat" / "annotations.xml", tmp_path / "reviewed.xml")
    result = import_file(out, "cvat", tmp_path / "reviewed.xml")
    # d0, d1, d2, h0 reviewed; h2 still 'review'; h1's label is no class
    assert result["added"] == 4 and len(result["skipped"]) == 2
    db = sqlite3.connect(out / "annotations.sqlite")
    reviews = {short(i): (d, m) for i, d, m in db.execute("SELECT image, decision, mask FROM reviews")}
    assert reviews["diseased/d1.png"] == ("healthy", None)
    polygon = load_mask(out / reviews["diseased/d0.png"][1])
    assert polygon[6:21, 4:25].all() and polygon.sum() == 15 * 21  # PIL fills the polygon's outline too
    assert np.array_equal(load_mask(out / reviews["diseased/d2.png"][1]), box(0, 0, 8, 8))
    assert import_file(out, "cvat", tmp_path / "reviewed.xml")["unchanged"] == 4


def test_cvat_file_of_other_images_is_refused(store, tmp_path):
    _, out = store
    export_cvat(out, tmp_path / "cvat")
    text = (tmp_path / "cvat" / "annotations.xml").read_text().replace("diseased/d0.png", "other/x.png")
    (tmp_path / "other.xml").write_text(text)
    with pytest.raises(ReviewImportError, match="other/x.png"):
        import_file(out, "cvat", tmp_path / "other.xml")
    (tmp_path / "broken.xml").write_text("<annotations><image")
    with pytest.raises(ValueError, match="broken.xml"):
        import_file(out, "cvat", tmp_path / "broken.xml")
