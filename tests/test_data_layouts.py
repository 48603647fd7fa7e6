"""aax.data.layouts: folder, CSV and TBX11K layouts, bad files, and the Dataset type."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aax.data import (DataError, Dataset, Sample, boxes_to_mask, detect_format, open_dataset,
                      read_voc_boxes, write_manifest)

RNG = np.random.default_rng(1)


def write_image(path: Path, h: int = 32, w: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def write_mask(path: Path, h: int = 32, w: int = 32, box=(4, 4, 12, 20)) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((h, w), dtype=bool)
    r0, c0, r1, c1 = box
    mask[r0:r1, c0:c1] = True
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    return mask


def folder_dataset(root: Path, n: int = 3) -> Path:
    """images/<class>/ with masks for the diseased class."""
    for i in range(n):
        write_image(root / "images" / "healthy" / f"h{i}.png")
        write_image(root / "images" / "diseased" / f"d{i}.png")
        write_mask(root / "masks" / "diseased" / f"d{i}.png", box=(i, 2, 10 + i, 12))
    return root


# --- folder layout ---------------------------------------------------------------------

def test_folder_layout_with_masks(tmp_path):
    ds = open_dataset(folder_dataset(tmp_path / "d"))
    assert ds.format == "folder" and ds.errors == []
    assert ds.classes == ["diseased", "healthy"]
    assert len(ds) == 6 and ds.counts() == {"diseased": 3, "healthy": 3}
    assert ds.mask_counts() == {"diseased": 3, "healthy": 0}
    by_name = {s.image.name: s for s in ds}
    d1 = by_name["d1.png"]
    assert d1.label == "diseased" and d1.has_mask and d1.size == (32, 32)
    m = d1.mask()
    assert m.dtype == bool and m.shape == (32, 32)
    assert m.sum() == 10 * 10 and m[1:11, 2:12].all() and not m[0].any()
    h0 = by_name["h0.png"]
    assert not h0.has_mask and h0.mask() is None
    assert h0.read().shape == (32, 32, 3)


def test_plain_class_folders_nested_and_hidden(tmp_path):
    write_image(tmp_path / "cats" / "a.png")
    write_image(tmp_path / "cats" / "sub" / "b.jpg")
    write_image(tmp_path / "dogs" / "c.bmp")
    (tmp_path / "dogs" / "notes.txt").write_text("not an image, not a sample")
    write_image(tmp_path / "dogs" / ".hidden.png")
    write_image(tmp_path / ".cache" / "x.png")
    ds = open_dataset(tmp_path)
    assert ds.classes == ["cats", "dogs"]
    assert sorted(s.image.name for s in ds) == ["a.png", "b.jpg", "c.bmp"]
    assert ds.errors == []


def test_folder_mask_in_subfolder_mirrors_image_path(tmp_path):
    write_image(tmp_path / "images" / "pos" / "site1" / "x.jpg")
    write_mask(tmp_path / "masks" / "pos" / "site1" / "x.png")
    (sample,) = open_dataset(tmp_path)
    assert sample.mask_path == tmp_path / "masks" / "pos" / "site1" / "x.png"


# --- CSV -------------------------------------------------------------------------------

def test_csv_manifest_relative_paths(tmp_path):
    root = folder_dataset(tmp_path / "data", n=2)
    csv = tmp_path / "lists" / "m.csv"
    csv.parent.mkdir()
    csv.write_text(
        "\ufeffimage,label,mask\n"  # a BOM, as spreadsheet programs write it
        "../data/images/diseased/d0.png,diseased,../data/masks/diseased/d0.png\n"
        "../data/images/healthy/h0.png,healthy,\n"
        f"{(root / 'images/healthy/h1.png').resolve()},healthy\n", encoding="utf-8")
    ds = open_dataset(csv)
    assert ds.format == "csv" and ds.errors == []
    assert [s.label for s in ds] == ["diseased", "healthy", "healthy"]
    assert ds[0].has_mask and ds[0].mask().shape == (32, 32)
    assert not ds[1].has_mask and not ds[2].has_mask


def test_csv_without_required_columns(tmp_path):
    (tmp_path / "m.csv").write_text("file,class\na.png,x\n")
    with pytest.raises(ValueError, match="image,label"):
        open_dataset(tmp_path / "m.csv")


def test_csv_bad_rows_become_errors(tmp_path):
    for name in ("a", "b", "c", "d"):
        write_image(tmp_path / f"{name}.png")
    (tmp_path / "m.csv").write_text(
        "image,label\na.png,cat\nb.png,\nc.png,zebra\n,cat\nd.png,dog\nmissing.png,cat\n")
    ds = open_dataset(tmp_path / "m.csv", classes=["cat", "dog"])
    assert [s.image.name for s in ds] == ["a.png", "d.png"]
    reasons = {Path(e.path).name: e.reason for e in ds.errors}
    assert reasons["b.png"] == "empty label"
    assert reasons["c.png"].startswith("unknown label 'zebra'")
    assert reasons["m.csv:5"] == "row has no image path"
    assert reasons["missing.png"] == "file not found"
    assert len(ds.errors) == 4


# --- bad files in a folder dataset ----------------------------------------------------

def _png_claiming(path: Path, width: int, height: int) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IEND", b""))


def test_every_bad_file_is_reported_and_the_rest_kept(tmp_path):
    root = folder_dataset(tmp_path, n=3)
    bad = root / "images" / "healthy"
    (bad / "zero.png").write_bytes(b"")
    (bad / "text.png").write_text("this is text")
    _png_claiming(bad / "bomb.png", 100_000, 100_000)
    write_image(bad / "full.png", 48, 48)
    data = (bad / "full.png").read_bytes()
    (bad / "full.png").unlink()
    (bad / "trunc.png").write_bytes(data[: len(data) // 2])
    write_image(root / "images" / "diseased" / "odd.png")
    write_mask(root / "masks" / "diseased" / "odd.png", h=30, w=32)

    ds = open_dataset(root)
    reasons = {Path(e.path).name: e.reason for e in ds.errors}
    assert reasons["zero.png"] == "empty file (0 bytes)"
    assert reasons["text.png"].startswith("not an image")
    assert "too large" in reasons["bomb.png"]
    assert reasons["odd.png"] == "mask size 32x30 differs from image size 32x32 (odd.png)"
    assert all(isinstance(e, DataError) for e in ds.errors)
    mask_error = next(e for e in ds.errors if "mask size" in e.reason)
    assert Path(mask_error.path).parent.name == "diseased" and "masks" in mask_error.path
    # the truncated file has a sound header: it is kept until its pixels are decoded
    assert "trunc.png" not in reasons
    names = {s.image.name for s in ds}
    assert names == {"h0.png", "h1.png", "h2.png", "d0.png", "d1.png", "d2.png",
                     "trunc.png", "odd.png"}
    odd = next(s for s in ds if s.image.name == "odd.png")
    assert not odd.has_mask  # the image stays, without its unusable mask

    checked = ds.verify()
    assert "trunc.png" not in {s.image.name for s in checked}
    assert any(Path(e.path).name == "trunc.png" and "truncated" in e.reason
               for e in checked.errors)
    assert len(checked) == 7 and len(checked.errors) == len(ds.errors) + 1
    assert checked.classes == ds.classes


def test_verify_drops_a_mask_that_does_not_decode(tmp_path):
    root = folder_dataset(tmp_path, n=1)
    mask = root / "masks" / "diseased" / "d0.png"
    Image.fromarray(RNG.integers(0, 2, (32, 32), dtype=np.uint8) * 255).save(mask)
    data = mask.read_bytes()
    mask.write_bytes(data[: len(data) // 2])
    ds = open_dataset(root)
    assert ds[0].has_mask  # header fine
    checked = ds.verify()
    assert len(checked) == 2 and not checked[0].has_mask
    assert [Path(e.path).name for e in checked.errors] == ["d0.png"]


def test_classes_argument_fixes_the_class_list(tmp_path):
    root = folder_dataset(tmp_path, n=1)
    write_image(root / "images" / "other" / "o.png")
    ds = open_dataset(root, classes=["healthy", "diseased", "absent"])
    assert ds.classes == ["absent", "diseased", "healthy"]  # sorted, absent class kept
    assert [Path(e.path).name for e in ds.errors] == ["o.png"]
    assert "unknown label 'other'" in ds.errors[0].reason


# --- TBX11K layout ---------------------------------------------------------------------

VOC = """<annotation><filename>{stem}</filename>
<size><width>{w}</width><height>{h}</height><depth>3</depth></size>
{objects}</annotation>"""
OBJ = ("<object><name>ActiveTuberculosis</name><bndbox><xmin>{}</xmin><ymin>{}</ymin>"
       "<xmax>{}</xmax><ymax>{}</ymax></bndbox></object>")


def tbx11k(root: Path) -> Path:
    """A miniature TBX11K: health, sick, tb (with and without XML), and lists."""
    for rel in ("health/h1.png", "health/h2.png", "sick/s1.png", "tb/t1.png", "tb/t2.png",
                "tb/t3.png", "test/u1.png"):
        write_image(root / "imgs" / rel, 40, 50)
    xml = root / "annotations" / "xml"
    xml.mkdir(parents=True)
    # scan 1000 wide x 800 high, image 50 x 40: factors 0.05 in both directions
    (xml / "t1.xml").write_text(VOC.format(stem="t1", w=1000, h=800, objects=OBJ.format(
        100, 80, 500, 400) + OBJ.format(300, 200, 700, 600)))
    (xml / "t2.xml").write_text(VOC.format(stem="t2", w=0, h=800, objects=OBJ.format(
        1, 1, 2, 2)))  # no usable <size>
    lists = root / "lists"
    lists.mkdir()
    (lists / "TBX11K_train.txt").write_text("health/h1.png\nsick/s1.png\ntb/t1.png\n")
    (lists / "TBX11K_val.txt").write_text("health/h2.png\ntb/t2.png\ntb/t3.png\n")
    (lists / "TBX11K_trainval.txt").write_text(
        "health/h1.png\nsick/s1.png\ntb/t1.png\nhealth/h2.png\ntb/t2.png\ntb/t3.png\n")
    (lists / "all_test.txt").write_text("test/u1.png\n")
    return root


def test_tbx11k_default_list_labels_and_masks(tmp_path):
    ds = open_dataset(tbx11k(tmp_path))
    assert ds.format == "tbx11k"
    assert ds.classes == ["healthy", "tb"]  # sick left out by default
    assert [s.image.name for s in ds] == ["h1.png", "t1.png", "h2.png", "t2.png", "t3.png"]
    by = {s.image.stem: s for s in ds}
    # health: known to have no lesion -> an all-False mask
    assert by["h1"].has_mask and not by["h1"].mask().any()
    assert by["h1"].mask().shape == (40, 50)
    # tb with boxes: scaled by 50/1000 and 40/800 -> (5, 4, 25, 20) and (15, 10, 35, 30)
    assert by["t1"].boxes == ((5.0, 4.0, 25.0, 20.0), (15.0, 10.0, 35.0, 30.0))
    m = by["t1"].mask()
    assert m.shape == (40, 50) and m.sum() == 20 * 16 + 20 * 20 - 10 * 10
    assert m[4:20, 5:25].all() and m[10:30, 15:35].all() and not m[0:4].any()
    # tb whose XML has no size: the XML is an error, the image stays without ground truth
    assert not by["t2"].has_mask
    assert [(Path(e.path).name, e.reason) for e in ds.errors] == [
        ("t2.xml", "annotation XML has no valid <size><width>/<height>")]
    # tb without XML: no ground truth
    assert not by["t3"].has_mask and by["t3"].mask() is None


def test_tbx11k_include_sick_and_split(tmp_path):
    root = tbx11k(tmp_path)
    ds = open_dataset(root, include_sick=True, split="train")
    assert ds.classes == ["healthy", "sick", "tb"]
    assert [s.label for s in ds] == ["healthy", "sick", "tb"]
    sick = ds[1]
    assert not sick.has_mask  # nothing says where its finding is
    for name in ("val", "TBX11K_val", "TBX11K_val.txt"):
        assert [s.image.name for s in open_dataset(root, split=name)] == [
            "h2.png", "t2.png", "t3.png"]
    with pytest.raises(ValueError, match="available: TBX11K_train, TBX11K_trainval"):
        open_dataset(root, split="nope")


def test_tbx11k_unlabelled_test_images_are_errors(tmp_path):
    ds = open_dataset(tbx11k(tmp_path), split="all_test")
    assert len(ds) == 0
    assert len(ds.errors) == 1 and "no TBX11K label" in ds.errors[0].reason


def test_tbx11k_without_trainval_merges_lists_or_walks_folders(tmp_path):
    root = tbx11k(tmp_path)
    (root / "lists" / "TBX11K_trainval.txt").unlink()
    merged = open_dataset(root)
    assert len(merged) == 5  # train + val (minus sick) once each
    assert len(merged.errors) == 2  # the unlabelled test image, the bad XML
    for p in (root / "lists").iterdir():
        p.unlink()
    walked = open_dataset(root, include_sick=True)
    assert sorted(s.image.name for s in walked) == [
        "h1.png", "h2.png", "s1.png", "t1.png", "t2.png", "t3.png"]


def test_voc_boxes_unscaled_and_boxes_to_mask_convention(tmp_path):
    (tmp_path / "a.xml").write_text(VOC.format(stem="a", w=10, h=10, objects=OBJ.format(
        1, 2, 3, 4)))
    assert read_voc_boxes(tmp_path / "a.xml") == ((1.0, 2.0, 3.0, 4.0),)
    (tmp_path / "b.xml").write_text("<annotation><size>")
    with pytest.raises(ValueError, match="unreadable"):
        read_voc_boxes(tmp_path / "b.xml")
    # pixel centres: column c is in [x0, x1) when x0 <= c + 0.5 < x1
    m = boxes_to_mask([(0.5, 1.4, 2.6, 3.6)], 6, 6)
    assert np.array_equal(np.argwhere(m.any(0)).ravel(), [0, 1, 2])
    assert np.array_equal(np.argwhere(m.any(1)).ravel(), [1, 2, 3])
    assert not boxes_to_mask([(-5, -5, -1, -1), (3, 3, 3, 9)], 6, 6).any()  # outside, empty
    assert boxes_to_mask([(-5, -5, 100, 100)], 6, 6).all()  # clipped


# --- detection and the Dataset type ----------------------------------------------------

def test_detect_format(tmp_path):
    assert detect_format(folder_dataset(tmp_path / "f", 1)) == "folder"
    assert detect_format(tbx11k(tmp_path / "t")) == "tbx11k"
    (tmp_path / "m.csv").write_text("image,label\n")
    assert detect_format(tmp_path / "m.csv") == "csv"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a dataset"):
        detect_format(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        open_dataset(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown dataset format"):
        open_dataset(tmp_path / "f", format="coco")
    with pytest.raises(ValueError, match="split"):
        open_dataset(tmp_path / "f", split="val")


def test_dataset_sequence_subset_summary(tmp_path):
    ds = open_dataset(folder_dataset(tmp_path, n=3))
    assert isinstance(ds[0], Sample) and len(list(ds)) == 6
    assert ds.labels == [s.label for s in ds]
    sub = ds.subset([5, 0])
    assert isinstance(sub, Dataset) and [s.image for s in sub] == [ds[5].image, ds[0].image]
    assert sub.classes == ds.classes and sub.errors == []
    part = ds[1:3]
    assert isinstance(part, Dataset) and len(part) == 2 and part[0] == ds[1]
    only_healthy = ds.subset([i for i, s in enumerate(ds) if s.label == "healthy"])
    assert only_healthy.classes == ["diseased", "healthy"]  # indices stay fixed
    summary = ds.summary()
    assert summary["n_samples"] == 6 and summary["n_masks"] == 3 and summary["n_errors"] == 0
    assert summary["classes"]["diseased"] == {"images": 3, "masks": 3}


def test_write_manifest_round_trip(tmp_path):
    ds = open_dataset(folder_dataset(tmp_path / "data", n=2))
    path = write_manifest(ds, tmp_path / "out" / "all.csv")
    again = open_dataset(path)
    assert again.format == "csv" and again.errors == []
    assert [(s.image.resolve(), s.label, s.has_mask) for s in again] == [
        (s.image.resolve(), s.label, s.has_mask) for s in ds]
    assert "../data/images/" in path.read_text()
