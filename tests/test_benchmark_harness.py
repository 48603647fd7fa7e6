"""The benchmark harness runs (its timings are not checked here: they are measured on
demand with ``make bench``), and its side-by-side check holds: on the same images, AAX's
maps and decisions are the hooked reference's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quick_core_run_writes_ratios_and_agrees_with_the_reference(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_annotate.py"), "--quick", "--parts", "core",
           "--sizes", "32", "--out", str(tmp_path), "--name", "smoke"]
    # no wall-clock limit: on a busy machine this takes minutes, and that is no failure
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "smoke.json").read_text())
    size = result["sizes"]["32"]
    assert size["floor"]["images_per_s"] > 0 and size["aax"]["images_per_s"] > 0
    assert set(size["ratios"]) == {"aax_over_floor", "aax_new_maps_over_floor", "aax_over_reference",
                                   "end_to_end_over_floor", "end_to_end_new_maps_over_floor"}
    # AAX with the map settings new runs get, timed beside stride 32
    assert size["aax_new_maps"]["images_per_s"] > 0 and size["aax_new_maps"]["maps"]["map_stride"] == 16
    check = size["map_check"]
    assert check["same_decision"] == check["images"] > 0
    assert check["max_abs_map_difference"] < 1e-4
    assert (tmp_path / "latest.json").is_file()


def test_protocol_levers_rederives_what_evaluate_scores(ensemble, lesion_dir, tmp_path):
    """benchmarks/protocol_levers.py re-derives decisions and masks from one annotate pass:
    at the run's own theta and novelty flags it must score what ``aax evaluate`` scores."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import protocol_levers as levers
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from aax.evaluation.evaluate import evaluate

    rows = levers.collect(ensemble, str(lesion_dir))
    got = levers.score_setting(ensemble, rows, float(ensemble.theta), levers.novel_flags(ensemble, rows, "run", None))
    want = evaluate(ensemble, str(lesion_dir), report=False)
    for key, expected in [("AAX", want["ensemble"]), *want["members"].items()]:
        for metric in ("accuracy", "flag_rate", "iou_mean"):
            assert got[key][metric] == pytest.approx(expected[metric], abs=1e-9), (key, metric)
    # members flagged by theta alone (the paper's rule) score what evaluate scores without
    # the novelty step; charged their own novel flags, they are flagged at least as often
    paper = evaluate(ensemble, str(lesion_dir), report=False, novelty=False)["members"]
    for name, expected in paper.items():
        plain = got[f"{name} (theta only)"]
        for metric in ("accuracy", "flag_rate", "iou_mean"):
            assert plain[metric] == pytest.approx(expected[metric], abs=1e-9), (name, metric)
        i = list(ensemble.members).index(name)
        by_hand = [m.uncertainty > ensemble.theta or m.predicted is None or bool(m.novel)
                   for m in (r["record"].members[i] for r in rows)]
        assert got[name]["flag_rate"] == pytest.approx(sum(by_hand) / len(rows), abs=1e-9), name
        assert plain["flag_rate"] <= got[name]["flag_rate"]
    # no uncertainty flags and no novelty step: nothing is flagged but no-consensus
    free = levers.score_setting(ensemble, rows, float("inf"), levers.novel_flags(ensemble, rows, "off", None))
    assert free["AAX"]["flag_rate"] <= got["AAX"]["flag_rate"]
    assert all(free[n]["flag_rate"] == 0.0 for n in ensemble.members)
    # thresholds set on a pool: over all its images, and per class over the images each
    # member predicts as that class (classes predicted at least MIN_PER_CLASS times)
    from aax.data import find_images
    from aax.models.novelty import MIN_PER_CLASS

    n_pool = len(find_images(lesion_dir / "images"))
    pool = levers.pool_thresholds(ensemble, str(lesion_dir / "images"))
    assert set(pool) == set(ensemble.members)
    for entry in pool.values():
        assert entry["n"] == n_pool and entry["by_class"]
        assert set(entry["by_class"]) <= set(ensemble.classes)
        assert all(e["n"] >= MIN_PER_CLASS for e in entry["by_class"].values())
        assert sum(e["n"] for e in entry["by_class"].values()) <= n_pool


def test_calibration_rules_scores_what_calibrate_picked(trained_run, lesion_dir):
    """benchmarks/calibration_rules.py: its ``calibrate`` rule is what ``aax calibrate``
    picks on the run's validation split (same options, tau and validation IoU), and no
    rule beats the test-set oracle on the test images."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import calibration_rules as rules
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    from aax.evaluation.calibrate import calibrate
    from aax.evaluation.calibration.files import validation_split

    recorded = calibrate(trained_run, validation_split(trained_run), write=False, novelty=False)
    assert recorded["iou_mean"] is not None
    result = rules.measure(str(trained_run), str(lesion_dir), theta=recorded["theta"])
    got = result["rules"]["calibrate"]
    assert got["validation_iou"] == pytest.approx(100 * recorded["iou_mean"], abs=1e-9)
    assert got["tau"] == recorded["tau"]
    who = "all" if recorded["mask_members"] is None else "+".join(recorded["mask_members"])
    assert got["option"].startswith(f"{recorded['fusion']} of {who},")
    assert got["option"].endswith(f"refine {recorded['refine']}")
    assert result["rules"]["paper"]["option"] == "min of all, refine none"
    oracle = result["rules"]["oracle"]["test_iou"]
    for rule, row in result["rules"].items():
        assert row["test_iou"] <= oracle + 1e-9, rule
        assert row["validation_iou"] <= got["validation_iou"] + 1e-9, rule  # calibrate takes the best
        if rule.startswith("gain >"):
            assert row["option"] in (got["option"], result["rules"]["paper"]["option"]), rule
    assert result["n_validation_masks"] > 0 and result["n_test_masks"] > result["n_validation_masks"]


def test_reviews_benchmark_tables_each_localisation_setting_apart(tmp_path):
    """benchmarks/reviews.py: rows of another localisation setting get their own key, row
    of the table and line of the figure; rows written before the setting was recorded
    read as the default."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import reviews
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    args = reviews.parse_args(["--train", "a", "--test", "b", "--out", str(tmp_path)])
    assert reviews._setting(args) == ""
    args = reviews.parse_args(["--train", "a", "--test", "b", "--out", str(tmp_path),
                               "--localisation-loss", "spatial", "--localisation-weight", "0.3"])
    assert reviews._setting(args) == "-spatial0.3"
    args = reviews.parse_args(["--train", "a", "--test", "b", "--out", str(tmp_path), "--warm-start",
                               "--retrain-epochs", "3"])
    assert reviews._setting(args) == "-warm3"
    args = reviews.parse_args(["--train", "a", "--test", "b", "--out", str(tmp_path), "--segmentation-weight", "1"])
    assert reviews._setting(args) == "-seg1-refit60-views14"  # the heads' refit, by default as aax retrain's
    args = reviews.parse_args(["--train", "a", "--test", "b", "--out", str(tmp_path), "--segmentation-weight", "1",
                               "--segmentation-views", "0"])
    assert reviews._setting(args) == "-seg1-refit60"
    args = reviews.parse_args(["--train", "a", "--test", "b", "--out", str(tmp_path), "--segmentation-weight", "1",
                               "--segmentation-epochs", "0"])
    assert reviews._setting(args) == "-seg1"

    def row(budget, order, iou, loc=None):
        r = {"budget": budget, "order": order, "accuracy": 0.7, "accuracy_kept": 0.8, "flag_rate": 0.1,
             "iou_mean": iou, "iou_mean_given": iou, "n_masks_given": 5,
             "trivial": {"whole image": 0.1, "centred box": 0.18}}
        return {**r, "localisation": loc} if loc else r

    results = {"rows": {"0": row(0, None, 0.05), "uncertainty:50": row(50, "uncertainty", 0.10),
                        "uncertainty:50-spatial0.3": row(50, "uncertainty", 0.20, {"loss": "spatial", "weight": 0.3}),
                        "uncertainty:50-warm3": {**row(50, "uncertainty", 0.30), "warm_start": True, "epochs": 3},
                        "uncertainty:50-seg1": {**row(50, "uncertainty", 0.40), "segmentation_weight": 1.0},
                        "uncertainty:50-seg1-refit60": {**row(50, "uncertainty", 0.45), "segmentation_weight": 1.0,
                                                        "segmentation_epochs": 60},
                        "uncertainty:50-seg1-refit60-views14": {**row(50, "uncertainty", 0.55),
                                                                "segmentation_weight": 1.0, "segmentation_epochs": 60,
                                                                "segmentation_views": 14, "iou_mean_with_drafts": 0.58,
                                                                "unet_iou_mean": 0.5, "unet_iou_given": 0.6}}}
    lines = reviews.table(results).splitlines()
    assert any("| 50 | uncertainty | bce 0.1 |" in line and "| 10.0 |" in line for line in lines)
    assert any("| 50 | uncertainty | spatial 0.3 |" in line and "| 20.0 |" in line for line in lines)
    assert any("| bce 0.1, warm start (3 epochs) |" in line and "| 30.0 |" in line for line in lines)
    assert any("| bce 0.1 + segmentation head 1, no refit |" in line and "| 40.0 |" in line for line in lines)
    assert any("| bce 0.1 + segmentation head 1, refit 60 |" in line and "| 45.0 |" in line for line in lines)
    assert any("| bce 0.1 + segmentation head 1, refit 60 (14 views) |" in line
               and line.endswith("| 55.0 (5) | 58.0 | 50.0 | 60.0 |") for line in lines)
    assert any("| 50 | uncertainty | bce 0.1 |" in line and "| 10.0 (5) | – |" in line for line in lines)  # no drafts stored
    reviews.figure(results, tmp_path / "reviews.png")
    assert (tmp_path / "reviews.png").stat().st_size > 10_000
