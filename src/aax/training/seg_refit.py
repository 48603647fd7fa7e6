"""The segmentation head's own epochs: refit on the reviewed masks over frozen features.

Trained with the members (:mod:`aax.training.loop`), a segmentation head
(:mod:`aax.models.members.segment`) sees each reviewed mask once an epoch, and the
checkpoint kept is the epoch with the best *classification* loss, often an early one:
the head stops long before it fits the masks. The plain supervised baseline, a UNet on
the same masks, gets dozens of epochs. So once a member is trained, its backbone is
frozen and its head alone trains on the reviewed masks for ``epochs`` more epochs: the
backbone's step outputs are computed once for a fixed set of views of each image (the
image, its mirror image and ``views`` draws of the training augmentation, masks moved
with them), so the refit costs a few forward passes over the masked images and seconds
of head updates. A hundred masks are few: the augmented views keep the head from
learning them by heart. The class, the uncertainty and the backbone's features stay
exactly as they were.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from aax.data.augment import Augment
from aax.models.members.backbones import Member
from aax.models.members.segment import segmentation_loss
from aax.training.tensors import Cached


MAX_CACHE_BYTES = 3 * 2**29
"""The cached step outputs and masks of every view together stay under this (1.5 GiB):
with many reviewed masks, large inputs or wide early steps (ResNet-50's layer1) each
image gets fewer augmented views. An EfficientNet-Lite view of one 128 px image takes
about 0.3 MB, so the cap leaves 14 views up to about 320 masks."""


@dataclass(frozen=True)
class RefitSettings:
    """How the head is refitted.

    Attributes:
        epochs: passes over the reviewed masks (0: no refit).
        lr: Adam's learning rate.
        batch_size: images a step.
        mirror: also learn from each image's left-right mirror image (off where sides differ).
        views: augmented views of each image (the training augmentation,
            :class:`~aax.data.augment.Augment`, flipping only with ``mirror``), drawn once;
            fewer when :data:`MAX_CACHE_BYTES` would be passed.
        seed: shuffling, the views drawn and the view of each batch.
    """

    epochs: int = 60
    lr: float = 1e-3
    batch_size: int = 8
    mirror: bool = True
    views: int = 14
    seed: int = 0


@torch.no_grad()
def _steps(member: Member, x: torch.Tensor, steps: tuple[int, ...], batch: int) -> list[torch.Tensor]:
    parts = [member.features_and_steps(x[i:i + batch], steps, stop=max(steps) + 1)[1]
             for i in range(0, len(x), batch)]
    return [torch.cat([p[k] for p in parts]).float() for k in range(len(steps))]


def refit_seg_head(member: Member, data: Cached, mean: tuple[float, ...], std: tuple[float, ...],
                   settings: RefitSettings, device: torch.device | str = "cpu") -> dict[str, float | int]:
    """Train ``member.seg`` alone on the images of ``data`` that have a reviewed mask, the
    rest of the member frozen (in eval mode) and left as it was.

    Args:
        member: a member with a segmentation head (:meth:`Member.add_segmentation`).
        data: cached training images with their reviewed masks.
        mean, std: the input normalisation per channel.
        settings: epochs, learning rate, batch size, mirroring, augmented views, seed.
        device: where to run.

    Returns:
        ``{"epochs", "masks", "views", "loss_first", "loss_last"}``: views counts the
        image itself; the losses are the mean of the first and the last epoch (NaN
        without epochs).

    Raises:
        ValueError: the member has no head, or ``data`` no reviewed mask.
    """
    head = getattr(member, "seg", None)
    if head is None:
        raise ValueError(f"{member.name} has no segmentation head to refit")
    if data.has_mask is None or not bool(data.has_mask.any()):
        raise ValueError(f"{member.name}: no reviewed mask to refit the segmentation head on")
    device = torch.device(device)
    idx = torch.nonzero(data.has_mask).flatten()
    x = data.images[idx].to(device).float().div_(255.0)
    masks = data.masks[idx].to(device).float().div_(255.0)
    generator = torch.Generator().manual_seed(settings.seed)
    augment = Augment(hflip=settings.mirror)
    fixed = 2 if settings.mirror else 1
    shift = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    scale = torch.tensor(std, device=device).view(1, -1, 1, 1)
    was_training = member.training
    member.eval()
    try:
        views: list[list[torch.Tensor]] = []
        targets: list[torch.Tensor] = []
        # one view at a time, so only its step outputs and mask are kept, not its image
        def add(img: torch.Tensor, target: torch.Tensor) -> None:
            views.append(_steps(member, (img - shift) / scale, head.steps, 4 * settings.batch_size))
            targets.append(target)

        add(x, masks)
        view_bytes = sum(t.numel() * t.element_size() for t in (*views[0], targets[0]))
        n_views = max(0, min(settings.views, MAX_CACHE_BYTES // view_bytes - fixed))
        if settings.mirror:
            add(x.flip(-1), masks.flip(-1))
        for _ in range(n_views):
            add(*augment(x, generator, masks=masks))
        losses: list[float] = []
        if settings.epochs > 0:
            optimizer = torch.optim.Adam(head.parameters(), lr=settings.lr)
            head.train()
            for _ in range(settings.epochs):
                total, seen = 0.0, 0
                for batch in torch.randperm(len(idx), generator=generator).split(settings.batch_size):
                    v = int(torch.randint(len(views), (1,), generator=generator))
                    batch = batch.to(device)
                    optimizer.zero_grad(set_to_none=True)
                    loss = segmentation_loss(head([s[batch] for s in views[v]]), targets[v][batch])
                    loss.backward()
                    optimizer.step()
                    total += float(loss.detach()) * len(batch)
                    seen += len(batch)
                losses.append(total / max(seen, 1))
    finally:
        member.train(was_training)
    return {"epochs": settings.epochs, "masks": int(len(idx)), "views": len(views),
            "loss_first": losses[0] if losses else math.nan, "loss_last": losses[-1] if losses else math.nan}
