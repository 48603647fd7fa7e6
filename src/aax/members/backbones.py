"""Ensemble members: MONAI backbones cut at their last convolutional map, plus an MC head.

Each member exposes ``features(x) -> A`` (the last conv map, after its activation),
``head(A) -> logits`` and ``target_layer``, the module whose output *is* ``A`` so that a
hook-based CAM tool reads the same map that :mod:`aax.explain` uses.
"""

from __future__ import annotations

import copy

import torch
from monai.networks import nets
from torch import nn

from aax.members.head import MCHead

# Batch-norm momentum for every member. MONAI's EfficientNetBN defaults to the
# TF-style 0.01: on small data its running statistics never settle and eval-mode
# accuracy stays at chance while train-mode accuracy climbs. 0.1 is PyTorch's default.
BN_MOMENTUM = 0.1


class Member(nn.Module):
    """One ensemble member: ``forward(x) = head(features(x))``.

    Subclasses set ``self.net`` (the MONAI network, kept whole so that checkpoints in
    its source format load by key), ``self.head`` and implement ``features``.
    """

    name: str = ""
    feature_dim: int = 0

    def __init__(self, num_classes: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.head = MCHead(self.feature_dim, num_classes, dropout)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def target_layer(self) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _set_bn_momentum(module: nn.Module, momentum: float) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum


class ResNet50(Member):
    """ResNet-50 as torchvision builds it (7x7 stride-2 stem, max-pool, bottlenecks)."""

    name = "resnet50"
    feature_dim = 2048

    def __init__(self, num_classes: int, dropout: float = 0.2) -> None:
        super().__init__(num_classes, dropout)
        self.net = nets.ResNet(
            block="bottleneck", layers=[3, 4, 6, 3], block_inplanes=[64, 128, 256, 512],
            spatial_dims=2, n_input_channels=3, conv1_t_size=7, conv1_t_stride=2,
            feed_forward=False, bias_downsample=False,
        )
        _set_bn_momentum(self.net, BN_MOMENTUM)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.act(n.bn1(n.conv1(x)))
        x = n.maxpool(x)
        return n.layer4(n.layer3(n.layer2(n.layer1(x))))

    @property
    def target_layer(self) -> nn.Module:
        return self.net.layer4  # each bottleneck ends in its ReLU: output is post-activation


class DenseNet121(Member):
    """DenseNet-121; ``A`` is ``relu(norm5(...))``: MONAI keeps that ReLU in ``class_layers``."""

    name = "densenet121"
    feature_dim = 1024

    def __init__(self, num_classes: int, dropout: float = 0.2) -> None:
        super().__init__(num_classes, dropout)
        self.net = nets.DenseNet121(spatial_dims=2, in_channels=3, out_channels=num_classes)
        # The final ReLU must not be in-place: a hook on it must see A, and autograd
        # through it must not overwrite norm5's output.
        self.net.class_layers.relu = nn.ReLU(inplace=False)
        _set_bn_momentum(self.net, BN_MOMENTUM)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.class_layers.relu(self.net.features(x))

    @property
    def target_layer(self) -> nn.Module:
        return self.net.class_layers.relu


class EfficientNetB0(Member):
    """EfficientNet-B0 (lukemelas layout, as MONAI ports it).

    MONAI's ``_swish`` module is shared by the stem and the head, so a hook on it fires
    twice per forward; the head gets its own activation module, which is the target layer.
    """

    name = "efficientnet-b0"
    feature_dim = 1280

    def __init__(self, num_classes: int, dropout: float = 0.2) -> None:
        super().__init__(num_classes, dropout)
        self.net = nets.EfficientNetBN(
            "efficientnet-b0", pretrained=False, spatial_dims=2, in_channels=3,
            num_classes=num_classes, norm=("batch", {"eps": 1e-3, "momentum": BN_MOMENTUM}),
        )
        self.head_act = copy.deepcopy(self.net._swish)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n._swish(n._bn0(n._conv_stem(n._conv_stem_padding(x))))
        x = n._blocks(x)
        return self.head_act(n._bn1(n._conv_head(n._conv_head_padding(x))))

    @property
    def target_layer(self) -> nn.Module:
        return self.head_act


MEMBERS: dict[str, type[Member]] = {m.name: m for m in (ResNet50, EfficientNetB0, DenseNet121)}
DEFAULT_MEMBERS: tuple[str, ...] = ("resnet50", "efficientnet-b0", "densenet121")


def build_member(name: str, num_classes: int, dropout: float = 0.2) -> Member:
    """Build member ``name`` (one of :data:`MEMBERS`) with a fresh ``C``-class MC head."""
    try:
        cls = MEMBERS[name]
    except KeyError:
        raise ValueError(f"unknown member {name!r}; choose from {sorted(MEMBERS)}") from None
    return cls(num_classes, dropout)
