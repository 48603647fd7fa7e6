"""report.html: one self-contained file that a browser renders."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from test_evaluate import UNSEEN, FakeEnsemble, fake_data

from aax.evaluation.evaluate import evaluate
from aax.evaluation.examples import write_report
from aax.evaluation.report.figures import mask_tile, shrink_map, shrink_mask


@pytest.fixture
def evaluated(tmp_path):
    out = tmp_path / "ev"
    ens = FakeEnsemble()
    result = evaluate(ens, fake_data(tmp_path), unseen=[tmp_path / n for n in UNSEEN], out=out)
    return result, out / "report.html", ens


def _images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]


def test_report_is_self_contained(evaluated):
    result, path, _ = evaluated
    html = path.read_text()
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    # nothing fetched from elsewhere: every src is an embedded PNG
    assert not re.search(r'(src|href)="(?!data:)', html)
    pngs = _images(html)
    assert all(p[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    # 4 example rows x (input, gt, 3 x (map, mask), AAX mask) tiles + 3 charts
    assert len(pngs) == 4 * 9 + 3
    assert path.stat().st_size < 1_500_000


def test_report_content(evaluated):
    _, path, _ = evaluated
    html = path.read_text()
    for text in ("Classification (paper tables 1 and 3)", "Masks (paper tables 2 and 4)",
                 "Confusion matrices", "Risk and coverage", "Uncertainty per member", "Open set",
                 "Input errors (1)", "cannot decode"):
        assert text in html
    # rows of the grid are labelled by outcome: a.png correct, b.png flagged, d.png wrong
    assert html.count('class="tag correct"') == 2
    assert html.count('class="tag flagged"') == 1
    assert html.count('class="tag wrong"') == 1
    # the flagged b.png shows its draft (all three maps on its lesion) where a mask would be
    assert html.count("draft, IoU 1.00") == 1 and 'alt="AAX draft for the reviewer"' in html
    assert "<td>AAX (fused maps of the agreeing members)</td>" in html
    assert "AAX&#x27;s masks: min fusion of the agreeing members&#x27; maps." in html  # how masks were made
    assert "A member alone is flagged when its own u &gt; theta" in html  # how members were scored


def test_report_rows_are_capped(tmp_path):
    from test_evaluate import SPEC

    spec = {f"{i}_{k}": v for i in range(6) for k, v in SPEC.items() if v[5]}  # 24 readable images
    out = tmp_path / "ev"
    evaluate(FakeEnsemble(spec=spec), fake_data(tmp_path, spec), out=out, max_examples=8)
    html = (out / "report.html").read_text()
    assert html.count('class="rowlabel"') == 8
    assert 'class="tag wrong"' in html and 'class="tag correct"' in html  # both kinds shown


def test_write_report_from_records(evaluated, tmp_path):
    result, _, ens = evaluated
    records = [r for r in ens.annotate(fake_data(tmp_path), keep_saliency=True) if r.status == "ok"]
    gt = {str(s.image): s.gt for s in fake_data(tmp_path) if s.gt is not None}
    path = write_report(result, records, tmp_path / "again", ground_truth=gt, max_rows=3)
    html = path.read_text()
    assert html.count('class="rowlabel"') == 3
    assert "IoU 1.00" in html  # a.png's AAX mask against its ground truth


def test_tiles():
    m = np.zeros((200, 100), bool)
    m[50:150, 25:75] = True
    small = shrink_mask(m)
    assert small.shape == (112, 56) and small.mean() == pytest.approx(m.mean(), abs=0.02)
    assert shrink_map(np.ones((20, 40), np.float32)).shape == (20, 40)  # never enlarged
    img = np.full((56, 112, 3), 200, np.uint8)
    tile = mask_tile(img, np.ones((56, 112), bool), gt=np.ones((56, 112), bool))
    assert tile.shape == img.shape and tuple(tile[0, 0]) == (40, 220, 40)  # outline on the border
    assert tuple(mask_tile(img, None)[10, 10]) == (90, 90, 90)  # dimmed, no tint


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def screenshot(html: Path, png: Path, width: int = 1400, height: int = 3000) -> None:
    """Render ``html`` with headless Chromium into ``png``."""
    browser = _chromium()
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        "--hide-scrollbars",  # a scrollbar is the browser's, not the page's content
                        f"--user-data-dir={profile}", f"--screenshot={png}", f"--window-size={width},{height}",
                        html.resolve().as_uri()],
                       check=True, capture_output=True)


def test_report_renders_in_a_browser(evaluated, tmp_path):
    if _chromium() is None:
        pytest.skip("no chromium on this machine")
    from PIL import Image

    _, path, _ = evaluated
    png = tmp_path / "shot.png"
    screenshot(path, png)
    shot = np.asarray(Image.open(io.BytesIO(png.read_bytes())).convert("RGB")).astype(int)
    assert shot.shape[:2] == (3000, 1400)
    ink = (shot.sum(axis=2) < 600)  # anything that is not near-white
    rows = np.flatnonzero(ink.any(axis=1))
    # the page is drawn (text, tables, images), and it is long: content well down the page
    assert ink.mean() > 0.02 and rows.max() > 1500
    # the content is centred in a max-width column: nothing drawn at the far right
    assert not ink[:, 1380:].any()
