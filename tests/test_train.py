"""Training: the loss, early stopping, resume, the RUN folder, ``aax train``, Ensemble.load."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from aax.cli import main
from aax.models import runfiles
from aax.models.ensemble import Ensemble, RunError
from aax.models.members import DEFAULT_MEMBERS, build_member
from aax.training.loop import lr_factor, member_loss
from aax.training.train import FINETUNE_LR, TrainConfig, default_negative_class, resolve_negative_class, train

FAST = dict(members=("efficientnet-b0",), image_size=32, batch_size=8, progress=False, pretrained=None)


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "history.csv", newline="") as fh:
        return list(csv.DictReader(fh))


# --- the objective ---------------------------------------------------------------------

def test_variance_term_matches_a_direct_computation(monkeypatch: pytest.MonkeyPatch) -> None:
    """``L = CE + lambda * Var`` equals a pass-by-pass computation with the same masks."""
    torch.manual_seed(0)
    # resnet50: no stochastic layer in the backbone, so the features can be recomputed.
    member = build_member("resnet50", 3, dropout=0.5).train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    passes, lam = 5, 0.7
    masks: list[torch.Tensor] = []

    def recording_dropout(t, p=0.5, training=True, inplace=False):
        if not training:
            return t
        mask = (torch.rand(t.shape) >= p).float() / (1 - p)
        masks.append(mask)
        return t * mask

    monkeypatch.setattr(F, "dropout", recording_dropout)
    torch.manual_seed(1)
    parts = member_loss(member, x, y, lambda_var=lam, passes=passes)
    assert len(masks) == 2  # one CE pass, then all T passes in one batched call

    with torch.no_grad():
        pooled = member.head.pool(member.features(x))
        ce = F.cross_entropy(member.head.fc(pooled * masks[0]), y)
        stacked = masks[1].view(passes, 4, -1)
        probs = [member.head.fc(pooled * stacked[t]).softmax(dim=1) for t in range(passes)]
        mean = sum(probs) / passes
        var = sum((p - mean) ** 2 for p in probs) / passes  # population variance, [B, C]
        expected = ce + lam * var.mean()
    assert parts.var.item() > 0
    assert torch.allclose(parts.var, var.mean(), atol=1e-6)
    assert torch.allclose(parts.ce, ce, atol=1e-5)
    assert torch.allclose(parts.total, expected, atol=1e-5)


def test_variance_term_vanishes_without_dropout() -> None:
    torch.manual_seed(0)
    member = build_member("efficientnet-b0", 2, dropout=0.0).train()
    parts = member_loss(member, torch.randn(2, 3, 32, 32), torch.tensor([0, 1]),
                        lambda_var=1.0, passes=4)
    assert float(parts.var.detach()) == pytest.approx(0.0, abs=1e-12)
    parts.total.backward()  # the composite loss is differentiable end to end


def test_lr_schedule_warms_up_then_decays_to_the_floor() -> None:
    f = [lr_factor(s, 100, 10, 0.01) for s in range(101)]
    assert f[0] < f[5] < f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[100] == pytest.approx(0.01)


# --- settings ------------------------------------------------------------------------

def test_negative_class_defaults_and_errors() -> None:
    assert default_negative_class(["diseased", "healthy"]) == "healthy"
    assert default_negative_class(["fire", "no_fire"]) == "no_fire"
    assert default_negative_class(["Normal", "tb"]) == "Normal"
    assert default_negative_class(["cat", "bird"]) == "bird"
    assert resolve_negative_class(["a", "b"], "b") == "b"
    with pytest.raises(ValueError, match="not among"):
        resolve_negative_class(["a", "b"], "c")


@pytest.mark.parametrize("bad", [dict(members=("vgg",)), dict(val_split=0.0),
                                 dict(class_weights="x"), dict(var_passes=1),
                                 dict(weights={"resnet50": "w.pth"}, members=("densenet121",))])
def test_bad_settings_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        TrainConfig(**bad).validate()


def test_default_lr_depends_on_pretrained_weights() -> None:
    from aax.training.train import SCRATCH_LR

    config = TrainConfig(weights={"resnet50": "x.pth"}, pretrained=None)
    assert config.member_lr("resnet50") == pytest.approx(FINETUNE_LR)
    assert config.member_lr("densenet121") == pytest.approx(SCRATCH_LR)
    assert TrainConfig().member_lr("efficientnet-lite2") == pytest.approx(FINETUNE_LR)
    assert TrainConfig(lr=5e-4).member_lr("resnet50") == pytest.approx(5e-4)


# --- the loop: early stopping, resume, reproducibility -----------------------------------

def test_early_stopping_stops_after_patience(tiny_lesion_dir: Path, tmp_path: Path) -> None:
    # lr 0 and no variance term: the validation loss is exactly the same every epoch.
    run = train(tiny_lesion_dir, tmp_path / "run",
                TrainConfig(**FAST, epochs=6, patience=2, lr=0.0, lambda_var=0.0))
    rows = _rows(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert len({r["val_loss"] for r in rows}) == 1
    entry = json.loads((run / "aax.json").read_text())["members"][0]
    assert entry["best_epoch"] == 1 and entry["epochs_run"] == 3 and entry["stopped_early"]
    assert not (run / "efficientnet-b0.last.pt").exists()


class Interrupt(Exception):
    """Raised from the epoch hook to simulate a crash."""


def test_resume_continues_and_matches_an_uninterrupted_run(tiny_lesion_dir: Path,
                                                           tmp_path: Path) -> None:
    config = TrainConfig(**FAST, epochs=4, patience=10)
    full = train(tiny_lesion_dir, tmp_path / "full", config)

    def crash_after_two(row: dict) -> None:
        if row["epoch"] == 2:
            raise Interrupt

    part = tmp_path / "part"
    with pytest.raises(Interrupt):
        train(tiny_lesion_dir, part, config, on_epoch=crash_after_two)
    assert (part / "efficientnet-b0.last.pt").exists()
    assert [int(r["epoch"]) for r in _rows(part)] == [1, 2]
    with pytest.raises(RunError, match="resume"):
        train(tiny_lesion_dir, part, config)  # not without resume=True
    with pytest.raises(RunError, match="epochs"):
        train(tiny_lesion_dir, part, TrainConfig(**FAST, epochs=5, patience=10, resume=True))
    with pytest.raises(RunError, match="not finished"):
        Ensemble.load(part)
    # a state that does not fit the member (e.g. written by a version with another head) is
    # refused by name, not with a bare loading error
    last = part / "efficientnet-b0.last.pt"
    good = runfiles.load_torch(last)
    bad = {**good, "model": {k: v for k, v in good["model"].items() if not k.startswith("head.")}}
    runfiles.save_torch(last, bad)
    with pytest.raises(RunError, match=r"efficientnet-b0\.last\.pt: the interrupted state of efficientnet-b0 "
                                       r"does not fit.*delete that file"):
        train(tiny_lesion_dir, part, TrainConfig(**FAST, epochs=4, patience=10, resume=True))
    runfiles.save_torch(last, good)

    seen: list[int] = []
    train(tiny_lesion_dir, part, TrainConfig(**FAST, epochs=4, patience=10, resume=True),
          on_epoch=lambda row: seen.append(row["epoch"]))

    assert seen == [3, 4]  # no epoch is repeated
    keys = ("member", "epoch", "train_loss", "val_loss", "val_accuracy", "lr", "best")
    assert [[r[k] for k in keys] for r in _rows(part)] == [[r[k] for k in keys] for r in _rows(full)]
    a = runfiles.load_torch(full / "efficientnet-b0.pt")
    b = runfiles.load_torch(part / "efficientnet-b0.pt")
    assert a["epoch"] == b["epoch"]
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert not (part / "efficientnet-b0.last.pt").exists()
    assert json.loads((part / "aax.json").read_text())["status"] == "complete"



def test_resume_and_calibration_find_images_outside_the_manifest_folder(tiny_lesion_dir: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A CSV manifest whose images sit in a sibling folder (``../images/...``): the run
    resumes, and finds its validation split, whichever way the manifest's path is spelt."""
    from aax.evaluation.calibration.files import validation_split

    lists = tmp_path / "lists"
    lists.mkdir()
    rows = [f"../data/{p.relative_to(tiny_lesion_dir).as_posix()},{p.parent.name}"
            for p in sorted((tiny_lesion_dir / "images").glob("*/*.png"))]
    shutil.copytree(tiny_lesion_dir / "images", tmp_path / "data" / "images")
    (lists / "train.csv").write_text("image,label\n" + "\n".join(rows) + "\n")
    config = TrainConfig(**FAST, epochs=2, patience=10)

    def crash_after_one(row: dict) -> None:
        if row["epoch"] == 1:
            raise Interrupt

    monkeypatch.chdir(tmp_path)
    with pytest.raises(Interrupt):
        train("lists/train.csv", tmp_path / "run", config, on_epoch=crash_after_one)
    monkeypatch.chdir(lists)
    seen: list[int] = []
    train(str(lists / ".." / "lists" / "train.csv"), tmp_path / "run", TrainConfig(**FAST, epochs=2, patience=10,
                                                                                   resume=True),
          on_epoch=lambda row: seen.append(row["epoch"]))
    assert seen == [2]
    stored = json.loads((tmp_path / "run" / "aax.json").read_text())["data"]["val_files"]
    assert all(Path(f).is_absolute() and ".." not in Path(f).parts for f in stored)  # outside root: resolved
    val = validation_split(tmp_path / "run")
    assert [Path(s.image).resolve().as_posix() for s in val] == stored


def test_warm_start_begins_from_the_runs_members_and_checks_them(tiny_lesion_dir: Path, tmp_path: Path) -> None:
    source = train(tiny_lesion_dir, tmp_path / "source", TrainConfig(**FAST, epochs=1))
    # lr 0: the parameters stay where they start, so they show where that was
    warm = train(tiny_lesion_dir, tmp_path / "warm", TrainConfig(**FAST, epochs=1, lr=0.0,
                                                                  warm_start=str(source)))
    a = runfiles.load_torch(source / "efficientnet-b0.pt")["state_dict"]
    b = runfiles.load_torch(warm / "efficientnet-b0.pt")["state_dict"]
    weights = [k for k in a if k.endswith("weight")]
    assert weights and all(torch.equal(a[k], b[k]) for k in weights)
    cold = runfiles.load_torch(train(tiny_lesion_dir, tmp_path / "cold", TrainConfig(**FAST, epochs=1, lr=0.0))
                               / "efficientnet-b0.pt")["state_dict"]
    assert not all(torch.equal(a[k], cold[k]) for k in weights)
    manifest = json.loads((warm / "aax.json").read_text())
    assert manifest["members"][0]["init"] == "warm start" and manifest["training"]["warm_start"] == str(source)
    with pytest.raises(RunError, match="resnet50.pt does not exist"):
        train(tiny_lesion_dir, tmp_path / "other", TrainConfig(**{**FAST, "members": ("resnet50",)}, epochs=1,
                                                               warm_start=str(source)))
    data = tmp_path / "three"
    shutil.copytree(tiny_lesion_dir / "images", data / "images")
    shutil.copytree(tiny_lesion_dir / "images" / "healthy", data / "images" / "other")
    with pytest.raises(RunError, match="classes"):
        train(data, tmp_path / "three-run", TrainConfig(**FAST, epochs=1, warm_start=str(source)))

def test_resume_skips_finished_members(tiny_lesion_dir: Path, tmp_path: Path) -> None:
    config = TrainConfig(**{**FAST, "members": ("efficientnet-b0", "resnet50")}, epochs=1)
    run = tmp_path / "run"

    def crash_in_second(row: dict) -> None:
        if row["member"] == "resnet50":
            raise Interrupt

    with pytest.raises(Interrupt):
        train(tiny_lesion_dir, run, config, on_epoch=crash_in_second)
    first = (run / "efficientnet-b0.pt").read_bytes()
    resumed = TrainConfig(**{**FAST, "members": ("efficientnet-b0", "resnet50")}, epochs=1,
                          resume=True)
    members_seen: list[str] = []
    train(tiny_lesion_dir, run, resumed, on_epoch=lambda row: members_seen.append(row["member"]))
    assert members_seen == []  # resnet50's only epoch had finished before the crash
    assert (run / "efficientnet-b0.pt").read_bytes() == first
    assert [r["member"] for r in _rows(run)] == ["efficientnet-b0", "resnet50"]
    manifest = json.loads((run / "aax.json").read_text())
    assert [m["name"] for m in manifest["members"]] == ["efficientnet-b0", "resnet50"]
    assert manifest["quorum"] == 2


def test_bad_images_are_reported_and_skipped(tiny_lesion_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_lesion_dir / "images", data / "images")
    victim = sorted((data / "images" / "diseased").glob("*.png"))[0]
    victim.write_bytes(victim.read_bytes()[:80])  # header intact, pixels cut off
    (data / "images" / "healthy" / "junk.png").write_bytes(b"not an image at all")
    run = train(data, tmp_path / "run", TrainConfig(**FAST, epochs=1, class_weights="balanced"))
    manifest = json.loads((run / "aax.json").read_text())
    skipped = {Path(s["path"]).name for s in manifest["data"]["skipped"]}
    assert {victim.name, "junk.png"} <= skipped
    assert manifest["data"]["n_train"] + manifest["data"]["n_val"] == 24 - 1  # junk never listed
    assert manifest["training"]["class_weights"] == "balanced"


# --- the RUN folder, the CLI and Ensemble.load ---------------------------------------------

def test_cli_train_writes_a_run_that_loads(tiny_lesion_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # A lukemelas-format checkpoint written here, to exercise --weights end to end.
    source = build_member("efficientnet-b0", 2).net.state_dict()
    lukemelas = {re.sub(r"^_blocks\.\d+\.(\d+)\.", r"_blocks.\1.", k): v
                 for k, v in source.items() if not k.startswith("_fc.")}
    weights = tmp_path / "efficientnet-b0-imagenet.pth"
    torch.save(lukemelas, weights)
    run = tmp_path / "RUN"
    argv = ["train", str(tiny_lesion_dir), "--out", str(run), "--members", "efficientnet-b0",
            "--epochs", "2", "--image-size", "32", "--batch-size", "8", "--no-progress",
            "--weights", f"efficientnet-b0={weights}", "--negative-class", "healthy", "--from-scratch"]
    calibrated: list[Path] = []
    given: list[object] = []
    monkeypatch.setattr("aax.evaluation.calibrate.calibrate_run",
                        lambda run, **kw: calibrated.append(Path(run)) or given.append(kw.get("novelty_images"))
                        or {"theta": 0.1, "tau": 0.5})
    assert main(argv + ["--novelty-images", str(tmp_path / "pool")]) == 0
    assert calibrated == [run]  # aax train calibrates at the end
    assert given == [str(tmp_path / "pool")]  # with the novelty thresholds' images passed on
    out = capsys.readouterr().out
    assert "efficientnet-b0" in out and str(run) in out

    manifest = json.loads((run / "aax.json").read_text())
    assert manifest["classes"] == ["diseased", "healthy"]
    assert manifest["negative_class"] == "healthy"
    assert manifest["image_size"] == 32
    assert (manifest["theta"], manifest["tau"], manifest["mc_passes"], manifest["quorum"]) == (
        0.1, 0.5, 30, 1)
    assert manifest["status"] == "complete" and manifest["aax_version"]
    data = manifest["data"]
    assert data["n_train"] + data["n_val"] == 24 and len(data["val_files"]) == data["n_val"]
    assert sorted(data["train_indices"] + data["val_indices"]) == list(range(24))
    entry = manifest["members"][0]
    assert entry["checkpoint"] == "efficientnet-b0.pt" and entry["lr"] == pytest.approx(FINETUNE_LR)
    assert entry["weights"]["loaded"] > 300 and entry["weights"]["missing"] == []
    assert entry["init"] == "pretrained"
    assert isinstance(entry["converged"], bool)
    rows = _rows(run)
    assert list(rows[0]) == list(runfiles.HISTORY_FIELDS)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(float(r["images_per_s"]) > 0 and float(r["seconds"]) > 0 for r in rows)

    ensemble = Ensemble.load(run)
    assert list(ensemble.members) == ["efficientnet-b0"]
    assert ensemble.classes == ["diseased", "healthy"] and ensemble.negative_index == 1
    assert ensemble.image_size == 32 and ensemble.mc_passes == 30 and ensemble.quorum == 1
    assert ensemble.normalisation[0] == pytest.approx((0.485, 0.456, 0.406))
    assert ensemble.run == run and ensemble.device.type in ("cpu", "cuda")
    assert not ensemble.members["efficientnet-b0"].training

    # Resuming a finished run does nothing (and keeps a calibrated theta); changing a
    # setting on resume is refused.
    manifest["theta"] = 0.25
    runfiles.write_json(run / "aax.json", manifest)
    assert main(argv[:2] + ["--out", str(run), "--resume", "--no-progress", "--no-calibrate"]) == 0
    assert calibrated == [run]
    assert json.loads((run / "aax.json").read_text())["theta"] == 0.25
    assert main(argv[:2] + ["--out", str(run), "--resume", "--epochs", "3"]) == 2
    assert "epochs" in capsys.readouterr().err


def test_cli_reports_bad_arguments(tiny_lesion_dir: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture) -> None:
    base = ["train", str(tiny_lesion_dir), "--out", str(tmp_path / "r"), "--no-progress",
            "--no-calibrate",
            "--members", "efficientnet-b0", "--epochs", "1", "--image-size", "32", "--from-scratch"]
    assert main(base + ["--negative-class", "cats"]) == 2
    assert "cats" in capsys.readouterr().err
    assert main(base + ["--weights", "efficientnet-b0"]) == 2
    assert "NAME=PATH" in capsys.readouterr().err


@pytest.mark.slow
def test_shared_run_has_every_file(trained_run: Path) -> None:
    manifest = json.loads((trained_run / "aax.json").read_text())
    names = [m["name"] for m in manifest["members"]]
    assert names == ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"]
    for name in names:
        assert (trained_run / f"{name}.pt").is_file()
        assert not (trained_run / f"{name}.last.pt").exists()
    assert {r["member"] for r in _rows(trained_run)} == set(names)
    assert manifest["quorum"] == 2 and manifest["negative_class"] == "healthy"
    assert [m["init"] for m in manifest["members"]] == ["pretrained"] * 3


def _copy_run(trained_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    return run


@pytest.mark.slow
@pytest.mark.parametrize("field,value,message", [
    ("classes", ["diseased", "sick"], "classes"),
    ("member", "resnet50", "member"),
    ("image_size", 128, "image_size"),
])
def test_mismatched_checkpoint_is_refused(trained_run: Path, tmp_path: Path, field: str,
                                          value, message: str) -> None:
    run = _copy_run(trained_run, tmp_path)
    last = DEFAULT_MEMBERS[-1]
    path = run / f"{last}.pt"
    payload = runfiles.load_torch(path)
    payload[field] = value
    runfiles.save_torch(path, payload)
    with pytest.raises(RunError) as err:
        Ensemble.load(run)
    assert f"{last}.pt" in str(err.value) and message in str(err.value)


@pytest.mark.slow
def test_wrong_weights_or_missing_checkpoint_are_refused(trained_run: Path, tmp_path: Path) -> None:
    run = _copy_run(trained_run, tmp_path)
    first, last = DEFAULT_MEMBERS[0], DEFAULT_MEMBERS[-1]  # Lite0 and Lite2: other shapes
    payload = runfiles.load_torch(run / f"{first}.pt")
    payload["state_dict"] = runfiles.load_torch(run / f"{last}.pt")["state_dict"]
    runfiles.save_torch(run / f"{first}.pt", payload)
    with pytest.raises(RunError, match=f"{first}.pt"):
        Ensemble.load(run)
    (run / f"{first}.pt").unlink()
    with pytest.raises(RunError, match="missing"):
        Ensemble.load(run)
    with pytest.raises(RunError, match="aax.json"):
        Ensemble.load(tmp_path / "nowhere")


# --- augmentation ---------------------------------------------------------------------

def test_augmentation_is_seeded_and_stays_in_range() -> None:
    from aax.data.augment import Augment

    x = torch.rand(6, 3, 32, 32)
    aug = Augment()
    a = aug(x, torch.Generator().manual_seed(5))
    b = aug(x, torch.Generator().manual_seed(5))
    c = aug(x, torch.Generator().manual_seed(6))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert not torch.allclose(a, x)


def test_augmentation_parts() -> None:
    from aax.data.augment import Augment

    x = torch.rand(8, 3, 16, 16)
    still = Augment(hflip=False, rotate=0, scale=0, translate=0, brightness=0, contrast=0)
    assert torch.allclose(still(x, torch.Generator().manual_seed(0)), x, atol=1e-5)
    flips = Augment(rotate=0, scale=0, translate=0, brightness=0, contrast=0)(
        x, torch.Generator().manual_seed(0))
    flipped = [torch.allclose(o, i.flip(-1), atol=1e-5) for o, i in zip(flips, x)]
    kept = [torch.allclose(o, i, atol=1e-5) for o, i in zip(flips, x)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)
    bright = Augment(hflip=False, rotate=0, scale=0, translate=0, brightness=0.2, contrast=0)
    shift = bright(torch.full((4, 3, 8, 8), 0.5), torch.Generator().manual_seed(0)) - 0.5
    per_image = shift.flatten(1)
    assert torch.allclose(per_image, per_image[:, :1].expand_as(per_image), atol=1e-6)
    assert float(per_image.abs().max()) <= 0.2 + 1e-6 and float(per_image.abs().max()) > 0


def test_a_member_near_chance_is_flagged_everywhere(tiny_lesion_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    import importlib

    train_module = importlib.import_module("aax.training.train")

    real = train_module.train_member

    def stuck(member, train_set, val_set, settings, **kw):
        outcome = real(member, train_set, val_set, settings, **kw)
        outcome.val_accuracy = 0.55  # majority rate of the split is 0.5
        return outcome

    monkeypatch.setattr(train_module, "train_member", stuck)
    run = train(tiny_lesion_dir, tmp_path / "run", TrainConfig(**FAST, epochs=2))
    manifest = json.loads((run / "aax.json").read_text())
    entry = manifest["members"][0]
    assert entry["converged"] is False and entry["majority_rate"] == 0.5
    assert "did not learn" in entry["warning"] and manifest["warnings"] == [entry["warning"]]
    rows = _rows(run)
    assert rows[-1]["warning"] == "near chance" and rows[0]["warning"] == ""
    assert "WARNING" in capsys.readouterr().err


def test_balanced_class_weights() -> None:
    from aax.training.train import _class_weight_tensor

    w = _class_weight_tensor(torch.tensor([0, 0, 0, 1]), 2, "balanced")
    assert torch.allclose(w, torch.tensor([4 / 6, 2.0]))
    assert _class_weight_tensor(torch.tensor([0, 1]), 2, None) is None


@pytest.mark.slow
def test_training_is_deterministic_for_a_seed(tiny_lesion_dir: Path, tmp_path: Path) -> None:
    """Two runs with one seed, on one machine and thread count, give the same weights
    (every member, so every architecture's kernels are covered)."""
    config = dict(FAST, members=("resnet50", "efficientnet-b0", "densenet121", "efficientnet-lite0"), epochs=1,
                  patience=1, seed=3)
    first = train(tiny_lesion_dir, tmp_path / "a", TrainConfig(**config))
    second = train(tiny_lesion_dir, tmp_path / "b", TrainConfig(**config))
    for name in config["members"]:
        a = runfiles.load_torch(first / f"{name}.pt")["state_dict"]
        b = runfiles.load_torch(second / f"{name}.pt")["state_dict"]
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs between two runs"
