"""`aax serve`: the Label Studio ML backend protocol over real HTTP (in this process),
its answers against `aax.annotate`, and its refusals (it must never die on one)."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from aax.interop import brush
from aax.interop.serve import Backend, ImageSource, make_server

TOKEN = "test-token-0123456789"


@pytest.fixture(scope="module")
def images(lesion_dir: Path) -> list[Path]:
    return sorted((lesion_dir / "images" / "diseased").glob("*.png"))[:3] + \
        sorted((lesion_dir / "images" / "healthy").glob("*.png"))[:2]


@pytest.fixture(scope="module")
def fake_label_studio(images):
    """Serves the images under /data/upload/, to requests with the right token only."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append(self.headers.get("Authorization"))
            name = self.path.rsplit("/", 1)[-1]
            match = [p for p in images if p.name == name]
            if self.headers.get("Authorization") != f"Token {TOKEN}":
                self.send_response(401)
                self.end_headers()
                return
            if not match:
                self.send_response(404)
                self.end_headers()
                return
            data = match[0].read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def junk_dir(tmp_path_factory) -> Path:
    """A second folder the backend may read: it holds a file that is no image."""
    folder = tmp_path_factory.mktemp("junk")
    (folder / "not-an-image.png").write_bytes(b"garbage")
    return folder


@pytest.fixture(scope="module")
def backend_url(ensemble, lesion_dir, fake_label_studio, junk_dir):
    source = ImageSource(fake_label_studio[0], TOKEN, [lesion_dir / "images", junk_dir])
    server = make_server(Backend(ensemble, source, max_batch=4), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def call(url: str, method: str = "GET", body=None, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def test_health_and_setup(backend_url):
    status, health = call(backend_url + "/health")
    assert status == 200 and health["status"] == "UP"
    assert health["model_version"].startswith("lesion-run@")
    status, setup = call(backend_url + "/setup", "POST", {"project": "1.1700000000", "schema": "<View/>"})
    assert (status, setup["model_version"]) == (200, health["model_version"])


def test_predict_matches_annotate_in_one_batch(backend_url, ensemble, images):
    from aax.annotation.annotate import annotate

    tasks = [{"id": i, "data": {"image": str(p)}} for i, p in enumerate(images)]
    status, body = call(backend_url + "/predict", "POST", {"tasks": tasks, "label_config": None})
    assert status == 200 and len(body["results"]) == len(images)
    # the backend's batches (max_batch 4), so that not even float rounding can differ
    for record, result in zip(annotate(ensemble, images, workers=0, batch_size=4), body["results"]):
        regions = {r["type"]: r for r in result["result"]}
        assert regions["choices"]["value"]["choices"] == [record.decision]
        assert regions["textarea"]["value"]["text"] == [record.reason]
        if record.mask is not None and record.decision != "review":
            mask = regions["brushlabels"]
            got = brush.rle_to_mask(mask["value"]["rle"], mask["original_height"], mask["original_width"])
            assert np.array_equal(got, record.mask)
        else:
            assert "brushlabels" not in regions
        assert 0.0 <= result["score"] <= 1.0
        assert (result["score"] < 0.5) == (record.decision == "review")


def test_predict_uses_the_projects_control_names(backend_url, images):
    config = ('<View><Image name="img" value="$picture"/><Choices name="verdict" toName="img">'
              '<Choice value="diseased"/></Choices><BrushLabels name="seg" toName="img"/></View>')
    status, body = call(backend_url + "/predict", "POST",
                        {"tasks": [{"id": 1, "data": {"picture": str(images[0])}}], "label_config": config})
    assert status == 200
    region = body["results"][0]["result"][0]
    assert (region["from_name"], region["to_name"]) == ("verdict", "img")


def test_images_from_label_studio_carry_the_token(backend_url, fake_label_studio, images):
    base, seen = fake_label_studio
    tasks = [{"id": 1, "data": {"image": f"/data/upload/1/{images[0].name}"}},
             {"id": 2, "data": {"image": f"{base}/data/upload/1/{images[3].name}"}}]
    status, body = call(backend_url + "/predict", "POST", {"tasks": tasks})
    assert status == 200 and all(r["result"] for r in body["results"])
    assert seen[-2:] == [f"Token {TOKEN}"] * 2


@pytest.mark.parametrize("body, raw, status, words", [
    (None, b"{not json", 400, "not JSON"),
    ([1, 2], None, 400, "JSON object"),
    ({"tasks": []}, None, 422, "non-empty list"),
    ({"tasks": ["x"]}, None, 422, "'data'"),
    ({"tasks": [{"data": {"image": "/etc/passwd"}}]}, None, 403, "not under a folder named at start"),
    ({"tasks": [{"data": {"image": "http://example.com/a.png"}}]}, None, 403, "not under Label Studio"),
    ({"tasks": [{"data": {"image": "/data/upload/1/missing.png"}}]}, None, 502, "404"),
    ({"tasks": [{"data": {}}]}, None, 422, "names no image"),
])
def test_bad_requests_get_a_json_error_and_the_server_goes_on(backend_url, body, raw, status, words):
    got, answer = call(backend_url + "/predict", "POST", body, raw)
    assert got == status and words in answer["error"]
    assert call(backend_url + "/health")[0] == 200


def test_one_bad_task_in_a_batch_leaves_the_others(backend_url, images, junk_dir):
    tasks = [{"id": 1, "data": {"image": str(images[0])}}, {"id": 2, "data": {"image": "/etc/passwd"}},
             {"id": 3, "data": {"image": str(junk_dir / "not-an-image.png")}}]
    status, body = call(backend_url + "/predict", "POST", {"tasks": tasks})
    assert status == 200 and len(body["results"]) == 3
    assert body["results"][0]["result"]
    assert body["results"][1]["result"] == [] and "not under a folder" in body["results"][1]["error"]
    assert body["results"][2]["result"] == [] and body["results"][2]["error"]


def test_routes_webhook_and_methods(backend_url):
    assert call(backend_url + "/nowhere")[0] == 404
    assert call(backend_url + "/nowhere", "POST", {})[0] == 404
    assert call(backend_url + "/predict", "PUT", {})[0] == 405
    status, body = call(backend_url + "/webhook", "POST", {"action": "ANNOTATION_CREATED", "project": {"id": 1}})
    assert status == 200 and body["status"] == "ignored"
    assert call(backend_url + "/webhook", "POST", {"action": "PROJECT_UPDATED"})[1]["status"] == "Unknown event"
