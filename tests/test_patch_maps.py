"""Patch-feature novelty maps (aax.models.patch_maps): distances by hand, the bank stored with
the run, and the map source end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from aax.models.maps import MapOptions
from aax.models.patch_maps import FILE, PATCH_STAGES, distance_maps, fit_banks, fit_run, load_banks, patch_features


def test_distances_by_hand():
    # two cells of 2-d features; bank rows (0, 0) and (3, 4)
    features = torch.tensor([[[[0.0, 3.0]], [[1.0, 4.0]]]])  # [1, 2, 1, 2]: cells (0, 1) and (3, 4)
    bank = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    got = distance_maps(features, bank, chunk=1)  # one bank row at a time: the minimum still holds
    assert got.shape == (1, 1, 2)
    assert got[0, 0].tolist() == pytest.approx([1.0, 0.0])
    with pytest.raises(ValueError, match="patch bank"):
        distance_maps(features, torch.zeros(3, 5))


def test_map_options_source():
    assert "source" not in MapOptions().to_dict()  # the paper's, as runs made before the option
    patch = MapOptions(source="patch")
    assert patch.to_dict()["source"] == "patch" and MapOptions.from_dict(patch.to_dict()).source == "patch"
    assert MapOptions.from_dict({}).source == "cam"
    with pytest.raises(ValueError, match="source"):
        MapOptions(source="gradcam")


@pytest.mark.slow
@torch.no_grad()
def test_a_foreign_patch_is_where_the_map_peaks(ensemble):
    """Bank: a grey image and the same with a bright square top left. Query: a dark
    square bottom right, never seen: every member's map is highest there, not in the
    grey regions the bank has seen."""
    bank_images = torch.zeros(2, 3, 128, 128)
    bank_images[1, :, 8:40, 8:40] = 2.5
    odd = torch.zeros(1, 3, 128, 128)
    odd[..., 88:120, 88:120] = -2.5
    for name, member in ensemble.members.items():
        seen = patch_features(member, bank_images)
        bank = seen.flatten(2).transpose(1, 2).reshape(-1, seen.shape[1])
        f = patch_features(member, odd)
        assert f.shape[0] == 1 and f.shape[-1] in (8, 16)  # stride 16 or 8 at 128 px
        d = distance_maps(f, bank)[0]
        h, w = d.shape
        peak = divmod(int(d.argmax()), w)
        assert peak[0] >= h // 2 and peak[1] >= w // 2, (name, peak)
        assert float(d[: h // 4, : w // 4].max()) < 0.5 * float(d.max()), name


@pytest.mark.slow
def test_bank_is_stored_with_the_run_and_drives_the_masks(trained_run, lesion_dir, tmp_path):
    from aax.annotation.annotate import annotate
    from aax.models.ensemble import Ensemble

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / FILE).unlink(missing_ok=True)
    manifest = json.loads((run / "aax.json").read_text())
    manifest.pop("patches", None)
    (run / "aax.json").write_text(json.dumps(manifest))
    ensemble = Ensemble.load(run, device="cpu")
    assert ensemble.patches is None
    images = sorted((Path(lesion_dir) / "images" / "diseased").glob("*.png"))[:4]
    ensemble.maps = ensemble.maps.replace(source="patch")
    with pytest.raises(ValueError, match="aax calibrate"):
        list(annotate(ensemble, images))

    negatives = sorted((Path(lesion_dir) / "images" / "healthy").glob("*.png"))[:6]
    banks, n_read = fit_banks(ensemble, negatives, size=50)  # 6 images give >= 96 patches each
    assert n_read == 6 and all(b.shape[0] == 50 and b.dtype == np.float16 for b in banks.values())
    block = fit_run(ensemble, negatives, size=50)
    assert block["n_images"] == 6 and block["stages"] == list(PATCH_STAGES)
    assert json.loads((run / "aax.json").read_text())["patches"] == block
    loaded = load_banks(run, json.loads((run / "aax.json").read_text()), list(ensemble.members))
    for name in ensemble.members:
        assert torch.equal(loaded[name], torch.from_numpy(banks[name].astype(np.float32)))
    reloaded = Ensemble.load(run, device="cpu")
    assert set(reloaded.patches) == set(ensemble.members)

    # the class decisions do not depend on the source; the masks come from the patch maps
    seeds = dict(mc_passes=8, keep_saliency=True, workers=0)
    cam = list(annotate(reloaded, images, **seeds))
    reloaded.maps = reloaded.maps.replace(source="patch")
    patch = list(annotate(reloaded, images, **seeds))
    assert [r.decision for r in cam] == [r.decision for r in patch]
    for c, p in zip(cam, patch):
        assert set(p.saliency) == set(c.saliency)
        assert any(not np.allclose(p.saliency[n], c.saliency[n]) for n in p.saliency)
        if p.agreeing:
            assert p.mask is not None and p.mask.shape == tuple(p.size)

    # an annotation folder made with one bank is not completed with another's masks
    from aax.annotation.annotate import annotate_to_folder
    from aax.annotation.store import SettingsMismatch

    src = tmp_path / "src"
    src.mkdir()
    for p in images[:2]:
        shutil.copy(p, src / p.name)
    annotate_to_folder(reloaded, src, tmp_path / "out", progress=False, workers=0)
    fit_run(reloaded, negatives[:5], size=50)  # another bank
    again = Ensemble.load(run, device="cpu")
    again.maps = again.maps.replace(source="patch")
    with pytest.raises(SettingsMismatch, match="patch_bank"):
        annotate_to_folder(again, src, tmp_path / "out", progress=False, workers=0)

    # a bank file that lacks a member is refused with the file named
    np.savez(run / FILE, **{n: b for n, b in list(banks.items())[:1]})
    with pytest.raises(ValueError, match=FILE):
        Ensemble.load(run, device="cpu")


@pytest.mark.slow
def test_calibrate_makes_the_bank_and_keeps_the_better_source(trained_run, lesion_dir, tmp_path, capsys):
    from aax.cli import main
    from aax.evaluation.calibrate import calibrate
    from aax.evaluation.calibration.files import validation_split
    from aax.models.ensemble import Ensemble

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / FILE).unlink(missing_ok=True)
    # without a bank, asking for patch maps is a one-line error before anything is written
    out = tmp_path / "out"
    assert main(["annotate", str(run), str(Path(lesion_dir) / "images"), "--out", str(out),
                 "--map-source", "patch", "--workers", "0"]) == 2
    assert "--map-sources cam patch" in capsys.readouterr().err and not out.exists()

    result = calibrate(run, validation_split(run), sources=("cam", "patch"), novelty=False)
    assert (run / FILE).is_file() and result["patches"]["n_images"] > 0
    rows = {r["source"]: r for r in result["sources"]}
    assert set(rows) == {"cam", "patch"}
    best = max(rows.values(), key=lambda r: r["iou_mean"])
    assert result["source"] == best["source"] and result["iou_mean"] == pytest.approx(best["iou_mean"])
    assert result["fusion"] == best["fusion"] and result["tau"] == best["tau"]
    loaded = Ensemble.load(run, device="cpu")
    assert loaded.maps.source == result["source"] and loaded.patches is not None
    with pytest.raises(ValueError, match="unknown map source"):
        calibrate(loaded, validation_split(run), sources=("gradcam",), write=False)


def test_the_report_names_the_map_source():
    from aax.evaluation.report.example import Example
    from aax.evaluation.report.html import example_grid

    m = np.zeros((8, 8), np.float32)
    ex = Example(image="a.png", label="diseased", decision="diseased", reason="consensus", correct=True,
                 preview=np.zeros((8, 8, 3), np.uint8), gt_mask=None, saliency={"resnet50": m},
                 member_masks={"resnet50": None}, member_decisions={"resnet50": "diseased"},
                 member_uncertainty={"resnet50": 0.0}, mask=None)
    assert "XGrad-CAM" in example_grid([ex], ["resnet50"], 0.5, "healthy")
    patch = example_grid([ex], ["resnet50"], 0.5, "healthy", source="patch")
    assert "patch-feature novelty" in patch and "XGrad-CAM" not in patch
