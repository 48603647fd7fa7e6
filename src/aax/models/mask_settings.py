"""The vocabulary of a run's mask settings, as ``RUN/aax.json`` and the CLI give them: the
sources and fusions of the members' maps, and tau (a number, ``"otsu"``, or one of those per class).

Pure Python with no imports from the rest of AAX: the run's settings
(:mod:`aax.models.maps`, :mod:`aax.models.ensemble`) are checked with it, and the protocol
(:mod:`aax.annotation.decide`) and evaluation apply what it parsed.
"""

from __future__ import annotations

MAP_SOURCES: tuple[str, ...] = ("cam", "patch", "segmentation")
"""Where the maps a mask is fused from come from: XGrad-CAM (the paper's), patch-feature
novelty (:mod:`aax.models.patch_maps`) or the members' segmentation heads
(:mod:`aax.models.members.segment`)."""

FUSIONS: tuple[str, ...] = ("min", "mean", "vote")
"""How the agreeing members' maps become one score map (see :func:`aax.annotation.decide.fuse`)."""

OTSU = "otsu"
"""The tau that thresholds each image's fused map at its own Otsu threshold."""


def parse_tau(value: object) -> float | str | dict[str, float | str]:
    """A tau as read from JSON or given by a user: a number, ``"otsu"``, or one of those per
    class (``{"class": tau}``)."""
    if isinstance(value, dict):
        return {str(k): parse_tau(v) for k, v in value.items()}  # type: ignore[misc]
    if value == OTSU:
        return OTSU
    return float(value)  # type: ignore[arg-type]


def tau_for(tau: float | str | dict[str, float | str], class_name: str,
            default: float = 0.5) -> float | str:
    """The mask threshold of ``class_name``: ``tau`` itself, or its entry when ``tau`` is
    per class (a missing class gets ``default``); a number, or ``"otsu"``."""
    if isinstance(tau, dict):
        tau = tau.get(class_name, default)
    return tau if tau == OTSU else float(tau)
