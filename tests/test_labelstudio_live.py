"""Against a real Label Studio (``.venv-ls``, from ``make interop``): AAX's config and
tasks go in, the predictions come back out of its API, a reviewer's annotation goes
through its export into AAX's store unchanged, and a project connected to ``aax serve``
gets AAX's prediction for a new task when the task is opened.

Label Studio runs on 127.0.0.1 with a temporary data folder and a known legacy token;
nothing reaches the network (its version check and analytics are off).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from aax.cli import main
from aax.interop import brush
from aax.interop.reviews import load_mask

TOKEN = "aax0test0token0aax0test0token0aax0test00"
START_TIMEOUT = 600  # s: a first start migrates a fresh database (about 70 s on 2 idle cores)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{url}: the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    pytest.fail(f"{url}: not up after {timeout} s:\n{log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class LabelStudio:
    """The API of a running Label Studio, with the test's token."""

    def __init__(self, url: str, files: Path) -> None:
        self.url, self.files = url, files

    def api(self, method: str, path: str, body=None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Authorization": f"Token {TOKEN}",
                                                  "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=300) as r:
                return json.load(r)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{method} {path}: {exc.code} {exc.read()[:500]!r}") from None


@pytest.fixture(scope="module")
def label_studio(label_studio_python: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("label-studio")
    files = root / "files"  # LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT
    files.mkdir()
    port = _free_port()
    env = {**os.environ,
           "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
           "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(files),
           # an ML backend on this machine: Label Studio blocks loopback addresses by default
           "ML_BLOCK_LOCAL_IP": "false", "SSRF_PROTECTION_ENABLED": "false",
           "LATEST_VERSION_CHECK": "false", "COLLECT_ANALYTICS": "false",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log = root / "label-studio.log"
    command = [str(label_studio_python.parent / "label-studio"), "start", "--no-browser",
               "--data-dir", str(root / "data"), "--internal-host", "127.0.0.1", "--port", str(port),
               "--username", "reviewer@example.com", "--password", "aax-test-password",
               "--user-token", TOKEN, "--enable-legacy-api-token"]
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        started = time.monotonic()
        _wait(f"http://127.0.0.1:{port}/health", process, log, START_TIMEOUT)
        print(f"Label Studio up in {time.monotonic() - started:.0f} s", file=sys.stderr)
        yield LabelStudio(f"http://127.0.0.1:{port}", files)
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def project(label_studio: LabelStudio, ensemble, lesion_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """AAX's annotations of 8 lesion images (under Label Studio's local-files root),
    exported as tasks and imported into a new project whose config is AAX's."""
    from aax.annotation.annotate import annotate_to_folder

    images = label_studio.files / "lesion"
    for cls in ("diseased", "healthy"):
        (images / cls).mkdir(parents=True)
        for path in sorted((lesion_dir / "images" / cls).glob("*.png"))[:4]:
            (images / cls / path.name).write_bytes(path.read_bytes())
    out = tmp_path_factory.mktemp("ls-store") / "out"
    annotate_to_folder(ensemble, images, out, progress=False, workers=0)
    export = out.parent / "ls"
    assert main(["export", str(out), "--format", "label-studio", "--to", str(export),
                 "--local-files", str(label_studio.files)]) == 0
    ls = label_studio
    created = ls.api("POST", "/api/projects", {"title": "AAX review",
                                               "label_config": (export / "config.xml").read_text()})
    # Label Studio serves local files only under a local-files storage of the project
    ls.api("POST", "/api/storages/localfiles", {"project": created["id"], "path": str(images),
                                                "title": "lesion", "use_blob_urls": True})
    tasks = json.loads((export / "tasks.json").read_text())
    imported = ls.api("POST", f"/api/projects/{created['id']}/import", tasks)
    assert (imported["task_count"], imported["prediction_count"]) == (len(tasks), len(tasks))
    return {"id": created["id"], "out": out, "images": images, "tasks": tasks}


def _project_tasks(ls: LabelStudio, project_id: int) -> list[dict]:
    return ls.api("GET", f"/api/tasks?project={project_id}&page_size=1000")["tasks"]


def test_predictions_come_back_through_the_api(label_studio, project):
    ls, out = label_studio, project["out"]
    db = sqlite3.connect(out / "annotations.sqlite")
    stored = {image: (decision, mask) for image, decision, mask in
              db.execute("SELECT image, decision, mask FROM annotations")}
    tasks = _project_tasks(ls, project["id"])
    assert len(tasks) == len(stored)
    masks = 0
    for task in tasks:
        decision, mask_file = stored[task["data"]["aax_image"]]
        predictions = ls.api("GET", f"/api/predictions?task={task['id']}")
        assert len(predictions) == 1
        prediction = predictions[0]
        assert prediction["model_version"].startswith("lesion-run@")
        regions = {r["type"]: r for r in prediction["result"]}
        assert regions["choices"]["value"]["choices"] == [decision]
        assert (prediction["score"] < 0.5) == (decision == "review")
        if mask_file and decision != "review":
            region = regions["brushlabels"]
            got = brush.rle_to_mask(region["value"]["rle"], region["original_height"], region["original_width"])
            assert np.array_equal(got, load_mask(out / mask_file))
            masks += 1
        # the labeling UI can load the image
        request = urllib.request.Request(ls.url + task["data"]["image"], headers={"Authorization": f"Token {TOKEN}"})
        with urllib.request.urlopen(request, timeout=60) as r:
            assert r.status == 200 and r.read(8).startswith(b"\x89PNG")
    assert masks == sum(1 for d, m in stored.values() if m and d != "review")


def test_reviewed_annotation_comes_back_into_the_store(label_studio, project, tmp_path, capsys):
    ls, out = label_studio, project["out"]
    task = next(t for t in _project_tasks(ls, project["id"]) if t["data"]["aax_image"].startswith("diseased/"))
    h, w = 64, 64
    drawn = np.zeros((h, w), bool)
    drawn[12:40, 20:51] = True
    drawn[30:34, 5:60] = True
    result = [{"from_name": "decision", "to_name": "image", "type": "choices", "value": {"choices": ["diseased"]}},
              {"from_name": "mask", "to_name": "image", "type": "brushlabels", "original_width": w,
               "original_height": h, "image_rotation": 0,
               "value": {"format": "rle", "rle": brush.mask_to_rle(drawn), "brushlabels": ["diseased"]}}]
    ls.api("POST", f"/api/tasks/{task['id']}/annotations", {"result": result, "was_cancelled": False})
    exported = ls.api("GET", f"/api/projects/{project['id']}/export?exportType=JSON&download_all_tasks=true")
    path = tmp_path / "export.json"
    path.write_text(json.dumps(exported))
    assert main(["import", str(out), "--from", "label-studio", str(path)]) == 0
    first = json.loads(capsys.readouterr().out)
    assert (first["added"], first["updated"], first["unchanged"]) == (1, 0, 0)
    db = sqlite3.connect(out / "annotations.sqlite")
    decision, mask_file = db.execute("SELECT decision, mask FROM reviews WHERE image = ?",
                                     (task["data"]["aax_image"],)).fetchone()
    assert decision == "diseased"
    assert np.array_equal(load_mask(out / mask_file), drawn)
    assert main(["import", str(out), "--from", "label-studio", str(path)]) == 0  # idempotent
    assert json.loads(capsys.readouterr().out)["unchanged"] == 1
    assert main(["review-stats", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["reviewed"] == 1


@contextlib.contextmanager
def _serve(ls: LabelStudio, run: Path, log: Path, *extra: str):
    """``aax serve RUN`` on a free port, pointed at ``ls``; yields its URL once healthy."""
    port = _free_port()
    env = {**os.environ, "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": TOKEN,
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "w") as f:
        server = subprocess.Popen([sys.executable, "-m", "aax", "serve", str(run), "--port", str(port),
                                   "--device", "cpu", *extra], env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait(f"{url}/health", server, log, 300)
        yield url
        assert server.poll() is None
    finally:
        _stop(server)


def test_connected_backend_predicts_a_new_task(label_studio, project, trained_run, tmp_path):
    ls = label_studio
    log = tmp_path / "serve.log"
    with _serve(ls, trained_run, log) as backend_url:
        backend = ls.api("POST", "/api/ml", {"url": backend_url, "project": project["id"], "title": "AAX"})
        assert backend["state"] == "CO", backend
        ls.api("PATCH", f"/api/projects/{project['id']}", {"evaluate_predictions_automatically": True})
        image = sorted((project["images"] / "healthy").glob("*.png"))[-1]
        url = "/data/local-files/?d=" + image.relative_to(ls.files).as_posix()
        # a task without predictions: with a backend connected, Label Studio asks it on
        # import, and again when the task is opened if it still has none
        imported = ls.api("POST", f"/api/projects/{project['id']}/import", [{"data": {"image": url}}])
        assert imported["prediction_count"] == 0
        new = next(t for t in _project_tasks(ls, project["id"]) if t["data"]["image"] == url)
        opened = ls.api("GET", f"/api/tasks/{new['id']}")  # what the labeling UI asks for
        assert len(opened["predictions"]) == 1, log.read_text()[-2000:]
        assert '"POST /predict HTTP/1.1" 200' in log.read_text()
        prediction = opened["predictions"][0]
        assert prediction["model_version"] == backend["model_version"]
        assert prediction["model_version"].startswith("lesion-run@")
        decision = prediction["result"][0]["value"]["choices"][0]
        stored = next(t for t in project["tasks"] if t["data"]["aax_image"].endswith(image.name))
        assert decision == stored["data"]["aax_decision"]  # the same image, the same answer


def test_backend_with_a_store_keeps_reviews_as_they_are_submitted(label_studio, project, trained_run, tmp_path):
    """`aax serve --store OUT` connected to the project: Label Studio's own webhook to the
    backend brings each submitted annotation into OUT's reviews, and a deletion removes it."""
    ls, out = label_studio, project["out"]
    log = tmp_path / "serve.log"

    def review(image: str):
        db = sqlite3.connect(out / "annotations.sqlite")
        try:
            return db.execute("SELECT decision, mask FROM reviews WHERE image = ?", (image,)).fetchone()
        finally:
            db.close()

    def wait_for(check, what: str):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.5)
        pytest.fail(f"{what}: not seen in 60 s\n{log.read_text()[-2000:]}")

    with _serve(ls, trained_run, log, "--store", str(out)) as backend_url:
        backend = ls.api("POST", "/api/ml", {"url": backend_url, "project": project["id"],
                                              "title": "AAX with reviews"})
        assert backend["state"] == "CO", backend
        task = next(t for t in _project_tasks(ls, project["id"])
                    if t["data"].get("aax_image", "").startswith("healthy/"))
        image = task["data"]["aax_image"]
        drawn = np.zeros((64, 64), bool)
        drawn[8:30, 10:28] = True
        result = [{"from_name": "decision", "to_name": "image", "type": "choices",
                   "value": {"choices": ["diseased"]}},
                  {"from_name": "mask", "to_name": "image", "type": "brushlabels", "original_width": 64,
                   "original_height": 64, "image_rotation": 0,
                   "value": {"format": "rle", "rle": brush.mask_to_rle(drawn), "brushlabels": ["diseased"]}}]
        created = ls.api("POST", f"/api/tasks/{task['id']}/annotations", {"result": result, "was_cancelled": False})
        wait_for(lambda: review(image) is not None, f"the review of {image}")
        decision, mask_file = review(image)
        assert decision == "diseased" and np.array_equal(load_mask(out / mask_file), drawn)
        _delete(ls, f"/api/annotations/{created['id']}")  # answers 204 with no body
        wait_for(lambda: review(image) is None, f"the removal of {image}'s review")


def _delete(ls: LabelStudio, path: str) -> None:
    request = urllib.request.Request(ls.url + path, method="DELETE", headers={"Authorization": f"Token {TOKEN}"})
    with urllib.request.urlopen(request, timeout=60) as r:
        assert r.status in (200, 204)
