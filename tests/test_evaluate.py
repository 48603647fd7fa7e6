"""evaluate(): hand-built records through a stand-in ensemble, scored by hand.

The stand-in yields records exactly as ``Ensemble.annotate`` does (input order, maps at
the image's size, error records), decided by the real protocol, so what is tested here
is the scoring: members alone vs AAX, masks, flags, open set, outputs.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from aax.annotation.decide import decide, draft_members, intersect, predicted_classes
from aax.annotation.records import REVIEW, AnnotationRecord, MemberResult
from aax.evaluation.evaluate import evaluate
from aax.evaluation.inputs import open_images
from aax.evaluation.scoring import member_decision
from aax.evaluation.tables import tables_markdown

S = 64  # image side
CLASSES = ["diseased", "healthy"]
D, H = [0.9, 0.1], [0.1, 0.9]
NAMES = ["resnet50", "efficientnet-b0", "densenet121"]


def block(r0, r1, c0, c1):
    m = np.zeros((S, S), bool)
    m[r0:r1, c0:c1] = True
    return m


TOP_LEFT = block(0, 32, 0, 32)  # 1024 px
TOP_HALF = block(0, 32, 0, 64)  # 2048 px
BOTTOM_RIGHT = block(32, 64, 32, 64)


@dataclass
class FakeSample:
    image: Path
    label: str
    gt: np.ndarray | None = None

    def mask(self):
        return self.gt


class FakeDataset(list):
    classes = CLASSES
    errors: list = []
    source = "fake-data"


# image -> (label, gt mask, members' probs, uncertainties, maps, readable)
SPEC = {
    # A: two confident diseased with maps TOP_HALF (r) and TOP_LEFT (e); d says healthy
    "a.png": ("diseased", TOP_LEFT, [D, D, H], [0.01, 0.02, 0.03], [TOP_HALF, TOP_LEFT, BOTTOM_RIGHT], True),
    # B: everyone uncertain -> flagged; members alone flagged too
    "b.png": ("diseased", BOTTOM_RIGHT, [D, D, D], [0.5, 0.5, 0.5], [BOTTOM_RIGHT] * 3, True),
    # C: healthy, all agree
    "c.png": ("healthy", None, [H, H, H], [0.0, 0.0, 0.0], [TOP_LEFT] * 3, True),
    # D: healthy image called diseased by two confident members (a false positive)
    "d.png": ("healthy", None, [D, D, H], [0.05, 0.05, 0.05], [TOP_LEFT] * 3, True),
    # E: unreadable
    "e.png": ("healthy", None, None, None, None, False),
}
UNSEEN = {
    "u1.png": ([D, H, D], [0.3, 0.4, 0.2]),
    "u2.png": ([H, H, D], [0.02, 0.3, 0.2]),
}


class FakeEnsemble:
    """Stands in for ``Ensemble``: ``spec`` maps an image's file name to
    ``(label, gt, probs, uncertainties, maps, readable)`` (label and gt are the data's)."""

    members = dict.fromkeys(NAMES)
    classes = CLASSES
    negative_class = "healthy"
    negative_index = 1
    mc_passes, quorum = 8, 2

    def __init__(self, spec=None, unseen=None, run=Path("fake-run"), theta=0.1, tau=0.5, regions=None):
        self.spec = SPEC if spec is None else spec
        self.unseen = UNSEEN if unseen is None else unseen
        self.regions = regions or {}  # file name -> superpixel labels, kept with the maps
        self.run, self.theta, self.tau = run, theta, tau
        self.calls = []

    def annotate(self, images, *, theta=None, tau=None, mc_passes=None, batch_size=16,
                 keep_saliency=False, keep_preview=False, workers=None, novelty=True, keep_regions=None):
        self.calls.append({"theta": theta, "tau": tau, "keep_saliency": keep_saliency, "novelty": novelty})
        theta = self.theta if theta is None else theta
        tau = self.tau if tau is None else tau
        for item in images:
            path = Path(getattr(item, "image", item))
            name = path.name
            label = getattr(item, "label", None)  # as annotate does: the input's label
            if name in self.unseen:
                probs, unc = self.unseen[name]
                maps, ok = [np.zeros((S, S), np.float32)] * 3, True
            else:
                _, _, probs, unc, maps, ok = self.spec[name]
            if not ok:
                yield AnnotationRecord(image=str(path), status="error", error="cannot decode", label=label)
                continue
            dec = decide(np.array(probs), np.array(unc), theta, self.negative_index, self.quorum)
            fmaps = [np.asarray(m, dtype=np.float32) for m in maps]
            mask = intersect(np.stack([fmaps[i] for i in dec.agreeing]), tau) if dec.agreeing else None
            drafted = draft_members(dec, np.array(probs), self.negative_index)
            draft = intersect(np.stack([fmaps[i] for i in drafted]), tau) if drafted else None
            yield AnnotationRecord(
                image=str(path), decision=REVIEW if dec.review else CLASSES[dec.label], reason=dec.reason,
                agreeing=[NAMES[i] for i in dec.agreeing],
                members=[MemberResult(n, list(p), u, None if k < 0 else CLASSES[k])
                         for n, p, u, k in zip(NAMES, probs, unc, predicted_classes(np.array(probs)))],
                mask=mask, draft=draft, draft_class=CLASSES[0] if drafted else None,
                saliency=dict(zip(NAMES, fmaps)) if keep_saliency else None, size=(S, S), label=label,
                regions=self.regions.get(name) if keep_saliency and keep_regions is not False else None,
                preview=np.full((S, S, 3), 120, np.uint8),
            )


def fake_data(folder, spec=None):
    """The dataset the spec describes (files need not exist: the fake never reads them)."""
    spec = SPEC if spec is None else spec
    return FakeDataset(FakeSample(Path(folder) / n, label, gt) for n, (label, gt, *_rest) in spec.items())


@pytest.fixture
def data(tmp_path):
    return fake_data(tmp_path)


def test_ensemble_and_members_scored_by_hand(data, tmp_path):
    ens = FakeEnsemble()
    result = evaluate(ens, data, out=tmp_path / "ev", report=False)
    assert ens.calls[0]["keep_saliency"] is True and len(ens.calls) == 1  # one annotate pass
    assert ens.calls[0]["novelty"] is True  # the run's novelty step, as annotate applies it
    e = result["ensemble"]
    assert e["n"] == 4 and result["settings"]["n_errors"] == 1
    assert e["accuracy"] == pytest.approx(0.5)  # A, C right; B flagged; D wrong
    assert e["flag_rate"] == pytest.approx(0.25) and e["coverage"] == pytest.approx(0.75)
    assert e["accuracy_kept"] == pytest.approx(2 / 3)
    assert e["precision"] == pytest.approx(0.5) and e["recall"] == pytest.approx(0.5)
    assert e["n_masks"] == 2
    assert e["iou_mean"] == pytest.approx(0.5)  # A: 1 (TOP_HALF & TOP_LEFT > tau), B: 0 (flagged)
    assert e["iou_micro"] == pytest.approx(1024 / 2048)
    # the masks it did give: A's only (B is flagged, so no mask)
    assert e["n_masks_given"] == 1 and e["iou_mean_given"] == pytest.approx(1.0)
    # B's draft (all three maps agree on its lesion) is what a reviewer starts from: it
    # counts beside the masks in their own figure, never in the paper's
    assert e["n_drafts"] == 1 and e["iou_mean_drafts"] == pytest.approx(1.0)
    assert e["iou_mean_with_drafts"] == pytest.approx(1.0)

    r = result["members"]["resnet50"]
    assert r["accuracy"] == pytest.approx(0.5) and r["flag_rate"] == pytest.approx(0.25)
    assert r["iou_mean"] == pytest.approx((0.5 + 0.0) / 2)  # its own mask is the whole top half
    assert r["iou_micro"] == pytest.approx(1024 / (2048 + 1024))
    assert r["pixel_precision"] == pytest.approx(0.5)

    eff = result["members"]["efficientnet-b0"]
    assert eff["iou_mean"] == pytest.approx(0.5)

    dn = result["members"]["densenet121"]  # says healthy on A and D, flagged on B
    assert dn["accuracy"] == pytest.approx(0.5)  # C, D right
    assert dn["precision"] is None and dn["recall"] == 0.0
    assert dn["iou_mean"] == 0.0 and dn["pixel_precision"] is None
    assert dn["n_masks_given"] == 0 and dn["iou_mean_given"] is None  # it gave no mask

    assert result["confusion"]["ensemble"] == [[1, 0, 1], [1, 1, 0]]
    assert result["errors"] == [{"image": str(data[4].image), "error": "cannot decode"}]


def test_outputs_written(data, tmp_path):
    out = tmp_path / "ev"
    result = evaluate(FakeEnsemble(), data, out=out, report=False)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"members", "ensemble", "settings", "confusion", "risk_coverage"}
    assert "per_image" not in metrics and "tables" not in metrics
    assert metrics["ensemble"]["iou_mean"] == pytest.approx(0.5)
    assert metrics["settings"]["theta"] == 0.1 and metrics["settings"]["tau"] == 0.5
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    assert [Path(r["image"]).name for r in rows] == ["a.png", "b.png", "c.png", "d.png", "e.png"]
    a = rows[0]
    assert a["decision"] == "diseased" and a["agreeing"] == "resnet50+efficientnet-b0"
    assert float(a["iou"]) == pytest.approx(1.0) and float(a["resnet50_iou"]) == pytest.approx(0.5)
    assert float(a["densenet121_p_healthy"]) == pytest.approx(0.9)
    assert rows[4]["status"] == "error" and rows[4]["decision"] == ""
    tables = (out / "tables.md").read_text()
    assert tables == result["tables"] + "\n"
    assert "| **AAX (fused maps of the agreeing members)** | 50.0 | 66.7 | 25.0 |" in tables
    assert "| ResNet-50 with XGrad-CAM and MC Dropout | 25.0 | 33.3 |" in tables
    assert "AAX's masks: min fusion of the agreeing members' maps." in tables  # a run without map settings
    assert metrics["settings"]["fusion"] == "min" and metrics["settings"]["mask_members"] is None
    # the trivial masks are printed beside ours (a mask that cannot beat them says nothing)
    assert set(metrics["trivial"]) == {"whole image", "centred box"}
    assert 0 < metrics["trivial"]["whole image"]["iou_mean"] <= 1
    # and on the images AAX gave a mask for (A only: B is flagged): the box's 16..48 square
    # meets A's top-left quarter in 16 x 16 px
    box = metrics["trivial"]["centred box"]
    assert box["n_masks"] == 2 and box["n_masks_given"] == 1
    assert box["iou_mean_given"] == pytest.approx(256 / (1024 + 1024 - 256))
    assert metrics["trivial"]["whole image"]["iou_mean_given"] == pytest.approx(1024 / 4096)
    assert "| whole image (trivial) |" in tables and "| centred box (trivial) |" in tables
    assert not (out / "report.html").exists()


def test_theta_and_tau_overrides_reach_annotate(data):
    ens = FakeEnsemble()
    result = evaluate(ens, data, theta=0.6, tau=0.9)
    assert ens.calls[0]["theta"] == 0.6 and ens.calls[0]["tau"] == 0.9
    # at theta 0.6 nobody is uncertain: B becomes a correct diseased call for every member
    assert result["ensemble"]["flag_rate"] == 0.0
    assert result["members"]["resnet50"]["accuracy"] == pytest.approx(0.75)
    # the risk-coverage curve at the theta in use matches the ensemble's own numbers
    at = [p for p in result["risk_coverage"] if p["theta"] == 0.6][0]
    assert at["coverage"] == result["ensemble"]["coverage"]
    assert at["accuracy_kept"] == pytest.approx(result["ensemble"]["accuracy_kept"])


def test_unseen_open_set(data, tmp_path):
    unseen = [tmp_path / n for n in UNSEEN]
    result = evaluate(FakeEnsemble(), data, unseen=unseen, out=tmp_path / "ev", report=False)
    u = result["unseen"]
    assert u["n"] == 2
    assert u["flag_rate_unseen"] == 1.0 and u["flag_rate_seen"] == pytest.approx(0.25)
    # resnet50: seen u = .01 .5 0 .05, unseen .3 .02 -> pairs won: .3 beats 3 of 4, .02 beats 2
    assert u["auroc"]["resnet50"] == pytest.approx((3 + 2) / 8)
    # quorum-th (2nd largest) u: seen .02 .5 0 .05; unseen .3 .2 -> each beats 3 of 4
    assert u["auroc"]["AAX (quorum-th largest u)"] == pytest.approx(6 / 8)
    assert u["over_theta"]["densenet121"] == {"seen": 0.25, "unseen": 1.0}
    # the quorum-th largest u over theta is exactly the protocol's "uncertain" flag
    assert u["over_theta"]["AAX (quorum-th largest u)"] == {"seen": 0.25, "unseen": 1.0}
    assert "## Open set" in result["tables"]
    rows = list(csv.DictReader((tmp_path / "ev" / "per_image.csv").open()))
    assert [r["set"] for r in rows].count("unseen") == 2


def test_unseen_folder_without_labels(tmp_path):
    from PIL import Image

    flat = tmp_path / "unlabelled"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "x.png")
    (flat / "notes.txt").write_text("not an image")
    assert [p.name for p in open_images(flat)] == ["x.png"]  # no layout: every image file
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images"):
        open_images(empty)


def test_member_decision_rules():
    rec = AnnotationRecord(image="x", members=[MemberResult("m", [0.5, 0.5], 0.0, None),
                                               MemberResult("n", [0.9, 0.1], 0.2, "diseased"),
                                               MemberResult("o", [0.9, 0.1], 0.1, "diseased")])
    assert member_decision(rec, 0, 0.1) == REVIEW  # a tie is no class
    assert member_decision(rec, 1, 0.1) == REVIEW  # u over theta
    assert member_decision(rec, 2, 0.1) == "diseased"  # u == theta is confident


def test_a_member_alone_is_charged_its_own_novelty_flag():
    """With the novelty step, a member alone goes to review when it finds the image novel
    (the ensemble's checks with a quorum of one); without the step only theta flags."""
    confident = [0.9, 0.1]
    rec = AnnotationRecord(image="x", members=[MemberResult("m", confident, 0.0, "diseased", novel=True),
                                               MemberResult("n", confident, 0.0, "diseased", novel=False),
                                               MemberResult("o", confident, 0.0, "diseased")])
    assert member_decision(rec, 0, 0.1) == REVIEW  # novel, though confident
    assert member_decision(rec, 1, 0.1) == "diseased"
    assert member_decision(rec, 2, 0.1) == "diseased"  # no novelty verdict: the paper's rule
    assert member_decision(rec, 0, 0.1, novel=False) == "diseased"  # an override (benchmarks)
    assert member_decision(rec, 1, 0.1, novel=True) == REVIEW


def test_unknown_label_is_an_error(tmp_path):
    bad = FakeDataset([FakeSample(tmp_path / "a.png", "cat", TOP_LEFT)])
    with pytest.raises(ValueError, match="not one of the model's classes"):
        evaluate(FakeEnsemble(), bad)


def test_tables_without_masks():
    result = {"settings": {"data": "x", "n_images": 1, "n_errors": 0, "classes": CLASSES,
                           "negative_class": "healthy", "theta": 0.1, "tau": 0.5, "mc_passes": 4,
                           "quorum": 2, "has_masks": False},
              "members": {}, "ensemble": {"accuracy": 1.0, "accuracy_kept": 1.0, "flag_rate": 0.0,
                                          "precision": None, "recall": None, "f1": None}}
    text = tables_markdown(result)
    assert "flagged when its own u > theta (no novelty step" in text
    result["settings"]["novelty"] = {"score": "maha", "pass_rate": 0.95}
    assert "or it finds the image novel" in tables_markdown(result)
    assert "No ground-truth masks" in text and "| **AAX (fused maps of the agreeing members)** | 100.0 | 100.0 | 0.0 | – |" in text


def test_member_mask_per_class_tau():
    from aax.evaluation.scoring import member_mask
    from aax.models.mask_settings import tau_for

    sal = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    rec = AnnotationRecord(image="x", members=[MemberResult("m", [0.1, 0.9], 0.0, "diseased")],
                           saliency={"m": sal})
    assert member_mask(rec, 0, "diseased", "healthy", 0.5).sum() == 8
    assert member_mask(rec, 0, "diseased", "healthy", {"diseased": 0.9}).sum() == 2
    assert member_mask(rec, 0, "healthy", "healthy", 0.5) is None  # negative: no mask
    assert member_mask(rec, 0, REVIEW, "healthy", 0.5) is None
    assert tau_for({"fire": 0.3}, "smoke") == 0.5


def test_bad_ground_truth_mask_is_reported_not_fatal(tmp_path):
    from aax.data import ImageError

    class Broken(FakeSample):
        def mask(self):
            raise ImageError(str(self.image), "truncated PNG")

    data = fake_data(tmp_path)
    data[0] = Broken(data[0].image, "diseased")  # a.png: unreadable mask
    data[1] = FakeSample(data[1].image, "diseased", np.zeros((S + 1, S), bool))  # b.png: wrong size
    result = evaluate(FakeEnsemble(), data)
    assert result["ensemble"]["n"] == 4  # both images still classified
    assert result["settings"]["has_masks"] is False  # neither mask was usable
    problems = {Path(e["image"]).name: e["error"] for e in result["errors"]}
    assert "truncated PNG" in problems["a.png"] and "scored without it" in problems["b.png"]


# --------------------------------------------------------------------------------------
# with a real trained ensemble (session fixtures of tests/conftest.py)
# --------------------------------------------------------------------------------------

def session_fixture(request, name):
    """A fixture of tests/conftest.py, or a clean skip where it is not there."""
    try:
        return request.getfixturevalue(name)
    except pytest.FixtureLookupError:
        pytest.skip(f"no {name!r} fixture (tests/conftest.py)")


def small_split(source, per_class=6):
    """A few images of each class, in a fixed order."""
    from aax.data import open_dataset

    ds = open_dataset(source)
    picked = []
    for c in ds.classes:
        picked += [i for i, s in enumerate(ds) if s.label == c][:per_class]
    return ds.subset(picked)


@pytest.mark.slow
def test_evaluate_real_ensemble(request, tmp_path):
    from aax.annotation.decide import decide as protocol
    from aax.data.synth import generate

    ensemble = session_fixture(request, "ensemble")
    lesion_dir = session_fixture(request, "lesion_dir")
    data = small_split(lesion_dir)
    unseen = generate("fire", tmp_path / "fire", n_per_class=3, size=48, seed=5)
    out = tmp_path / "ev"
    result = evaluate(ensemble, data, unseen=unseen, out=out)
    names = list(ensemble.members)
    assert set(result["members"]) == set(names)
    e = result["ensemble"]
    assert e["n"] == len(data) == 12 and result["settings"]["has_masks"] is True
    assert e["n_masks"] == 6 and 0.0 <= e["iou_mean"] <= 1.0
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    seen = [r for r in rows if r["set"] == "data"]
    assert len(seen) == 12 and sum(r["set"] == "unseen" for r in rows) == 6
    # the table's accuracy is the share of rows whose decision equals the label
    assert e["accuracy"] == pytest.approx(np.mean([r["decision"] == r["label"] for r in seen]))
    # and every decision is the protocol's on that row's numbers
    for r in seen:
        probs = np.array([[float(r[f"{n}_p_{c}"]) for c in ensemble.classes] for n in names])
        unc = np.array([float(r[f"{n}_u"]) for n in names])
        d = protocol(probs, unc, ensemble.theta, ensemble.negative_index, ensemble.quorum)
        assert r["decision"] == (REVIEW if d.review else ensemble.classes[d.label])
    assert result["unseen"]["n"] == 6
    assert all(v is None or 0.0 <= v <= 1.0 for v in result["unseen"]["auroc"].values())
    html = (out / "report.html").read_text()
    assert 1 <= html.count('class="rowlabel"') <= 8 and "Open set" in html


@pytest.mark.slow
def test_evaluate_command(request, tmp_path):
    from aax.cli import main

    run = session_fixture(request, "trained_run")
    lesion_dir = session_fixture(request, "lesion_dir")
    from aax.data import write_manifest

    manifest = write_manifest(small_split(lesion_dir, per_class=3), tmp_path / "few.csv")
    out = tmp_path / "ev"
    code = main(["evaluate", str(run), str(manifest), "--out", str(out), "--no-report", "--theta", "0.2",
                 "--mc-passes", "5", "--batch-size", "4"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["theta"] == 0.2 and metrics["settings"]["mc_passes"] == 5
    assert metrics["ensemble"]["n"] == 6
    assert (out / "tables.md").is_file() and not (out / "report.html").exists()
    assert main(["evaluate", str(run), str(tmp_path / "nowhere"), "--out", str(out)]) == 2


def test_trivial_masks_are_what_they_say():
    from aax.evaluation.trivial import TRIVIAL_MASKS, trivial_mask

    assert trivial_mask("whole image", (6, 8)).all()
    box = trivial_mask("centred box", (8, 12))
    assert box.sum() == 4 * 6 and box[2:6, 3:9].all() and not box[:2].any() and not box[:, :3].any()
    assert TRIVIAL_MASKS == ("whole image", "centred box")
    with pytest.raises(ValueError, match="unknown trivial mask"):
        trivial_mask("circle", (4, 4))


def test_no_novelty_evaluates_the_papers_protocol(data, tmp_path):
    ens = FakeEnsemble()
    result = evaluate(ens, data, report=False, novelty=False)
    assert [c["novelty"] for c in ens.calls] == [False]
    assert result["settings"]["novelty"] is None


def test_masks_text_names_the_mask_members():
    from aax.evaluation.tables import masks_text

    text = masks_text({"fusion": "mean", "mask_members": ["resnet50", "densenet121"]})
    assert text == ("AAX's masks: mean fusion of the agreeing members' maps among resnet50, densenet121 "
                    "(chosen on validation masks).")
