"""Label Studio export, reviewed labels back (`aax import`), exports preferring them,
and `aax review-stats`, on a hand-made store whose answers are known."""

from __future__ import annotations

import json
import sqlite3
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from _stores import DRAFTS, MODEL_MASKS, ROWS, H, W, box, make_store, short

from aax.cli import main
from aax.interop import brush
from aax.interop.labelstudio import (config_names, confidence, export_label_studio, label_config, local_files_url,
                                    prediction)
from aax.interop.review_import import import_file
from aax.interop.reviews import ReviewImportError, load_mask


@pytest.fixture()
def store(tmp_path):
    return make_store(tmp_path)


def _tasks(out, tmp_path, **options):
    export_label_studio(out, tmp_path / "ls", **options)
    return json.loads((tmp_path / "ls" / "tasks.json").read_text())


def test_config_lists_every_class_review_and_positive_brushes():
    root = ET.fromstring(label_config(["diseased", "healthy", "other"], "healthy"))
    assert [c.get("value") for c in root.find("Choices")] == ["diseased", "healthy", "other", "review"]
    assert [c.get("value") for c in root.find("BrushLabels")] == ["diseased", "other"]
    assert root.find("Image").get("value") == "$image"
    names = config_names(label_config(["a", "b"], "b"))
    assert names == {"image": "image", "field": "image", "decision": "decision", "mask": "mask", "reason": "reason"}
    custom = config_names('<View><Image name="img" value="$url"/><Choices name="cls" toName="img"/>'
                          '<BrushLabels name="seg" toName="img"/></View>')
    assert (custom["image"], custom["field"], custom["decision"], custom["mask"]) == ("img", "url", "cls", "seg")


def test_tasks_carry_decision_mask_scores_and_member_fields(store, tmp_path):
    images, out = store
    tasks = _tasks(out, tmp_path, image_root="http://files.example/lesion")
    assert len(tasks) == len(ROWS)
    by_image = {short(t["data"]["aax_image"]): t for t in tasks}
    d0 = by_image["diseased/d0.png"]
    assert d0["data"]["image"] == "http://files.example/lesion/diseased/d0.png"
    assert d0["data"]["aax_u_resnet50"] == pytest.approx(0.01)
    assert d0["data"]["aax_p_diseased_densenet121"] == pytest.approx(0.4)
    pred = d0["predictions"][0]
    assert pred["model_version"] == "lesion-run@0123456789abcdef"
    regions = {r["type"]: r for r in pred["result"]}
    assert regions["choices"]["value"]["choices"] == ["diseased"]
    assert regions["textarea"]["value"]["text"] == ["consensus"]
    mask = regions["brushlabels"]
    assert (mask["original_height"], mask["original_width"]) == MODEL_MASKS["diseased/d0.png"].shape
    assert np.array_equal(brush.rle_to_mask(mask["value"]["rle"], 32, 40), MODEL_MASKS["diseased/d0.png"])
    # no brush for negatives and for flagged images without a draft; the flag's reason is kept
    h2 = by_image["healthy/h2.png"]["predictions"][0]
    assert [r["type"] for r in h2["result"]] == ["choices", "textarea"]
    assert h2["result"][0]["value"]["choices"] == ["review"]
    assert h2["result"][1]["value"]["text"] == ["no-consensus"]


def test_a_flagged_image_carries_its_draft_for_the_reviewer_and_stays_flagged(store, tmp_path):
    _, out = store
    result = export_label_studio(out, tmp_path / "ls")
    assert (result["masks"], result["drafts"]) == (len(MODEL_MASKS), len(DRAFTS))
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    d2 = next(t for t in tasks if short(t["data"]["aax_image"]) == "diseased/d2.png")["predictions"][0]
    regions = {r["type"]: r for r in d2["result"]}
    assert regions["choices"]["value"]["choices"] == ["review"]
    draft = regions["brushlabels"]
    assert draft["id"] == "aax-draft" and draft["value"]["brushlabels"] == ["diseased"]
    assert np.array_equal(brush.rle_to_mask(draft["value"]["rle"], 32, 40), DRAFTS["diseased/d2.png"])
    # a decided image's prediction never shows a draft, even when handed one
    decided = prediction("diseased", "consensus", None, (H, W), 0.9, "v", draft=DRAFTS["diseased/d2.png"],
                         draft_class="diseased")
    assert [r["type"] for r in decided["result"]] == ["choices", "textarea"]


def test_flagged_images_score_lowest(store, tmp_path):
    _, out = store
    scores = {short(t["data"]["aax_image"]): t["predictions"][0]["score"]
              for t in _tasks(out, tmp_path)}
    flagged = [scores[n] for n, r in ROWS.items() if r[0] == "review"]
    decided = [scores[n] for n, r in ROWS.items() if r[0] != "review"]
    assert max(flagged) < 0.5 < min(decided)
    # the more uncertain flagged image first: d2 (mean u 0.17) before h2 (mean u 0.073)
    assert scores["diseased/d2.png"] < scores["healthy/h2.png"]
    # d0: agreeing members resnet50 (0.9) and efficientnet-b0 (0.8) -> 0.5 + 0.5 * 0.85
    assert scores["diseased/d0.png"] == pytest.approx(0.925)


def test_confidence_without_members_is_zero():
    assert confidence("diseased", [], [], ["diseased", "healthy"]) == 0.0


def test_local_files_urls(store, tmp_path):
    images, out = store
    tasks = _tasks(out, tmp_path, local_files=tmp_path)
    assert {t["data"]["image"] for t in tasks} >= {"/data/local-files/?d=input/diseased/d0.png"}
    with pytest.raises(ValueError, match="not under the local-files document root"):
        local_files_url(images / "diseased/d0.png", tmp_path / "elsewhere")
    # an image outside the document root is named in the result, the others still exported
    result = export_label_studio(out, tmp_path / "ls2", local_files=images / "diseased")
    assert result["tasks"] == 3 and len(result["errors"]) == 3
    assert all("healthy" in e["image"] for e in result["errors"])


def _annotation(task: dict, decision: str, mask: np.ndarray | None, ann_id: int, note: str | None = None) -> dict:
    result = [{"from_name": "decision", "to_name": "image", "type": "choices", "value": {"choices": [decision]}}]
    if mask is not None:
        result.append({"from_name": "mask", "to_name": "image", "type": "brushlabels",
                       "original_width": mask.shape[1], "original_height": mask.shape[0], "image_rotation": 0,
                       "value": {"format": "rle", "rle": brush.mask_to_rle(mask), "brushlabels": [decision]}})
    if note is not None:
        result.append({"from_name": "reason", "to_name": "image", "type": "textarea", "value": {"text": [note]}})
    return {"id": ann_id, "result": result, "was_cancelled": False, "completed_by": 1,
            "updated_at": f"2026-11-26T05:00:{ann_id:02d}Z"}


REVIEWED_D0 = box(6, 4, 20, 24)  # 14 of the model's 16 rows: IoU 280 / 320
REVIEWED_D2 = box(0, 0, 8, 8)


def _export(tasks: list[dict], path, images) -> None:
    """A Label Studio JSON export: the tasks, as imported, with a reviewer's annotations."""
    plan = {"diseased/d0.png": ("diseased", REVIEWED_D0), "diseased/d1.png": ("healthy", None),
            "diseased/d2.png": ("diseased", REVIEWED_D2), "healthy/h0.png": ("healthy", None),
            "healthy/h2.png": ("diseased", None)}
    out = []
    for i, task in enumerate(tasks):
        name = "/".join(task["data"]["image"].split("/")[-2:])
        annotations = []
        if name in plan:
            annotations = [_annotation(task, *plan[name], ann_id=10 + i,
                                       note="faint lesion" if name == "healthy/h2.png" else None)]
        if name == "diseased/d0.png":  # an earlier, cancelled annotation is ignored
            annotations.insert(0, {"id": 1, "result": [], "was_cancelled": True})
        out.append({"id": i + 1, "data": task["data"], "annotations": annotations,
                    "predictions": task["predictions"]})
    path.write_text(json.dumps(out))


def test_import_records_reviews_beside_the_model(store, tmp_path):
    images, out = store
    _export(_tasks(out, tmp_path), tmp_path / "export.json", images)
    result = import_file(out, "label-studio", tmp_path / "export.json")
    assert (result["added"], result["updated"], result["unchanged"]) == (5, 0, 0)
    db = sqlite3.connect(out / "annotations.sqlite")
    reviews = {short(i): (d, m, note) for i, d, m, note in
               db.execute("SELECT image, decision, mask, note FROM reviews")}
    assert reviews["diseased/d1.png"] == ("healthy", None, None)
    assert reviews["healthy/h2.png"][2] == "faint lesion"
    assert np.array_equal(load_mask(out / reviews["diseased/d0.png"][1]), REVIEWED_D0)
    # the model's rows are kept as they were
    model = {short(i): d for i, d in db.execute("SELECT image, decision FROM annotations")}
    assert model["diseased/d1.png"] == "diseased"
    # the same export again changes nothing
    again = import_file(out, "label-studio", tmp_path / "export.json")
    assert (again["added"], again["updated"], again["unchanged"]) == (0, 0, 5)


def test_changed_review_replaces_the_earlier_one(store, tmp_path):
    images, out = store
    tasks = _tasks(out, tmp_path)
    _export(tasks, tmp_path / "export.json", images)
    import_file(out, "label-studio", tmp_path / "export.json")
    exported = json.loads((tmp_path / "export.json").read_text())
    d0 = next(t for t in exported if t["data"]["aax_image"].endswith("d0.png"))
    d0["annotations"].append(_annotation(d0, "healthy", None, ann_id=99))  # later: not diseased after all
    (tmp_path / "export.json").write_text(json.dumps(exported))
    result = import_file(out, "label-studio", tmp_path / "export.json")
    assert (result["added"], result["updated"], result["unchanged"]) == (0, 1, 4)
    db = sqlite3.connect(out / "annotations.sqlite")
    decision, mask = db.execute("SELECT decision, mask FROM reviews WHERE image LIKE '%d0.png'").fetchone()
    assert (decision, mask) == ("healthy", None)
    assert not list((out / "reviews" / "masks" / "diseased").glob("d0*"))


def test_export_for_other_images_is_refused_by_name(store, tmp_path):
    images, out = store
    tasks = _tasks(out, tmp_path)
    tasks[0]["data"]["aax_image"] = "/elsewhere/stranger.png"
    _export(tasks, tmp_path / "export.json", images)
    with pytest.raises(ReviewImportError, match="stranger.png"):
        import_file(out, "label-studio", tmp_path / "export.json")
    db = sqlite3.connect(out / "annotations.sqlite")
    assert db.execute("SELECT COUNT(*) FROM reviews").fetchone()[0] == 0
    assert main(["import", str(out), "--from", "label-studio", str(tmp_path / "export.json")]) == 1


def test_tasks_without_a_usable_answer_are_skipped_with_a_reason(store, tmp_path):
    _, out = store
    tasks = _tasks(out, tmp_path)
    export = [{"id": 1, "data": tasks[0]["data"], "annotations": [_annotation(tasks[0], "review", None, 1)]},
              {"id": 2, "data": tasks[1]["data"], "annotations": [_annotation(tasks[1], "cat", None, 2)]},
              {"id": 3, "data": {"image": "x.png"}, "annotations": []}]
    (tmp_path / "export.json").write_text(json.dumps(export))
    result = import_file(out, "label-studio", tmp_path / "export.json")
    assert result["added"] == 0 and len(result["skipped"]) == 3
    assert any("left it as 'review'" in s for s in result["skipped"])
    assert any("'cat' is not one of the classes" in s for s in result["skipped"])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        import_file(out, "label-studio", tmp_path / "bad.json")


def test_exports_prefer_reviewed_annotations(store, tmp_path):
    images, out = store
    _export(_tasks(out, tmp_path), tmp_path / "export.json", images)
    import_file(out, "label-studio", tmp_path / "export.json")
    tasks = {short(t["data"]["aax_image"]): t for t in _tasks(out, tmp_path / "again")}
    d0 = tasks["diseased/d0.png"]
    assert d0["data"]["aax_reviewed"] is True and d0["predictions"][0]["model_version"].endswith("+reviewed")
    rle = next(r for r in d0["predictions"][0]["result"] if r["type"] == "brushlabels")["value"]["rle"]
    assert np.array_equal(brush.rle_to_mask(rle, 32, 40), REVIEWED_D0)
    assert tasks["diseased/d1.png"]["data"]["aax_decision"] == "healthy"
    assert tasks["healthy/h1.png"]["data"]["aax_reviewed"] is False
    assert main(["export", str(out), "--format", "coco", "--to", str(tmp_path / "coco.json")]) == 0
    coco = json.loads((tmp_path / "coco.json").read_text())
    decisions = {short(i["file_name"]): i["aax"]["decision"] for i in coco["images"]}
    assert decisions["diseased/d1.png"] == "healthy" and decisions["healthy/h2.png"] == "diseased"
    assert len(coco["annotations"]) == 2  # d0 (reviewed mask) and d2 (drawn by the reviewer)


def test_review_stats(store, tmp_path, capsys):
    images, out = store
    _export(_tasks(out, tmp_path), tmp_path / "export.json", images)
    import_file(out, "label-studio", tmp_path / "export.json")
    assert main(["review-stats", str(out)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["reviewed"] == 5 and stats["decided_reviewed"] == 3
    assert stats["decision_accuracy"] == pytest.approx(2 / 3)  # d0, h0 kept; d1 overturned
    assert stats["masks_compared"] == 1
    assert stats["mask_iou_mean"] == pytest.approx(280 / 320)
    # flagged: d2 (ensemble answer diseased, kept), h2 (answer healthy, overturned): one hard
    assert (stats["flagged_reviewed"], stats["flagged_hard"]) == (2, 1)
    # d2's draft (rows 6-18, columns 8-20) and the reviewer's mask (rows 0-8, columns 0-8) do not meet
    assert (stats["drafts_compared"], stats["draft_iou_mean"], stats["drafts_dropped"]) == (1, 0.0, 0)
    assert stats["confusion"]["diseased -> healthy"] == 1


def test_old_store_without_reviews_table_exports(store, tmp_path):
    _, out = store
    db = sqlite3.connect(out / "annotations.sqlite")
    db.execute("DROP TABLE IF EXISTS reviews")
    db.commit()
    db.close()
    assert len(_tasks(out, tmp_path)) == len(ROWS)
