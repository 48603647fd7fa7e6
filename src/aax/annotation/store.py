"""Where annotations land: ``OUT/annotations.sqlite`` plus mask, draft (and overlay) PNG files.

Crash safety comes from one ordering rule: an image's files are written first (to a
temporary name, then renamed into place), its row second. A kill at any moment leaves
at worst files without a row, which :meth:`AnnotationStore.recover` deletes, so running
the same command again annotates exactly the images that have no row yet.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from aax.annotation.records import REVIEW, AnnotationRecord

DB_NAME = "annotations.sqlite"
MASK_DIR = "masks"
DRAFT_DIR = "drafts"  # flagged images' draft masks: what a reviewer starts from, not annotations
SALIENCY_DIR = "saliency"
TMP_SUFFIX = ".tmp"
REVIEW_FILES = ("review.csv", "review.json")  # the review list (aax.annotation.review_list)

SCHEMA = """
CREATE TABLE IF NOT EXISTS annotations (
    id INTEGER PRIMARY KEY,
    image TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL CHECK (status IN ('ok', 'error')),
    error TEXT,
    decision TEXT,
    reason TEXT,
    agreeing TEXT,
    mask TEXT,
    mask_area INTEGER,
    saliency TEXT,
    members TEXT,
    label TEXT,
    height INTEGER,
    width INTEGER,
    created_at TEXT NOT NULL,
    draft TEXT,
    draft_class TEXT
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class SettingsMismatch(RuntimeError):
    """The output folder holds annotations made with other settings."""


def relative_name(image: Path, root: Path | None) -> PurePosixPath:
    """An image's path relative to the input root (posix), as the store names it.

    Images outside the root get a stable name under ``_external/`` so that two of them
    with the same file name never collide.
    """
    image = Path(image)
    if root is not None:
        root = Path(root)
        if ".." not in image.parts and image.is_absolute() == root.is_absolute():
            try:  # the usual case, a file found under the root: no file-system calls
                return PurePosixPath(image.relative_to(root).as_posix())
            except ValueError:
                pass
        try:
            return PurePosixPath(image.resolve().relative_to(root.resolve()).as_posix())
        except ValueError:
            pass
    digest = hashlib.sha1(str(image.resolve()).encode()).hexdigest()[:12]
    return PurePosixPath("_external", digest, image.name)


def image_key(image: str | os.PathLike, root: str | os.PathLike | None) -> str:
    """How the store identifies an image: its path relative to the input root (posix),
    whatever the working directory or the form the path was given in; an image outside
    the root by its absolute path. A relative ``image`` is taken as relative to the root
    already."""
    path = Path(image)
    if root is None:
        return path.resolve().as_posix()
    if not path.is_absolute():
        return PurePosixPath(path.as_posix()).as_posix()
    name = relative_name(path, Path(root))
    return path.resolve().as_posix() if name.parts[0] == "_external" else name.as_posix()


def file_stem_name(key: str) -> PurePosixPath:
    """Where an image's mask and overlay go, below ``masks/`` and ``saliency/``: its key
    without the image's extension (``tb/tb0003.png`` -> ``tb/tb0003``), under
    ``_external/<digest>/`` for images outside the input root."""
    path = PurePosixPath(key)
    if path.is_absolute():
        digest = hashlib.sha1(key.encode()).hexdigest()[:12]
        path = PurePosixPath("_external", digest, path.name)
    return path.with_name(path.stem) if path.suffix else path


@dataclass(frozen=True)
class EncodedPNG:
    """An image already encoded as PNG, with the number of its set pixels (for a mask).

    Encoding is most of what storing a record costs; where many workers feed one store
    (:mod:`aax.scale.annotate`), they encode and the store only writes the bytes. The
    bytes are those :meth:`AnnotationStore.add` would have written itself."""

    data: bytes
    count: int | None = None

    @classmethod
    def encode(cls, array: np.ndarray) -> EncodedPNG:
        """``array`` as the store encodes it: a bool mask as a 1-bit PNG (with its area),
        a uint8 image as it is."""
        import io

        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        count = int(np.count_nonzero(array)) if array.dtype == bool else None
        return cls(buffer.getvalue(), count)


def _write_png_atomically(path: Path, image: np.ndarray | EncodedPNG) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    if isinstance(image, EncodedPNG):
        tmp.write_bytes(image.data)
    else:
        Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)


def _public(value: Any) -> Any:
    """``value`` without the keys that start with ``_`` (private fields that older
    versions wrote into a folder's settings), at every depth."""
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, list):
        return [_public(v) for v in value]
    return value


class AnnotationStore:
    """The SQLite database and files of one annotation run.

    Args:
        out: the output folder.
        settings: what the annotations depend on (run, theta, tau, K, ...). A folder
            made with other settings is refused unless ``overwrite``.
        input_root: the folder image paths are made relative to, for file names.
        overwrite: start afresh, deleting what the folder held.
    """

    def __init__(self, out: str | os.PathLike, settings: dict | None = None,
                 input_root: str | os.PathLike | None = None, overwrite: bool = False) -> None:
        self.out = Path(out)
        if overwrite:
            self._wipe()
        self.out.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.out / DB_NAME, check_same_thread=False, isolation_level=None)
        # WAL survives a killed process (only a power cut may lose the last commits,
        # and those images are simply annotated again).
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        columns = {c[1] for c in self.db.execute("PRAGMA table_info(annotations)")}
        for column in ("draft", "draft_class"):  # a folder made before drafts existed
            if column not in columns:
                self.db.execute(f"ALTER TABLE annotations ADD COLUMN {column} TEXT")
        if settings is not None:
            self._check_settings(settings)
        self.input_root = self._input_root(input_root)
        self.recover()
        # file paths taken, so that two images with one stem (a.png, a.jpg) never share a mask
        self._files: dict[str, str] = {}
        for image, *paths in self.db.execute("SELECT image, mask, saliency, draft FROM annotations"):
            self._files.update({p: image for p in paths if p})
        self._pending = 0
        self._last_commit = time.monotonic()

    def _input_root(self, given: str | os.PathLike | None) -> Path | None:
        """The input root: given (and then recorded, absolute), or as recorded."""
        if given is not None:
            root = Path(given).resolve()
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('input_root', ?)", (str(root),))
            return root
        row = self.db.execute("SELECT value FROM meta WHERE key = 'input_root'").fetchone()
        return Path(row[0]) if row else None

    def key(self, image: str | os.PathLike) -> str:
        """The name this store gives ``image`` (see :func:`image_key`)."""
        return image_key(image, self.input_root)

    def resolve(self, key: str) -> Path:
        """Where the image of a row's ``image`` key is on disk."""
        path = Path(key)
        if path.is_absolute() or self.input_root is None:
            return path
        return self.input_root / path

    # -- settings -------------------------------------------------------------------
    def _wipe(self) -> None:
        for name in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm", "summary.json", *REVIEW_FILES):
            (self.out / name).unlink(missing_ok=True)
        for name in (MASK_DIR, SALIENCY_DIR, DRAFT_DIR):
            shutil.rmtree(self.out / name, ignore_errors=True)

    def _check_settings(self, settings: dict) -> None:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'settings'").fetchone()
        wanted = json.dumps(settings, sort_keys=True)
        if row is None:
            self.db.execute("INSERT INTO meta VALUES ('settings', ?)", (wanted,))
            return
        if row[0] != wanted:
            old = json.loads(row[0])
            if _public(old) == json.loads(wanted):
                # an older folder, whose settings held MapOptions' private
                # view list: the same options, so it is resumed and its row rewritten
                self.db.execute("UPDATE meta SET value = ? WHERE key = 'settings'", (wanted,))
                return
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}"
                             for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k))
            raise SettingsMismatch(
                f"{self.out} holds annotations made with other settings ({diff}); "
                "use another output folder, or --overwrite to start afresh")

    @property
    def settings(self) -> dict:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'settings'").fetchone()
        return json.loads(row[0]) if row else {}

    # -- recovery -------------------------------------------------------------------
    def recover(self) -> dict[str, int]:
        """Make files and rows agree after a crash: delete temporary files and files
        without a row; delete rows whose mask file is missing (they are redone)."""
        rows = self.db.execute("SELECT image, mask, saliency, draft FROM annotations").fetchall()
        known = {p for _, *paths in rows for p in paths if p}
        removed_files = 0
        for folder in (MASK_DIR, SALIENCY_DIR, DRAFT_DIR):
            base = self.out / folder
            if not base.exists():
                continue
            for path in base.rglob("*"):
                if path.is_file() and path.relative_to(self.out).as_posix() not in known:
                    path.unlink()
                    removed_files += 1
        missing = [image for image, *paths in rows if any(p and not (self.out / p).is_file() for p in paths)]
        self.db.executemany("DELETE FROM annotations WHERE image = ?", [(i,) for i in missing])
        return {"files_removed": removed_files, "rows_removed": len(missing)}

    def done(self) -> set[str]:
        """Images that already have a row."""
        return {r[0] for r in self.db.execute("SELECT image FROM annotations")}

    # -- writing --------------------------------------------------------------------
    def add(self, record: AnnotationRecord, overlay: np.ndarray | EncodedPNG | None = None) -> None:
        """Store one record: its mask (and overlay) files first, then its row.

        ``record.image`` becomes the store's key for it (see :meth:`key`). The mask and
        the overlay may come encoded already (:class:`EncodedPNG`)."""
        record.image = key = self.key(record.image)
        name = self._file_name(key)
        mask_rel = self._write_mask(MASK_DIR, name, key, record.mask)
        draft_rel = self._write_mask(DRAFT_DIR, name, key, record.draft)
        saliency_rel = None
        if overlay is not None:
            saliency_rel = f"{SALIENCY_DIR}/{name}.png"
            _write_png_atomically(self.out / saliency_rel, overlay)
            self._files[saliency_rel] = key
        record.mask_path, record.draft_path = mask_rel, draft_rel
        if self._pending == 0:
            self.db.execute("BEGIN")
        self.db.execute(
            "INSERT OR REPLACE INTO annotations (image, status, error, decision, reason, agreeing, mask,"
            " mask_area, saliency, members, label, height, width, created_at, draft, draft_class)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (record.image, record.status, record.error, record.decision, record.reason,
             json.dumps(record.agreeing), mask_rel,
             _area(record.mask), saliency_rel,
             json.dumps([m.to_json() for m in record.members]), record.label,
             record.size[0] if record.size else None, record.size[1] if record.size else None,
             datetime.now(timezone.utc).isoformat(timespec="seconds"), draft_rel,
             record.draft_class if draft_rel else None))
        self._pending += 1
        if self._pending >= 64 or time.monotonic() - self._last_commit > 2.0:
            self.commit()

    def _write_mask(self, folder: str, name: PurePosixPath, key: str,
                    mask: np.ndarray | EncodedPNG | None) -> str | None:
        """Write ``mask`` as ``folder/name.png``; its path relative to the store, or None."""
        if mask is None:
            return None
        rel = f"{folder}/{name}.png"
        # 1-bit PNG: a quarter of the size of 8-bit 0/255 and 3x faster to encode;
        # viewers and OpenCV show it as 0/255, Pillow reads it as bool.
        _write_png_atomically(self.out / rel, mask if isinstance(mask, EncodedPNG) else np.asarray(mask, dtype=bool))
        self._files[rel] = key
        return rel

    def _file_name(self, key: str) -> PurePosixPath:
        """The image's stem path, or its whole name when another image has that stem."""
        name = file_stem_name(key)
        taken = {self._files.get(f"{d}/{name}.png") for d in (MASK_DIR, SALIENCY_DIR, DRAFT_DIR)} - {None, key}
        if taken:
            name = file_stem_name(key).with_name(PurePosixPath(key).name)
        return name

    def commit(self) -> None:
        if self._pending:
            self.db.execute("COMMIT")
            self._pending = 0
        self._last_commit = time.monotonic()

    def close(self) -> None:
        self.commit()
        self.db.close()

    # -- reading --------------------------------------------------------------------
    def rows(self) -> Iterator[dict]:
        """Every row as a dict (``members`` and ``agreeing`` decoded), in insertion order."""
        cursor = self.db.execute("SELECT * FROM annotations ORDER BY id")
        columns = [c[0] for c in cursor.description]
        for values in cursor:
            row = dict(zip(columns, values))
            row["members"] = json.loads(row["members"]) if row["members"] else []
            row["agreeing"] = json.loads(row["agreeing"]) if row["agreeing"] else []
            yield row

    def summary(self) -> dict:
        """Counts per decision, the flag rate and every error with its reason."""
        counts = dict(self.db.execute(
            "SELECT COALESCE(decision, 'error'), COUNT(*) FROM annotations GROUP BY 1").fetchall())
        errors = [{"image": i, "error": e} for i, e in self.db.execute(
            "SELECT image, error FROM annotations WHERE status = 'error' ORDER BY id")]
        n = sum(counts.values())
        ok = n - len(errors)
        masks, drafts = self.db.execute(
            "SELECT COUNT(mask), COUNT(draft) FROM annotations").fetchone()
        return {"images": n, "annotated": ok, "errors": len(errors), "masks": masks, "drafts": drafts,
                "decisions": counts, "flag_rate": counts.get(REVIEW, 0) / ok if ok else None,
                "error_list": errors, "settings": self.settings}

    def write_summary(self, **extra: object) -> dict:
        """:meth:`summary` plus ``extra`` entries, written to ``OUT/summary.json``."""
        summary = {**self.summary(), **extra}
        tmp = self.out / ("summary.json" + TMP_SUFFIX)
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, self.out / "summary.json")
        return summary


def _area(mask: np.ndarray | EncodedPNG | None) -> int | None:
    if mask is None:
        return None
    return mask.count if isinstance(mask, EncodedPNG) else int(np.count_nonzero(mask))


def open_store(out: str | os.PathLike) -> AnnotationStore:
    """The store of an existing annotation folder (for reading and exporting).

    Raises:
        FileNotFoundError: ``out`` holds no ``annotations.sqlite``.
    """
    if not (Path(out) / DB_NAME).is_file():
        what = "no such folder" if not Path(out).exists() else f"no {DB_NAME} here"
        raise FileNotFoundError(f"{out}: {what}; run `aax annotate RUN IMAGES --out {out}` first")
    return AnnotationStore(out)


class BackgroundWriter:
    """Stores records from a worker thread, so PNG encoding and database writes overlap
    with the next batch's compute. ``render`` (optional) makes a record's overlay image."""

    def __init__(self, store: AnnotationStore,
                 render: Callable[[AnnotationRecord], np.ndarray | None] | None = None,
                 maxsize: int = 256) -> None:
        self.store, self.render = store, render
        self.queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="aax-store", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue
            record, overlay = item
            try:
                if overlay is None and self.render and record.status == "ok":
                    overlay = self.render(record)
                self.store.add(record, overlay)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                self.error = exc
        self.store.commit()

    def put(self, record: AnnotationRecord, overlay: np.ndarray | EncodedPNG | None = None) -> None:
        """Queue ``record`` for storing; ``overlay``: its overlay image, made already
        (elsewhere, e.g. by a cluster's actors), instead of by ``render`` here."""
        if self.error is not None:
            raise self.error
        self.queue.put((record, overlay))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
