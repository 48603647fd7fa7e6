"""aax.data.synth: layout, determinism, ground truth, and that global statistics do not win."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aax.cli import main
from aax.data import open_dataset
from aax.data.synth import KINDS, MAX_AREA, MIN_AREA, generate, lesion_image, sample_rng


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


TRAINING_KINDS = ["fire", "lesion"]  # "implant" is near-OOD data for lesion runs (test below)


@pytest.mark.parametrize("kind", TRAINING_KINDS)
def test_layout_and_ground_truth(tmp_path, kind):
    negative, positive = KINDS[kind]
    out = generate(kind, tmp_path / kind, n_per_class=6, size=48, seed=3)
    assert out == tmp_path / kind
    ds = open_dataset(out)
    assert ds.format == "folder" and ds.errors == []
    assert ds.classes == sorted([negative, positive])
    assert ds.counts() == {negative: 6, positive: 6}
    assert ds.mask_counts() == {negative: 0, positive: 6}
    assert not (out / "masks" / negative).exists() or not any((out / "masks" / negative).iterdir())
    for sample in ds:
        image = sample.read()
        assert image.shape == (48, 48, 3)
        if sample.label == negative:
            continue
        raw = np.asarray(Image.open(sample.mask_path))
        assert set(np.unique(raw)) <= {0, 255}
        mask = sample.mask()
        assert MIN_AREA <= mask.mean() <= MAX_AREA
        inside, outside = image[mask], image[~mask]
        if kind == "lesion":
            assert np.array_equal(image[..., 0], image[..., 2])  # greyscale
        else:
            # flame colours: red dominates blue, and hotter than the rest of the scene
            assert (inside[:, 0] - inside[:, 2]).mean() > 0.3
            assert inside[:, 0].mean() > outside[:, 0].mean()


def test_lesions_are_plainly_brighter_than_what_they_cover():
    for index in range(20):
        with_lesion, mask = lesion_image(sample_rng(4, "lesion", 1, index), 64, True)
        without, none = lesion_image(sample_rng(4, "lesion", 1, index), 64, False)
        assert none is None and MIN_AREA <= mask.mean() <= MAX_AREA
        diff = with_lesion.astype(float) - without.astype(float)
        assert diff[mask].mean() > 0.15 * 255  # the same image, with and without
        assert (diff[mask] > 0).mean() > 0.8  # brighter nearly everywhere (bar clipping)
        assert np.abs(diff[~mask]).mean() < 0.03 * 255  # nothing else changes much
        assert diff[mask].std() > 0.02 * 255  # textured, not a flat patch


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_same_seed_same_bytes(tmp_path, kind):
    a = _files(generate(kind, tmp_path / "a", n_per_class=4, size=32, seed=11, manifest=True))
    b = _files(generate(kind, tmp_path / "b", n_per_class=4, size=32, seed=11, manifest=True))
    assert a == b and len(a) == 4 + 4 + 4 + 1  # images, positive masks, manifest
    c = _files(generate(kind, tmp_path / "c", n_per_class=4, size=32, seed=12))
    assert all(a[name] != c[name] for name in c)
    # more images per class leave the first ones as they were
    d = _files(generate(kind, tmp_path / "d", n_per_class=6, size=32, seed=11))
    assert all(d[name] == a[name] for name in a if name != "manifest.csv")


def test_manifest_opens_as_the_same_dataset(tmp_path):
    out = generate("fire", tmp_path, n_per_class=3, size=32, seed=0, manifest=True)
    from_csv, from_folder = open_dataset(out / "manifest.csv"), open_dataset(out)
    assert [(s.image.resolve(), s.label, s.has_mask) for s in from_csv] == [
        (s.image.resolve(), s.label, s.has_mask) for s in from_folder]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown kind"):
        generate("smoke", tmp_path)
    with pytest.raises(ValueError, match="size"):
        generate("lesion", tmp_path, size=8)
    with pytest.raises(ValueError, match="n_per_class"):
        generate("lesion", tmp_path, n_per_class=0)


def test_fast_enough(tmp_path):
    start = time.perf_counter()
    generate("lesion", tmp_path / "l", n_per_class=100, size=128, seed=0)
    generate("fire", tmp_path / "f", n_per_class=100, size=128, seed=0)
    assert time.perf_counter() - start < 30  # ~2 s on a laptop core; generous for CI
    assert len(list((tmp_path / "l" / "images").rglob("*.png"))) == 200


def test_cli(tmp_path, capsys):
    assert main(["synth", "--kind", "fire", "--out", str(tmp_path), "--n-per-class", "2",
                 "--size", "32", "--seed", "5"]) == 0
    assert "wrote 4 32x32 images" in capsys.readouterr().out
    assert len(open_dataset(tmp_path)) == 4
    assert main(["synth", "--out", str(tmp_path / "x"), "--size", "4"]) == 2
    with pytest.raises(SystemExit):
        main(["synth", "--kind", "smoke", "--out", str(tmp_path)])


# --- global statistics must not decide -------------------------------------------------

def _load(root: Path) -> tuple[np.ndarray, np.ndarray]:
    ds = open_dataset(root)
    x = np.stack([s.read() for s in ds])
    y = np.array([int(s.label in ("diseased", "fire")) for s in ds])
    return x, y


def _colour_histogram(x: np.ndarray, bins: int = 4) -> np.ndarray:
    q = np.minimum((x * bins).astype(int), bins - 1)
    cell = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
    return np.stack([np.bincount(c.ravel(), minlength=bins ** 3) / c.size for c in cell])


def _grey_histogram(x: np.ndarray, bins: int = 16) -> np.ndarray:
    q = np.minimum((x.mean(-1) * bins).astype(int), bins - 1)
    return np.stack([np.bincount(c.ravel(), minlength=bins) / c.size for c in q])


def _threshold(f_train, y_train, f_test):
    best = (-1.0, 0.0, 1)
    for t in np.unique(f_train):
        for sign in (1, -1):
            acc = ((sign * (f_train - t) > 0) == y_train).mean()
            best = max(best, (acc, t, sign))
    _, t, sign = best
    return (sign * (f_test - t) > 0).astype(int)


def _nearest_centroid(f_train, y_train, f_test):
    centres = np.stack([f_train[y_train == k].mean(0) for k in (0, 1)])
    return ((f_test[:, None] - centres[None]) ** 2).sum(-1).argmin(1)


def _logistic(f_train, y_train, f_test, l2=1e-3, steps=2000, lr=0.5):
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
    a, b = (f_train - mu) / sd, (f_test - mu) / sd
    w, bias = np.zeros(a.shape[1]), 0.0
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(a @ w + bias)))
        w -= lr * (a.T @ (p - y_train) / len(y_train) + l2 * w)
        bias -= lr * (p - y_train).mean()
    return (b @ w + bias > 0).astype(int)


@pytest.mark.parametrize("kind", TRAINING_KINDS)
def test_global_statistics_do_not_separate_the_classes(tmp_path, kind):
    x, y = _load(generate(kind, tmp_path, n_per_class=100, size=32, seed=0))
    order = np.random.default_rng(0).permutation(len(y))
    train, test = order[: len(y) // 2], order[len(y) // 2:]
    mean = x.mean(axis=(1, 2, 3))
    colour = _colour_histogram(x)
    grey = _grey_histogram(x)
    scores = {
        "mean brightness threshold": _threshold(mean[train], y[train], mean[test]),
        "colour histogram, nearest centroid": _nearest_centroid(colour[train], y[train],
                                                                colour[test]),
        "colour histogram, logistic": _logistic(colour[train], y[train], colour[test]),
        "grey histogram, logistic": _logistic(grey[train], y[train], grey[test]),
    }
    accuracy = {name: float((pred == y[test]).mean()) for name, pred in scores.items()}
    assert max(accuracy.values()) <= 0.70, accuracy


def test_the_finding_is_learnable_where_statistics_fail(tmp_path):
    """The same data that defeats the statistics above: a small CNN finds the lesion."""
    torch.manual_seed(0)
    x, y = _load(generate("lesion", tmp_path / "train", n_per_class=100, size=32, seed=0))
    xv, yv = _load(generate("lesion", tmp_path / "val", n_per_class=50, size=32, seed=1))
    x, xv = (torch.from_numpy(a).permute(0, 3, 1, 2) for a in (x, xv))
    y, yv = torch.from_numpy(y), torch.from_numpy(yv)

    def block(i: int, o: int) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Conv2d(i, o, 3, padding=1), torch.nn.GroupNorm(4, o),
                                   torch.nn.ReLU(), torch.nn.MaxPool2d(2))

    net = torch.nn.Sequential(block(3, 16), block(16, 32), block(32, 32),
                              torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(32, 2))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(10):
        for batch in torch.randperm(len(y)).split(16):
            loss = torch.nn.functional.cross_entropy(net(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        accuracy = (net(xv).argmax(1) == yv).float().mean().item()
    assert accuracy >= 0.85


def test_implant_is_a_healthy_chest_with_a_bright_device(tmp_path):
    from aax.data.synth import implant_image

    for index in range(5):
        with_device, mask = implant_image(sample_rng(2, "implant", 1, index), 64, True)
        without, none = implant_image(sample_rng(2, "implant", 1, index), 64, False)
        assert none is None and 0.003 < mask.mean() < 0.1
        assert (with_device[~mask] == without[~mask]).all()  # only the device differs
        assert with_device[mask].min() >= 0.88 * 255 - 1  # bright, sharp-edged metal
    ds = open_dataset(generate("implant", tmp_path, n_per_class=2, size=32, seed=0))
    assert ds.classes == ["implant", "no_implant"] and ds.mask_counts() == {"implant": 2, "no_implant": 0}
