"""``--ray``: annotation on Ray Data and training as Ray tasks, on a real local Ray
instance (``ray.init(num_cpus=2)``, no mock).

What must hold: the store equals the single-process one (same rows, decisions and masks;
scores and overlays within float tolerance), a driver killed mid-run resumes with every
image stored exactly once, and ``aax train --ray`` writes the RUN that ``aax train``
writes. Comparisons run both sides at one CPU thread: results equal the single-process
ones exactly only at the same thread count (the order of float sums depends on it).
"""

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

from aax.cli import main

pytestmark = pytest.mark.slow

TOL = 1e-3  # scores: relative and absolute


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray instance with 2 CPUs for this module; its address, for drivers in
    other processes. In CI a missing Ray fails (``make test`` installs it); elsewhere it
    skips."""
    try:
        import logging

        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        message = f"Ray is not installed ({exc}): pip install -e '.[dev,ray]' (make test does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def input_dir(lesion_dir, tmp_path_factory):
    """Ten synthetic images (one resized to a non-square size) and two broken files."""
    return input_folder(lesion_dir, tmp_path_factory.mktemp("ray_in"))


def rows(out: Path) -> dict[str, dict]:
    db = sqlite3.connect(out / "annotations.sqlite")
    db.row_factory = sqlite3.Row
    found = {r["image"]: dict(r) for r in db.execute("SELECT * FROM annotations")}
    db.close()
    return found


def close(a: float, b: float) -> bool:
    return abs(a - b) <= TOL + TOL * abs(b)


def assert_same_store(a: Path, b: Path, theta: float) -> None:
    """Rows of ``a`` and ``b`` name the same images with the same decisions, reasons and
    masks; scores agree within :data:`TOL`; overlays within a grey level on average. A
    member's novelty flag may differ only where its score sits within tolerance of the
    threshold (a tie that float rounding can tip)."""
    ra, rb = rows(a), rows(b)
    assert set(ra) == set(rb)
    for image, x in ra.items():
        y = rb[image]
        for column in ("status", "error", "decision", "reason", "agreeing", "mask", "mask_area", "label",
                       "height", "width"):
            assert x[column] == y[column], (image, column, x[column], y[column])
        assert (x["saliency"] is None) == (y["saliency"] is None), image
        for p, q in zip(json.loads(x["members"]), json.loads(y["members"]), strict=True):
            assert p["name"] == q["name"] and p["predicted"] == q["predicted"], (image, p, q)
            assert all(close(u, v) for u, v in zip(p["probs"], q["probs"])), (image, p, q)
            assert close(p["uncertainty"], q["uncertainty"]), (image, p, q)
            if (p["uncertainty"] > theta) != (q["uncertainty"] > theta):
                assert close(p["uncertainty"], theta), (image, p, q)
            if p.get("novelty") is not None:
                assert all(close(p["novelty"][k], q["novelty"][k]) for k in p["novelty"]), (image, p, q)
        if x["mask"]:
            ma, mb = (np.asarray(Image.open(out / x["mask"]), dtype=bool) for out in (a, b))
            assert ma.shape == mb.shape and np.count_nonzero(ma != mb) <= max(1, ma.size // 1000), image
        if x["saliency"]:
            sa, sb = (np.asarray(Image.open(out / x["saliency"]), dtype=np.int16) for out in (a, b))
            assert sa.shape == sb.shape and np.abs(sa - sb).mean() < 1.0, image


def theta_of(run: Path) -> float:
    return float(json.loads((run / "aax.json").read_text()).get("theta", 0.1))


def test_store_equals_the_single_process_one(trained_run, input_dir, tmp_path, ray_address, capsys):
    plain, clustered = tmp_path / "plain", tmp_path / "ray"
    common = [str(trained_run), str(input_dir), "--threads", "1", "--save-saliency", "--mc-passes", "8"]
    assert main(["annotate", *common, "--out", str(plain), "--workers", "0", "--batch-size", "4"]) == 1  # 2 broken
    # `--ray` alone: in a process already connected to Ray, that instance is used
    # batches of 4: three of them for two actors
    assert main(["annotate", *common, "--out", str(clustered), "--ray", "--actors", "2", "--batch-size", "4"]) == 1
    assert_same_store(plain, clustered, theta_of(trained_run))
    summary = json.loads((clustered / "summary.json").read_text())
    plain_summary = json.loads((plain / "summary.json").read_text())
    for key in ("images", "annotated", "errors", "masks", "decisions", "settings"):
        assert summary[key] == plain_summary[key], key
    assert summary["ray"]["actors"] == 2 and summary["ray"]["threads_per_actor"] == 1
    assert summary["ray"]["images"] == 12 and summary["ray"]["images_per_second"] > 0
    errors = {e["image"]: e["error"] for e in summary["error_list"]}
    assert set(errors) == {"broken/empty.png", "broken/text.png"}

    # the same fingerprint: a second run finds everything stored, under Ray or not
    capsys.readouterr()
    assert main(["annotate", *common, "--out", str(clustered), "--ray"]) == 1
    assert "resumed: 12 images were already done" in capsys.readouterr().err
    assert main(["annotate", *common, "--out", str(clustered), "--workers", "0"]) == 1
    assert len(rows(clustered)) == 12


def test_kill_the_driver_then_resume_stores_every_image_once(trained_run, input_dir, tmp_path, ray_address):
    many = tmp_path / "many"
    for i in range(8):  # 96 inputs: enough for the kill to land mid-run
        shutil.copytree(input_dir, many / f"copy{i}")
    out, reference = tmp_path / "out", tmp_path / "reference"
    options = ["--batch-size", "2", "--mc-passes", "5", "--threads", "1", "--save-saliency"]
    # the driver in its own process, joining this module's Ray instance by its address
    cmd = [sys.executable, "-m", "aax", "annotate", str(trained_run), str(many), "--out", str(out), *options,
           "--ray", ray_address, "--actors", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db_path = out / "annotations.sqlite"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:  # until the first rows are committed
        time.sleep(0.1)
        if db_path.exists():
            try:
                with sqlite3.connect(db_path) as db:
                    n = db.execute("SELECT COUNT(*) FROM annotations").fetchone()[0]
            except sqlite3.OperationalError:
                continue
            if n >= 1:
                break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with sqlite3.connect(db_path) as db:
        done_before = db.execute("SELECT COUNT(*) FROM annotations").fetchone()[0]
    total = len(list(many.rglob("*.png")))
    assert 0 < done_before < total, "the kill must land mid-run for this test to mean anything"

    # resumed as the README says, with a Ray instance of its own on this machine
    local = [c for c in cmd if c != ray_address]
    resumed = subprocess.run(local, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 1, resumed.stderr[-2000:]  # the broken files
    assert f"resumed: {done_before} images were already done" in resumed.stderr
    db = sqlite3.connect(db_path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    images = [r[0] for r in db.execute("SELECT image FROM annotations")]
    assert len(images) == len(set(images)) == total
    stored = {r[0] for r in db.execute("SELECT mask FROM annotations WHERE mask IS NOT NULL")}
    stored |= {r[0] for r in db.execute("SELECT saliency FROM annotations WHERE saliency IS NOT NULL")}
    db.close()
    on_disk = {p.relative_to(out).as_posix() for d in ("masks", "saliency") if (out / d).exists()
               for p in (out / d).rglob("*") if p.is_file()}
    assert on_disk == stored  # no file without a row, no row without its file

    # the same records as an uninterrupted run (in this process, without Ray)
    assert main(["annotate", str(trained_run), str(many), "--out", str(reference), *options, "--workers", "0"]) == 1
    assert_same_store(reference, out, theta_of(trained_run))


def test_train_ray_writes_the_run_train_writes(tiny_lesion_dir, tmp_path, ray_address, capsys):
    import torch

    plain, clustered = tmp_path / "plain", tmp_path / "ray"
    common = ["train", str(tiny_lesion_dir), "--epochs", "1", "--image-size", "32", "--threads", "1",
              "--no-progress"]
    assert main([*common, "--out", str(plain)]) == 0
    assert main([*common, "--out", str(clustered), "--ray"]) == 0
    assert "as Ray tasks" in capsys.readouterr().err
    assert sorted(p.name for p in plain.iterdir()) == sorted(p.name for p in clustered.iterdir())
    a, b = (json.loads((run / "aax.json").read_text()) for run in (plain, clustered))
    for entry in (*a["members"], *b["members"]):
        entry.pop("seconds")
    for key in ("classes", "negative_class", "members", "data", "training", "maps", "theta", "tau", "quorum",
                "status", "warnings"):
        assert a[key] == b[key], key
    assert a["calibration"]["fusion"] == b["calibration"]["fusion"]  # calibrated after the three members
    for entry in a["members"]:
        x, y = (torch.load(run / entry["checkpoint"], weights_only=True)["state_dict"] for run in (plain, clustered))
        assert x.keys() == y.keys()
        for key in x:
            assert torch.allclose(x[key].float(), y[key].float(), rtol=1e-5, atol=1e-6), (entry["name"], key)
    history = [(run / "history.csv").read_text().splitlines() for run in (plain, clustered)]
    assert [line.split(",")[:3] for line in history[0]] == [line.split(",")[:3] for line in history[1]]


def test_a_missing_ray_is_one_line_naming_the_extra(trained_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    assert main(["annotate", str(trained_run), str(tmp_path), "--out", str(tmp_path / "o"), "--ray"]) == 2
    assert "pip install 'aax[ray]'" in capsys.readouterr().err
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "r"), "--ray"]) == 2
    assert "pip install 'aax[ray]'" in capsys.readouterr().err


def test_actors_needs_ray(trained_run, tmp_path, capsys):
    assert main(["annotate", str(trained_run), str(tmp_path), "--out", str(tmp_path / "o"), "--actors", "2"]) == 2
    assert "--actors needs --ray" in capsys.readouterr().err


def test_threads_are_shared_evenly_within_one_node():
    from aax.scale.cluster import ClusterInfo, actor_threads, default_cpu_actors

    two = ClusterInfo("x", cpus=2, gpus=0, nodes=1, node_cpus=2, started_here=True)
    assert default_cpu_actors(two) == 1 and actor_threads(two, 1) == 2 and actor_threads(two, 2) == 1
    assert actor_threads(two, 3) == 1 and actor_threads(two, 2, threads=4) == 4
    cluster = ClusterInfo("x", cpus=64, gpus=0, nodes=4, node_cpus=16, started_here=False)
    assert default_cpu_actors(cluster) == 16 and actor_threads(cluster, 16) == 4
    assert actor_threads(cluster, 2) == 16  # an actor never spans nodes
