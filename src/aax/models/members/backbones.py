"""Ensemble members: MONAI backbones cut at their last convolutional map, plus an MC head.

Each member exposes ``features(x) -> A`` (the last conv map, after its activation),
``head(A) -> logits`` and ``target_layer``, the module whose output *is* ``A`` so that a
hook-based CAM tool reads the same map that :mod:`aax.models.explain` uses.

Output stride. ``A`` is 1/32 of the input by default. ``set_output_stride(16)`` (or 8)
runs the last one (two) stride-2 stages at stride 1 and dilates every convolution after
them, as DeepLab does (torchvision's ``replace_stride_with_dilation``: a dilated stage's
first block keeps the previous dilation, the others take the new one). No parameter
changes, so a network trained at stride 32 can be converted at annotation time, and
``set_output_stride(32)`` restores it exactly.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence

import torch
from monai.networks import nets
from torch import nn
from torch.nn import functional as F

from aax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from aax.models.members.head import MCHead
from aax.models.members.segment import SegHead

# Batch-norm momentum for every member. MONAI's EfficientNetBN defaults to the
# TF-style 0.01: on small data its running statistics never settle and eval-mode
# accuracy stays at chance while train-mode accuracy climbs. 0.1 is PyTorch's default.
BN_MOMENTUM = 0.1
IMAGENET_NORMALISATION: tuple[tuple[float, ...], tuple[float, ...]] = (IMAGENET_MEAN, IMAGENET_STD)
"""How every member's input is normalised: ImageNet's mean and std (torchvision's)."""
OUTPUT_STRIDES: tuple[int, ...] = (32, 16, 8)
"""Output strides every member supports (see :meth:`Member.set_output_stride`)."""


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
        self.output_stride = 32
        self.seg: SegHead | None = None  # added by add_segmentation (aax retrain --segmentation-weight)

    def add_segmentation(self, strides: Sequence[int] | None = None) -> SegHead:
        """Give the member a :class:`~aax.models.members.segment.SegHead` reading the steps at
        ``strides`` (default :data:`~aax.models.members.segment.STRIDES`), on the device of its
        weights, unless it has one already; return its head."""
        if self.seg is None:
            from aax.models.members.segment import build_seg_head

            self.seg = build_seg_head(self, strides=strides).to(next(self.parameters()).device)
        return self.seg

    def features_and_steps(self, x: torch.Tensor, steps: Sequence[int],
                           stop: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``A`` (as :meth:`features`; with ``stop``, the output of the steps before it) and
        the outputs of ``steps`` of :meth:`stages`, from one pass."""
        outputs = []
        for i, step in enumerate(self.stages()[:stop]):
            x = step(x)
            if i in steps:
                outputs.append(x)
        return x, outputs

    def set_output_stride(self, stride: int) -> Member:
        """Run the backbone at output stride ``stride`` (32, 16 or 8), in place.

        The stride-2 stages past ``stride`` run at stride 1 and the convolutions after
        them are dilated (2, then 4), so the receptive fields stay those the weights
        were trained with and ``A`` has ``32 / stride`` times more cells per side.
        Parameters are untouched; returns the member.
        """
        if stride not in OUTPUT_STRIDES:
            raise ValueError(f"output stride must be one of {OUTPUT_STRIDES}, got {stride}")
        if stride != self.output_stride:
            # stages from the last one back: OS 16 dilates the last, OS 8 the last two
            n_dilated = {32: 0, 16: 1, 8: 2}[stride]
            self._apply_stride(n_dilated)
            self.output_stride = stride
        return self

    def _apply_stride(self, n_dilated: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def set_input_normalisation(self, normalisation: tuple[Sequence[float], Sequence[float]]) -> None:
        """Tell the member how its inputs are normalised (the run's ``(mean, std)``).

        Members whose weights expect another scaling convert their input to it; the
        paper's trio expects ImageNet's mean and std, which every run uses, and ignores it.
        """

    def grid_origin(self, stride: int) -> float:  # pragma: no cover - abstract
        """Where cell 0 of a feature map at ``stride`` (the output stride, or a stage's
        stride up to it) is centred on the input, in input pixels: the centre of its
        receptive field. Cell ``j`` is centred at ``grid_origin(stride) + stride * j``.

        The padding of the strided layers decides it, not the weights: a stride-2 layer
        whose windows are centred on ``2j + d`` of its input adds ``d`` times its input's
        stride (``d = 0`` for ResNet-50, 1 for EfficientNet-B0's TF-"same" padding, 1/2 for
        a 2x2 pool), dilated layers (symmetric padding) nothing. Resizing a map
        needs it (:class:`aax.models.explain.Grid`); tests/test_grid.py measures it on each member.
        """
        raise NotImplementedError

    # stage index -> the first stage whose computation differs at that stride from stride 32
    _first_dilated: dict[int, int] = {}

    def stages(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:  # pragma: no cover - abstract
        """The backbone as a sequence of steps; ``features`` runs them in order."""
        raise NotImplementedError

    def features(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """``A`` (the last conv map, after its activation); with ``start``/``stop``, only
        those steps of :meth:`stages` (an intermediate map in, or out)."""
        for step in self.stages()[start:stop]:
            x = step(x)
        return x

    def shared_stages(self, stride_a: int, stride_b: int) -> int:
        """How many leading steps of :meth:`stages` compute the same at both strides: a
        second pass at another stride can start from the first pass's map after them."""
        n = len(self.stages())
        if stride_a == stride_b:
            return n
        return self._first_dilated[min(stride_a, stride_b)]

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

    _first_dilated = {16: 4, 8: 3}

    def grid_origin(self, stride: int) -> float:
        # 7x7/2 pad 3, 3x3/2 pad 1 and the 3x3/2 pad 1 bottlenecks: windows centred on 2j
        return 0.0

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        return n.maxpool(n.act(n.bn1(n.conv1(x))))

    def stages(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        n = self.net
        return [self._stem, n.layer1, n.layer2, n.layer3, n.layer4]

    @property
    def target_layer(self) -> nn.Module:
        return self.net.layer4  # each bottleneck ends in its ReLU: output is post-activation

    def _apply_stride(self, n_dilated: int) -> None:
        layers = [self.net.layer3, self.net.layer4]
        dilation = 1
        for i, layer in enumerate(layers):
            dilate = i >= len(layers) - n_dilated
            first = layer[0]
            first.conv2.stride = (1, 1) if dilate else (2, 2)
            first.downsample[0].stride = (1, 1) if dilate else (2, 2)
            _dilate(first.conv2, dilation)  # the first block keeps the previous dilation
            dilation = dilation * 2 if dilate else dilation
            for block in layer[1:]:
                _dilate(block.conv2, dilation)


def _dilate(conv: nn.Conv2d, dilation: int) -> None:
    """Dilate a symmetric-padded convolution, keeping its output the size of its input."""
    k = conv.kernel_size[0]
    conv.dilation = (dilation, dilation)
    conv.padding = (dilation * (k - 1) // 2,) * 2


class TentPool(nn.Module):
    """The stride-1 stand-in for a 2x2 stride-2 average pool in a dilated network.

    A 2x2 box at stride 1 would centre each output half a cell off the grid; the
    separable [1, 2, 1] / 4 tent (the mean of the box at its two phases) averages the
    same neighbourhood, centred. ``dilation`` spaces its taps as the pool's own input
    is spaced (2 when an earlier stage is already dilated). Edges are replicated.
    """

    def __init__(self, dilation: int = 1) -> None:
        super().__init__()
        self.dilation = dilation
        self.register_buffer("kernel", torch.tensor([0.25, 0.5, 0.25]), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d, c = self.dilation, x.shape[1]
        x = F.pad(x, (d, d, d, d), mode="replicate")
        kx = self.kernel.to(x.dtype).view(1, 1, 1, 3).expand(c, 1, 1, 3)
        x = F.conv2d(x, kx, groups=c, dilation=(1, d))
        return F.conv2d(x, kx.transpose(2, 3), groups=c, dilation=(d, 1))


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

    _first_dilated = {16: 4, 8: 2}

    def grid_origin(self, stride: int) -> float:
        # the stem's windows are centred on 2j; each 2x2/2 transition pool on 2j + 1/2 of
        # its input (at strides 4, 8, 16), which adds a quarter of its output stride; the
        # tent pools of a dilated network are centred
        return max(0.0, stride / 2 - 2)

    def stages(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        f = self.net.features
        head = [m for name, m in f.named_children() if name not in _DENSE_TAIL]
        t2, t3 = f.transition2, f.transition3

        def upto(modules: list[nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
            def run(x: torch.Tensor) -> torch.Tensor:
                for m in modules:
                    x = m(x)
                return x
            return run

        return [upto(head), upto([t2.norm, t2.relu, t2.conv]), upto([t2.pool, f.denseblock3]),
                upto([t3.norm, t3.relu, t3.conv]),
                upto([t3.pool, f.denseblock4, f.norm5, self.net.class_layers.relu])]

    @property
    def target_layer(self) -> nn.Module:
        return self.net.class_layers.relu

    def _apply_stride(self, n_dilated: int) -> None:
        f = self.net.features
        stages = [(f.transition2, f.denseblock3), (f.transition3, f.denseblock4)]
        dilation = 1
        for i, (transition, block) in enumerate(stages):
            if i >= len(stages) - n_dilated:
                transition.pool = TentPool(dilation)
                dilation *= 2
            else:
                transition.pool = nn.AvgPool2d(kernel_size=2, stride=2)
            for layer in block.children():
                _dilate(layer.layers.conv2, dilation)


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
        for stage in self.net._blocks:
            if stage[0]._depthwise_conv.stride[0] == 2:  # the build-time padder, to restore
                stage[0]._aax_pad_s2 = stage[0]._depthwise_conv_padding

    _first_dilated = {16: 4, 8: 2}

    def grid_origin(self, stride: int) -> float:
        # every stride-2 conv is padded TF-style (0 before, 1 after for 3x3; 1 and 2 for
        # 5x5): its windows are centred on 2j + 1 of its input, half of its output stride
        return float(stride - 1)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n._swish(n._bn0(n._conv_stem(n._conv_stem_padding(x))))
        return n._blocks[1](n._blocks[0](x))  # output stride 4

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        return self.head_act(n._bn1(n._conv_head(n._conv_head_padding(n._blocks[6](x)))))

    def stages(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        b = self.net._blocks
        # strides 4, 8, 16, 16, 32, 32: a step ends at every stride, so a segmentation
        # head can read a stride-4 map
        return [self._stem, b[2], b[3], b[4], b[5], self._head]

    @property
    def target_layer(self) -> nn.Module:
        return self.head_act

    def _apply_stride(self, n_dilated: int) -> None:
        # MONAI pads every conv TF-style ("same") with a padder computed once for the
        # build-time size and stride; a conv whose stride or dilation changes gets a
        # symmetric padder for its new setting, or the map would shift by half a cell.
        down = [i for i, stage in enumerate(self.net._blocks) if hasattr(stage[0], "_aax_pad_s2")]
        dilated = set(down[len(down) - n_dilated:]) if n_dilated else set()
        dilation = 1
        for i, stage in enumerate(self.net._blocks):
            for j, block in enumerate(stage):
                conv = block._depthwise_conv
                if j == 0 and i in down:
                    # block.stride stays 2: it decides the skip connection, absent here
                    if i in dilated:
                        conv.stride = (1, 1)
                        block._depthwise_conv_padding = _same_pad(conv.kernel_size[0], dilation)
                        conv.dilation = (dilation, dilation)
                        dilation *= 2
                        continue
                    conv.stride, conv.dilation = (2, 2), (1, 1)
                    block._depthwise_conv_padding = block._aax_pad_s2
                    continue
                conv.dilation = (dilation, dilation)
                block._depthwise_conv_padding = _same_pad(conv.kernel_size[0], dilation)


# EfficientNet-Lite (Google's mobile variant of EfficientNet): B0's block layout without
# squeeze-excitation, ReLU6 in place of swish, stem (32) and head (1280) fixed at every
# scale. Block strings in MONAI's notation; repeats and channels are each model's own,
# already scaled, so the network is built with width and depth coefficients of 1.
_LITE_KERNELS = (3, 3, 5, 3, 5, 5, 3)
_LITE_STRIDES = (1, 2, 2, 2, 1, 2, 1)
_LITE_EXPAND = (1, 6, 6, 6, 6, 6, 6)
_B0_CHANNELS = (16, 24, 40, 80, 112, 192, 320)
_LITE_LAYOUT: dict[str, tuple[tuple[int, ...], tuple[int, ...], int]] = {
    # name: (repeats per stage, output channels per stage, native input size)
    "efficientnet-lite0": ((1, 2, 2, 3, 3, 4, 1), _B0_CHANNELS, 224),
    "efficientnet-lite1": ((1, 3, 3, 4, 4, 5, 1), _B0_CHANNELS, 240),
    "efficientnet-lite2": ((1, 3, 3, 4, 4, 5, 1), (16, 24, 48, 88, 120, 208, 352), 260),
}
LITE_NORMALISATION: tuple[tuple[float, ...], tuple[float, ...]] = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
"""The input scaling the EfficientNet-Lite ImageNet weights expect: [0, 1] -> [-1, 1]."""


def lite_block_strings(name: str) -> list[str]:
    """MONAI block strings of EfficientNet-Lite ``name`` (no ``_se`` part: no squeeze-excitation)."""
    repeats, channels, _ = _LITE_LAYOUT[name]
    inputs = (32, *channels[:-1])
    return [f"r{r}_k{k}_s{s}{s}_e{e}_i{i}_o{o}"
            for r, k, s, e, i, o in zip(repeats, _LITE_KERNELS, _LITE_STRIDES, _LITE_EXPAND, inputs, channels)]


class EfficientNetLite(EfficientNetB0):
    """EfficientNet-Lite0/1/2, built with MONAI's ``EfficientNet`` from explicit block strings.

    Everything B0 has (stages, TF-"same" padding, output-stride conversion, grid origin,
    the head's own activation as target layer) carries over; the activations are ReLU6.
    Like every member, it takes images normalised with the run's mean and std; its
    ImageNet weights expect inputs in [-1, 1], so the first step re-scales them to
    :data:`LITE_NORMALISATION` (a fixed per-channel affine map, no parameter).
    """

    name = "efficientnet-lite0"
    feature_dim = 1280
    native_size = 224
    input_normalisation = LITE_NORMALISATION

    def __init__(self, num_classes: int, dropout: float = 0.2) -> None:
        Member.__init__(self, num_classes, dropout)
        self.native_size = _LITE_LAYOUT[self.name][2]
        # MONAI computes each TF-"same" padder once, for the build size. 224 is a multiple
        # of 32, as every input side AAX uses: each stride-2 conv then pads 0 | 1 (3x3) or
        # 1 | 2 (5x5), as TensorFlow does for such sides. Built at 240 or 260, a stage of odd
        # side pads symmetrically and shifts every later map by half a cell.
        self.net = nets.EfficientNet(
            lite_block_strings(self.name), spatial_dims=2, in_channels=3, num_classes=num_classes,
            width_coefficient=1.0, depth_coefficient=1.0, dropout_rate=0.2, image_size=224,
            norm=("batch", {"eps": 1e-3, "momentum": BN_MOMENTUM}),
        )
        self.net._swish = nn.ReLU6(inplace=True)
        for stage in self.net._blocks:
            for block in stage:
                block._swish = nn.ReLU6(inplace=True)
        # not in-place: a hook on it must see A, and autograd needs bn1's output intact
        self.head_act = nn.ReLU6(inplace=False)
        for stage in self.net._blocks:
            if stage[0]._depthwise_conv.stride[0] == 2:
                stage[0]._aax_pad_s2 = stage[0]._depthwise_conv_padding
        self.set_input_normalisation(IMAGENET_NORMALISATION)

    def set_input_normalisation(self, normalisation: tuple[Sequence[float], Sequence[float]]) -> None:
        mean_in, std_in = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in normalisation)
        mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in self.input_normalisation)
        # x_own = (x * std_in + mean_in - mean) / std = x * scale + shift
        self.register_buffer("_in_scale", std_in / std, persistent=False)
        self.register_buffer("_in_shift", (mean_in - mean) / std, persistent=False)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self._in_scale.to(x) + self._in_shift.to(x)
        return super()._stem(x)


class EfficientNetLite1(EfficientNetLite):
    """EfficientNet-Lite1 (native input 240 px)."""

    name = "efficientnet-lite1"


class EfficientNetLite2(EfficientNetLite):
    """EfficientNet-Lite2 (native input 260 px; wider stages)."""

    name = "efficientnet-lite2"


def _same_pad(kernel: int, dilation: int) -> nn.Module:
    p = dilation * (kernel - 1) // 2
    return nn.ConstantPad2d((p, p, p, p), 0.0) if p else nn.Identity()


# DenseNet-121's feature steps after denseblock2 (the rest is one step)
_DENSE_TAIL = ("transition2", "denseblock3", "transition3", "denseblock4", "norm5")

MEMBERS: dict[str, type[Member]] = {m.name: m for m in (ResNet50, EfficientNetB0, DenseNet121, EfficientNetLite,
                                                          EfficientNetLite1, EfficientNetLite2)}
PAPER_MEMBERS: tuple[str, ...] = ("resnet50", "efficientnet-b0", "densenet121")
"""The paper's trio (from MONAI; ImageNet weights through torch hub where it can download)."""
DEFAULT_MEMBERS: tuple[str, ...] = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
"""The default ensemble: three EfficientNet-Lite members, ImageNet weights installed with
the package (:mod:`aax.models.members.weights`)."""


def build_member(name: str, num_classes: int, dropout: float = 0.2, output_stride: int = 32) -> Member:
    """Build member ``name`` (one of :data:`MEMBERS`) with a fresh ``C``-class MC head,
    its backbone at ``output_stride`` (see :meth:`Member.set_output_stride`)."""
    try:
        cls = MEMBERS[name]
    except KeyError:
        raise ValueError(f"unknown member {name!r}; choose from {sorted(MEMBERS)}") from None
    return cls(num_classes, dropout).set_output_stride(output_stride)


@contextlib.contextmanager
def output_stride(member: Member, stride: int) -> Iterator[Member]:
    """Run ``member`` at ``stride`` inside the block, restoring its stride after it."""
    before = member.output_stride
    member.set_output_stride(stride)
    try:
        yield member
    finally:
        member.set_output_stride(before)
