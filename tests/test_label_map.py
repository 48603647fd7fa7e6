"""Datasets whose class names differ from the run's: a clear error, and --label-map."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from aax.cli import main
from aax.data import open_dataset


def renamed(lesion_dir: Path, root: Path, names: dict[str, str], per_class: int = 3) -> Path:
    """A copy of a few lesion images with the classes renamed (``names``: old -> new)."""
    for old, new in names.items():
        target = root / "images" / new
        target.mkdir(parents=True)
        for p in sorted((lesion_dir / "images" / old).glob("*.png"))[:per_class]:
            shutil.copy(p, target / p.name)
    return root


def test_open_dataset_renames_labels_before_checking_them(lesion_dir, tmp_path):
    data = renamed(lesion_dir, tmp_path / "d", {"diseased": "tb", "healthy": "health"})
    plain = open_dataset(data, classes=["diseased", "healthy"])
    assert len(plain) == 0 and {e.reason.split(" (")[0] for e in plain.errors} == {
        "unknown label 'tb'", "unknown label 'health'"}
    mapped = open_dataset(data, classes=["diseased", "healthy"], label_map={"tb": "diseased", "health": "healthy"})
    assert len(mapped) == 6 and not mapped.errors and mapped.counts() == {"diseased": 3, "healthy": 3}
    partial = open_dataset(data, label_map={"tb": "diseased"})  # labels not named keep theirs
    assert partial.classes == ["diseased", "health"]


@pytest.mark.slow
def test_evaluate_names_unknown_labels_and_takes_a_label_map(trained_run, lesion_dir, tmp_path, capsys):
    data = renamed(lesion_dir, tmp_path / "d", {"diseased": "tb", "healthy": "health"})
    out = tmp_path / "eval"
    assert main(["evaluate", str(trained_run), str(data), "--out", str(out), "--no-report",
                 "--mc-passes", "4"]) == 2
    err = capsys.readouterr().err
    assert "'tb' (3 images)" in err and "'health' (3 images)" in err
    assert "run's classes (diseased, healthy)" in err and "--label-map" in err
    assert main(["evaluate", str(trained_run), str(data), "--out", str(out), "--no-report",
                 "--mc-passes", "4", "--label-map", "tb=diseased,health=healthy"]) == 0
    assert "6 images" in (out / "tables.md").read_text()


def test_data_check_takes_a_label_map(lesion_dir, tmp_path, capsys):
    data = renamed(lesion_dir, tmp_path / "d", {"diseased": "tb", "healthy": "health"})
    assert main(["data", "check", str(data), "--no-progress", "--classes", "diseased,healthy",
                 "--label-map", "tb=diseased,health=healthy"]) == 0
    assert "no unusable files" in capsys.readouterr().out
