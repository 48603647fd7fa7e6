"""Annotation end to end on a small trained ensemble: records, the command, crash
safety (kill -9 and resume), and the COCO round trip."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _inputs import input_folder
from PIL import Image

from aax.annotation.decide import decide
from aax.cli import main
from aax.models.members import DEFAULT_MEMBERS
from aax.models.refine import WORK_SIDE, pool_numpy, resize_labels

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def input_dir(lesion_dir, tmp_path_factory):
    """A folder of images: some synthetic X-rays (one resized to a non-square size),
    a zero-byte file and a text file posing as a PNG."""
    return input_folder(lesion_dir, tmp_path_factory.mktemp("annotate_in"))


def image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.png"))


def test_records_follow_the_protocol(ensemble, input_dir):
    files = image_files(input_dir)
    records = list(ensemble.annotate(files, batch_size=4, keep_saliency=True, workers=0))
    assert [r.image for r in records] == [str(f) for f in files]
    errors = {Path(r.image).name: r.error for r in records if r.status == "error"}
    assert set(errors) == {"empty.png", "text.png"} and all(errors.values())
    for r in (r for r in records if r.status == "ok"):
        h, w = Image.open(r.image).size[::-1]
        assert r.size == (h, w)
        assert [m.name for m in r.members] == list(ensemble.members)
        probs = np.array([m.probs for m in r.members])
        uncert = np.array([m.uncertainty for m in r.members])
        np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)
        assert (uncert >= 0).all()
        d = decide(probs, uncert, ensemble.theta, ensemble.negative_index, ensemble.quorum)
        assert r.decision == ("review" if d.review else ensemble.classes[d.label])
        assert r.agreeing == [list(ensemble.members)[i] for i in d.agreeing]
        for m in r.saliency.values():
            assert m.shape == (h, w) and m.min() >= 0 and m.max() <= 1
        assert r.regions is not None and r.regions.shape == (WORK_SIDE, WORK_SIDE)  # kept with the maps
        if r.agreeing:
            score = np.min([r.saliency[n] for n in r.agreeing], axis=0)
            if ensemble.maps.refine == "superpixels":  # new runs' default: region means
                labels = resize_labels(r.regions, (h, w))
                score = pool_numpy(score, labels)
                for region in np.unique(labels):  # each region wholly in or out
                    assert len(np.unique(r.mask[labels == region])) == 1
            near = np.abs(score - ensemble.tau) < 1e-5  # float32 sums in another order
            assert r.mask.shape == (h, w) and np.array_equal(r.mask[~near], (score > ensemble.tau)[~near])
        else:
            assert r.mask is None


def test_regions_are_kept_only_when_asked_masks_alike(ensemble, input_dir):
    files = [f for f in image_files(input_dir) if f.parent.name != "broken"][:6]
    kept = list(ensemble.annotate(files, keep_saliency=True, keep_regions=True, workers=0))
    bare = list(ensemble.annotate(files, keep_saliency=True, keep_regions=False, workers=0))
    plain = list(ensemble.annotate(files, workers=0))
    assert all(r.regions is not None for r in kept) and all(r.regions is None for r in bare + plain)
    for a, b, c in zip(kept, bare, plain):  # the masks do not depend on what is kept
        assert (a.mask is None) == (b.mask is None) == (c.mask is None)
        if a.mask is not None:
            assert np.array_equal(a.mask, b.mask) and np.array_equal(a.mask, c.mask)


def test_superpixels_cut_in_loader_workers_give_the_same_masks(ensemble, input_dir):
    files = image_files(input_dir)  # the broken files too: a worker reports them alike
    here = list(ensemble.annotate(files, batch_size=4, keep_saliency=True, keep_regions=True, workers=0))
    there = list(ensemble.annotate(files, batch_size=4, keep_saliency=True, keep_regions=True, workers=1))
    assert [r.status for r in here] == [r.status for r in there]
    assert any(r.mask is not None for r in here)
    for a, b in zip(here, there):
        if a.status == "ok":
            assert np.array_equal(a.regions, b.regions)
            assert (a.mask is None) == (b.mask is None)
            assert a.mask is None or np.array_equal(a.mask, b.mask)


def test_annotate_streams(ensemble, input_dir):
    stream = ensemble.annotate(image_files(input_dir), batch_size=2, workers=0)
    first = next(stream)  # a generator: results come before the whole set is done
    assert first.image.endswith(".png")
    stream.close()


def test_theta_zero_flags_everything_confident_never(ensemble, input_dir):
    files = [f for f in image_files(input_dir) if f.parent.name != "broken"]
    records = list(ensemble.annotate(files, theta=-1.0, workers=0))
    assert all(r.decision == "review" and r.reason == "uncertain" for r in records)


def test_flagged_images_the_members_lean_positive_on_get_their_mask_as_a_draft(ensemble, input_dir):
    files = [f for f in image_files(input_dir) if f.parent.name != "broken"]
    # a low tau, so that the small ensemble's maps overlap somewhere
    confident = list(ensemble.annotate(files, theta=1.0, tau=0.1, workers=0))  # nothing is uncertain
    flagged = list(ensemble.annotate(files, theta=-1.0, tau=0.1, workers=0))  # everything is
    negative = ensemble.negative_index
    leaning = 0
    for c, f in zip(confident, flagged):
        assert c.draft is None and c.draft_class is None  # decided images get masks, not drafts
        lean = np.mean([m.probs for m in f.members], axis=0)[negative] < 0.5
        assert f.mask is None and (f.draft is None or (lean and f.draft.any()))  # no empty drafts
        leaning += lean
        if lean and c.mask is not None and len(c.agreeing) == len(ensemble.members):
            # the same maps, fused and thresholded as the mask they make when the members agree
            # (a draft that would be empty is not given)
            assert (f.draft is not None) == bool(c.mask.any())
            if f.draft is not None:
                assert f.draft_class == c.decision and np.array_equal(f.draft, c.mask)
    assert 0 < leaning < len(files)  # both kinds were seen
    assert any(f.draft is not None for f in flagged)


def trained_classes(run: Path) -> list[str]:
    return json.loads((Path(run) / "aax.json").read_text())["classes"]


def run_cli(*args: str) -> int:
    return main(["annotate", *map(str, args)])


def test_command_writes_rows_masks_overlays_and_summary(trained_run, input_dir, tmp_path):
    out = tmp_path / "out"
    # 1: finished, but two inputs were unusable (listed); data check uses the same rule
    assert run_cli(trained_run, input_dir, "--out", out, "--save-saliency", "--workers", "0", "--batch-size", "4") == 1
    db = sqlite3.connect(out / "annotations.sqlite")
    rows = db.execute("SELECT image, status, decision, mask, saliency, height, width FROM annotations").fetchall()
    assert sorted(r[0] for r in rows) == sorted(f.relative_to(input_dir).as_posix() for f in image_files(input_dir))
    for image, status, decision, mask, saliency, h, w in rows:
        if status == "error":
            assert mask is None and saliency is None
            continue
        assert (Path(out) / saliency).is_file()
        if mask:
            assert decision not in ("healthy", "review")
            im = Image.open(out / mask)
            assert im.mode == "1"  # a 1-bit black-and-white PNG
            assert np.asarray(im).shape == (h, w) and set(np.unique(im.convert("L"))) <= {0, 255}
            assert mask == "masks/" + image.removesuffix(".png") + ".png"  # the stem: no x.png.png
        else:
            assert decision in ("healthy", "review")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == len(rows) and summary["errors"] == 2
    assert {e["image"].split("/")[-1] for e in summary["error_list"]} == {"empty.png", "text.png"}
    overlay = Image.open(next((out / "saliency").rglob("*.png")))
    assert overlay.width > 4 * overlay.height  # input, three members and the mask side by side

    # running again does nothing twice; other settings are refused unless --overwrite
    assert run_cli(trained_run, input_dir, "--out", out, "--save-saliency", "--workers", "0") == 1
    assert db.execute("SELECT COUNT(*) FROM annotations").fetchone()[0] == len(rows)
    assert json.loads((out / "summary.json").read_text())["skipped_already_done"] == len(rows)
    assert run_cli(trained_run, input_dir, "--out", out, "--theta", "0.3", "--workers", "0") == 2
    assert run_cli(trained_run, input_dir, "--out", out, "--theta", "0.3", "--workers", "0", "--overwrite") == 1
    assert not (out / "saliency").exists()
    # the refinement is part of the settings: new runs refine; --refine none is other settings
    assert summary["settings"]["maps"]["refine"] == "superpixels"
    assert not [k for k in summary["settings"]["maps"] if k.startswith("_")]  # options only
    assert run_cli(trained_run, input_dir, "--out", out, "--theta", "0.3", "--workers", "0", "--refine", "none") == 2
    assert run_cli(trained_run, input_dir, "--out", out, "--theta", "0.3", "--workers", "0", "--refine", "none",
                   "--overwrite") == 1
    assert json.loads((out / "summary.json").read_text())["settings"]["maps"]["refine"] == "none"


def test_kill_9_then_resume_completes_exactly_once(trained_run, input_dir, tmp_path):
    many = tmp_path / "many"
    for i in range(6):  # 60 inputs: enough to be killed midway
        shutil.copytree(input_dir, many / f"copy{i}")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "aax", "annotate", str(trained_run), str(many), "--out", str(out),
           "--batch-size", "2", "--workers", "0", "--mc-passes", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db_path = out / "annotations.sqlite"
    while proc.poll() is None:  # however long a busy machine takes to store the first rows
        time.sleep(0.2)
        if db_path.exists():
            try:
                n = sqlite3.connect(db_path).execute("SELECT COUNT(*) FROM annotations").fetchone()[0]
            except sqlite3.OperationalError:
                continue
            if n >= 4:
                break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = sqlite3.connect(db_path).execute("SELECT COUNT(*) FROM annotations").fetchone()[0]
    total = len(image_files(many))
    assert 0 < done_before < total, "the kill must land mid-run for this test to mean anything"

    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 1  # the two broken files
    db = sqlite3.connect(db_path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    images = [r[0] for r in db.execute("SELECT image FROM annotations")]
    assert len(images) == len(set(images)) == total
    masks = {r[0] for r in db.execute("SELECT mask FROM annotations WHERE mask IS NOT NULL")}
    positives = db.execute("SELECT COUNT(*) FROM annotations WHERE decision NOT IN ('healthy', 'review')"
                           " AND status = 'ok'").fetchone()[0]
    assert len(masks) == positives
    on_disk = {p.relative_to(out).as_posix() for p in (out / "masks").rglob("*") if p.is_file()} if (out / "masks").exists() else set()
    assert on_disk == masks


def test_coco_round_trip_through_pycocotools(trained_run, input_dir, tmp_path):
    from pycocotools.coco import COCO

    out = tmp_path / "out"
    assert run_cli(trained_run, input_dir, "--out", out, "--workers", "0", "--theta", "1.0") == 1
    assert main(["export", str(out), "--format", "coco", "--to", str(tmp_path / "coco.json")]) == 0
    coco = COCO(str(tmp_path / "coco.json"))
    db = sqlite3.connect(out / "annotations.sqlite")
    with_masks = dict(db.execute("SELECT image, mask FROM annotations WHERE mask IS NOT NULL").fetchall())
    assert len(coco.getAnnIds()) == len(with_masks) > 0, "theta=1 keeps every confident positive"
    assert {c["name"] for c in coco.loadCats(coco.getCatIds())} == {"diseased"}
    for ann in coco.loadAnns(coco.getAnnIds()):
        image = coco.loadImgs(ann["image_id"])[0]
        assert isinstance(ann["segmentation"]["counts"], str)
        decoded = coco.annToMask(ann).astype(bool)
        png = np.asarray(Image.open(out / with_masks[image["file_name"]])) > 0
        assert np.array_equal(decoded, png)
        assert ann["area"] == png.sum() and ann["iscrowd"] == 0 and 0 <= ann["score"] <= 1
    assert main(["export", str(out), "--format", "png", "--to", str(tmp_path / "flat")]) == 0
    index = (tmp_path / "flat" / "index.csv").read_text().splitlines()
    assert len(index) == 1 + len(with_masks)


def test_results_do_not_depend_on_batching(ensemble, input_dir):
    files = [f for f in image_files(input_dir) if f.parent.name != "broken"]
    one = list(ensemble.annotate(files, batch_size=1, workers=0, mc_passes=8))
    many = list(ensemble.annotate(files[::-1], batch_size=5, workers=0, mc_passes=8))[::-1]
    for a, b in zip(one, many):
        assert a.image == b.image and a.decision == b.decision
        for ma, mb in zip(a.members, b.members):
            np.testing.assert_allclose(ma.probs, mb.probs, atol=1e-5)
            assert ma.uncertainty == pytest.approx(mb.uncertainty, abs=1e-5)


def test_decoding_in_worker_processes_gives_the_same_records(ensemble, input_dir):
    files = image_files(input_dir)  # the broken files too: their errors cross the process boundary
    inline = list(ensemble.annotate(files, batch_size=3, workers=0, mc_passes=8, keep_preview=True))
    pooled = list(ensemble.annotate(files, batch_size=3, workers=2, mc_passes=8, keep_preview=True))
    assert [r.image for r in pooled] == [r.image for r in inline]
    for a, b in zip(inline, pooled):
        assert (a.status, a.error, a.decision) == (b.status, b.error, b.decision)
        assert [m.probs for m in a.members] == [m.probs for m in b.members]
        assert (a.mask is None) == (b.mask is None)
        if a.mask is not None:
            assert np.array_equal(a.mask, b.mask)
        if a.status == "ok":
            assert a.preview.ndim == 3 and a.preview.shape[2] == 3 and np.array_equal(a.preview, b.preview)


def test_checkpoint_digests_are_cached_by_size_and_mtime(tmp_path):
    import json
    import os

    from aax.models.runfiles import DIGEST_CACHE, checkpoint_digest

    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"weights v1")
    first = checkpoint_digest(ckpt)
    cache = json.loads((tmp_path / DIGEST_CACHE).read_text())
    assert cache["m.pt"]["sha256"] == first
    cache["m.pt"]["sha256"] = "from-the-cache"
    (tmp_path / DIGEST_CACHE).write_text(json.dumps(cache))
    assert checkpoint_digest(ckpt) == "from-the-cache"  # unchanged file: the cache answers
    ckpt.write_bytes(b"weights v2")  # retrained: another size
    os.utime(ckpt, ns=(1, 2))
    second = checkpoint_digest(ckpt)
    assert second not in (first, "from-the-cache") and len(second) == 64
    ckpt.write_bytes(b"weights v3")  # same size, another mtime
    os.utime(ckpt, ns=(3, 4))
    assert checkpoint_digest(ckpt) not in (second, "from-the-cache")


def test_same_input_named_differently_is_one_image(trained_run, input_dir, tmp_path, monkeypatch):
    """Absolute, relative, or from another working directory: each image is stored once,
    and the exports name it relative to the input folder."""
    out = tmp_path / "out"
    monkeypatch.chdir(input_dir.parent)
    assert run_cli(trained_run, input_dir.name, "--out", out, "--workers", "0", "--mc-passes", "4") == 1
    monkeypatch.chdir(tmp_path)
    assert run_cli(trained_run, input_dir.resolve(), "--out", out, "--workers", "0", "--mc-passes", "4") == 1
    monkeypatch.chdir(input_dir)
    assert run_cli(trained_run, ".", "--out", out, "--workers", "0", "--mc-passes", "4") == 1
    images = [r[0] for r in sqlite3.connect(out / "annotations.sqlite").execute("SELECT image FROM annotations")]
    assert sorted(images) == sorted(f.relative_to(input_dir).as_posix() for f in image_files(input_dir))
    assert main(["export", str(out), "--format", "coco", "--to", str(tmp_path / "coco.json")]) == 0
    names = [i["file_name"] for i in json.loads((tmp_path / "coco.json").read_text())["images"]]
    assert len(names) == len(set(names)) == len(images) - 2 and not any(n.startswith("/") for n in names)


def test_output_folder_inside_the_input_is_never_read(trained_run, input_dir, tmp_path):
    root = tmp_path / "in"
    shutil.copytree(input_dir / "diseased", root)
    out = root / "out"
    for _ in range(2):  # the second run must not annotate the first run's masks
        assert run_cli(trained_run, root, "--out", out, "--workers", "0", "--mc-passes", "4", "--theta", "1") == 0
    images = [r[0] for r in sqlite3.connect(out / "annotations.sqlite").execute("SELECT image FROM annotations")]
    assert sorted(images) == sorted(p.name for p in root.glob("*.png"))
    assert not any(i.startswith("out/") for i in images)


def test_review_list_names_flagged_images_most_uncertain_first(trained_run, input_dir, tmp_path, capsys):
    out = tmp_path / "out"
    # theta 0: every member is uncertain, so every readable image is flagged
    assert run_cli(trained_run, input_dir, "--out", out, "--workers", "0", "--mc-passes", "6",
                   "--theta", "0", "--tau", "0.1", "--save-saliency") == 1  # (a low tau: drafts with pixels)
    err = capsys.readouterr().err
    assert "review list (10 flagged images" in err and f"drafts for the reviewer: {out}/drafts/" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["review_list"] == [str(out / "review.csv"), str(out / "review.json")]
    listed = json.loads((out / "review.json").read_text())
    assert listed["n"] == 10 and len(listed["images"]) == 10
    u = [e["max_uncertainty"] for e in listed["images"]]
    assert u == sorted(u, reverse=True) and u[0] > 0
    first = listed["images"][0]
    assert first["reason"] == "uncertain" and (out / first["overlay"]).is_file()
    assert Path(first["path"]).is_file() and not Path(first["image"]).is_absolute()
    assert [m["name"] for m in first["members"]] == list(DEFAULT_MEMBERS)
    assert max(m["uncertainty"] for m in first["members"]) == first["max_uncertainty"]
    # drafts (on disk, named in the list) only where the members lean positive
    drafted = [e for e in listed["images"] if e["draft"]]
    assert drafted and summary["drafts"] == len(drafted) and summary["masks"] == 0
    assert all((out / e["draft"]).is_file() and e["draft"].startswith("drafts/") and e["p_positive"] > 0.5
               and e["draft_class"] in trained_classes(trained_run) for e in drafted)
    import csv

    rows = list(csv.DictReader(open(out / "review.csv")))
    assert [r["image"] for r in rows] == [e["image"] for e in listed["images"]]
    assert float(rows[0][f"{DEFAULT_MEMBERS[0]}:uncertainty"]) == pytest.approx(first["members"][0]["uncertainty"])
    # the command prints it and writes it elsewhere on request
    assert main(["review", str(out), "--to", str(tmp_path / "r"), "--limit", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("10 images to review") and "... and 8 more" in printed
    assert (tmp_path / "r" / "review.csv").read_text() == (out / "review.csv").read_text()
    assert main(["export", str(out), "--format", "review", "--to", str(tmp_path / "e")]) == 0
    assert (tmp_path / "e" / "review.json").is_file()


def test_ctrl_c_says_how_many_are_stored_and_how_to_resume(trained_run, input_dir, tmp_path, monkeypatch, capsys):
    import importlib

    annotate_module = importlib.import_module("aax.annotation.annotate")
    real = annotate_module.annotate

    def interrupted(*args, **kwargs):
        for i, record in enumerate(real(*args, **kwargs)):
            if i == 3:
                raise KeyboardInterrupt
            yield record

    monkeypatch.setattr(annotate_module, "annotate", interrupted)
    out = tmp_path / "out"
    args = (trained_run, input_dir, "--out", out, "--workers", "0", "--mc-passes", "4", "--batch-size", "2")
    assert run_cli(*args) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    stored = sqlite3.connect(out / "annotations.sqlite").execute("SELECT COUNT(*) FROM annotations").fetchone()[0]
    assert stored >= 3 and f"interrupted; {stored} images are stored" in err and "run the same command again" in err.lower()
    monkeypatch.setattr(annotate_module, "annotate", real)
    assert run_cli(*args) == 1
    assert "were already done and were skipped" in capsys.readouterr().err
    total = sqlite3.connect(out / "annotations.sqlite").execute("SELECT COUNT(*) FROM annotations").fetchone()[0]
    assert total == len(image_files(input_dir))


def test_masks_that_lose_to_a_trivial_mask_are_said_at_the_end(trained_run, input_dir, tmp_path, capsys):
    """A run whose calibration found its masks no better than a centred box: annotate
    carries that into summary.json and warns; a run without that finding stays quiet."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    manifest = json.loads((run / "aax.json").read_text())
    calibration = dict(manifest.get("calibration") or {})
    calibration.update(iou_mean=0.1, beats_trivial=False, mask_warning="the masks do not beat a trivial centred box",
                       trivial={"whole image": {"iou_mean": 0.05}, "centred box": {"iou_mean": 0.2}})
    (run / "aax.json").write_text(json.dumps({**manifest, "calibration": calibration}))
    out = tmp_path / "out"
    run_cli(run, input_dir / "diseased", "--out", out, "--workers", "0")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mask_quality"] == {"validation_iou_mean": 0.1, "beats_trivial": False,
                                       "trivial_iou_mean": {"whole image": 0.05, "centred box": 0.2},
                                       "warning": "the masks do not beat a trivial centred box"}
    assert "WARNING: the masks do not beat a trivial centred box" in capsys.readouterr().err

    calibration.update(beats_trivial=True, mask_warning=None)
    (run / "aax.json").write_text(json.dumps({**manifest, "calibration": calibration}))
    run_cli(run, input_dir / "diseased", "--out", tmp_path / "out2", "--workers", "0")
    assert json.loads((tmp_path / "out2" / "summary.json").read_text())["mask_quality"]["beats_trivial"] is True
    assert "WARNING" not in capsys.readouterr().err
