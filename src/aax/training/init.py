"""Initialisation for members trained from scratch.

Residual branches start as the identity ("zero-init residual", Goyal et al. 2017,
He et al. 2019, "Bag of Tricks"): the last batch-norm scale of every residual branch is
set to zero, so at step 0 each residual block passes its input through unchanged and
the deep network trains like a shallow one first. Measured here (docs/training.md):
without it, ResNet-50 and EfficientNet-B0 trained from scratch on a few dozen synthetic
images stay near chance for many epochs; with it they learn within a handful. DenseNet
has no residual additions and is left alone. Not applied when pretrained weights are
loaded (they set those scales).
"""

from __future__ import annotations

import torch
from torch import nn

from aax.models.members.backbones import Member


def zero_init_residuals(member: Member) -> list[str]:
    """Zero the last BN scale of each residual branch of ``member``; returns their names."""
    touched = []
    for name, module in member.named_modules():
        bn = None
        # MONAI ResNetBottleneck / ResNetBlock: the branch ends in bn3 / bn2 before the add.
        if hasattr(module, "conv3") and isinstance(getattr(module, "bn3", None), nn.BatchNorm2d):
            bn = module.bn3
        elif (hasattr(module, "conv2") and not hasattr(module, "conv3")
              and isinstance(getattr(module, "bn2", None), nn.BatchNorm2d)
              and hasattr(module, "downsample")):
            bn = module.bn2
        # MONAI MBConvBlock: the identity skip exists iff id_skip, stride 1 and in == out.
        elif (hasattr(module, "_project_conv") and getattr(module, "id_skip", False)
              and _stride_one(getattr(module, "stride", 1))
              and getattr(module, "in_channels", None) == getattr(module, "out_channels", 0)):
            bn = module._bn2
        if bn is not None:
            with torch.no_grad():
                bn.weight.zero_()
            touched.append(name)
    return touched


def _stride_one(stride: object) -> bool:
    if isinstance(stride, (tuple, list)):
        return all(s == 1 for s in stride)
    return stride == 1
