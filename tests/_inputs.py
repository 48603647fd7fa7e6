"""The annotation input folder the annotate and Ray tests share (``input_folder``)."""

from __future__ import annotations

import shutil
from pathlib import Path

from PIL import Image


def input_folder(lesion_dir: Path, root: Path) -> Path:
    """Ten synthetic lesion images in ``root`` (6 diseased, 4 healthy; one resized to a
    non-square size), a zero-byte file and a text file posing as a PNG."""
    images = sorted((Path(lesion_dir) / "images").rglob("*.png"))
    picked = [p for p in images if p.parent.name == "diseased"][:6] + [p for p in images if p.parent.name == "healthy"][:4]
    for p in picked:
        (root / p.parent.name).mkdir(exist_ok=True)
        shutil.copy(p, root / p.parent.name / p.name)
    odd = root / "diseased" / picked[0].name
    Image.open(odd).resize((80, 50)).save(odd)
    (root / "broken").mkdir()
    (root / "broken" / "empty.png").write_bytes(b"")
    (root / "broken" / "text.png").write_text("not an image")
    return root
