"""Synthetic benchmark data with pixel ground truth: ``lesion`` and ``fire``.

Both kinds are written in the folder layout (``OUT/images/<class>/<name>.png``, with
0/255 masks at ``OUT/masks/<class>/<name>.png`` for the positive class), so they open
with :func:`aax.data.open_dataset` like any real dataset.

``lesion`` (classes ``healthy`` / ``diseased``)
    Chest-X-ray-like greyscale: a bright body, two dark lung fields, ribs, a spine, a
    heart shadow of random size, soft-tissue noise. Diseased images carry one to three
    irregular lesions inside the lungs: brighter, textured patches covering 3-15 % of
    the image, whose union is the mask.

``fire`` (classes ``no_fire`` / ``fire``)
    Colour landscapes: sky (day, overcast or sunset), ground, a tree line. ``fire``
    images carry one or two flames (irregular, flickering, red edges around a yellow-white
    core; the mask) covering 3-15 % of the image. Flame-coloured distractors (a sun, a
    sign, an orange ball: smooth and regular) appear in most negatives and some
    positives, and sunsets in both, so colour alone does not decide.

Per-image random brightness, contrast, gamma and (for ``fire``) colour balance are larger
than the shift that the finding gives the image's mean or its coarse histogram, so a
classifier cannot win on such a global statistic: it has to find the finding.

``implant`` (classes ``no_implant`` / ``implant``)
    The ``lesion`` anatomy (a ``no_implant`` image is a healthy chest) with a finding a
    lesion run never saw: a bright, sharp-edged device (a rounded box high on the chest)
    and its lead wire curving down to the heart (the mask). Near-OOD data for the
    open-set check of a ``lesion`` run: same modality, new kind of finding.

Every image is drawn from its own generator, seeded by ``(seed, kind, class, index)``:
the same seed gives byte-identical files, and asking for more images per class keeps
the first ones as they were.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

KINDS: dict[str, tuple[str, str]] = {"lesion": ("healthy", "diseased"),
                                     "fire": ("no_fire", "fire"),
                                     "implant": ("no_implant", "implant")}
"""Kind -> (negative class, positive class)."""

MIN_AREA, MAX_AREA = 0.03, 0.15
"""Bounds of the share of the image that the finding covers in a positive image."""


def generate(kind: str, out: str | os.PathLike, n_per_class: int = 50, size: int = 64,
             seed: int = 0, *, manifest: bool = False) -> Path:
    """Write a synthetic dataset in the folder layout.

    Args:
        kind: ``"lesion"``, ``"fire"`` or ``"implant"``.
        out: the folder to write (created; existing files of the same names are replaced).
        n_per_class: images per class.
        size: side of the square images, in pixels (16 or more).
        seed: the same seed gives byte-identical files.
        manifest: also write ``OUT/manifest.csv`` (``image,label,mask``).

    Returns:
        ``out``, as a :class:`~pathlib.Path`.

    Raises:
        ValueError: unknown ``kind``, ``size`` below 16 or ``n_per_class`` below 1.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    if size < 16:
        raise ValueError(f"size must be at least 16 px, got {size}")
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be at least 1, got {n_per_class}")
    out = Path(out)
    draw = _DRAW[kind]
    negative, positive = KINDS[kind]
    for class_index, label in enumerate((negative, positive)):
        image_dir = out / "images" / label
        image_dir.mkdir(parents=True, exist_ok=True)
        mask_dir = out / "masks" / label
        if label == positive:
            mask_dir.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            image, mask = draw(sample_rng(seed, kind, class_index, i), size, label == positive)
            name = f"{label}_{i:05d}.png"
            Image.fromarray(image).save(image_dir / name)
            if mask is not None:
                Image.fromarray(mask.astype(np.uint8) * 255).save(mask_dir / name)
    if manifest:
        from aax.data.layouts import open_dataset, write_manifest

        write_manifest(open_dataset(out, "folder"), out / "manifest.csv")
    return out


def sample_rng(seed: int, kind: str, class_index: int, index: int) -> np.random.Generator:
    """The generator of one image: independent of every other image and of their number."""
    return np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(kind.encode()), class_index,
                                  index])


def lesion_image(rng: np.random.Generator, size: int,
                 diseased: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """One chest-X-ray-like image: ``uint8 [size, size]`` and its lesion mask (or ``None``).

    The anatomy, the lesions and the finish (global variation, noise) come from three
    generators spawned from ``rng``, so the same ``rng`` drawn with ``diseased=False``
    gives the same image without its lesions: a counterfactual pair.
    """
    rng, lesion_rng, finish_rng = rng.spawn(3)
    y, x = _grid(size)
    body_cx = 0.5 + rng.uniform(-0.04, 0.04)
    body = _inside(1.0 - ((x - body_cx) / rng.uniform(0.40, 0.50)) ** 2
                   - ((y - 0.62) / 0.62) ** 2, size, 3.0)
    img = 0.06 + body * (rng.uniform(0.50, 0.75) + 0.12 * y)

    lungs = np.zeros_like(x)
    for side in (-1.0, 1.0):
        cx = body_cx + side * rng.uniform(0.15, 0.20)
        cy = rng.uniform(0.40, 0.48)
        rx, ry = rng.uniform(0.10, 0.16), rng.uniform(0.22, 0.32)
        # lungs are narrower at the apex than at the base
        taper = 0.75 + 0.25 * np.clip((y - (cy - ry)) / (2 * ry), 0.0, 1.0)
        lung = _inside(1.0 - ((x - cx) / (rx * taper)) ** 2 - ((y - cy) / ry) ** 2, size, 2.0)
        lungs = np.maximum(lungs, lung)
    img -= lungs * rng.uniform(0.28, 0.42)

    freq, curve, phase = rng.uniform(6.0, 9.0), rng.uniform(1.5, 3.5), rng.uniform(0, 2 * np.pi)
    ribs = (0.5 + 0.5 * np.cos(2 * np.pi * (freq * y + curve * (x - body_cx) ** 2) + phase)) ** 3
    img += rng.uniform(0.05, 0.10) * ribs * lungs
    img += rng.uniform(0.08, 0.16) * np.exp(-((x - body_cx) / 0.045) ** 2) * body  # spine
    # The heart shadow's size varies a lot in both classes, so the share of dark lung
    # in the histogram varies at least as much as a lesion changes it.
    heart = _inside(1.0 - ((x - body_cx - rng.uniform(0.02, 0.08)) / rng.uniform(0.08, 0.20)) ** 2
                    - ((y - rng.uniform(0.58, 0.66)) / rng.uniform(0.12, 0.20)) ** 2, size, 8.0)
    img += heart * lungs * rng.uniform(0.04, 0.18)
    # Soft tissue over the lower lungs, of random strength in both classes: grey lung is
    # no sign of a lesion by itself.
    img += lungs * np.clip((y - rng.uniform(0.35, 0.65)) * 4.0, 0, 1) * rng.uniform(0.0, 0.18)
    img += 0.035 * _smooth_noise(rng, size, 6)

    mask = None
    if diseased:
        mask = _lesion_mask(lesion_rng, size, x, y, lungs)
        texture = _smooth_noise(lesion_rng, size, max(4, size // 4))
        # brighter everywhere it lies, by 65-135 % of its strength: textured, never dark
        img += mask * lesion_rng.uniform(0.34, 0.44) * (1.0 + 0.35 * np.tanh(texture))

    img = _global_variation(finish_rng, img[..., None])[..., 0]
    img += finish_rng.uniform(0.01, 0.025) * finish_rng.standard_normal(img.shape)
    return _to_uint8(img), mask


def fire_image(rng: np.random.Generator, size: int,
               fire: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """One landscape: ``uint8 [size, size, 3]`` RGB and its flame mask (or ``None``)."""
    y, x = _grid(size)
    horizon = rng.uniform(0.42, 0.62)
    sky_kind = rng.choice(3, p=[0.5, 0.2, 0.3])
    top, low = {0: (np.array([0.25, 0.45, 0.85]), np.array([0.65, 0.80, 0.95])),  # day
                1: (np.array([0.55, 0.57, 0.60]), np.array([0.78, 0.78, 0.80])),  # overcast
                2: (np.array([0.35, 0.25, 0.50]), np.array([0.98, 0.55, 0.20]))}[int(sky_kind)]
    t = np.clip(y / horizon, 0.0, 1.0)[..., None]
    img = (1 - t) * top + t * low + rng.uniform(-0.06, 0.06, 3)

    ground_col = np.array([[0.30, 0.45, 0.18], [0.45, 0.38, 0.25], [0.40, 0.40, 0.38]])[
        rng.integers(3)] + rng.uniform(-0.05, 0.05, 3)
    depth = np.clip((y - horizon) / (1 - horizon), 0, 1)[..., None]
    ground = ground_col * (0.8 + 0.35 * depth) + 0.06 * _smooth_noise(rng, size, 10)[..., None]
    is_ground = _inside((y - horizon) * size, size, 1.0, scale=False)[..., None]
    img = img * (1 - is_ground) + ground * is_ground

    tree_top = horizon - rng.uniform(0.04, 0.12) * (0.6 + 0.8 * _smooth_noise_01(rng, size, 8))
    trees = _inside((y - tree_top) * size, size, 1.0, scale=False) * (1 - is_ground[..., 0])
    tree_col = np.array([0.10, 0.22, 0.08]) + rng.uniform(-0.04, 0.04, 3)
    foliage = tree_col + 0.04 * _smooth_noise(rng, size, 12)[..., None]
    img = img * (1 - trees[..., None]) + foliage * trees[..., None]

    # Most negatives get distractors and most positives none, so that the amount of
    # flame colour in an image is about the same in both classes.
    n_distractors = rng.choice(3, p=[0.6, 0.3, 0.1] if fire else [0.1, 0.6, 0.3])
    for _ in range(n_distractors):
        img = _distractor(rng, img, x, y, horizon, size)

    mask = None
    if fire:
        mask, flame = _flames(rng, size, x, y, horizon)
        img = np.where(mask[..., None], flame, img)

    img = _global_variation(rng, img, colour=True)
    img += rng.uniform(0.01, 0.025) * rng.standard_normal(img.shape)
    return _to_uint8(img), mask


def implant_image(rng: np.random.Generator, size: int,
                  implant: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """A healthy chest-X-ray-like image (:func:`lesion_image`), with a device and its
    lead when ``implant``: ``uint8 [size, size]`` and the device's mask (or ``None``)."""
    rng, device_rng = rng.spawn(2)
    base, _ = lesion_image(rng, size, False)
    if not implant:
        return base, None
    y, x = _grid(size)
    r = device_rng
    cx, cy = r.choice([-1.0, 1.0]) * r.uniform(0.18, 0.30) + 0.5, r.uniform(0.14, 0.24)
    w, h = r.uniform(0.07, 0.11), r.uniform(0.05, 0.08)
    # a rounded box: superellipse of exponent 4
    box = (np.abs(x - cx) / w) ** 4 + (np.abs(y - cy) / h) ** 4 < 1.0
    # the lead: a quadratic curve from the box to the heart, a few pixels thick
    t = np.linspace(0.0, 1.0, 4 * size)
    hx, hy = 0.5 + r.uniform(0.0, 0.08), r.uniform(0.55, 0.65)
    bx, by = (cx + hx) / 2 + r.uniform(-0.12, 0.12), (cy + hy) / 2 + r.uniform(-0.1, 0.1)
    px = (1 - t) ** 2 * cx + 2 * (1 - t) * t * bx + t**2 * hx
    py = (1 - t) ** 2 * cy + 2 * (1 - t) * t * by + t**2 * hy
    thick = max(1.0, size / 96) / size
    lead = np.zeros((size, size), dtype=bool)
    for qx, qy in zip(px[::2], py[::2]):
        lead |= np.hypot(x - qx, y - qy) < thick
    mask = box | lead
    img = base.astype(np.float64) / 255.0
    img = np.where(mask, np.maximum(img, r.uniform(0.88, 0.98)), img)
    return _to_uint8(img), mask


_DRAW: dict[str, Callable[[np.random.Generator, int, bool],
                          tuple[np.ndarray, np.ndarray | None]]] = {
    "lesion": lesion_image, "fire": fire_image, "implant": implant_image}


# --- building blocks -------------------------------------------------------------------

def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(size) + 0.5) / size
    return coords[:, None] * np.ones((1, size)), np.ones((size, 1)) * coords[None, :]


def _inside(field: np.ndarray, size: int, sharpness: float, scale: bool = True) -> np.ndarray:
    """Soft indicator of ``field > 0``, about ``sharpness`` pixels wide at the edge."""
    k = size / sharpness if scale else 1.0 / sharpness
    return 1.0 / (1.0 + np.exp(-np.clip(field * k, -40, 40)))


def _interp_matrix(n: int, cells: int) -> np.ndarray:
    # Gaussian-weighted interpolation from a (cells + 3)-knot lattice: smooth, without
    # the diamond artefacts that bilinear interpolation leaves in thresholded shapes.
    pos = (np.arange(n) + 0.5) / n * cells + 1.0
    knots = np.arange(cells + 3)
    w = np.exp(-0.5 * ((pos[:, None] - knots[None, :]) / 0.7) ** 2)
    return w / w.sum(axis=1, keepdims=True)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-variance noise with about ``cells`` blobs across the image."""
    lattice = rng.standard_normal((cells + 3, cells + 3))
    m = _interp_matrix(size, cells)
    field = m @ lattice @ m.T
    return (field - field.mean()) / (field.std() + 1e-8)


def _smooth_noise_01(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    return np.clip(0.5 + 0.25 * _smooth_noise(rng, size, cells), 0.0, 1.0)


def _global_variation(rng: np.random.Generator, img: np.ndarray,
                      colour: bool = False) -> np.ndarray:
    """Per-image brightness, contrast, gamma and (colour) white balance."""
    img = np.clip(img, 0.0, 1.0)
    img = img ** rng.uniform(0.75, 1.35)
    if colour:
        img = img * rng.uniform(0.80, 1.20, 3)
    mid = img.mean()
    return (img - mid) * rng.uniform(0.60, 1.40) + mid + rng.uniform(-0.18, 0.18)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def _lesion_mask(rng: np.random.Generator, size: int, x: np.ndarray, y: np.ndarray,
                 lungs: np.ndarray) -> np.ndarray:
    target = rng.uniform(0.04, 0.12)
    in_lung = lungs > 0.5
    lung_y, lung_x = np.nonzero(lungs > 0.9)
    n = int(rng.integers(1, 4))
    picks = rng.integers(len(lung_y), size=n)
    centres = [((lung_x[p] + 0.5) / size, (lung_y[p] + 0.5) / size) for p in picks]
    shares = rng.dirichlet(np.full(n, 3.0))
    warps = [_smooth_noise(rng, size, 5) for _ in range(n)]
    scale = 1.0
    # Lungs clip the blobs, so grow or shrink them until the union has the target area.
    for _ in range(8):
        mask = np.zeros((size, size), dtype=bool)
        for (cx, cy), share, warp in zip(centres, shares, warps):
            r = np.sqrt(target * share / np.pi) * scale
            dist = np.hypot(x - cx, y - cy) / r
            mask |= dist + 0.35 * warp < 1.0
        mask &= in_lung
        area = mask.mean()
        if MIN_AREA <= area <= MAX_AREA and abs(area - target) < 0.3 * target:
            break
        scale *= np.sqrt(target / max(area, 1e-3))
    return mask


def _flame_colour(heat: np.ndarray) -> np.ndarray:
    """Red -> orange -> yellow-white for heat in [0, 1]; ``[..., 1] -> [..., 3]``.

    Flames and distractors share it, so that a colour histogram sees the same colours
    in both and only shape and texture tell them apart.
    """
    red, orange = np.array([0.80, 0.12, 0.04]), np.array([1.0, 0.55, 0.08])
    white = np.array([1.0, 0.96, 0.70])
    return np.where(heat < 0.5, red + (orange - red) * heat / 0.5,
                    orange + (white - orange) * (heat - 0.5) / 0.5)


def _distractor(rng: np.random.Generator, img: np.ndarray, x: np.ndarray, y: np.ndarray,
                horizon: float, size: int) -> np.ndarray:
    """A smooth, regular object in flame colours: a sun, a sign or a ball."""
    kind = rng.integers(3)
    area = rng.uniform(0.02, 0.10)
    lo, hi = np.sort(rng.uniform(0.0, 1.0, 2))
    if kind == 0:  # sun: round, hottest at the centre
        r = np.sqrt(area / np.pi)
        cx, cy = rng.uniform(0.15, 0.85), rng.uniform(r, max(r + 0.01, horizon - 0.05))
        d = np.hypot(x - cx, y - cy) / r
        inside = _inside(1.0 - d, size, 1.0 / r)[..., None]
        heat = (lo + (hi - lo) * np.clip(1.0 - d, 0, 1))[..., None]
        return img * (1 - inside) + _flame_colour(heat) * inside
    if kind == 1:  # sign: a rectangle with a linear gradient and a dark border
        w = np.sqrt(area) * rng.uniform(0.7, 1.4)
        h = area / w
        cx, cy = rng.uniform(w / 2, 1 - w / 2), rng.uniform(h / 2, 1 - h / 2)
        box = (np.abs(x - cx) < w / 2) & (np.abs(y - cy) < h / 2)
        inner = (np.abs(x - cx) < w / 2 - 1.5 / size) & (np.abs(y - cy) < h / 2 - 1.5 / size)
        t = np.clip((y - cy) / h + 0.5, 0, 1) if rng.random() < 0.5 else \
            np.clip((x - cx) / w + 0.5, 0, 1)
        colour = _flame_colour((lo + (hi - lo) * t)[..., None])
        out = img.copy()
        out[box] = colour[box] * 0.55
        out[inner] = colour[inner]
        return out
    r = np.sqrt(area / np.pi)  # ball: an ellipse shaded along a random direction
    cx, cy = rng.uniform(0.15, 0.85), rng.uniform(horizon, 0.95)
    rx, ry = r * rng.uniform(0.8, 1.25), r * rng.uniform(0.8, 1.25)
    d = np.hypot((x - cx) / rx, (y - cy) / ry)
    inside = _inside(1.0 - d, size, 1.0 / r)[..., None]
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip(0.5 + 0.5 * ((x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)) / r, 0, 1)
    return img * (1 - inside) + _flame_colour((lo + (hi - lo) * t)[..., None]) * inside


def _flames(rng: np.random.Generator, size: int, x: np.ndarray,
            y: np.ndarray, horizon: float) -> tuple[np.ndarray, np.ndarray]:
    """Flame mask and colours: tongues that narrow upwards, with a hot core."""
    target = rng.uniform(0.04, 0.12)
    n = int(rng.integers(1, 3))
    shares = rng.dirichlet(np.full(n, 3.0))
    bases = [(rng.uniform(0.15, 0.85), rng.uniform(max(horizon + 0.1, 0.55), 0.95))
             for _ in range(n)]
    aspects = rng.uniform(1.2, 2.0, n)
    turbulence = _smooth_noise(rng, size, 7)
    flicker = _smooth_noise(rng, size, max(6, size // 5))
    scale = 1.0
    for _ in range(8):
        mask = np.zeros((size, size), dtype=bool)
        heat = np.zeros((size, size))
        for (cx, base), share, aspect in zip(bases, shares, aspects):
            # a flame of width w and height h = aspect * w fills about 0.5 * w * h
            w = np.sqrt(2 * target * share / aspect) * scale
            h = aspect * w
            up = (base - y) / h  # 0 at the base, 1 at the tip
            half = 0.5 * np.clip(1.0 - up, 0, 1) ** 0.6 + 0.08 * turbulence * up
            across = np.abs(x - cx + 0.25 * w * turbulence * up) / w
            inside = (up >= -0.05) & (up <= 1.0) & (across < half)
            mask |= inside
            core = np.clip(1.0 - across / np.maximum(half, 1e-3), 0, 1) * np.clip(1.1 - up, 0, 1)
            heat = np.maximum(heat, np.where(inside, core, 0.0))
        area = mask.mean()
        if MIN_AREA <= area <= MAX_AREA and abs(area - target) < 0.3 * target:
            break
        scale *= np.sqrt(target / max(area, 1e-3))
    heat = np.clip(heat + 0.18 * flicker, 0, 1)[..., None]
    return mask, _flame_colour(heat)
