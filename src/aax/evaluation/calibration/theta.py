"""Choosing theta: the best accuracy on kept images within a flag-rate bound, on the
risk-coverage curve of the validation images (rule: :mod:`aax.evaluation.calibrate`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


MAX_FLAG_RATE = 0.2


def choose_theta(curve: Sequence[dict[str, Any]], max_flag_rate: float) -> tuple[dict[str, Any], bool]:
    """The risk-coverage point to use, and whether it meets the flag-rate bound
    (see the module docstring for the rule)."""
    usable = [p for p in curve if p["accuracy_kept"] is not None]
    feasible = [p for p in usable if p["flag_rate"] <= max_flag_rate + 1e-12]
    if feasible:
        return max(feasible, key=lambda p: (p["accuracy_kept"], p["coverage"], -p["theta"])), True
    pool = usable or list(curve)
    return min(pool, key=lambda p: (p["flag_rate"], -(p["accuracy_kept"] or 0.0), p["theta"])), False


def settle_theta(theta: float, uncertainty: np.ndarray) -> float:
    """Move the winning candidate to the middle of its interval.

    Decisions on the validation images are the same for every theta from the winner (an
    observed uncertainty) up to the next observed uncertainty; at the winner itself a
    member sits exactly on the threshold, and MC noise in a new pass flips it half the
    time. The midpoint keeps the validation decisions and adds margin on both sides.
    At or beyond the largest observed uncertainty the winner is kept.
    """
    values = np.unique(np.asarray(uncertainty, dtype=float))
    above = values[values > theta]
    return float(theta) if above.size == 0 else float((theta + above[0]) / 2.0)
