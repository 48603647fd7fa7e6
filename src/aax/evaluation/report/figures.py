"""The report's pictures: small image tiles (PIL) and charts (matplotlib, Agg canvas).

matplotlib is imported inside the functions that draw, so importing :mod:`aax.evaluation.report`
costs nothing; figures are drawn on an Agg canvas directly, so no global backend is set.
Everything returns PNG bytes or a ``data:`` URI, ready to embed in one HTML file.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

THUMB = 112  # longest side of a grid tile, pixels: keeps the report small
MASK_RGB = (255, 48, 48)  # predicted mask tint
GT_RGB = (40, 220, 40)  # ground-truth outline
DRAFT_RGB = (255, 200, 0)  # a flagged image's draft: a suggestion, not a mask


# --------------------------------------------------------------------------------------
# arrays -> small arrays -> PNG
# --------------------------------------------------------------------------------------

def _target_size(shape: Sequence[int], side: int) -> tuple[int, int]:
    h, w = int(shape[0]), int(shape[1])
    scale = min(1.0, side / max(h, w))
    return max(1, round(w * scale)), max(1, round(h * scale))  # PIL order (w, h)


def shrink_map(saliency: np.ndarray, side: int = THUMB) -> np.ndarray:
    """A [0, 1] float map with its longest side at most ``side`` (bilinear)."""
    from PIL import Image

    saliency = np.asarray(saliency, dtype=np.float32)
    size = _target_size(saliency.shape, side)
    if size == (saliency.shape[1], saliency.shape[0]):
        return saliency.copy()
    return np.asarray(Image.fromarray(saliency).resize(size, Image.BILINEAR), dtype=np.float32)


def shrink_mask(mask: np.ndarray, side: int = THUMB) -> np.ndarray:
    """A boolean mask with its longest side at most ``side``: a pixel is set when at
    least half of the area it covers is (box filter), so thin shapes neither vanish
    nor swell."""
    from PIL import Image

    mask = np.asarray(mask, dtype=bool)
    size = _target_size(mask.shape, side)
    if size == (mask.shape[1], mask.shape[0]):
        return mask.copy()
    area = Image.fromarray(mask.astype(np.float32)).resize(size, Image.BOX)
    return np.asarray(area) >= 0.5


def to_uint8_rgb(image: np.ndarray) -> np.ndarray:
    """Float [0, 1] or uint8, grey or RGB(A) -> uint8 RGB."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = (np.clip(image.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3])


def shrink_image(image: np.ndarray, side: int = THUMB) -> np.ndarray:
    """A uint8 RGB copy with its longest side at most ``side``."""
    from PIL import Image

    im = Image.fromarray(to_uint8_rgb(image))
    im.thumbnail((side, side), Image.LANCZOS)
    return np.asarray(im)


def resize_to(array: np.ndarray, shape: Sequence[int], nearest: bool) -> np.ndarray:
    """Resize a 2-D map or mask to ``shape`` (h, w) so that it lies over a tile."""
    from PIL import Image

    if tuple(array.shape[:2]) == tuple(shape[:2]):
        return array
    h, w = int(shape[0]), int(shape[1])
    if nearest:
        return np.asarray(Image.fromarray(np.asarray(array, dtype=np.uint8) * 255).resize((w, h), Image.NEAREST)) > 0
    return np.asarray(Image.fromarray(np.asarray(array, dtype=np.float32)).resize((w, h), Image.BILINEAR))


def heat_tile(image: np.ndarray, saliency: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The saliency map (jet) blended over the image, as in the paper's figures."""
    from matplotlib import colormaps

    heat = np.clip(resize_to(saliency, image.shape, nearest=False), 0, 1)
    colour = colormaps["jet"](heat)[..., :3] * 255
    return (image.astype(np.float32) * (1 - alpha) + colour * alpha).astype(np.uint8)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` that touch a pixel outside it (4-neighbourhood)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def mask_tile(image: np.ndarray, mask: np.ndarray | None, gt: np.ndarray | None = None,
              alpha: float = 0.55, colour: Sequence[int] = MASK_RGB) -> np.ndarray:
    """The image dimmed, the mask tinted (red), the ground truth outlined in green.

    ``mask=None`` (no mask: negative, flagged) gives the dimmed image alone, so an
    empty answer still reads as an answer.
    """
    out = image.astype(np.float32) * 0.45
    if mask is not None:
        m = resize_to(mask, image.shape, nearest=True)
        out[m] = out[m] * (1 - alpha) + np.asarray(colour, np.float32) * alpha + image[m] * 0.3
    if gt is not None:
        out[_outline(resize_to(gt, image.shape, nearest=True))] = GT_RGB
    return np.clip(out, 0, 255).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    """PNG-encode a uint8 RGB array."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(to_uint8_rgb(image)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    """A ``data:image/png;base64,...`` URI for an ``<img src>``."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# --------------------------------------------------------------------------------------
# charts
# --------------------------------------------------------------------------------------

def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig: Any) -> bytes:
    """PNG bytes of a matplotlib figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def confusion_figure(matrices: Mapping[str, Sequence[Sequence[int]]], rows: Sequence[str],
                     columns: Sequence[str]) -> Any:
    """One confusion-matrix panel per method (true class down, prediction across, the
    last column is 'review'), counts written in the cells."""
    k = len(matrices)
    fig = _figure(min(3.2 * k, 16), 2.2 + 0.35 * len(rows))
    axes = fig.subplots(1, k, squeeze=False)[0]
    for ax, (name, cm) in zip(axes, matrices.items()):
        cm = np.asarray(cm)
        ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(1, cm.max()))
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=9,
                    color="white" if v > 0.6 * max(1, cm.max()) else "black")
        ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("predicted", fontsize=8)
    axes[0].set_ylabel("true", fontsize=8)
    return fig


def risk_coverage_figure(curve: Sequence[Mapping[str, float | None]], theta: float | None = None,
                         title: str = "Accuracy on kept images vs coverage") -> Any:
    """Accuracy on the images not flagged against the share kept, as theta moves;
    the point at ``theta`` (the setting in use) is marked."""
    pts = [p for p in curve if p.get("accuracy_kept") is not None]
    fig = _figure(5.2, 3.6)
    ax = fig.add_subplot()
    if pts:
        cov = np.array([p["coverage"] for p in pts])
        acc = np.array([p["accuracy_kept"] for p in pts])
        order = np.lexsort((-acc, cov))  # by coverage; several thetas may share one
        ax.plot(cov[order], acc[order], ".-", color="#1f77b4", lw=1.2, ms=4)
        if theta is not None:
            at = min(pts, key=lambda p: abs(p["theta"] - theta))
            ax.plot([at["coverage"]], [at["accuracy_kept"]], "o", color="#d62728", ms=8,
                    label=f"theta = {theta:.3g}: coverage {at['coverage']:.2f}, accuracy {at['accuracy_kept']:.2f}")
            ax.legend(loc="lower left", fontsize=8)
    else:
        ax.text(0.5, 0.5, "every image flagged at every theta", ha="center", transform=ax.transAxes)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(max(0.0, min([p["accuracy_kept"] for p in pts], default=0) - 0.05), 1.01)
    ax.set_xlabel("coverage (share of images not flagged)")
    ax.set_ylabel("accuracy on kept images")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return fig


def histogram_figure(seen: Mapping[str, Sequence[float]], unseen: Mapping[str, Sequence[float]] | None,
                     theta: float) -> Any:
    """Per member, the histogram of its uncertainty on the evaluation data (and on the
    unseen data when given), with theta marked."""
    names = list(seen)
    fig = _figure(min(3.4 * len(names), 16), 2.8)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names):
        s = np.asarray(seen[name], dtype=float)
        u = np.asarray(unseen[name], dtype=float) if unseen else np.array([])
        top = max([theta * 1.5, *(s.tolist() or [0]), *(u.tolist() or [0])]) or 1.0
        bins = np.linspace(0, top * 1.02, 30)
        ax.hist(s, bins=bins, color="#1f77b4", alpha=0.7, label=f"data (n={s.size})")
        if u.size:
            ax.hist(u, bins=bins, color="#ff7f0e", alpha=0.6, label=f"unseen (n={u.size})")
        ax.axvline(theta, color="#d62728", ls="--", lw=1, label=f"theta = {theta:.3g}")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("uncertainty u", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("images", fontsize=8)
    return fig


def score_histogram_figure(seen: Mapping[str, Sequence[float]], unseen: Mapping[str, Sequence[float]],
                           thresholds: Mapping[str, float], score: str,
                           class_thresholds: Mapping[str, Mapping[str, float]] | None = None) -> Any:
    """Per member, histograms of a novelty score on the evaluation data and on the unseen
    images, with the member's stored threshold marked (and its threshold per predicted
    class, when it has them: the ones the protocol uses)."""
    names = list(seen)
    fig = _figure(min(3.4 * len(names), 16), 2.8)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names):
        s = np.asarray(seen[name], dtype=float)
        u = np.asarray(unseen.get(name, []), dtype=float)
        per_class = dict((class_thresholds or {}).get(name) or {})
        values = np.concatenate([s, u, [thresholds[name]] if name in thresholds else [], list(per_class.values())])
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
        # distances span orders of magnitude between seen and far-unseen images: log bins
        log = lo > 0 and hi / lo > 100
        bins = (np.geomspace(lo, hi, 30) if log else np.linspace(lo, hi if hi > lo else lo + 1.0, 30))
        if log:
            ax.set_xscale("log")
        ax.hist(s, bins=bins, color="#1f77b4", alpha=0.7, label=f"data (n={s.size})")
        if u.size:
            ax.hist(u, bins=bins, color="#ff7f0e", alpha=0.6, label=f"unseen (n={u.size})")
        if name in thresholds:
            ax.axvline(thresholds[name], color="#d62728", ls="--", lw=1,
                       label=(f"pooled {thresholds[name]:.3g} (other classes)" if per_class
                              else f"threshold {thresholds[name]:.3g}"))
        for (c, t), colour in zip(sorted(per_class.items()), ("#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")):
            ax.axvline(t, color=colour, ls=":", lw=1.2, label=f"predicted {c}: {t:.3g}")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(f"{score} (higher = more novel)", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("images", fontsize=8)
    return fig
