"""calibrate(): theta and tau chosen by the documented procedure, checked by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_evaluate import D, H, NAMES, S, FakeEnsemble, fake_data

from aax.evaluation.calibrate import calibrate
from aax.evaluation.calibration.files import validation_split
from aax.evaluation.calibration.masks import choose_tau
from aax.evaluation.calibration.theta import choose_theta
from aax.evaluation.evaluate import evaluate

GT = np.zeros((S, S), bool)
GT[16:48, 16:48] = True  # 1024 px
RING = np.zeros((S, S), bool)
RING[8:56, 8:56] = True
RING &= ~GT  # 1280 px around it
# off the tau grid on purpose (float32 0.8 > 0.8): > tau for tau in [0.43, 0.83) is exactly GT
GOOD = np.where(GT, 0.83, np.where(RING, 0.43, 0.0)).astype(np.float32)
ZERO = np.zeros((S, S), np.float32)
BLANK = [ZERO] * 3

# name -> (label, gt, probs, uncertainties, maps, readable)
VAL = {
    "p1.png": ("diseased", GT, [D, D, D], [0.01, 0.01, 0.01], [GOOD, GOOD, GOOD], True),
    # the third member is uncertain at the chosen theta: its (empty) map must not join the mask
    "p2.png": ("diseased", GT, [D, D, D], [0.02, 0.02, 0.5], [GOOD, GOOD, ZERO], True),
    "h3.png": ("healthy", None, [H, H, H], [0.03, 0.03, 0.03], BLANK, True),
    "h4.png": ("healthy", None, [H, H, H], [0.04, 0.04, 0.04], BLANK, True),
    "h5.png": ("healthy", None, [D, D, D], [0.3, 0.3, 0.3], BLANK, True),  # wrong whenever kept
    **{f"h{i}.png": ("healthy", None, [H, H, H], [0.0, 0.0, 0.0], BLANK, True) for i in range(6, 11)},
}


@pytest.fixture
def run(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "aax.json").write_text(json.dumps({"classes": ["diseased", "healthy"], "theta": 0.1, "tau": 0.9,
                                                 "other": {"kept": True}, "calibration": None}))
    return folder


def test_theta_by_hand(run, tmp_path):
    ens = FakeEnsemble(spec=VAL, run=run, tau=0.9)
    result = calibrate(ens, fake_data(tmp_path, VAL), max_flag_rate=0.2)
    assert len(ens.calls) == 1 and ens.calls[0]["keep_saliency"] is True  # one pass
    # candidates 0, .01, .02, .03, .04, .1 (current), .3, .5: theta in [.04, .3) keeps 9 of 10,
    # all right; .03 keeps 8; .3 keeps all but gets h5 wrong. Ties -> smaller theta: .04,
    # then settled halfway to the next observed uncertainty (.3; .1 is not observed)
    assert result["theta_candidate"] == pytest.approx(0.04)
    assert result["theta"] == pytest.approx(0.17)
    assert result["flag_rate"] == pytest.approx(0.1) and result["accuracy_kept"] == 1.0
    assert result["constraint_met"] is True
    assert result["n"] == 10 and result["n_candidates"] == 8
    # tau: IoU 1 for tau in 0.45 .. 0.80; nearest to the current 0.9 is 0.8
    assert result["tau"] == pytest.approx(0.8)
    assert result["iou_mean"] == pytest.approx(1.0) and result["n_masks"] == 2
    by_tau = {p["tau"]: p for p in result["tau_curve"]}
    assert by_tau[0.4]["iou_mean"] == pytest.approx(1024 / (1024 + 1280))
    assert by_tau[0.85]["iou_mean"] == 0.0


def test_tight_flag_budget_takes_the_theta_that_keeps_everything(run, tmp_path):
    result = calibrate(FakeEnsemble(spec=VAL, run=run), fake_data(tmp_path, VAL), max_flag_rate=0.05, write=False)
    # .3 and .5 tie on accuracy and coverage -> .3, settled halfway to .5
    assert result["theta_candidate"] == pytest.approx(0.3) and result["theta"] == pytest.approx(0.4)
    assert result["flag_rate"] == 0.0 and result["accuracy_kept"] == pytest.approx(0.9)
    # at theta .3 the third member of p2 is still uncertain: the mask comes from the first two
    assert result["iou_mean"] == pytest.approx(1.0)


def test_matches_evaluate_at_the_chosen_values(run, tmp_path):
    data = fake_data(tmp_path, VAL)
    result = calibrate(FakeEnsemble(spec=VAL, run=run), data, write=False)
    ev = evaluate(FakeEnsemble(spec=VAL, run=run), data, theta=result["theta"], tau=result["tau"])
    assert ev["ensemble"]["accuracy_kept"] == pytest.approx(result["accuracy_kept"])
    assert ev["ensemble"]["flag_rate"] == pytest.approx(result["flag_rate"])
    assert ev["ensemble"]["iou_mean"] == pytest.approx(result["iou_mean"])
    assert ev["ensemble"]["iou_micro"] == pytest.approx(result["iou_micro"])


def test_writes_manifest_and_curve(run, tmp_path):
    result = calibrate(FakeEnsemble(spec=VAL, run=run, tau=0.9), fake_data(tmp_path, VAL))
    manifest = json.loads((run / "aax.json").read_text())
    assert manifest["theta"] == result["theta"] and manifest["tau"] == result["tau"]
    assert manifest["other"] == {"kept": True}  # the rest of the manifest is untouched
    cal = manifest["calibration"]
    assert cal["previous"] == {"theta": 0.1, "tau": 0.9, "fusion": "min", "source": "cam", "refine": "none"}
    assert cal["refine"] == "none"  # the fake ensemble cuts no regions
    assert cal["source"] == "cam" and [r["source"] for r in cal["sources"]] == ["cam"]  # no patch bank
    assert manifest["maps"] == {"fusion": result["fusion"]} and result["fusion"] == "min"
    assert cal["n"] == 10 and cal["n_candidates"] == 8 and "date" in cal
    assert "risk_coverage" not in cal  # the curve lives in its own file
    curves = json.loads((run / cal["curves"]).read_text())
    assert len(curves["risk_coverage"]) == 8 and len(curves["tau_curve"]) == 19
    png = (run / "calibration" / "risk_coverage.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(run.glob(".*.tmp")) and not list((run / "calibration").glob(".*.tmp"))


def test_no_masks_leaves_tau(run, tmp_path):
    spec = {k: (v[0], None, *v[2:]) for k, v in VAL.items()}
    result = calibrate(FakeEnsemble(spec=spec, run=run, tau=0.9), fake_data(tmp_path, spec), write=False)
    assert result["tau"] == 0.9 and result["iou_mean"] is None and result["tau_curve"] == []


def test_flag_budget_that_cannot_be_met(run, tmp_path):
    # two confident members that disagree and a third with no vote: flagged (no
    # consensus) at every theta
    # (here: the third member's probabilities tie, so it votes for nothing)
    spec = {"x.png": ("diseased", None, [D, H, [0.5, 0.5]], [0.0, 0.0, 0.0], [ZERO] * 3, True),
            "y.png": ("healthy", None, [H, H, H], [0.0, 0.0, 0.0], [ZERO] * 3, True)}
    result = calibrate(FakeEnsemble(spec=spec, run=run), fake_data(tmp_path, spec), max_flag_rate=0.0, write=False)
    assert result["constraint_met"] is False and "warning" in result
    assert result["flag_rate"] == pytest.approx(0.5)


def test_settle_theta():
    from aax.evaluation.calibration.theta import settle_theta

    unc = np.array([[0.1, 0.2], [0.2, 0.4]])
    assert settle_theta(0.1, unc) == pytest.approx(0.15)
    assert settle_theta(0.2, unc) == pytest.approx(0.3)
    assert settle_theta(0.4, unc) == 0.4  # the largest: kept
    assert settle_theta(0.05, unc) == pytest.approx(0.075)  # a default below every u


def test_choosers_directly():
    curve = [
        {"theta": 0.0, "coverage": 0.0, "flag_rate": 1.0, "accuracy": 0.0, "accuracy_kept": None},
        {"theta": 0.1, "coverage": 0.7, "flag_rate": 0.3, "accuracy": 0.7, "accuracy_kept": 1.0},
        {"theta": 0.2, "coverage": 0.8, "flag_rate": 0.2, "accuracy": 0.76, "accuracy_kept": 0.95},
        {"theta": 0.3, "coverage": 0.9, "flag_rate": 0.1, "accuracy": 0.855, "accuracy_kept": 0.95},
        {"theta": 0.4, "coverage": 1.0, "flag_rate": 0.0, "accuracy": 0.9, "accuracy_kept": 0.9},
    ]
    assert choose_theta(curve, 0.2)[0]["theta"] == 0.3  # .2 and .3 tie on accuracy: more coverage wins
    assert choose_theta(curve, 0.3)[0]["theta"] == 0.1
    assert choose_theta(curve, 0.0)[0]["theta"] == 0.4
    assert choose_tau([{"tau": 0.3, "iou_mean": 0.5}, {"tau": 0.6, "iou_mean": 0.5},
                       {"tau": 0.9, "iou_mean": None}], current=0.5)["tau"] == 0.6
    assert choose_tau([{"tau": 0.3, "iou_mean": None}], current=0.5) is None


def test_max_flag_rate_validated(run, tmp_path):
    with pytest.raises(ValueError):
        calibrate(FakeEnsemble(spec=VAL, run=run), fake_data(tmp_path, VAL), max_flag_rate=1.5)


def test_validation_split_from_manifest(tmp_path):
    from aax.data.synth import generate

    src = generate("lesion", tmp_path / "data", n_per_class=3, size=32)
    run = tmp_path / "run"
    run.mkdir()
    val_files = ["images/diseased/diseased_00001.png", "images/healthy/healthy_00002.png"]
    (run / "aax.json").write_text(json.dumps({"data": {"source": str(src), "root": str(src), "format": "folder",
                                                       "val_files": val_files}}))
    val = validation_split(run)
    assert [Path(s.image).relative_to(src).as_posix() for s in val] == val_files
    assert [s.label for s in val] == ["diseased", "healthy"]
    (src / val_files[0]).unlink()
    with pytest.raises(ValueError, match="no longer in"):
        validation_split(run)
    (run / "aax.json").write_text(json.dumps({"data": {"source": None}}))
    with pytest.raises(ValueError, match="no validation split"):
        validation_split(run)


@pytest.mark.slow
def test_calibrate_run_on_a_trained_run(request, tmp_path):
    import shutil

    from test_evaluate import session_fixture

    from aax.evaluation.calibrate import calibrate_run
    from aax.models.ensemble import Ensemble

    run = tmp_path / "run"
    shutil.copytree(session_fixture(request, "trained_run"), run)  # the shared fixture's run stays as it is
    before = json.loads((run / "aax.json").read_text())
    result = calibrate_run(run, max_flag_rate=0.3)
    assert result["n"] == before["data"]["n_val"]
    assert "validation split" in result["data"]
    if result["constraint_met"]:
        assert result["flag_rate"] <= 0.3
    assert result["theta"] >= result["theta_candidate"]
    assert result["n_masks"] == before["data"]["val_counts"]["diseased"]  # synthetic lesions have masks
    assert result["tau"] in [pytest.approx(t) for t in result["tau_grid"]]
    loaded = Ensemble.load(run)
    assert loaded.theta == pytest.approx(result["theta"]) and loaded.tau == pytest.approx(result["tau"])
    after = json.loads((run / "aax.json").read_text())
    assert after["members"] == before["members"] and after["data"] == before["data"]
    assert (run / "calibration" / "risk_coverage.png").is_file()


@pytest.mark.slow
def test_calibrate_command(request, tmp_path, capsys):
    import shutil

    from test_evaluate import session_fixture, small_split

    from aax.cli import main
    from aax.data import write_manifest

    run = tmp_path / "run"
    shutil.copytree(session_fixture(request, "trained_run"), run)
    val = write_manifest(small_split(session_fixture(request, "lesion_dir"), per_class=4), tmp_path / "val.csv")
    pool = tmp_path / "pool"  # unlabelled images for the novelty thresholds
    pool.mkdir()
    for i, s in enumerate(small_split(session_fixture(request, "lesion_dir"), per_class=6)):
        shutil.copy(s.image, pool / f"img{i:02d}.png")
    assert main(["calibrate", str(run), str(val), "--max-flag-rate", "0.5", "--batch-size", "4",
                 "--novelty-images", str(pool)]) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((run / "aax.json").read_text())
    cal = manifest["calibration"]
    assert cal["n"] == 8 and cal["max_flag_rate"] == 0.5 and cal["data"] == str(val)
    assert manifest["novelty"]["validation"]["n"] == 12  # set on the pool, not on VALDATA's 8
    new = manifest["novelty"]["new_images"]
    assert manifest["novelty"]["validation"]["source"] == f"{pool} (unlabelled)"
    assert f"of 12 images of {pool} (unlabelled) pass" in printed
    assert (f"lets pass {100 * new['expected']:.1f}% on average, at least {100 * new['low']:.1f}% "
            "19 times in 20") in printed
    assert len(cal["member_sets"]) == 4  # all three, then each pair
    assert {r["refine"] for r in cal["fusions"]} == {"none", "superpixels"}  # both tried by default
    assert main(["calibrate", str(run), str(val), "--batch-size", "4", "--all-members", "--no-novelty",
                 "--refines", "none"]) == 0
    manifest = json.loads((run / "aax.json").read_text())
    assert manifest["calibration"]["mask_members"] is None and "mask_members" not in manifest["maps"]
    assert [r["mask_members"] for r in manifest["calibration"]["member_sets"]] == [None]
    assert manifest["calibration"]["refine"] == "none" and "refine" not in manifest["maps"]
    assert {r["refine"] for r in manifest["calibration"]["fusions"]} == {"none"}
    assert main(["calibrate", str(tmp_path / "no-run"), str(val)]) == 2


# Three agreeing members: A has a false positive R (1.0) beside the lesion, B a hole H in it
# (0.0), the lesion is 0.5 elsewhere. min loses H at every tau; mean puts R and H both at
# 1/3 and cannot separate them; a 2-of-3 vote (the second largest value) is exactly GT.
HOLE = np.zeros((S, S), bool)
HOLE[16:24, 16:48] = True  # 256 px of GT
LESION = np.where(GT, 0.5, 0.0).astype(np.float32)
MAP_A = np.where(RING, 1.0, LESION).astype(np.float32)
MAP_B = np.where(HOLE, 0.0, LESION).astype(np.float32)
FUSE = {
    "p1.png": ("diseased", GT, [D, D, D], [0.01, 0.01, 0.01], [MAP_A, MAP_B, LESION], True),
    "p2.png": ("diseased", GT, [D, D, D], [0.01, 0.01, 0.01], [MAP_A, MAP_B, LESION], True),
    **{f"h{i}.png": ("healthy", None, [H, H, H], [0.0, 0.0, 0.0], BLANK, True) for i in range(3, 8)},
}


def test_fusion_is_chosen_by_iou(run, tmp_path):
    data = fake_data(tmp_path, FUSE)
    result = calibrate(FakeEnsemble(spec=FUSE, run=run), data, write=False)
    table = {row["fusion"]: row for row in result["fusions"]}
    assert table["min"]["iou_mean"] == pytest.approx((1024 - 256) / 1024)
    assert table["mean"]["iou_mean"] < 1.0
    assert table["vote"]["iou_mean"] == pytest.approx(1.0)
    assert result["fusion"] == "vote" and result["iou_mean"] == pytest.approx(1.0)
    assert 0.0 <= result["tau"] < 0.5
    assert result["mask_members"] is None  # a tie with a smaller set keeps all members
    # only the paper's intersection of every agreeing member
    only_min = calibrate(FakeEnsemble(spec=FUSE, run=run), data, write=False, fusions=("min",),
                         choose_members=False)
    assert only_min["fusion"] == "min" and only_min["iou_mean"] == pytest.approx(0.75)
    # the intersection, from the members whose maps have no hole: the lesion exactly
    narrowed = calibrate(FakeEnsemble(spec=FUSE, run=run), data, write=False, fusions=("min",))
    assert narrowed["mask_members"] == [NAMES[0], NAMES[2]] and narrowed["iou_mean"] == pytest.approx(1.0)


def test_otsu_when_no_masks_and_as_a_candidate(run, tmp_path):
    spec = {k: (v[0], None, *v[2:]) for k, v in VAL.items()}
    result = calibrate(FakeEnsemble(spec=spec, run=run, tau=0.9), fake_data(tmp_path, spec), write=False,
                       tau_without_masks="otsu")
    assert result["tau"] == "otsu" and result["iou_mean"] is None
    # with masks, Otsu's point is in the table beside the grid; on VAL it ties the grid's best,
    # so the grid value is kept
    result = calibrate(FakeEnsemble(spec=VAL, run=run, tau=0.9), fake_data(tmp_path, VAL), write=False)
    assert result["tau"] == pytest.approx(0.8)


def test_each_positive_class_gets_its_own_tau_by_hand():
    """Two positive classes whose masks want different thresholds: each class takes its
    own best tau, and the overall mean IoU is the mean over both classes' images."""
    from aax.evaluation.calibration.collect import Collected, _ImageMasks
    from aax.evaluation.calibration.masks import choose_masks
    from aax.evaluation.metrics import ThetaSweep

    classes = ["benign", "malignant", "normal"]  # "normal" (2) is the negative class
    taus = np.array([0.2, 0.5, 0.8])
    a, b, n = [0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.05, 0.05, 0.9]
    probs = np.array([[a] * 3, [b] * 3, [n] * 3])
    uncertainty = np.zeros((3, 3))
    sweep = ThetaSweep.build(probs, uncertainty, negative_index=2)
    everyone = (0, 1, 2)

    def entry(label: int, tp: list[int], fp: list[int]) -> _ImageMasks:
        # 100 GT pixels; TP / FP at tau = 0.2, 0.5, 0.8, then at Otsu's threshold
        counts = {(f, everyone, "none"): (np.array(tp), np.array(fp)) for f in ("min", "mean", "vote")}
        return _ImageMasks(gt_pixels=100, counts=counts, label=label)

    # IoU = TP / (TP + FP + FN): benign 0.5, 90/110, 0.4, 0.5; malignant 0.25, 0.5, 0.7, 0.5
    masks = {0: entry(0, [100, 90, 40, 50], [100, 10, 0, 0]),   # benign: best at 0.5
             1: entry(1, [100, 100, 70, 50], [300, 100, 0, 0])}  # malignant: best at 0.8
    collected = Collected(labels=np.array([0, 1, 2]), probs=probs, uncertainty=uncertainty,
                          masks=masks, taus=taus, n_errors=0)
    chosen = choose_masks(collected, sweep, theta=0.1, classes=classes, current_tau=0.5)
    assert chosen["tau"] == {"benign": 0.5, "malignant": 0.8}
    assert chosen["iou_mean"] == pytest.approx((90 / 110 + 0.7) / 2)
    assert chosen["n_masks"] == 2
    # one tau for both classes reaches at best (90/110 + 0.5) / 2, at 0.5
    assert chosen["iou_mean"] > (90 / 110 + 0.5) / 2 + 0.05


CORNER = np.zeros((S, S), bool)
CORNER[:16, :16] = True  # 256 px, off the centre: a centred box misses it
ON_CORNER = np.where(CORNER, 0.9, 0.0).astype(np.float32)
ELSEWHERE = np.zeros((S, S), np.float32)
ELSEWHERE[48:, 48:] = 0.9  # as large, in the opposite corner


@pytest.mark.parametrize("maps, beats", [(ON_CORNER, True), (ELSEWHERE, False)])
def test_masks_are_compared_with_trivial_masks(run, tmp_path, maps, beats):
    spec = {"p1.png": ("diseased", CORNER, [D, D, D], [0.01] * 3, [maps] * 3, True),
            **{f"h{i}.png": ("healthy", None, [H, H, H], [0.0] * 3, BLANK, True) for i in range(2, 6)}}
    result = calibrate(FakeEnsemble(spec=spec, run=run), fake_data(tmp_path, spec), write=False)
    # by hand: the whole image is 256 / 4096; the centred box [16:48, 16:48] misses the corner
    assert result["trivial"]["whole image"]["iou_mean"] == pytest.approx(256 / 4096)
    assert result["trivial"]["centred box"]["iou_mean"] == pytest.approx(0.0)
    assert result["iou_mean"] == pytest.approx(1.0 if beats else 0.0)
    assert result["beats_trivial"] is beats
    assert ("mask_warning" in result) is (not beats)
    if not beats:
        assert "whole image" in result["mask_warning"] and "0.062" in result["mask_warning"]


# Two members whose maps complement each other, and a third that points elsewhere: no
# fusion of all three finds the lesion, the first two's does (values off the tau grid).
WEAK_A = np.where(GT & ~HOLE, 0.83, np.where(HOLE, 0.23, 0.0)).astype(np.float32)
RING_ALSO = np.where(RING, 0.33, np.where(GT, 0.83, 0.0)).astype(np.float32)
ELSEWHERE_RING = np.where(RING, 0.93, 0.0).astype(np.float32)
MISLEADS = {
    "p1.png": ("diseased", GT, [D, D, D], [0.01, 0.01, 0.01], [WEAK_A, RING_ALSO, ELSEWHERE_RING], True),
    "p2.png": ("diseased", GT, [D, D, D], [0.01, 0.01, 0.01], [WEAK_A, RING_ALSO, ELSEWHERE_RING], True),
    **{f"h{i}.png": ("healthy", None, [H, H, H], [0.0, 0.0, 0.0], BLANK, True) for i in range(3, 8)},
}


def test_mask_members_are_chosen_by_iou_by_hand(run, tmp_path):
    """With all three maps the best is 0.75 (mean above 0.4, or the 2-of-3 vote above
    0.33: the lesion without its weak quarter); the first two members' maps, fused by
    the intersection above 0.05..0.2, give the lesion exactly. The third member's map is
    left out of the masks; the class decision (all three agree) is unchanged."""
    data = fake_data(tmp_path, MISLEADS)
    result = calibrate(FakeEnsemble(spec=MISLEADS, run=run), data, write=False)
    sets = {tuple(r["mask_members"] or ["all"]): r for r in result["member_sets"]}
    assert sets[("all",)]["iou_mean"] == pytest.approx(0.75)
    assert {row["fusion"]: row["iou_mean"] for row in result["fusions"]}["min"] == pytest.approx(0.0)
    first_two = tuple(NAMES[:2])
    assert sets[first_two]["iou_mean"] == pytest.approx(1.0)
    assert sets[(NAMES[0], NAMES[2])]["iou_mean"] < 0.75 and sets[(NAMES[1], NAMES[2])]["iou_mean"] < 0.75
    assert result["mask_members"] == list(first_two) and result["iou_mean"] == pytest.approx(1.0)
    assert result["fusion"] == "min" and 0.05 <= result["tau"] < 0.23
    # the paper's fusion of every agreeing member, when asked
    paper = calibrate(FakeEnsemble(spec=MISLEADS, run=run), data, write=False, choose_members=False)
    assert paper["mask_members"] is None and paper["iou_mean"] == pytest.approx(0.75)
    assert [r["mask_members"] for r in paper["member_sets"]] == [None]


def test_mask_members_are_written_and_cleared(run, tmp_path):
    data = fake_data(tmp_path, MISLEADS)
    calibrate(FakeEnsemble(spec=MISLEADS, run=run), data, write=True, novelty=False)
    manifest = json.loads((run / "aax.json").read_text())
    assert manifest["maps"]["mask_members"] == NAMES[:2]
    calibrate(FakeEnsemble(spec=MISLEADS, run=run), data, write=True, novelty=False, choose_members=False)
    assert "mask_members" not in json.loads((run / "aax.json").read_text())["maps"]  # all: the default


# The square finding GT, most of it at 0.6 with a weak quarter at 0.2, and the ring around
# it at 0.4: thresholded as it is, the best mask is the strong part (0.75); averaged over
# the image's regions (GT, ring, the rest) the square's mean (0.5) stands above the
# ring's, and tau in [0.4, 0.5) gives it exactly.
WEAK_QUARTER = np.zeros((S, S), bool)
WEAK_QUARTER[16:32, 16:32] = True
SPILLS = np.where(GT & ~WEAK_QUARTER, 0.6, np.where(GT, 0.2, np.where(RING, 0.4, 0.0))).astype(np.float32)
REGIONS = np.where(GT, 1, np.where(RING, 2, 0)).astype(np.int64)
SQUARES = {
    "p1.png": ("diseased", GT, [D, D, D], [0.01, 0.01, 0.01], [SPILLS, SPILLS, SPILLS], True),
    "p2.png": ("diseased", GT, [D, D, D], [0.01, 0.01, 0.01], [SPILLS, SPILLS, SPILLS], True),
    **{f"h{i}.png": ("healthy", None, [H, H, H], [0.0, 0.0, 0.0], BLANK, True) for i in range(3, 8)},
}


def test_refinement_is_chosen_by_iou_by_hand(run, tmp_path):
    regions = {"p1.png": REGIONS, "p2.png": REGIONS[::2, ::2]}  # at the model's size, resized to the image's
    data = fake_data(tmp_path, SQUARES)
    result = calibrate(FakeEnsemble(spec=SQUARES, run=run, regions=regions), data, write=False)
    rows = {(r["fusion"], r["refine"]): r["iou_mean"] for r in result["fusions"]}
    assert rows[("min", "none")] == pytest.approx(0.75)
    # p2's regions, halved and resized back to the image's size, are the same regions
    assert rows[("min", "superpixels")] == pytest.approx(1.0)
    assert result["refine"] == "superpixels" and result["iou_mean"] == pytest.approx(1.0)
    assert 0.4 <= result["tau"] <= 0.5 and result["previous"]["refine"] == "none"  # the square: 0.5 + float error
    paper = calibrate(FakeEnsemble(spec=SQUARES, run=run, regions=regions), data, write=False, refines=("none",))
    assert paper["refine"] == "none" and paper["iou_mean"] == pytest.approx(0.75)
    # without regions (an ensemble that cuts none) nothing is refined: the tie keeps "none"
    bare = calibrate(FakeEnsemble(spec=SQUARES, run=run), data, write=False)
    assert bare["refine"] == "none" and bare["iou_mean"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="refines"):
        calibrate(FakeEnsemble(spec=SQUARES, run=run), data, write=False, refines=("crf",))


def test_refinement_is_written_and_cleared(run, tmp_path):
    regions = dict.fromkeys(("p1.png", "p2.png"), REGIONS)
    data = fake_data(tmp_path, SQUARES)
    calibrate(FakeEnsemble(spec=SQUARES, run=run, regions=regions), data, write=True, novelty=False)
    assert json.loads((run / "aax.json").read_text())["maps"]["refine"] == "superpixels"
    calibrate(FakeEnsemble(spec=SQUARES, run=run, regions=regions), data, write=True, novelty=False,
              refines=("none",))
    assert "refine" not in json.loads((run / "aax.json").read_text())["maps"]  # none: the default
