#!/usr/bin/env python
"""Export and import times for the annotation-tool formats, on a synthetic store.

Builds an output folder of N rows (default 1,000; 60 % positive with a mask, 15 %
flagged, the rest negative; three members with probabilities and uncertainties) at
SIZE x SIZE pixels, with no model involved, then times:

- ``aax export --format label-studio`` (brush RLE per mask), ``cvat`` (mask RLE),
  ``coco`` (pycocotools RLE) and ``png``;
- ``aax import --from label-studio`` of an export where a reviewer accepted every task
  (the masks' brush RLE decoded again), and the same import a second time (unchanged);
- ``aax review-stats``.

    python benchmarks/bench_export.py --out OUT [--n 1000] [--size 512]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from aax.annotation.records import AnnotationRecord, MemberResult
from aax.annotation.store import AnnotationStore
from aax.cli import main

MEMBERS = ["resnet50", "efficientnet-b0", "densenet121"]


def make_store(out: Path, n: int, size: int, seed: int = 0) -> Path:
    """N synthetic rows with elliptic masks (no image files: exports do not read them)."""
    rng = np.random.default_rng(seed)
    root = out / "input"
    settings = {"run": "/runs/bench-run", "weights": "0" * 16, "classes": ["diseased", "healthy"],
                "negative_class": "healthy", "input": str(root), "theta": 0.1, "tau": 0.5,
                "mc_passes": 8, "quorum": 2}
    store = AnnotationStore(out / "out", settings, input_root=root, overwrite=True)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        kind = rng.random()
        decision = "diseased" if kind < 0.6 else ("review" if kind < 0.75 else "healthy")
        p = rng.uniform(0.6, 0.99, 3) if decision == "diseased" else rng.uniform(0.01, 0.6, 3)
        u = rng.uniform(0.0, 0.3 if decision == "review" else 0.08, 3)
        mask = None
        if decision == "diseased":
            cy, cx = rng.uniform(0.2, 0.8, 2) * size
            ry, rx = rng.uniform(0.05, 0.25, 2) * size
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        members = [MemberResult(m, [float(pi), float(1 - pi)], float(ui), "diseased" if pi > 0.5 else "healthy")
                   for m, pi, ui in zip(MEMBERS, p, u)]
        store.add(AnnotationRecord(
            image=str(root / ("diseased" if i % 2 else "healthy") / f"img_{i:05d}.png"), decision=decision,
            reason="consensus" if decision != "review" else "uncertain",
            agreeing=MEMBERS[:2] if decision == "diseased" else [], members=members, mask=mask,
            size=(size, size)))
    store.close()
    return out / "out"


def timed(label: str, argv: list[str], results: dict) -> None:
    start = time.perf_counter()
    code = main(argv)
    results[label] = round(time.perf_counter() - start, 3)
    if code != 0:
        raise SystemExit(f"{label}: exit {code}")
    print(f"{label}: {results[label]:.2f} s", file=sys.stderr)


def accept_everything(tasks_file: Path, to: Path) -> None:
    """A Label Studio export in which a reviewer submitted every prediction unchanged."""
    tasks = json.loads(tasks_file.read_text())
    exported = [{"id": i + 1, "data": t["data"], "predictions": [],
                 "annotations": [{"id": i + 1, "completed_by": 1, "was_cancelled": False,
                                  "updated_at": "2026-11-26T00:00:00Z",
                                  "result": [r for r in t["predictions"][0]["result"]
                                             if r["type"] != "choices" or r["value"]["choices"] != ["review"]]
                                  if t["data"]["aax_decision"] != "review" else
                                  [{"from_name": "decision", "to_name": "image", "type": "choices",
                                    "value": {"choices": ["healthy"]}}]}]}
                for i, t in enumerate(tasks)]
    to.write_text(json.dumps(exported))


def main_(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"n": args.n, "size": args.size, "machine": platform.processor() or platform.machine(),
                     "cpus": os.cpu_count()}
    start = time.perf_counter()
    out = make_store(args.out, args.n, args.size)
    results["make_store"] = round(time.perf_counter() - start, 3)
    timed("export_label_studio", ["export", str(out), "--format", "label-studio", "--to", str(args.out / "ls")],
          results)
    timed("export_cvat", ["export", str(out), "--format", "cvat", "--to", str(args.out / "cvat")], results)
    timed("export_coco", ["export", str(out), "--format", "coco", "--to", str(args.out / "coco.json")], results)
    timed("export_png", ["export", str(out), "--format", "png", "--to", str(args.out / "png")], results)
    accept_everything(args.out / "ls" / "tasks.json", args.out / "reviewed.json")
    timed("import_label_studio", ["import", str(out), "--from", "label-studio", str(args.out / "reviewed.json")],
          results)
    timed("import_label_studio_again", ["import", str(out), "--from", "label-studio",
                                        str(args.out / "reviewed.json")], results)
    timed("review_stats", ["review-stats", str(out)], results)
    results["tasks_json_mb"] = round((args.out / "ls" / "tasks.json").stat().st_size / 2**20, 2)
    results["cvat_xml_mb"] = round((args.out / "cvat" / "annotations.xml").stat().st_size / 2**20, 2)
    (args.out / "bench_export.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main_())
