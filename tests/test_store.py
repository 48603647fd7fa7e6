"""The annotation store: rows and files agree after any crash; settings are guarded."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
from PIL import Image

from aax.annotation.records import AnnotationRecord, MemberResult
from aax.annotation.store import SCHEMA, AnnotationStore, SettingsMismatch, relative_name

SETTINGS = {"run": "r", "theta": 0.1, "tau": 0.5, "mc_passes": 30, "quorum": 2,
            "classes": ["diseased", "healthy"], "negative_class": "healthy"}


def positive(image: str, h: int = 6, w: int = 8) -> AnnotationRecord:
    mask = np.zeros((h, w), bool)
    mask[1:3, 2:5] = True
    members = [MemberResult("resnet50", [0.9, 0.1], 0.01, "diseased")]
    return AnnotationRecord(image=image, decision="diseased", reason="consensus",
                            agreeing=["resnet50"], members=members, mask=mask, size=(h, w))


def test_rows_and_mask_files(tmp_path):
    root = tmp_path / "in"
    store = AnnotationStore(tmp_path / "out", SETTINGS, input_root=root)
    store.add(positive(str(root / "a" / "x.png")))
    store.add(AnnotationRecord(image=str(root / "b.png"), decision="healthy", reason="consensus", size=(4, 4)))
    store.add(AnnotationRecord(image=str(root / "c.png"), status="error", error="zero bytes"))
    store.close()
    image = Image.open(tmp_path / "out" / "masks" / "a" / "x.png")
    assert image.mode == "1"  # 1-bit black and white; 0/255 once converted to grey
    assert set(np.unique(image.convert("L"))) == {0, 255}
    assert np.array_equal(np.asarray(image), positive("x").mask)
    store = AnnotationStore(tmp_path / "out", SETTINGS)
    rows = list(store.rows())
    assert [r["image"] for r in rows] == ["a/x.png", "b.png", "c.png"]  # relative to the input root
    assert store.resolve("a/x.png") == root.resolve() / "a" / "x.png"
    assert rows[0]["mask"] == "masks/a/x.png" and rows[0]["mask_area"] == 6
    assert rows[0]["members"][0]["predicted"] == "diseased"
    assert rows[1]["mask"] is None
    summary = store.summary()
    assert summary["decisions"] == {"diseased": 1, "healthy": 1, "error": 1}
    assert summary["flag_rate"] == 0.0 and summary["error_list"] == [{"image": "c.png", "error": "zero bytes"}]


def test_other_settings_refused_unless_overwrite(tmp_path):
    AnnotationStore(tmp_path, SETTINGS).close()
    with pytest.raises(SettingsMismatch, match=r"theta: 0.1 -> 0.2.*--overwrite"):
        AnnotationStore(tmp_path, {**SETTINGS, "theta": 0.2})
    store = AnnotationStore(tmp_path, {**SETTINGS, "theta": 0.2}, overwrite=True)
    assert store.settings["theta"] == 0.2
    store.close()


def test_a_folder_whose_settings_held_private_fields_is_resumed(tmp_path):
    """Older folders hold MapOptions' private view list in their
    settings; the same options without it resume them (and rewrite the row), while any
    other difference is still refused."""
    maps = {"map_stride": 16, "fusion": "min"}
    AnnotationStore(tmp_path, {**SETTINGS, "maps": {**maps, "_views": [[1.0, False]]}}).close()
    store = AnnotationStore(tmp_path, {**SETTINGS, "maps": maps})
    assert store.settings["maps"] == maps
    store.close()
    with pytest.raises(SettingsMismatch, match="map_stride"):
        AnnotationStore(tmp_path, {**SETTINGS, "maps": {**maps, "map_stride": 32}})


def test_recover_removes_orphans_and_redoes_rows_without_masks(tmp_path):
    store = AnnotationStore(tmp_path, SETTINGS, input_root=tmp_path)
    store.add(positive(str(tmp_path / "kept.png")))
    store.add(positive(str(tmp_path / "lost.png")))
    store.close()
    # a crash between a mask file and its row leaves an orphan and a temporary file
    (tmp_path / "masks" / "orphan.png").write_bytes(b"x")
    (tmp_path / "masks" / "half.png.tmp").write_bytes(b"x")
    # a row whose mask vanished must be redone
    (tmp_path / "masks" / "lost.png").unlink()
    store = AnnotationStore(tmp_path, SETTINGS)
    assert store.done() == {"kept.png"}
    files = sorted(p.name for p in (tmp_path / "masks").rglob("*") if p.is_file())
    assert files == ["kept.png"]
    store.close()


def test_uncommitted_rows_are_not_done(tmp_path):
    store = AnnotationStore(tmp_path, SETTINGS, input_root=tmp_path)
    store.add(positive(str(tmp_path / "a.png")))  # pending in an open transaction
    other = sqlite3.connect(tmp_path / "annotations.sqlite")
    assert other.execute("SELECT COUNT(*) FROM annotations").fetchone()[0] == 0
    store.commit()
    assert other.execute("SELECT COUNT(*) FROM annotations").fetchone()[0] == 1
    store.close()


def test_relative_name_outside_root_is_stable_and_distinct(tmp_path):
    a = relative_name(tmp_path / "x" / "img.png", tmp_path / "y")
    b = relative_name(tmp_path / "z" / "img.png", tmp_path / "y")
    assert a.parts[0] == "_external" and a != b and a == relative_name(tmp_path / "x" / "img.png", tmp_path / "y")
    assert str(relative_name(tmp_path / "y" / "s" / "i.png", tmp_path / "y")) == "s/i.png"


def test_summary_file_is_json(tmp_path):
    store = AnnotationStore(tmp_path, SETTINGS)
    store.add(AnnotationRecord(image="a", decision="review", reason="uncertain", size=(2, 2)))
    summary = store.write_summary()
    store.close()
    assert json.loads((tmp_path / "summary.json").read_text())["flag_rate"] == summary["flag_rate"] == 1.0


def test_one_image_one_key_whatever_form_its_path_takes(tmp_path, monkeypatch):
    root = tmp_path / "in"
    (root / "a").mkdir(parents=True)
    store = AnnotationStore(tmp_path / "out", SETTINGS, input_root=root)
    monkeypatch.chdir(root)
    assert store.key(root / "a" / "x.png") == store.key("a/x.png") == "a/x.png"
    assert store.key(root / "a" / ".." / "a" / "x.png") == "a/x.png"
    outside = tmp_path / "elsewhere" / "y.png"
    assert store.key(outside) == outside.resolve().as_posix()  # outside the root: absolute
    store.close()


def test_mask_files_are_named_by_stem_and_never_collide(tmp_path):
    root = tmp_path / "in"
    store = AnnotationStore(tmp_path / "out", SETTINGS, input_root=root)
    store.add(positive(str(root / "tb" / "tb0003.png")))
    store.add(positive(str(root / "tb" / "tb0003.jpg")))  # same stem, another image
    store.add(positive(str(tmp_path / "far" / "z.dcm")))
    store.close()
    masks = [r["mask"] for r in AnnotationStore(tmp_path / "out", SETTINGS).rows()]
    assert masks[0] == "masks/tb/tb0003.png"
    assert masks[1] == "masks/tb/tb0003.jpg.png"
    assert masks[2].startswith("masks/_external/") and masks[2].endswith("/z.png")
    assert len(set(masks)) == 3 and all((tmp_path / "out" / m).is_file() for m in masks)


def test_drafts_are_stored_apart_from_masks_and_recovered_alike(tmp_path):
    root = tmp_path / "in"
    store = AnnotationStore(tmp_path / "out", SETTINGS, input_root=root)
    draft = np.zeros((6, 8), bool)
    draft[2:4, 1:6] = True
    store.add(AnnotationRecord(image=str(root / "f.png"), decision="review", reason="uncertain", size=(6, 8),
                               draft=draft, draft_class="diseased"))
    store.add(positive(str(root / "p.png")))
    store.close()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "drafts" / "f.png")), draft)
    assert not (tmp_path / "out" / "masks" / "f.png").exists()
    store = AnnotationStore(tmp_path / "out", SETTINGS)
    rows = {r["image"]: r for r in store.rows()}
    assert (rows["f.png"]["mask"], rows["f.png"]["draft"], rows["f.png"]["draft_class"]) == (
        None, "drafts/f.png", "diseased")
    assert rows["p.png"]["draft"] is None and rows["p.png"]["draft_class"] is None
    assert (store.summary()["masks"], store.summary()["drafts"]) == (1, 1)
    store.close()
    (tmp_path / "out" / "drafts" / "f.png").unlink()  # a lost draft file: the row is redone
    (tmp_path / "out" / "drafts" / "orphan.png").write_bytes(b"x")
    store = AnnotationStore(tmp_path / "out", SETTINGS)
    assert store.done() == {"p.png"} and not (tmp_path / "out" / "drafts" / "orphan.png").exists()


def test_a_folder_made_before_drafts_gains_the_columns(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    db = sqlite3.connect(out / "annotations.sqlite")
    old = [line for line in SCHEMA.splitlines() if "draft" not in line]
    db.executescript("\n".join(old).replace("created_at TEXT NOT NULL,", "created_at TEXT NOT NULL"))
    db.execute("INSERT INTO annotations (image, status, decision, created_at) VALUES ('a.png', 'ok', 'healthy', 'now')")
    db.commit()
    db.close()
    store = AnnotationStore(out, SETTINGS)
    row = next(store.rows())
    assert row["image"] == "a.png" and row["draft"] is None
    store.add(AnnotationRecord(image="b.png", decision="review", reason="uncertain", size=(2, 2),
                               draft=np.ones((2, 2), bool), draft_class="diseased"))
    rows = list(store.rows())
    store.close()
    assert rows[1]["draft"].startswith("drafts/") and (out / rows[1]["draft"]).is_file()
