"""The evaluation report: one self-contained HTML file.

:func:`write_html` turns the result of :func:`aax.evaluation.evaluate.evaluate` (a dict)
and a few :class:`~aax.evaluation.report.example.Example` s into ``report.html``: the
paper's tables, a grid like its figures 2 and 3, the confusion matrices, the
risk-coverage curve and the uncertainty histograms. Images are embedded as base64 PNGs
(downscaled), so the file can be mailed or archived as is.

The report renders plain results; it computes no score, so it imports nothing from the
modules that do (records are turned into examples by :mod:`aax.evaluation.examples`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from aax.evaluation.report.example import Example

MAX_ROWS = 8  # example rows in the grid: enough to see, small enough to mail


def write_html(evaluation_result: Mapping[str, Any], examples: Sequence[Example],
               out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir/report.html`` (the folder is created if missing) and return its path.

    Args:
        evaluation_result: what :func:`aax.evaluation.evaluate.evaluate` returned.
        examples: the rows of the example grid, in order.
        out_dir: folder to write into.
    """
    from aax.evaluation.report.html import page

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.html"
    tmp = out / ".report.html.tmp"
    tmp.write_text(page(evaluation_result, examples), encoding="utf-8")
    os.replace(tmp, path)
    return path


__all__ = ["MAX_ROWS", "write_html"]
