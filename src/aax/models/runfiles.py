"""Files of a RUN folder: atomic writes, ``history.csv``, checkpoint payloads.

Every file is written to a temporary name in the same folder and moved into place with
``os.replace``, so an interrupted run never leaves a half-written manifest or checkpoint.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

MANIFEST = "aax.json"
HISTORY = "history.csv"
HISTORY_FIELDS: tuple[str, ...] = ("member", "epoch", "train_loss", "train_ce", "train_var",
                                   "train_loc", "train_seg", "val_loss", "val_accuracy", "lr", "seconds", "images_per_s",
                                   "best", "warning")


class RunError(ValueError):
    """A RUN folder that cannot be written, resumed or loaded as asked (message says why)."""


def checkpoint_name(member: str) -> str:
    """File name of a member's best checkpoint in a RUN folder."""
    return f"{member}.pt"


def last_state_name(member: str) -> str:
    """File name of a member's resume state (last finished epoch)."""
    return f"{member}.last.pt"


def _atomic(path: Path, write: Any, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    _atomic(Path(path), lambda fh: fh.write(text), "w")


def write_json(path: Path, obj: Mapping[str, Any]) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def save_torch(path: Path, obj: Any) -> None:
    """``torch.save`` to ``path`` atomically."""
    _atomic(Path(path), lambda fh: torch.save(obj, fh), "wb")


def load_torch(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``: plain data and tensors only."""
    return torch.load(path, map_location=map_location, weights_only=True)


DIGEST_CACHE = ".aax-digests.json"  # checkpoint name -> size, mtime_ns, sha256


def checkpoint_digest(path: Path) -> str:
    """The sha256 of a checkpoint, cached beside it by size and modification time.

    Hashing the three members' checkpoints (about 140 MB) takes about 80 ms: nothing for
    one large run, but a fixed cost on every ``aax annotate``, so the digest is kept in
    ``RUN/.aax-digests.json`` and reused while the file's size and mtime are unchanged
    (as ``git`` trusts its index). A read-only RUN folder is simply hashed every time.
    """
    path = Path(path)
    stat = path.stat()
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    cache_path = path.parent / DIGEST_CACHE
    try:
        cache = read_json(cache_path)
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(path.name) if isinstance(cache, dict) else None
    if isinstance(entry, dict) and entry.get("sha256") and all(entry.get(k) == v for k, v in key.items()):
        return str(entry["sha256"])
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    cache = cache if isinstance(cache, dict) else {}
    cache[path.name] = {**key, "sha256": digest.hexdigest()}
    try:
        write_json(cache_path, cache)
    except OSError:
        pass
    return digest.hexdigest()


def write_history(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write ``history.csv`` (one row per member and epoch), atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(HISTORY_FIELDS), extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k, "")) for k in HISTORY_FIELDS})
    write_text(path, buf.getvalue())


def read_history(path: Path) -> list[dict[str, Any]]:
    """Rows of ``history.csv`` with numbers parsed back (empty list if absent)."""
    if not Path(path).is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    ints = {"epoch"}
    floats = {"train_loss", "train_ce", "train_var", "train_loc", "train_seg", "val_loss", "val_accuracy", "lr",
              "seconds", "images_per_s"}
    out = []
    for row in rows:
        parsed: dict[str, Any] = dict(row)
        for key in ints & row.keys():
            parsed[key] = int(row[key])
        for key in floats & row.keys():
            parsed[key] = float(row[key]) if row[key] != "" else float("nan")
        if "best" in row:
            parsed["best"] = row["best"] == "1"
        out.append(parsed)
    return out


def _fmt(value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def member_checkpoint(state_dict: Mapping[str, torch.Tensor], *, member: str,
                      classes: Sequence[str], image_size: int,
                      normalisation: Mapping[str, Sequence[float]], dropout: float,
                      version: str, **extra: Any) -> dict[str, Any]:
    """The payload of ``RUN/<member>.pt`` (see docs/architecture.md): tensors on the CPU."""
    payload: dict[str, Any] = {
        "state_dict": {k: v.detach().cpu().clone() for k, v in state_dict.items()},
        "member": member, "classes": list(classes), "image_size": int(image_size),
        "normalisation": {"mean": [float(v) for v in normalisation["mean"]],
                          "std": [float(v) for v in normalisation["std"]]},
        "dropout": float(dropout), "aax_version": version,
    }
    payload.update(extra)
    return payload


def run_fingerprint(run: str | os.PathLike, manifest: dict[str, Any]) -> str:
    """A digest of a RUN's member checkpoints (as ``manifest`` lists them): another RUN,
    or retrained weights, differ."""
    digest = hashlib.sha256()
    for entry in manifest["members"]:
        digest.update(checkpoint_digest(Path(run) / entry["checkpoint"]).encode())
    return digest.hexdigest()[:16]


def recorded_split(run: str | os.PathLike) -> tuple[list[str], list[int], list[str]]:
    """The training images (paths, class indices) and validation images a RUN's manifest
    records, re-opened from its data source.

    Raises:
        ValueError: the manifest records no source, or the source changed.
    """
    from aax.data import open_dataset

    manifest = read_json(Path(run) / MANIFEST)
    d = manifest.get("data") or {}
    if not d.get("source") or d.get("train_indices") is None or d.get("val_indices") is None:
        raise ValueError(f"{run}: the manifest records no training split (data.source / data.train_indices)")
    dataset = open_dataset(d["source"], format=d.get("format"))
    if d.get("n_images") is not None and len(dataset) != int(d["n_images"]):
        raise ValueError(f"{run}: {d['source']} now holds {len(dataset)} images, the run was trained on "
                         f"{d['n_images']}; its training split cannot be found again")
    classes = list(manifest["classes"])
    train = [dataset[int(i)] for i in d["train_indices"]]
    val = [dataset[int(i)] for i in d["val_indices"]]
    return ([str(s.image) for s in train], [classes.index(s.label) for s in train],
            [str(s.image) for s in val])
