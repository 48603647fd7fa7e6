"""The real TBX11K sample (see ``SAMPLE``) must load, with box masks."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

from aax.data import open_dataset

# The real TBX11K sample: $AAX_TBX11K_SAMPLE, else shared/data/tbx11k-sample in the
# repository or beside it.
_REPO = Path(__file__).resolve().parent.parent
SAMPLE = next((p for p in (Path(os.environ.get("AAX_TBX11K_SAMPLE", _REPO / "shared" / "data" / "tbx11k-sample")),
                           _REPO.parent / "shared" / "data" / "tbx11k-sample") if p.is_dir()),
              _REPO / "shared" / "data" / "tbx11k-sample")

pytestmark = pytest.mark.skipif(not SAMPLE.is_dir(), reason="TBX11K sample not present")


def _scaled_boxes(xml: Path, height: int, width: int) -> list[tuple[float, ...]]:
    """The XML's boxes scaled to the image, parsed without the reader's code."""
    text = xml.read_text()
    scan_w = float(re.search(r"<width>(\d+)</width>", text).group(1))
    scan_h = float(re.search(r"<height>(\d+)</height>", text).group(1))
    boxes = re.findall(r"<xmin>([\d.]+)</xmin>\s*<ymin>([\d.]+)</ymin>\s*"
                       r"<xmax>([\d.]+)</xmax>\s*<ymax>([\d.]+)</ymax>", text)
    assert boxes, xml
    return [(float(a) * width / scan_w, float(b) * height / scan_h,
             float(c) * width / scan_w, float(d) * height / scan_h) for a, b, c, d in boxes]


def _union_area(boxes: list[tuple[float, ...]]) -> float:
    """Exact area of a union of rectangles (coordinate compression)."""
    xs = sorted({b[0] for b in boxes} | {b[2] for b in boxes})
    ys = sorted({b[1] for b in boxes} | {b[3] for b in boxes})
    area = 0.0
    for x0, x1 in zip(xs, xs[1:]):
        for y0, y1 in zip(ys, ys[1:]):
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            if any(b[0] <= cx < b[2] and b[1] <= cy < b[3] for b in boxes):
                area += (x1 - x0) * (y1 - y0)
    return area


def test_sample_loads_sixteen_tb_images_with_box_masks():
    ds = open_dataset(SAMPLE)
    assert ds.format == "tbx11k" and ds.errors == []
    assert len(ds) == 16 and ds.classes == ["tb"]
    assert ds.counts() == {"tb": 16} and ds.mask_counts() == {"tb": 16}
    listed = (SAMPLE / "lists" / "TBX11K_trainval.txt").read_text().split()
    assert [f"tb/{s.image.name}" for s in ds] == listed

    yy, xx = np.mgrid[0:512, 0:512] + 0.5  # pixel centres
    for sample in ds:
        mask = sample.mask()
        assert mask.shape == (512, 512) and mask.dtype == bool
        boxes = _scaled_boxes(SAMPLE / "annotations" / "xml" / f"{sample.image.stem}.xml",
                              512, 512)
        # exact: a pixel is in the mask when its centre is in one of the scaled boxes
        expected = np.zeros((512, 512), dtype=bool)
        for x0, y0, x1, y1 in boxes:
            expected |= (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
        assert mask.sum() == expected.sum() and np.array_equal(mask, expected)
        # and the pixel count is the continuous area of the union, to within the edges
        area = _union_area(boxes)
        perimeter = sum(2 * ((x1 - x0) + (y1 - y0)) for x0, y0, x1, y1 in boxes)
        assert abs(int(mask.sum()) - area) <= 0.5 * perimeter + 4
        assert abs(int(mask.sum()) - area) / area < 0.03


def test_sample_first_image_boxes_in_scan_coordinates_scaled():
    ds = open_dataset(SAMPLE, split="val")
    first = next(s for s in ds if s.image.stem == "tb0003")
    # tb0003.xml: scan 2840 x 2827, box (1446, 250, 2007, 1017)
    x0, y0, x1, y1 = first.boxes[0]
    assert x0 == pytest.approx(1446 * 512 / 2840) and y1 == pytest.approx(1017 * 512 / 2827)
    assert first.size == (512, 512)
    image = first.read()
    assert image.shape == (512, 512, 3) and image.dtype == np.float32
    assert open_dataset(SAMPLE, split="train").samples == []  # the sample's train list is empty
