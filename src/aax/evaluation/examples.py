"""The report's example grid from annotation records, and the report written from them.

:func:`aax.evaluation.evaluate.evaluate` keeps its examples as it scores; these are for
records annotated elsewhere (with ``keep_saliency=True``): each is scored as evaluation
scores it (:mod:`aax.evaluation.scoring`) and handed to the report as plain data.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from aax.annotation.records import AnnotationRecord
from aax.evaluation.metrics import iou
from aax.evaluation.report import MAX_ROWS, write_html
from aax.evaluation.report.example import Example
from aax.evaluation.report.figures import shrink_map, shrink_mask
from aax.evaluation.scoring import image_regions, member_decision, member_mask


def example_from_record(record: AnnotationRecord, result: Mapping[str, Any],
                        gt_mask: np.ndarray | None = None) -> Example:
    """An :class:`~aax.evaluation.report.example.Example` from a record annotated with ``keep_saliency``,
    scored with the result's theta, tau and refinement (a member alone as in :mod:`aax.evaluation.scoring`)."""
    s = result["settings"]
    names = [m.name for m in record.members]
    decisions = {n: member_decision(record, i, s["theta"]) for i, n in enumerate(names)}
    regions = image_regions(record, s.get("refine", "none"))  # members' masks as the run makes its own
    masks = {n: member_mask(record, i, decisions[n], s["negative_class"], s["tau"], regions)
             for i, n in enumerate(names)}
    gt = None if gt_mask is None else np.asarray(gt_mask, dtype=bool)
    return Example(
        image=record.image, label=record.label or "?", decision=record.decision or "?",
        reason=record.reason, correct=record.decision == record.label,
        preview=getattr(record, "preview", None),
        gt_mask=None if gt is None else shrink_mask(gt),
        saliency={n: shrink_map(v) for n, v in (record.saliency or {}).items()},
        member_masks={n: None if m is None else shrink_mask(m) for n, m in masks.items()},
        member_decisions=decisions,
        member_uncertainty={m.name: m.uncertainty for m in record.members},
        mask=None if record.mask is None else shrink_mask(record.mask),
        iou=None if gt is None else iou(record.mask, gt),
        member_iou={n: None if gt is None else iou(masks[n], gt) for n in names},
    )


def write_report(evaluation_result: Mapping[str, Any], records: Iterable[Any],
                 out_dir: str | os.PathLike, *, ground_truth: Mapping[str, np.ndarray] | None = None,
                 max_rows: int = MAX_ROWS) -> Path:
    """Write ``out_dir/report.html`` and return its path.

    Args:
        evaluation_result: what :func:`aax.evaluation.evaluate.evaluate` returned.
        records: example images for the grid: :class:`~aax.evaluation.report.example.Example`s, or
            :class:`AnnotationRecord`s annotated with ``keep_saliency=True`` (others and
            error records are skipped); at most ``max_rows`` are shown.
        out_dir: folder to write into (created if missing).
        ground_truth: image path -> ground-truth mask, for records (Examples carry theirs).
    """
    examples = []
    for r in records:
        if len(examples) >= max_rows:
            break
        if isinstance(r, Example):
            examples.append(r)
        elif isinstance(r, AnnotationRecord) and r.status == "ok" and r.saliency:
            examples.append(example_from_record(r, evaluation_result, (ground_truth or {}).get(r.image)))
    return write_html(evaluation_result, examples, out_dir)
