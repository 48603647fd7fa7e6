"""The plain supervised baseline of ``reviews.py``: a MONAI UNet trained on the reviewed
masks alone ("N masks alone"), scored as AAX's masks are (mean IoU over the positive test
images, at each image's own size)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from aax.data import read_image, read_mask
from aax.data.transforms import prepare


def _tensors(images: Sequence[Any], masks: Sequence[Any] | None, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    x = torch.stack([prepare(read_image(p), size) for p in images])
    if masks is None:
        return x, None
    m = torch.stack([F.interpolate(torch.from_numpy(read_mask(p).astype(np.float32))[None, None],
                                   size=(size, size), mode="bilinear", antialias=True)[0] for p in masks])
    return x, m


def train_unet(images: Sequence[Any], masks: Sequence[Any], size: int = 128, epochs: int = 60,
               seed: int = 0, batch_size: int = 8) -> torch.nn.Module | None:
    """A 2-D MONAI UNet (16-128 channels) trained with Dice + BCE, flips as augmentation,
    Adam 1e-3 for ``epochs`` epochs; None with fewer than two masks."""
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet

    if len(images) < 2:
        return None
    torch.manual_seed(seed)
    net = UNet(spatial_dims=2, in_channels=3, out_channels=1, channels=(16, 32, 64, 128),
               strides=(2, 2, 2), num_res_units=2)
    x, m = _tensors(images, masks, size)
    loss_fn = DiceCELoss(sigmoid=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            xb, mb = x[idx], m[idx]
            if bool(torch.rand(1, generator=g) < 0.5):
                xb, mb = xb.flip(-1), mb.flip(-1)
            optimizer.zero_grad()
            loss = loss_fn(net(xb), mb)
            loss.backward()
            optimizer.step()
    return net.eval()


@torch.no_grad()
def image_ious(net: torch.nn.Module | None, images: Sequence[Any], masks: Sequence[Any],
               size: int = 128) -> list[float]:
    """IoU of ``net``'s mask (sigmoid > 0.5, resized to the image) on each image (1 where
    mask and prediction are both empty); an untrained baseline (None) scores 0 on every image."""
    if net is None:
        return [0.0] * len(images)
    ious = []
    for p, mp in zip(images, masks):
        gt = read_mask(mp)
        logit = net(prepare(read_image(p), size)[None])
        pred = F.interpolate(logit, size=gt.shape, mode="bilinear")[0, 0].numpy() > 0.0
        union = np.count_nonzero(pred | gt)
        ious.append(np.count_nonzero(pred & gt) / union if union else 1.0)
    return ious


def mean_iou(net: torch.nn.Module | None, images: Sequence[Any], masks: Sequence[Any], size: int = 128) -> float:
    """Mean of :func:`image_ious`."""
    ious = image_ious(net, images, masks, size)
    return float(np.mean(ious)) if ious else 0.0
