"""``aax data check``: exit status, text and JSON output."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from aax.cli import main

# The real TBX11K sample: $AAX_TBX11K_SAMPLE, else shared/data/tbx11k-sample in the
# repository or beside it.
_REPO = Path(__file__).resolve().parent.parent
SAMPLE = next((p for p in (Path(os.environ.get("AAX_TBX11K_SAMPLE", _REPO / "shared" / "data" / "tbx11k-sample")),
                           _REPO.parent / "shared" / "data" / "tbx11k-sample") if p.is_dir()),
              _REPO / "shared" / "data" / "tbx11k-sample")


def _dataset(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for label in ("healthy", "diseased"):
        for i in range(2):
            path = root / "images" / label / f"{label}{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path)
    mask = root / "masks" / "diseased" / "diseased0.png"
    mask.parent.mkdir(parents=True)
    Image.fromarray(np.full((24, 24), 255, dtype=np.uint8)).save(mask)
    return root


def test_check_clean_dataset_exits_0(tmp_path, capsys):
    assert main(["data", "check", str(_dataset(tmp_path)), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "diseased        2        1" in out and "healthy         2        0" in out
    assert "no unusable files" in out


def test_check_json_and_bad_files_exit_1(tmp_path, capsys):
    root = _dataset(tmp_path)
    (root / "images" / "healthy" / "empty.png").write_bytes(b"")
    good = root / "images" / "diseased" / "diseased1.png"
    data = good.read_bytes()
    (root / "images" / "diseased" / "cut.png").write_bytes(data[: len(data) // 2])
    assert main(["data", "check", str(root), "--json"]) == 1
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # exactly one JSON object on stdout
    assert report["ok"] is False and report["format"] == "folder"
    assert report["n_samples"] == 4 and report["n_masks"] == 1
    assert report["classes"] == {"diseased": {"images": 2, "masks": 1},
                                 "healthy": {"images": 2, "masks": 0}}
    reasons = {Path(e["path"]).name: e["reason"] for e in report["errors"]}
    assert reasons["empty.png"] == "empty file (0 bytes)"
    assert "truncated" in reasons["cut.png"]  # found only by decoding
    assert report["n_errors"] == 2


def test_check_text_lists_errors_and_shows_progress(tmp_path, capsys):
    root = _dataset(tmp_path)
    (root / "images" / "healthy" / "notes.png").write_text("text")
    assert main(["data", "check", str(root)]) == 1
    captured = capsys.readouterr()
    assert "1 unusable file(s):" in captured.out
    assert "notes.png: not an image" in captured.out
    assert "decoding" in captured.err  # the progress bar goes to stderr


def test_check_bad_source_exits_2(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "nowhere")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["data"]) == 2


def test_check_tbx11k_sample_and_classes_option(tmp_path, capsys):
    if SAMPLE.is_dir():
        assert main(["data", "check", str(SAMPLE), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["classes"] == {"tb": {"images": 16, "masks": 16}}
    root = _dataset(tmp_path)
    assert main(["data", "check", str(root), "--json", "--classes", "healthy"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["n_samples"] == 2 and report["n_errors"] == 2
    assert all("unknown label 'diseased'" in e["reason"] for e in report["errors"])


def test_split_writes_a_held_out_test_manifest(tmp_path, capsys):
    """``aax data split``: class by class, every image on exactly one side, masks kept,
    the same seed the same split, and manifests every command opens."""
    from aax.data import open_dataset

    rng = np.random.default_rng(1)
    root = tmp_path / "data"
    for label in ("healthy", "diseased"):
        for i in range(8):
            path = root / "images" / label / f"{label}{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
            if label == "diseased":
                mask = root / "masks" / label / f"{label}{i}.png"
                mask.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.full((16, 16), 255, dtype=np.uint8)).save(mask)
    out = tmp_path / "split"
    assert main(["data", "split", str(root), "--out", str(out), "--test-fraction", "0.25", "--seed", "3"]) == 0
    assert "test: " in capsys.readouterr().out
    train, test = open_dataset(out / "train.csv"), open_dataset(out / "test.csv")
    assert train.counts() == {"diseased": 6, "healthy": 6} and test.counts() == {"diseased": 2, "healthy": 2}
    names = [s.image.resolve() for s in [*train, *test]]
    assert len(set(names)) == 16 == len(names)
    assert all(s.has_mask for s in test if s.label == "diseased")
    first = (out / "test.csv").read_text()
    assert main(["data", "split", str(root), "--out", str(tmp_path / "again"), "--seed", "3",
                 "--test-fraction", "0.25"]) == 0
    assert (tmp_path / "again" / "test.csv").read_text().splitlines()[1:] == first.splitlines()[1:]
    assert main(["data", "split", str(root), "--out", str(out), "--test-fraction", "1.5"]) == 2
    assert "the test fraction must be in (0, 1), got 1.5" in capsys.readouterr().err


def test_split_refuses_box_ground_truth(tmp_path):
    """Boxes (TBX11K) cannot go into a manifest: a clear error, not masks lost in silence."""
    import pytest

    from aax.data import Dataset, Sample
    from aax.data.split import split_manifests

    data = Dataset([Sample(tmp_path / "a.png", "tb", boxes=((0.0, 0.0, 4.0, 4.0),)),
                    Sample(tmp_path / "b.png", "healthy", boxes=())])
    with pytest.raises(ValueError, match="a.png: its ground truth is boxes"):
        split_manifests(data, tmp_path / "out")
