"""Novelty in a trained RUN: features stored at training time, thresholds from the
validation split, scores in every record, the ``novel`` step, and runs made before."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from aax.annotation.annotate import AnnotateSettings, annotate_batch
from aax.data import find_images
from aax.data.transforms import prepare
from aax.models import novelty as nv

pytestmark = pytest.mark.slow


def test_training_stores_features_and_validation_thresholds(trained_run, ensemble):
    manifest = json.loads((trained_run / "aax.json").read_text())
    block = manifest["novelty"]
    names = [m["name"] for m in manifest["members"]]
    assert block["file"] == nv.FEATURES_FILE and block["score"] == nv.PRETRAINED_SCORE and block["pass_rate"] == 0.95
    with np.load(trained_run / nv.FEATURES_FILE, allow_pickle=False) as data:
        for n in names:
            feats = data[f"{n}.features"]
            assert feats.dtype == np.float16 and feats.shape[0] == manifest["data"]["n_train"]
            assert feats.shape[1] == block["feature_dim"][n] and np.isfinite(feats).all()
    n_val = manifest["data"]["n_val"]
    assert block["validation"]["n"] == n_val
    for n in names:
        assert set(block["thresholds"][n]) == set(nv.SCORES)
        # the 95 % quantile of the validation scores: at most ceil(5 %) of them over it
        assert block["validation"]["flag_rate"][n] <= 1 - np.ceil(0.95 * n_val) / n_val + 1e-9
    assert ensemble.novelty is not None and ensemble.novelty.ready


def _batch(ensemble, paths):
    mean, std = ensemble.normalisation
    from aax.data import read_image

    images = [read_image(p, keep_grey=True) for p in paths]
    x = np.stack([prepare(im, ensemble.image_size, mean, std).numpy() for im in images])
    import torch

    return torch.from_numpy(x), [im.shape[:2] for im in images]


def test_records_carry_scores_and_the_novel_step(ensemble, lesion_dir):
    paths = find_images(lesion_dir / "images")[:6]
    x, sizes = _batch(ensemble, paths)
    settings = AnnotateSettings.from_ensemble(ensemble)
    assert settings.novelty["score"] == nv.PRETRAINED_SCORE and set(settings.novelty["thresholds"]) == set(ensemble.members)
    seeds = list(range(len(paths)))
    on = annotate_batch(ensemble, x, sizes, settings, seeds=seeds)
    for r in on:
        for m in r.members:
            assert set(m.novelty) == set(nv.SCORES) and isinstance(m.novel, bool)
            assert m.novel == (m.novelty[nv.PRETRAINED_SCORE] > settings.novelty["thresholds"][m.name])
            assert m.to_json()["novelty"] == m.novelty
    # thresholds below every score: every member calls every image novel -> review, "novel"
    forced = dataclasses.replace(settings, novelty={"score": "knn", "thresholds": {n: -1.0 for n in ensemble.members}})
    assert {r.reason for r in annotate_batch(ensemble, x, sizes, forced, seeds=seeds)} == {"novel"}
    # thresholds per predicted class come first: pooled thresholds that never flag, but
    # below every score for the class each member predicts -> every image novel
    predicted = {(i, m.name): m.predicted for i, r in enumerate(on) for m in r.members}
    by_class = {n: {c: -1.0 for c in ensemble.classes} for n in ensemble.members}
    first = dataclasses.replace(settings, novelty={"score": "knn", "thresholds": {n: 9.0 for n in ensemble.members},
                                                   "by_class": by_class})
    assert {r.reason for r in annotate_batch(ensemble, x, sizes, first, seeds=seeds)} == {"novel"}
    # only for a class no member predicts: the pooled thresholds apply
    other = {n: {"no-such-class": -1.0} for n in ensemble.members}
    unused = dataclasses.replace(first, novelty={**first.novelty, "by_class": other})
    assert "novel" not in {r.reason for r in annotate_batch(ensemble, x, sizes, unused, seeds=seeds)}
    assert all(p is not None for p in predicted.values())
    # thresholds above every score: decisions and masks are the paper's protocol's exactly
    never = dataclasses.replace(settings, novelty={"score": "knn", "thresholds": {n: 9.0 for n in ensemble.members}})
    off = dataclasses.replace(settings, novelty=None)
    a = annotate_batch(ensemble, x, sizes, never, seeds=seeds)
    b = annotate_batch(ensemble, x, sizes, off, seeds=seeds)
    for ra, rb in zip(a, b):
        assert (ra.decision, ra.reason, ra.agreeing) == (rb.decision, rb.reason, rb.agreeing)
        assert (ra.mask is None) == (rb.mask is None) and (ra.mask is None or (ra.mask == rb.mask).all())
        assert all(m.novel is None and m.novelty for m in rb.members)  # off: scores kept, no verdict


def test_novelty_setting_is_in_the_store_fingerprint(ensemble, lesion_dir, tmp_path):
    from aax.annotation.annotate import annotate_to_folder
    from aax.annotation.store import AnnotationStore, SettingsMismatch

    src = tmp_path / "in"
    src.mkdir()
    for p in find_images(lesion_dir / "images")[:2]:
        shutil.copy(p, src / p.name)
    annotate_to_folder(ensemble, src, tmp_path / "out", progress=False)
    stored = AnnotationStore(tmp_path / "out").settings
    assert stored["novelty"]["thresholds"] == ensemble.novelty.member_thresholds()
    row = next(AnnotationStore(tmp_path / "out").rows())
    assert all("novelty" in m and "novel" in m for m in row["members"])
    with pytest.raises(SettingsMismatch, match="novelty"):
        annotate_to_folder(ensemble, src, tmp_path / "out", progress=False, novelty=False)


def test_old_run_without_novelty_loads_annotates_and_calibrate_adds_it(trained_run, lesion_dir, tmp_path):
    from aax.evaluation.calibrate import calibrate_run
    from aax.models.ensemble import Ensemble

    old = tmp_path / "old-run"
    shutil.copytree(trained_run, old)
    (old / nv.FEATURES_FILE).unlink()
    manifest = json.loads((old / "aax.json").read_text())
    del manifest["novelty"]
    (old / "aax.json").write_text(json.dumps(manifest))

    with pytest.warns(UserWarning, match="no novelty features"):
        ens = Ensemble.load(old, device="cpu")
    assert ens.novelty is None and AnnotateSettings.from_ensemble(ens).novelty is None
    records = list(ens.annotate(find_images(lesion_dir / "images")[:3]))
    assert all(r.status == "ok" and r.reason != "novel" for r in records)
    assert all(m.novelty is None and "novelty" not in m.to_json() for r in records for m in r.members)

    result = calibrate_run(old, ensemble=ens)
    # the score that suits the run's pretrained members, as training would have chosen
    assert result["novelty"]["score"] == nv.PRETRAINED_SCORE and (old / nv.FEATURES_FILE).is_file()
    assert ens.novelty is not None and ens.novelty.ready
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loads without the message now
        assert Ensemble.load(old, device="cpu").novelty.ready


def test_fit_sets_a_threshold_per_predicted_class(trained_run, monkeypatch, tmp_path):
    from aax.models.ensemble import Ensemble
    from aax.models.novelty_fit import fit_run
    from aax.models.runfiles import recorded_split

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    train_paths, train_labels, val_paths = recorded_split(run)
    monkeypatch.setattr(nv, "MIN_PER_CLASS", 3)  # the test run's validation split is small
    block = fit_run(run, train_paths, train_labels, val_paths)
    assert block["per_class"] is True
    ens = Ensemble.load(run, device="cpu")
    step = ens.novelty.step()
    assert step["by_class"] and set(step["by_class"]) == set(ens.members)
    records = list(ens.annotate(val_paths, novelty=False))
    for n in ens.members:
        entry = block["thresholds"][n][block["score"]]
        for c, own in entry["by_class"].items():
            scores = [m.novelty[block["score"]] for r in records for m in r.members
                      if m.name == n and m.predicted == c]
            assert len(scores) >= 3 and own["n"] == len(scores)  # the images it predicts as c
            assert own["threshold"] == pytest.approx(nv.threshold_at(np.array(scores), 0.95)["threshold"], rel=1e-4)
        flags = [m.novelty[block["score"]] > nv.limits_for(entry, [m.predicted])[0][0]
                 for r in records for m in r.members if m.name == n]
        assert block["validation"]["flag_rate"][n] == pytest.approx(np.mean(flags))
    assert "as few as" in block["warning"] and "validation images predicted" in block["warning"]  # < 19 of a class
    fewest = min((e["n"], c) for t in block["thresholds"].values() for c, e in t[block["score"]]["by_class"].items())
    assert (block["new_images"]["n"], block["new_images"]["class"]) == fewest  # the least certain threshold
    assert block["new_images"] == {**nv.pass_rate_on_new_images(fewest[0], 0.95), "class": fewest[1]}
    pooled = fit_run(run, train_paths, train_labels, val_paths, per_class=False)
    assert pooled["per_class"] is False
    assert all("by_class" not in e for t in pooled["thresholds"].values() for e in t.values())
    assert "by_class" not in Ensemble.load(run, device="cpu").novelty.step()


def test_calibrate_keeps_features_of_the_same_checkpoints(trained_run, tmp_path):
    from aax.evaluation.calibrate import calibrate_run
    from aax.models.ensemble import Ensemble

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = (run / nv.FEATURES_FILE).stat().st_mtime_ns
    result = calibrate_run(run, ensemble=Ensemble.load(run, device="cpu"))
    assert (run / nv.FEATURES_FILE).stat().st_mtime_ns == before  # reused: same weights
    assert result["novelty"]["validation"]["n"] > 0


def test_evaluate_side_by_side_on_never_seen_fire(ensemble, lesion_dir, tmp_path):
    from aax.data.synth import generate
    from aax.evaluation.evaluate import evaluate

    unseen = generate("fire", tmp_path / "fire", n_per_class=4, size=64, seed=7)
    result = evaluate(ensemble, lesion_dir, unseen=unseen / "images", out=tmp_path / "ev")
    nov = result["unseen"]["novelty"]
    assert nov["available"] and nov["score"] == nv.PRETRAINED_SCORE
    methods = {(r["score"], r["method"]) for r in nov["rows"]}
    for score in ("u", "msp", "energy", "knn", "maha", "rmd"):
        assert (score, "AAX (2 of 3)") in methods
        assert all((score, n) in methods for n in ensemble.members)
    rule = next(r for r in nov["rows"] if r["score"] == nv.PRETRAINED_SCORE and r["method"].startswith("AAX"))
    # fire scenes are far from lesion X-rays in the members' features (8 fire images, 64 px)
    assert rule["auroc"] > 0.85
    assert nov["novel_rate_unseen"] == rule["flag_unseen"]  # the protocol's step is the rule's
    assert "Novelty scores side by side" in (tmp_path / "ev" / "report.html").read_text()
    assert "KNN" in result["tables"] and "FPR at 95% TPR" in result["tables"]
    header = (tmp_path / "ev" / "per_image.csv").read_text().splitlines()[0]
    assert all(f"{n}_knn" in header and f"{n}_novel" in header for n in ensemble.members)


def test_calibrate_sets_novelty_thresholds_on_unlabelled_images(trained_run, tmp_path):
    from aax.data import synth
    from aax.evaluation.calibrate import calibrate
    from aax.evaluation.calibration.files import validation_split
    from aax.models.ensemble import Ensemble

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    # new in-distribution images, their labels dropped: a plain folder of files
    made = synth.generate("lesion", tmp_path / "made", n_per_class=10, size=64, seed=123)
    pool = tmp_path / "pool"
    pool.mkdir()
    for i, f in enumerate(sorted(find_images(made / "images"))):
        shutil.copy(f, pool / f"img{i:02d}.png")
    ens = Ensemble.load(run, device="cpu")
    result = calibrate(ens, validation_split(run), novelty_images=pool)
    block = result["novelty"]
    assert block["validation"]["n"] == 20 != len(validation_split(run))  # the pool, not the validation split
    records = list(Ensemble.load(run, device="cpu").annotate(sorted(pool.iterdir()), novelty=False))
    for n in ens.members:
        entry = block["thresholds"][n][block["score"]]
        scores = np.array([m.novelty[block["score"]] for r in records for m in r.members if m.name == n])
        assert entry["n"] == 20
        assert entry["threshold"] == pytest.approx(nv.threshold_at(scores, 0.95)["threshold"], rel=1e-4)
    assert block["new_images"]["n"] <= 20
    # the labelled split is used when no images are given
    again = calibrate(ens, validation_split(run))["novelty"]
    assert again["validation"]["n"] == len(validation_split(run)) and "source" not in again["validation"]
