"""Learning from reviews: the localisation loss, masks that move with augmentation, the
merge of reviews into the training data, `aax retrain`, evaluation that refuses reviewed
test images, the review orders and the Label Studio webhook that stores reviews."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from aax.annotation.agreement import disagreement, map_agreement
from aax.cli import main
from aax.data import open_dataset
from aax.data.augment import Augment
from aax.data.layouts import Dataset, Sample
from aax.training.loop import localisation_loss
from aax.training.reviewed import ReviewedImage, merge_reviews, reviewed_split


class _Head(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(1, 2)
        with torch.no_grad():  # class 0 (positive) logit = feature, class 1 (negative) = 0
            self.fc.weight.copy_(torch.tensor([[1.0], [0.0]]))
            self.fc.bias.zero_()


def test_localisation_loss_is_low_where_the_cells_point_at_the_mask():
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4, :4] = 1.0  # the top-left cell of a 2x2 grid
    right = torch.full((1, 1, 2, 2), -6.0)
    right[..., 0, 0] = 6.0
    labels = torch.tensor([0])
    good = localisation_loss(_Head(), right, labels, mask, negative_index=1)
    bad = localisation_loss(_Head(), -right, labels, mask, negative_index=1)
    assert good.item() < 0.01 < 1.0 < bad.item()


def test_spatial_localisation_loss_asks_where_not_how_high():
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, :, :4, :4] = 1.0
    right = torch.zeros(2, 1, 2, 2)
    right[:, :, 0, 0] = 6.0
    labels = torch.tensor([0, 0])
    spatial = [localisation_loss(_Head(), right + shift, labels, mask, 1, kind="spatial").item()
               for shift in (0.0, -10.0, 10.0)]
    assert spatial == pytest.approx([spatial[0]] * 3, abs=1e-5)  # a constant on every cell changes nothing
    bce = [localisation_loss(_Head(), right + shift, labels, mask, 1).item() for shift in (0.0, 10.0)]
    assert bce[1] > bce[0] + 1.0  # where the per-cell form does
    wrong = localisation_loss(_Head(), right.flip(-1), labels, mask, 1, kind="spatial").item()
    assert spatial[0] < 0.02 < 1.0 < wrong  # the second image's empty mask is left out
    empty = localisation_loss(_Head(), right, labels, torch.zeros_like(mask), 1, kind="spatial")
    assert empty.item() == 0.0
    with pytest.raises(ValueError, match="spatial"):
        localisation_loss(_Head(), right, labels, mask, 1, kind="dice")


def test_masks_move_with_the_image_and_the_images_do_not_change():
    images = torch.zeros(4, 3, 32, 32)
    images[:, :, 4:14, 18:30] = 1.0  # a bright square, off centre
    masks = images[:, :1].clone()
    aug = Augment(rotate=20, scale=0.2, translate=0.1, brightness=0.0, contrast=0.0)
    alone = aug(images, torch.Generator().manual_seed(3))
    moved, moved_masks = aug(images, torch.Generator().manual_seed(3), masks=masks)
    assert torch.equal(alone, moved)
    square, on_mask = moved.mean(dim=1) > 0.5, moved_masks[:, 0] > 0.5
    iou = (square & on_mask).sum() / (square | on_mask).sum()
    assert float(iou) > 0.95
    assert not torch.equal(moved_masks, masks)  # it did move


def test_map_agreement_is_one_for_equal_maps_and_low_for_disjoint_ones():
    a = torch.zeros(2, 8, 8)
    a[0, :4] = 1.0
    a[1, 4:] = 1.0
    same = torch.stack([a[0], a[0], a[0]])[None]
    apart = torch.stack([a[0], a[1], a[1]])[None]
    assert np.allclose(map_agreement(same), 1.0)
    low = map_agreement(apart)[0]
    assert low[0] < 0.01 and low[1] == pytest.approx(1 / 3)  # half of its mass is shared
    assert disagreement([None, None]) is None
    assert disagreement([1.0, 0.5]) == pytest.approx(0.25)


def _dataset(tmp_path: Path) -> Dataset:
    samples = [Sample(tmp_path / f"{c}{i}.png", c) for c in ("diseased", "healthy") for i in range(5)]
    return Dataset(samples, source=tmp_path, format="folder")


def test_merge_corrects_labels_adds_images_and_keeps_masks_of_positives_only(tmp_path):
    data = _dataset(tmp_path)
    reviews = [ReviewedImage((tmp_path / "diseased0.png").resolve(), "healthy", tmp_path / "m0.png", "OUT"),
               ReviewedImage((tmp_path / "healthy1.png").resolve(), "healthy", None, "OUT"),
               ReviewedImage((tmp_path / "new.png").resolve(), "diseased", tmp_path / "m1.png", "OUT")]
    merged = merge_reviews(data, reviews, negative_class="healthy")
    assert len(merged.dataset) == 11 and merged.dataset[10].label == "diseased"
    assert merged.dataset[0].label == "healthy" and data[0].label == "diseased"  # the source is untouched
    assert merged.corrected == 1 and merged.added == [10]
    assert merged.masks == {10: tmp_path / "m1.png"}  # a negative's mask is no finding
    train, val = reviewed_split([1, 2, 3, 5], [0, 6, 4], merged)
    assert set(val).isdisjoint(merged.reviewed) and val == [4]
    assert sorted(train) == [0, 1, 2, 3, 5, 6, 10]
    with pytest.raises(ValueError, match="not among the dataset's"):
        merge_reviews(data, [ReviewedImage(tmp_path / "x.png", "fire", None, "OUT")], "healthy")


@pytest.fixture(scope="module")
def reviewed_out(ensemble, lesion_dir: Path, tmp_path_factory) -> dict:
    """An annotation folder of 24 lesion images, 12 of them reviewed from the ground truth
    (11 diseased with their masks, one diseased image corrected to healthy)."""
    from aax.annotation.annotate import annotate_to_folder
    from aax.annotation.store import open_store
    from aax.interop.reviews import Review, import_reviews

    root = tmp_path_factory.mktemp("review-src")
    picked = sorted((lesion_dir / "images" / "diseased").glob("*.png"))[:14] + \
        sorted((lesion_dir / "images" / "healthy").glob("*.png"))[:10]
    for p in picked:
        (root / p.parent.name).mkdir(exist_ok=True)
        shutil.copy(p, root / p.parent.name / p.name)
    out = tmp_path_factory.mktemp("reviewed") / "out"
    annotate_to_folder(ensemble, root, out, mc_passes=4)
    data = open_dataset(lesion_dir)
    gt = {Path(s.image).name: s for s in data if s.label == "diseased"}
    names = sorted(p.name for p in (root / "diseased").glob("*.png"))
    reviews = [Review(image=f"diseased/{n}", decision="diseased", mask=gt[n].mask(), tool="test")
               for n in names[:11]]
    reviews.append(Review(image=f"diseased/{names[11]}", decision="healthy", tool="test"))
    store = open_store(out)
    try:
        import_reviews(store, reviews, "test")
    finally:
        store.close()
    reviewed = {str((lesion_dir / "images" / "diseased" / n).resolve()) for n in names[:12]}
    return {"out": out, "root": root, "reviewed_in_lesion_dir": reviewed}


def test_retrain_learns_from_reviews_and_evaluation_refuses_them(trained_run, reviewed_out, lesion_dir,
                                                               tmp_path, capsys):
    run2 = tmp_path / "run2"
    code = main(["retrain", str(trained_run), "--reviews", str(reviewed_out["out"]), "--out", str(run2),
                 "--epochs", "1", "--warm-start", "--no-progress", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((run2 / "aax.json").read_text())
    assert {m["init"] for m in manifest["members"]} == {"warm start"}
    block = manifest["reviews"]
    assert block["n"] == 12 and block["n_masks"] == 11 and block["n_masks_used"] == 11
    # the reviewed copies are other files than the dataset's: they join the training images
    assert block["added"] == 12 and manifest["data"]["n_train"] == 64 + 12
    assert block["localisation_weight"] == pytest.approx(0.1)
    history = (run2 / "history.csv").read_text().splitlines()
    loc = [float(r.split(",")[5]) for r in history[1:]]
    assert history[0].split(",")[5] == "train_loc" and all(v > 0 for v in loc)
    assert "reviewed images with their masks" in manifest["calibration"]["data"]

    # the reviewed copies are the test images: refused, then left out on request
    capsys.readouterr()
    assert main(["evaluate", str(run2), str(reviewed_out["root"]), "--out", str(tmp_path / "ev"),
                 "--no-report", "--mc-passes", "4"]) == 2
    assert "reviewed into training" in capsys.readouterr().err
    assert main(["evaluate", str(run2), str(reviewed_out["root"]), "--out", str(tmp_path / "ev"),
                 "--no-report", "--mc-passes", "4", "--against", str(trained_run)]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    before = json.loads((tmp_path / "ev" / "against" / "metrics.json").read_text())
    assert metrics["settings"]["excluded_reviewed"] == 12 and metrics["settings"]["n_images"] == 12
    assert before["settings"]["n_images"] == 12  # the old run is scored on the same 12 images
    assert "on the same images" in capsys.readouterr().out
    assert "mean IoU" in (tmp_path / "ev" / "comparison.md").read_text()


def test_segmentation_heads_learn_the_reviewed_masks_and_make_the_masks(trained_run, reviewed_out, lesion_dir,
                                                                       tmp_path, capsys):
    from aax.annotation.annotate import annotate
    from aax.models.ensemble import Ensemble

    run = tmp_path / "run-seg"
    code = main(["retrain", str(trained_run), "--reviews", str(reviewed_out["out"]), "--out", str(run),
                 "--epochs", "1", "--warm-start", "--segmentation-weight", "1", "--no-progress", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((run / "aax.json").read_text())
    assert manifest["reviews"]["segmentation_weight"] == 1.0 and manifest["training"]["segmentation_weight"] == 1.0
    assert manifest["maps"]["source"] == "segmentation"  # kept by the calibration on the reviewed masks
    # then each head alone was refitted on the masks (the default 60 epochs), and the
    # checkpoint says so, so a resumed run does not refit it twice
    for entry in manifest["members"]:
        refit = entry["segmentation_refit"]
        assert refit["epochs"] == 60 and refit["masks"] == manifest["reviews"]["n_masks_used"]
        assert refit["views"] == 2 + 14  # the image, its mirror image and 14 augmented views
        assert manifest["reviews"]["segmentation_views"] == 14
        assert refit["loss_last"] < refit["loss_first"]
        assert torch.load(run / entry["checkpoint"], weights_only=True)["segmentation_refit"] == refit
    history = (run / "history.csv").read_text().splitlines()
    column = history[0].split(",").index("train_seg")
    assert all(float(r.split(",")[column]) > 0 for r in history[1:])
    ensemble = Ensemble.load(run, device="cpu")
    assert all(m.seg is not None for m in ensemble.members.values())
    images = sorted((reviewed_out["root"] / "diseased").glob("*.png"))
    records = list(annotate(ensemble, images, mc_passes=4, keep_saliency=True))
    masked = [r for r in records if r.mask is not None]
    assert masked and all(r.mask.shape == r.size and r.mask.any() for r in masked)
    assert all(set(r.saliency) == set(ensemble.members) for r in records)
    # the source stays a choice: XGrad-CAM can be calibrated against it on the same masks
    assert main(["calibrate", str(run), "--map-sources", "cam", "segmentation", "--mc-passes", "4"]) == 0
    out = capsys.readouterr().out
    assert "cam maps: mean IoU" in out and "segmentation maps: mean IoU" in out

    # benchmarks/seg_heads.py refits fresh heads of each layout on the same reviewed masks
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import seg_heads
    finally:
        sys.path.pop(0)
    assert seg_heads.main(["--run", str(run), "--test", str(lesion_dir), "--negative-class", "healthy",
                           "--strides", "8 16 32", "4 8 16 32", "--out", str(tmp_path / "heads.json")]) == 0
    heads = json.loads((tmp_path / "heads.json").read_text())
    assert heads["n_masks"] == manifest["reviews"]["n_masks_used"] and heads["n_test"] > 0
    assert [r["strides"] for r in heads["results"]] == [[8, 16, 32], [4, 8, 16, 32]]
    for row in heads["results"]:
        assert set(row["members"]) == set(ensemble.members)
        assert all(0.0 <= v <= 1.0 for v in [*row["members"].values(), row["mean_of_heads"]])
    assert "| 4 8 16 32 |" in capsys.readouterr().out


def test_a_reviewed_label_overrides_the_dataset_and_the_image_never_validates(trained_run, reviewed_out,
                                                                             lesion_dir, tmp_path):
    """Reviews of the dataset's own files: the corrected label is used and every reviewed
    file trains, so evaluation on the dataset is refused."""
    from aax.evaluation.evaluate import ReviewedTestImages, drop_reviewed
    from aax.training.reviewed import read_reviews
    from aax.training.train import TrainConfig, train

    reviews = [ReviewedImage(Path(p), r.label, r.mask, r.source)
               for p, r in zip(sorted(reviewed_out["reviewed_in_lesion_dir"]),
                               sorted(read_reviews([reviewed_out["out"]]), key=lambda r: r.path.name))]
    with pytest.raises(ValueError, match="localisation_loss"):
        TrainConfig(localisation_loss="dice").validate()
    # 64 px: a 2 x 2 class map (at 32 px its single cell leaves the spatial term nothing to shape)
    run = train(lesion_dir, tmp_path / "run", TrainConfig(members=("efficientnet-lite0",), epochs=1,
                                                          image_size=64, progress=False,
                                                          localisation_loss="spatial"), reviews=reviews)
    manifest = json.loads((run / "aax.json").read_text())
    assert manifest["reviews"]["added"] == 0 and manifest["reviews"]["corrected"] == 1
    assert manifest["reviews"]["localisation_loss"] == "spatial"
    history = (run / "history.csv").read_text().splitlines()
    assert all(float(r.split(",")[5]) > 0 for r in history[1:])  # the spatial term was trained on
    val = {str((lesion_dir / f).resolve()) for f in manifest["data"]["val_files"]}
    assert val.isdisjoint(reviewed_out["reviewed_in_lesion_dir"])
    with pytest.raises(ReviewedTestImages, match="12 of the 80 test images"):
        drop_reviewed(manifest, open_dataset(lesion_dir))
    kept, n = drop_reviewed(manifest, open_dataset(lesion_dir), "exclude")
    assert n == 12 and len(kept) == 68


def test_review_orders(reviewed_out, capsys):
    from aax.annotation.review_list import priority, review_list

    every = review_list(reviewed_out["out"], include_all=True, order="disagreement")["entries"]
    assert len(every) == 24
    assert all(0.0 <= e["disagreement"] <= 1.0 and 0.0 <= e["p_positive"] <= 1.0 for e in every)
    values = [priority(e) for e in every]
    assert values == sorted(values, reverse=True)
    # a likely-negative image comes after a likely-positive one whose maps agree as well
    assert priority({"disagreement": 0.5, "p_positive": 0.9}) > priority({"disagreement": 0.5, "p_positive": 0.1})
    a = [e["image"] for e in review_list(reviewed_out["out"], include_all=True, order="random", seed=1)["entries"]]
    b = [e["image"] for e in review_list(reviewed_out["out"], include_all=True, order="random", seed=2)["entries"]]
    assert sorted(a) == sorted(b) == sorted(e["image"] for e in every) and a != b
    assert main(["review", str(reviewed_out["out"]), "--order", "disagreement", "--all"]) == 0
    assert "24 images to review, disagreement order" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown review order"):
        review_list(reviewed_out["out"], order="size")


def test_webhook_stores_updates_and_removes_label_studio_reviews(ensemble, reviewed_out, tmp_path):
    from aax.annotation.store import open_store
    from aax.interop import brush
    from aax.interop.labelstudio import export_label_studio
    from aax.interop.reviews import reviews_by_image
    from aax.interop.serve import Backend, ImageSource, RequestError

    out = tmp_path / "out"
    shutil.copytree(reviewed_out["out"], out)
    export_label_studio(out, tmp_path / "ls")
    task = next(t for t in json.loads((tmp_path / "ls" / "tasks.json").read_text())
                if t["data"]["aax_image"].startswith("healthy/"))
    image = task["data"]["aax_image"]
    mask = np.zeros((64, 64), bool)
    mask[10:20, 30:40] = True
    annotation = {"id": 7, "completed_by": 1, "updated_at": "2026-12-01T10:00:00Z", "result": [
        {"from_name": "decision", "to_name": "image", "type": "choices", "value": {"choices": ["diseased"]}},
        {"from_name": "mask", "to_name": "image", "type": "brushlabels", "original_width": 64,
         "original_height": 64, "value": {"format": "rle", "rle": brush.mask_to_rle(mask),
                                          "brushlabels": ["diseased"]}}]}
    backend = Backend(ensemble, ImageSource(), store=out)
    answer = backend.webhook({"action": "ANNOTATION_CREATED", "task": task, "annotation": annotation})
    assert answer["status"] == "stored" and answer["mask"] and answer["added"] == 1

    def stored() -> dict:
        store = open_store(out)
        try:
            return reviews_by_image(store)
        finally:
            store.close()

    assert stored()[image]["decision"] == "diseased" and stored()[image]["mask_area"] == 100
    annotation["result"] = annotation["result"][:1]
    annotation["result"][0]["value"]["choices"] = ["healthy"]
    assert backend.webhook({"action": "ANNOTATION_UPDATED", "task": task, "annotation": annotation})["updated"] == 1
    assert stored()[image]["decision"] == "healthy" and stored()[image]["mask"] is None
    # Label Studio names a deleted annotation by its id alone
    assert backend.webhook({"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 8}]})["status"] == "ignored"
    answer = backend.webhook({"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 7}]})
    assert answer["status"] == "removed" and answer["images"] == [image]
    assert image not in stored() and len(stored()) == 12
    with pytest.raises(RequestError, match="needs 'task' and 'annotation'"):
        backend.webhook({"action": "ANNOTATION_CREATED"})
    # without a store the events are acknowledged and nothing is kept
    plain = Backend(ensemble, ImageSource())
    assert plain.webhook({"action": "ANNOTATION_CREATED", "task": task, "annotation": annotation})["status"] == "ignored"


def test_reviews_that_cannot_be_read_stop_training_with_the_folder_named(tiny_lesion_dir, tmp_path, capsys):
    empty = tmp_path / "not-annotated"
    empty.mkdir()
    assert main(["train", str(tiny_lesion_dir), "--out", str(tmp_path / "run"), "--reviews", str(empty)]) == 2
    assert f"{empty}: no annotations.sqlite here" in capsys.readouterr().err
    assert not (tmp_path / "run" / "aax.json").exists()


def test_a_run_made_before_the_heads_refit_resumes_as_a_run_without_it(tmp_path):
    from aax.models.runfiles import RunError
    from aax.training.train import TrainConfig, _check_resumable

    stored = TrainConfig().settings()
    del stored["segmentation_epochs"], stored["segmentation_views"]  # written before they existed
    (tmp_path / "aax.json").write_text(json.dumps({"training": stored}))
    assert _check_resumable(tmp_path, TrainConfig(resume=True, segmentation_epochs=0, segmentation_views=0))
    with pytest.raises(RunError, match="segmentation_epochs: run has 0, asked 60"):
        _check_resumable(tmp_path, TrainConfig(resume=True))
