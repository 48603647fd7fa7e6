"""Folders written by AAX 0.1.0 before the package was laid out by stage still load.

``tests/data/v0.1.0`` holds what that code wrote for 16 synthetic ``lesion`` images of
32 px (``aax.data.synth.generate("lesion", "data", n_per_class=8, size=32, seed=0)``,
``aax.train("data", "run", TrainConfig(epochs=1, patience=1, image_size=32, seed=0))``,
``aax.annotate_to_folder(ensemble, "data", "store")``):

- ``run/``: ``aax.json``, ``history.csv`` and ``novelty.npz`` as written. The member
  checkpoints (megabytes each) are not kept: the test writes them in the format that
  code wrote (the dict keys below), with untrained weights. Machine paths in the
  manifest's provenance fields were cut to relative ones.
- ``store/``: the annotation folder as written (``annotations.sqlite``, masks, summary,
  review list), its recorded paths likewise made relative.

Nothing here writes into ``tests/data``; each test copies what it needs.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import aax
from aax.annotation.review_list import review_list
from aax.annotation.store import open_store
from aax.data import synth
from aax.interop.export import export_png
from aax.models.members import build_member

OLD = Path(__file__).resolve().parent / "data" / "v0.1.0"


@pytest.fixture()
def old_run(tmp_path: Path) -> Path:
    """The 0.1.0 RUN folder, with member checkpoints in 0.1.0's format."""
    run = tmp_path / "run"
    shutil.copytree(OLD / "run", run)
    manifest = json.loads((run / "aax.json").read_text())
    torch.manual_seed(0)
    for entry in manifest["members"]:
        member = build_member(entry["name"], len(manifest["classes"]), entry["dropout"])
        torch.save({"state_dict": member.state_dict(), "member": entry["name"], "classes": manifest["classes"],
                    "image_size": manifest["image_size"], "normalisation": manifest["normalisation"],
                    "dropout": entry["dropout"], "aax_version": manifest["aax_version"],
                    "epoch": entry["best_epoch"], "val_loss": entry["val_loss"],
                    "val_accuracy": entry["val_accuracy"]}, run / entry["checkpoint"])
    return run


def test_a_0_1_0_run_loads_and_annotates(old_run: Path, tmp_path: Path) -> None:
    images = synth.generate("lesion", tmp_path / "data", n_per_class=2, size=32, seed=0) / "images"
    paths = sorted(images.rglob("*.png"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing in the old folder needs a warning
        ensemble = aax.Ensemble.load(old_run, device="cpu")
    assert list(ensemble.members) == ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"]
    assert ensemble.maps.map_stride == 16 and ensemble.maps.refine == "superpixels"
    assert ensemble.novelty is not None and ensemble.novelty.ready  # novelty.npz and its thresholds
    records = list(aax.annotate(ensemble, paths, mc_passes=4, workers=0))
    assert [Path(r.image) for r in records] == paths
    assert all(r.status == "ok" and r.decision is not None for r in records)
    assert all(r.members[0].novelty is not None for r in records)

    summary = aax.annotate_to_folder(ensemble, images, tmp_path / "out", mc_passes=4, workers=0, progress=False)
    assert summary["images"] == len(paths) and summary["errors"] == 0


def test_a_0_1_0_store_loads_and_exports(tmp_path: Path) -> None:
    out = tmp_path / "store"
    shutil.copytree(OLD / "store", out)
    store = open_store(out)
    rows = list(store.rows())
    summary = store.summary()
    settings = store.settings
    store.close()
    assert len(rows) == 24 and summary["images"] == 24 and summary["errors"] == 0
    assert summary["masks"] == sum(r["mask"] is not None for r in rows) > 0
    assert settings["store"] == 2 and settings["classes"] == ["diseased", "healthy"]
    assert all(len(r["members"]) == 3 and r["members"][0]["novelty"] for r in rows)
    assert all((out / r["mask"]).is_file() for r in rows if r["mask"])

    exported = export_png(out, tmp_path / "png")
    assert exported["masks"] == summary["masks"]
    flagged = review_list(out, tmp_path / "review")
    assert flagged["n"] == summary["decisions"].get("review", 0)
    assert json.loads((tmp_path / "review" / "review.json").read_text())
