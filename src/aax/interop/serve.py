"""``aax serve``: a Label Studio ML backend that answers with AAX's predictions.

It speaks the protocol Label Studio's ML backends speak (the one of the
``label-studio-ml`` package): ``GET /health``, ``POST /setup`` (answers the model
version), ``POST /predict`` (``{"tasks": [...], "label_config": ...}`` in,
``{"results": [one prediction per task]}`` out) and ``POST /webhook`` (Label Studio's
webhooks: with ``store`` set, every annotation a reviewer submits or updates on a task
AAX exported is stored in that annotation folder's reviews, as ``aax import`` would
store it, and a deleted one is removed; ``aax retrain`` then learns from them. Without
``store`` the events are acknowledged and ignored).

Built on the standard library's ``http.server`` rather than ``label-studio-ml``: that
package brings Flask and the Label Studio SDK (which pins numpy, pillow and OpenCV
versions of its own) into AAX's environment, and builds a model object per request;
four JSON routes need neither. The members are loaded once, at start.

Safety: it binds to 127.0.0.1 unless told otherwise; it reads images only from Label
Studio (URLs under ``LABEL_STUDIO_URL``, with the key in ``LABEL_STUDIO_API_KEY``) or
from the folders named at start; a bad request gets a 4xx JSON error, a failure inside
a 500 JSON error, and the server goes on.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

log = logging.getLogger("aax.interop.serve")

MAX_BODY = 64 << 20  # bytes of one request
MAX_IMAGE = 256 << 20  # bytes of one image
FETCH_TIMEOUT = 30.0
REVIEW_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED")
TRAIN_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED", "START_TRAINING")


class RequestError(Exception):
    """A request the backend refuses: answered with ``status`` and the message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ImageSource:
    """Where the backend may read images from: Label Studio, and folders named at start.

    Args:
        label_studio_url: Label Studio's address (``http://host:port``); task URLs under
            it, and Label Studio's own relative ``/data/...`` URLs, are fetched with the key.
        api_key: a legacy token (sent as ``Authorization: Token``) or a personal access
            token (a JWT, exchanged at ``/api/token/refresh`` for a ``Bearer`` token).
        folders: local folders whose files tasks may name (a path or ``file://`` URL).
    """

    def __init__(self, label_studio_url: str | None = None, api_key: str | None = None,
                 folders: Sequence[str | os.PathLike] = ()) -> None:
        self.url = label_studio_url.rstrip("/") if label_studio_url else None
        self.api_key = api_key
        self.folders = [Path(f).resolve() for f in folders]
        self._bearer: str | None = None

    def _auth_header(self) -> str | None:
        if not self.api_key:
            return None
        if self.api_key.count(".") != 2:
            return f"Token {self.api_key}"
        if self._bearer is None:  # a personal access token is a refresh token
            body = json.dumps({"refresh": self.api_key}).encode()
            req = urllib.request.Request(f"{self.url}/api/token/refresh", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=FETCH_TIMEOUT) as r:  # noqa: S310 - Label Studio's URL
                self._bearer = json.load(r)["access"]
        return f"Bearer {self._bearer}"

    def resolve(self, ref: str) -> tuple[str, str]:
        """``("url", URL)`` to fetch from Label Studio or ``("file", PATH)`` to read;
        raises :class:`RequestError` (403) for anything else."""
        if not isinstance(ref, str) or not ref:
            raise RequestError(422, "the task names no image")
        if self.url and ref.startswith(self.url + "/"):
            return "url", ref
        if ref.startswith("/data/") and self.url:
            return "url", self.url + ref
        if ref.startswith(("http://", "https://", "s3://", "gs://", "azure-blob://")):
            raise RequestError(403, f"{ref}: not under Label Studio's address "
                                    f"({self.url or 'LABEL_STUDIO_URL is not set'}); not fetched")
        if ref.startswith("/data/"):
            raise RequestError(403, f"{ref}: a Label Studio URL, but LABEL_STUDIO_URL is not set")
        path = Path(urllib.parse.unquote(ref[len("file://"):])) if ref.startswith("file://") else Path(ref)
        path = path.resolve()
        if not any(path.is_relative_to(folder) for folder in self.folders):
            raise RequestError(403, f"{ref}: not under a folder named at start (--images)")
        return "file", str(path)

    def fetch(self, ref: str, folder: Path) -> Path:
        """The image ``ref`` as a local file (downloaded into ``folder`` when remote)."""
        kind, where = self.resolve(ref)
        if kind == "file":
            if not Path(where).is_file():
                raise RequestError(404, f"{ref}: no such file")
            return Path(where)
        headers = {}
        if (auth := self._auth_header()) is not None:
            headers["Authorization"] = auth
        request = urllib.request.Request(where, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT) as r:  # noqa: S310 - checked above
                data = r.read(MAX_IMAGE + 1)
        except urllib.error.HTTPError as exc:
            raise RequestError(502, f"{ref}: Label Studio answered {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise RequestError(502, f"{ref}: cannot reach Label Studio ({exc})") from None
        if len(data) > MAX_IMAGE:
            raise RequestError(413, f"{ref}: larger than {MAX_IMAGE >> 20} MiB")
        name = Path(urllib.parse.urlparse(where).path).name
        query = urllib.parse.parse_qs(urllib.parse.urlparse(where).query)
        if "d" in query:  # local-files URLs carry the file name in ?d=
            name = Path(query["d"][0]).name
        # the file keeps its name: MC Dropout seeds come from it (aax.annotation.annotate.image_seed)
        path = folder / f"{len(list(folder.iterdir())):05d}" / (name or "image")
        path.parent.mkdir()
        path.write_bytes(data)
        return path


class Backend:
    """AAX's ensemble behind the ML backend protocol (no HTTP here; see :func:`serve`).

    Args:
        ensemble (aax.models.ensemble.Ensemble): a loaded ensemble.
        source: where images may come from.
        max_batch: tasks per forward pass of the members.
    """

    def __init__(self, ensemble, source: ImageSource, max_batch: int = 16,
                 store: str | os.PathLike | None = None) -> None:
        from aax.interop.labelstudio import model_version
        from aax.models.runfiles import run_fingerprint

        self.ensemble = ensemble
        self.source = source
        self.max_batch = max(1, int(max_batch))
        self.version = model_version({"run": str(ensemble.run), "weights": run_fingerprint(ensemble.run, ensemble.manifest)})
        self._lock = threading.Lock()  # one forward pass at a time: they share the cores
        self.store = None if store is None else Path(store)
        self._store_lock = threading.Lock()  # the store has one writer

    def health(self) -> dict:
        return {"status": "UP", "model_class": "AAX", "model_version": self.version}

    def setup(self, body: dict) -> dict:
        return {"model_version": self.version}

    def webhook(self, body: dict) -> dict:
        action = body.get("action")
        if self.store is not None and action in REVIEW_EVENTS:
            return self._store_review(action, body)
        if action in TRAIN_EVENTS:
            return {"status": "ignored", "action": action,
                    "reason": "start aax serve with --store OUT to keep reviews; retrain with aax retrain"}
        return {"status": "Unknown event", "action": action}

    def _store_review(self, action: str, body: dict) -> dict:
        """Store the review in one annotation event, or remove the reviews of deleted
        annotations (Label Studio names only their ids: the review's ``tool_ref`` has it)."""
        from aax.annotation.store import open_store
        from aax.interop.labelstudio import review_from_task
        from aax.interop.reviews import ReviewImportError, import_reviews, remove_annotation_reviews

        if action == "ANNOTATIONS_DELETED":
            ids = [a.get("id") for a in body.get("annotations") or [] if isinstance(a, dict)]
            with self._store_lock:
                store = open_store(self.store)
                try:
                    removed = remove_annotation_reviews(store, [i for i in ids if isinstance(i, int)])
                finally:
                    store.close()
            return {"status": "removed" if removed else "ignored", "action": action, "images": removed}
        task, annotation = body.get("task"), body.get("annotation")
        if not isinstance(task, dict) or not isinstance(annotation, dict):
            raise RequestError(422, f"{action} needs 'task' and 'annotation' objects")
        image = (task.get("data") or {}).get("aax_image")
        with self._store_lock:
            store = open_store(self.store)
            try:
                settings = store.settings
                review, why = review_from_task({**task, "annotations": [annotation]},
                                               settings.get("classes", []), settings.get("negative_class"))
                if review is None:
                    return {"status": "ignored", "action": action, "image": image, "reason": why}
                try:
                    counts = import_reviews(store, [review], f"Label Studio webhook (task {task.get('id')})")
                except ReviewImportError as exc:
                    raise RequestError(422, str(exc)) from None
            finally:
                store.close()
        log.info("review of %s stored (%s)", image, action)
        return {"status": "stored", "action": action, "image": image, "decision": review.decision,
                "mask": review.mask is not None, **counts}

    def predict(self, body: dict) -> dict:
        from aax.annotation.annotate import annotate
        from aax.annotation.records import AnnotationRecord
        from aax.interop.labelstudio import config_names, predictions_for_records

        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise RequestError(422, "'tasks' must be a non-empty list of tasks")
        names = config_names(body.get("label_config"))
        classes = list(self.ensemble.classes)
        results: list[dict | None] = [None] * len(tasks)
        with tempfile.TemporaryDirectory(prefix="aax-serve-") as tmp:
            paths, where = [], []
            for i, task in enumerate(tasks):
                if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
                    raise RequestError(422, f"task {i}: not an object with 'data'")
                try:
                    paths.append(self.source.fetch(task["data"].get(names["field"]), Path(tmp)))
                    where.append(i)
                except RequestError as exc:
                    if len(tasks) == 1:
                        raise
                    log.warning("task %s: %s", task.get("id"), exc)
                    results[i] = predictions_for_records(
                        [AnnotationRecord(image="", status="error", error=str(exc))], classes, self.version)[0]
            with self._lock:
                records = list(annotate(self.ensemble, paths, batch_size=min(self.max_batch, max(1, len(paths))),
                                        workers=0))
        if len(tasks) == 1 and records and records[0].status != "ok":
            raise RequestError(422, f"{tasks[0]['data'].get(names['field'])}: {records[0].error}")
        for i, prediction in zip(where, predictions_for_records(records, classes, self.version, names)):
            results[i] = prediction
        return {"results": results}


def _handler(backend: Backend) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "aax-serve"
        protocol_version = "HTTP/1.1"

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            self._send(status, {"status": "error", "error": message})

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = urllib.parse.urlparse(self.path).path
            if path in ("/", "/health"):
                self._send(200, backend.health())
            elif path == "/metrics":
                self._send(200, {})
            else:
                self._error(404, f"no route GET {path}")

        def do_POST(self) -> None:  # noqa: N802
            path = urllib.parse.urlparse(self.path).path
            routes = {"/predict": backend.predict, "/setup": backend.setup, "/webhook": backend.webhook}
            try:
                length = int(self.headers.get("Content-Length") or -1)
                if path not in routes:
                    if length > 0:
                        self.rfile.read(min(length, MAX_BODY))
                    raise RequestError(404, f"no route POST {path}")
                if length < 0:
                    raise RequestError(411, "Content-Length is required")
                if length > MAX_BODY:
                    self.close_connection = True
                    raise RequestError(413, f"request body over {MAX_BODY >> 20} MiB")
                try:
                    body = json.loads(self.rfile.read(length) or b"null")
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise RequestError(400, f"the body is not JSON: {exc}") from None
                if not isinstance(body, dict):
                    raise RequestError(400, "the body must be a JSON object")
                self._send(200, routes[path](body))
            except RequestError as exc:
                self._error(exc.status, str(exc))
            except Exception as exc:  # noqa: BLE001 - one request's failure, not the server's
                log.exception("POST %s failed", path)
                self._error(500, f"{type(exc).__name__}: {exc}")

        def do_PUT(self) -> None:  # noqa: N802
            self._error(405, "method not allowed")

        do_DELETE = do_PATCH = do_PUT  # noqa: N815

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's signature
            log.info("%s %s", self.address_string(), format % args)

    return Handler


def make_server(backend: Backend, host: str = "127.0.0.1", port: int = 9090) -> ThreadingHTTPServer:
    """An HTTP server for ``backend`` (not started; call ``serve_forever``). Port 0 picks a free one."""
    server = ThreadingHTTPServer((host, port), _handler(backend))
    server.daemon_threads = True
    return server


def serve(run: str | os.PathLike, host: str = "127.0.0.1", port: int = 9090, *,
          images: Sequence[str | os.PathLike] = (), label_studio_url: str | None = None,
          device: str | None = None, max_batch: int = 16, store: str | os.PathLike | None = None) -> None:
    """Load the ensemble of ``run`` and serve it until interrupted. The Label Studio
    address defaults to ``LABEL_STUDIO_URL``; the key is read from ``LABEL_STUDIO_API_KEY``.
    ``store``: the annotation folder whose reviews the webhook keeps (see the module's description)."""
    from aax.models.ensemble import Ensemble

    source = ImageSource(label_studio_url or os.environ.get("LABEL_STUDIO_URL"),
                         os.environ.get("LABEL_STUDIO_API_KEY"), images)
    if store is not None:
        from aax.annotation.store import open_store

        open_store(store).close()  # fail now, not at the first review, when OUT is not a store
    backend = Backend(Ensemble.load(run, device=device), source, max_batch=max_batch, store=store)
    server = make_server(backend, host, port)
    log.warning("aax serve: %s on http://%s:%d (images from %s)", backend.version, host,
                server.server_address[1],
                ", ".join(filter(None, [source.url, *map(str, source.folders)])) or "nowhere yet")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
