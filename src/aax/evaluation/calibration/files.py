"""What calibration writes into a RUN folder (theta, tau and the ``calibration`` entry in
``RUN/aax.json``; the risk-coverage curve in ``RUN/calibration/``), and the validation
split it reads back from one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


CALIBRATION_DIR = "calibration"


MANIFEST = "aax.json"


def write_calibration(run: Path, result: dict[str, Any]) -> Path:
    """Write theta, tau and the ``calibration`` entry into ``RUN/aax.json`` (atomically:
    tmp file + ``os.replace``), and the risk-coverage curve (JSON + PNG) into
    ``RUN/calibration/``. Returns the manifest's path."""
    from aax.evaluation.report.figures import figure_png, risk_coverage_figure

    folder = run / CALIBRATION_DIR
    folder.mkdir(parents=True, exist_ok=True)
    curves = {"theta": result["theta"], "theta_candidate": result.get("theta_candidate"), "tau": result["tau"],
              "risk_coverage": result["risk_coverage"],
              "tau_curve": result["tau_curve"]}
    _atomic_write(folder / "risk_coverage.json", json.dumps(curves, indent=2) + "\n")
    # marked at the winning candidate: the settled theta has the same decisions
    fig = risk_coverage_figure(result["risk_coverage"], result.get("theta_candidate", result["theta"]),
                               title=f"Validation: accuracy on kept images vs coverage (n={result['n']})")
    _atomic_write_bytes(folder / "risk_coverage.png", figure_png(fig))

    manifest_path = run / MANIFEST
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))  # fresh: others may have written
    entry = {k: v for k, v in result.items() if k not in ("risk_coverage", "tau_curve")}
    entry["curves"] = f"{CALIBRATION_DIR}/risk_coverage.json"
    manifest["theta"], manifest["tau"] = result["theta"], result["tau"]
    if result.get("fusion") is not None:
        manifest["maps"] = {**(manifest.get("maps") or {}), "fusion": result["fusion"]}
        manifest["maps"].pop("mask_members", None)  # all members: the default, as runs made before the option
        if result.get("mask_members"):
            manifest["maps"]["mask_members"] = list(result["mask_members"])
        manifest["maps"].pop("refine", None)  # none: the default, as runs made before the option
        if result.get("refine", "none") != "none":
            manifest["maps"]["refine"] = result["refine"]
    if result.get("source") is not None:
        manifest["maps"] = {**(manifest.get("maps") or {}), "source": result["source"]}
        if result["source"] == "cam":
            manifest["maps"].pop("source")  # the default, as runs made before the option
    manifest["calibration"] = entry
    _atomic_write(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return manifest_path


def _atomic_write(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode("utf-8"))


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    # same folder, so os.replace is atomic; fsync so a crash never leaves half a manifest
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def validation_split(run: str | os.PathLike) -> Any:
    """The validation images a RUN was trained with, as a dataset.

    ``aax train`` records the source, its layout and the validation files (relative to
    ``root``) under ``manifest["data"]``; the same files are picked again by name, so
    images added to the source later do not shift the split.
    """
    from aax.data import open_dataset

    manifest = json.loads((Path(run) / MANIFEST).read_text(encoding="utf-8"))
    d = manifest.get("data") or {}
    if not d.get("source") or d.get("val_files") is None:
        raise ValueError(f"{run}: the manifest records no validation split (data.source / data.val_files); "
                         "calibrate on a validation folder instead: aax calibrate RUN VALDATA")
    label_map = (manifest.get("training") or {}).get("label_map") or None
    dataset = open_dataset(d["source"], format=d.get("format"), label_map=label_map)
    root = Path(d.get("root") or d["source"])

    # by resolved file, so that names stored relative to root and absolute ones both match
    by_file = {Path(s.image).resolve(): i for i, s in enumerate(dataset)}
    wanted = [(root / f).resolve() for f in d["val_files"]]
    missing = [f for f, w in zip(d["val_files"], wanted) if w not in by_file]
    if missing:
        raise ValueError(f"{run}: {len(missing)} validation images are no longer in {d['source']}, "
                         f"e.g. {missing[0]}")
    return dataset.subset([by_file[w] for w in wanted])


def calibration_split(run: str | os.PathLike) -> Any:
    """What ``aax calibrate RUN`` calibrates on: the validation split and, when the run
    learned from at least :data:`~aax.training.reviewed.MIN_REVIEWED_MASKS` reviewed
    masks, those reviewed images with their masks (so theta, tau and the fusion are also
    chosen on the masks people drew, where the validation split often has none). The
    reviewed images trained the members, so their uncertainties are lower than unseen
    images': the docs say so next to the figures."""
    from aax.data.layouts import Dataset, Sample
    from aax.training.reviewed import MIN_REVIEWED_MASKS, reviewed_masks

    val = validation_split(run)
    manifest = json.loads((Path(run) / MANIFEST).read_text(encoding="utf-8"))
    masks = reviewed_masks(manifest)
    if len(masks) < MIN_REVIEWED_MASKS:
        return val
    extra = [Sample(image=Path(m["path"]), label=m["label"], mask_path=Path(m["mask"])) for m in masks]
    merged = Dataset(list(val) + extra, classes=val.classes, source=val.source, format=val.format)
    merged.reviewed_masks = len(extra)
    return merged


def split_name(val: Any) -> str:
    """How a calibration entry names the recorded validation split."""
    reviewed = getattr(val, "reviewed_masks", 0)
    if reviewed:
        return (f"{getattr(val, 'source', '?')} (the RUN's validation split, {len(val) - reviewed} images, "
                f"and {reviewed} reviewed images with their masks)")
    return f"{getattr(val, 'source', '?')} (the RUN's validation split, {len(val)} images)"
