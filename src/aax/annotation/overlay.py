"""Pictures of why: the image beside each member's saliency map and the AAX mask."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from aax.annotation.records import AnnotationRecord

PANEL = 192  # side of one panel, pixels
CAPTION = 30  # caption strip height


def heat_overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a [0, 1] map (resized to the image) over a uint8 RGB image."""
    from matplotlib import colormaps
    from PIL import Image

    h, w = image.shape[:2]
    heat = np.asarray(Image.fromarray(heat.astype(np.float32)).resize((w, h), Image.BILINEAR))
    colour = colormaps[cmap](np.clip(heat, 0, 1))[..., :3] * 255
    return (image * (1 - alpha) + colour * alpha).astype(np.uint8)


def mask_overlay(image: np.ndarray, mask: np.ndarray, colour: Sequence[int] = (255, 40, 40),
                 alpha: float = 0.45) -> np.ndarray:
    """Tint the mask's pixels of a uint8 RGB image (mask resized to the image)."""
    from PIL import Image

    h, w = image.shape[:2]
    m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 0
    out = image.astype(np.float32)
    out[m] = out[m] * (1 - alpha) + np.asarray(colour, np.float32) * alpha
    return out.astype(np.uint8)


def _panel(image: np.ndarray, caption: str) -> np.ndarray:
    from PIL import Image, ImageDraw

    tile = Image.new("RGB", (PANEL, PANEL + CAPTION), "white")
    im = Image.fromarray(image)
    scale = PANEL / max(im.width, im.height)  # small images are enlarged to fill the panel
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR)
    tile.paste(im, ((PANEL - im.width) // 2, CAPTION + (PANEL - im.height) // 2))
    draw = ImageDraw.Draw(tile)
    for i, line in enumerate(caption.split("\n")[:2]):
        draw.text((4, 2 + 13 * i), line, fill="black")
    return np.asarray(tile)


def render_record(record: AnnotationRecord, tau: float | str, theta: float | None = None) -> np.ndarray:
    """Side-by-side panels: input, each member's map, and the intersection of the
    agreeing members' maps (the AAX mask), a flagged image's draft (in yellow) or else
    the decision.

    Each member's caption gives its uncertainty ``u`` to four decimals (calibrated thetas
    are often a few hundredths) and, with ``theta``, whether it is over (``>``) or within
    (``<=``) it."""
    if record.preview is None or record.saliency is None:
        raise ValueError(f"{record.image}: rendering needs the record's preview and saliency maps")
    image = record.preview
    panels = [_panel(image, f"input\n{record.decision} ({record.reason})")]
    for m in record.members:
        versus = "" if theta is None else (">" if m.uncertainty > theta else "<=") + f"{theta:.4g}"
        caption = f"{m.name} -> {m.predicted}\np={max(m.probs):.2f} u={m.uncertainty:.4f}{versus}"
        panels.append(_panel(heat_overlay(image, record.saliency[m.name]), caption))
    if record.mask is not None:
        caption = f"AAX mask (tau={tau if isinstance(tau, str) else format(tau, 'g')})\n{'+'.join(record.agreeing)}"
        panels.append(_panel(mask_overlay(image, record.mask), caption))
    elif record.draft is not None:  # another colour: a suggestion for the reviewer, not a mask
        panels.append(_panel(mask_overlay(image, record.draft, colour=(255, 200, 0)),
                             f"draft for review\n{record.draft_class}"))
    else:
        panels.append(_panel(image, f"no mask\n{record.decision}"))
    return np.concatenate(panels, axis=1)
