"""Training augmentation on image tensors, seeded, for X-rays and photos alike.

Kept deliberately mild: horizontal flip, a small affine (rotation, scale, translation)
and brightness/contrast jitter. Nothing here moves a finding out of the image or
changes its class, so image-level labels stay true. Works on a batch ``[B, 3, H, W]``
of float images in [0, 1] (before normalisation), on any device, and draws every
random number from the ``torch.Generator`` it is given, so the same seed gives the same
batches. (Chest X-rays are not left-right symmetric; pass ``hflip=False`` where side
matters.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augment:
    """Random flip + affine + intensity jitter.

    Attributes:
        hflip: flip left-right with probability 0.5.
        rotate: maximum rotation in degrees (uniform in ``[-rotate, rotate]``).
        scale: maximum relative zoom (uniform in ``[1 - scale, 1 + scale]``).
        translate: maximum shift as a fraction of the image side.
        brightness: maximum additive brightness change (in [0, 1] intensity units).
        contrast: maximum relative contrast change around each image's mean.
    """

    hflip: bool = True
    rotate: float = 10.0
    scale: float = 0.1
    translate: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.1

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None,
                 masks: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Augment ``[B, C, H, W]`` images in [0, 1]; returns a new tensor in [0, 1].

        With ``masks`` (``[B, 1, H, W]`` float), returns ``(images, masks)``: the masks
        moved by the same flip and affine (no intensity change), so a reviewed mask stays
        on its finding. The random numbers drawn are the same with or without masks.
        """
        if images.dim() != 4:
            raise ValueError(f"expected [B, C, H, W], got shape {tuple(images.shape)}")
        b = images.shape[0]
        dev, dtype = images.device, images.dtype

        def uniform(low: float, high: float) -> torch.Tensor:
            # Drawn on the CPU with the CPU generator so results do not depend on the device.
            r = torch.rand(b, generator=generator, dtype=torch.float64)
            return (low + (high - low) * r).to(device=dev, dtype=dtype)

        angle = uniform(-self.rotate, self.rotate) * (math.pi / 180.0)
        zoom = uniform(1.0 - self.scale, 1.0 + self.scale)
        tx = uniform(-self.translate, self.translate) * 2.0  # grid units span [-1, 1]
        ty = uniform(-self.translate, self.translate) * 2.0
        flip = (torch.rand(b, generator=generator) < 0.5).to(dev) if self.hflip \
            else torch.zeros(b, dtype=torch.bool, device=dev)
        gain = uniform(1.0 - self.contrast, 1.0 + self.contrast)
        shift = uniform(-self.brightness, self.brightness)

        # Output pixel -> input pixel: inverse zoom, rotation, then the shift.
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        sx = torch.where(flip, -torch.ones_like(cos), torch.ones_like(cos))
        theta = torch.stack([torch.stack([cos * sx, -sin, tx], dim=1),
                             torch.stack([sin * sx, cos, ty], dim=1)], dim=1)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border",
                            align_corners=False)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * gain.view(b, 1, 1, 1) + mean + shift.view(b, 1, 1, 1)
        out = out.clamp_(0.0, 1.0)
        if masks is None:
            return out
        # zeros outside the image: a finding does not extend into the border padding
        moved = F.grid_sample(masks.to(dtype), grid, mode="bilinear", padding_mode="zeros",
                              align_corners=False)
        return out, moved


def identity(images: torch.Tensor, generator: torch.Generator | None = None,
             masks: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """No augmentation (same call signature as :class:`Augment`)."""
    return images if masks is None else (images, masks)
