"""XGrad-CAM on the head (paper 3.2), in the shape of pytorch-grad-cam: one small base
class, one subclass per CAM method.

A CAM needs the feature map ``A`` and ``dY/dA``. ``A`` comes from one forward pass of
the backbone; ``dY/dA`` flows through the head alone, so no backward pass through the
backbone is ever needed. For the GAP+Linear head, ``dY_c/dA_k(x, y) = W[c, k] / (h w)``
in closed form, and no autograd is needed at all.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from aax.models.members.backbones import Member
from aax.models.members.head import MCHead

EPS = 1e-7  # as pytorch-grad-cam, so maps agree with it to float precision


def head_gradient(head: torch.nn.Module, features: torch.Tensor,
                  class_index: torch.Tensor, closed_form: bool = True) -> torch.Tensor:
    """``dY/dA`` for class ``class_index[b]`` of each image, through the head only.

    Args:
        head: the member's head (deterministic: dropout is off for explanation).
        features: ``A``, ``[B, K, h, w]``.
        class_index: ``[B]`` long tensor.
        closed_form: use the GAP+Linear closed form when the head is an :class:`MCHead`.
    """
    b, k, h, w = features.shape
    if closed_form and isinstance(head, MCHead):
        weight = head.fc.weight[class_index]  # [B, K]
        return (weight / (h * w))[:, :, None, None].expand(b, k, h, w)
    with torch.enable_grad():
        a = features.detach().requires_grad_(True)
        logits = head.classify(head.pool(a), stochastic=False) if isinstance(head, MCHead) else head(a)
        score = logits.gather(1, class_index.view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(score, a)
    return grad


def normalise(maps: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Per-image min-max to [0, 1] of ``[..., H, W]`` maps (a constant map becomes 0).

    With ``inplace`` the maps are overwritten, which saves two full-size temporaries
    (this runs on every upsampled map). Both ways give the same bits: rounding is
    monotonic, so ``max(x - lo) == hi - lo`` in floating point too.
    """
    flat = maps.flatten(-2)
    lo, hi = flat.amin(dim=-1, keepdim=True), flat.amax(dim=-1, keepdim=True)
    scale = (hi - lo) + EPS
    if inplace:
        return flat.sub_(lo).div_(scale).view_as(maps)
    return ((flat - lo) / scale).view_as(maps)


@dataclass(frozen=True)
class Grid:
    """Where a map's cells lie on the image the network saw (``input_size``, in pixels):
    cell ``(i, j)`` is centred on input pixel ``(origin[0] + stride * i, origin[1] +
    stride * j)``.

    Bilinear resizing with ``align_corners=False`` assumes the centred grid,
    ``origin = (stride - 1) / 2``. A CNN's cells are where their receptive fields are
    centred, which the padding of its strided layers decides (:meth:`Member.grid_origin`):
    ResNet-50's lie at ``stride * j``, EfficientNet-B0's at ``stride * j + stride - 1``,
    half a cell either side of the centred grid. Maps resized without their grid are
    shifted by that much (docs/method.md gives what it cost on the demo).
    """

    stride: float
    origin: tuple[float, float]
    input_size: tuple[int, int]

    @classmethod
    def of(cls, member: Member, input_size: Sequence[int], stride: int | None = None) -> Grid:
        """The grid of ``member``'s feature map at ``stride`` (its current output stride
        by default) for an input of ``input_size``."""
        stride = member.output_stride if stride is None else stride
        origin = float(member.grid_origin(stride))
        return cls(float(stride), (origin, origin), (int(input_size[-2]), int(input_size[-1])))

    @classmethod
    def centred(cls, input_size: Sequence[int], map_size: Sequence[int]) -> Grid:
        """The centred grid of a ``map_size`` map over ``input_size``: where a map that was
        trained against targets resized with ``align_corners=False`` (a segmentation head,
        :func:`aax.models.members.segment.segmentation_loss`) has its cells, whatever the
        receptive fields say."""
        stride = int(input_size[-1]) / int(map_size[-1])
        origin = (stride - 1.0) / 2.0
        return cls(stride, (origin, origin), (int(input_size[-2]), int(input_size[-1])))

    @classmethod
    def pixels(cls, input_size: Sequence[int]) -> Grid:
        """The grid of a map already at the input's resolution."""
        return cls(1.0, (0.0, 0.0), (int(input_size[-2]), int(input_size[-1])))

    def mirrored(self, width: int) -> Grid:
        """The grid of this map flipped left-right, as a map of the mirrored input: a
        cell's centre ``c`` on the mirrored input is ``W - 1 - c`` on the input."""
        ox = self.input_size[1] - 1 - self.origin[1] - self.stride * (width - 1)
        return Grid(self.stride, (self.origin[0], ox), self.input_size)

    def axis(self, dim: int, dst: int) -> tuple[float, float]:
        """``(start, step)``: output pixel ``q`` of a ``dst``-long axis ``dim`` (0: rows,
        1: columns) reads the map at cell coordinate ``start + step * q``. The output
        spans the input as a resize does (``align_corners=False``), so a view's map
        (the input resized, hence another ``input_size``) comes back onto the input too."""
        scale = self.input_size[dim] / dst  # input pixels per output pixel
        return ((0.5 * scale - 0.5 - self.origin[dim]) / self.stride, scale / self.stride)


@functools.lru_cache(maxsize=256)
def _linear_weights(src: int, dst: int, device: str, start: float | None = None,
                    step: float | None = None) -> torch.Tensor:
    """``[dst, src]`` weights of 1-D linear resampling: output pixel ``q`` reads the
    source at ``start + step * q`` (clamped at the edges). By default ``align_corners=False``
    (PyTorch's and OpenCV's convention: pixel centres at ``i + 0.5``)."""
    if start is None or step is None:
        start, step = 0.5 * src / dst - 0.5, src / dst
    pos = (start + step * torch.arange(dst, dtype=torch.float64)).clamp(min=0.0, max=src - 1)
    lo = pos.floor().long().clamp(max=src - 1)
    hi = (lo + 1).clamp(max=src - 1)
    frac = pos - lo
    weights = torch.zeros(dst, src, dtype=torch.float64)
    rows = torch.arange(dst)
    weights.index_put_((rows, lo), 1.0 - frac, accumulate=True)
    weights.index_put_((rows, hi), frac, accumulate=True)
    return weights.float().to(device)


def _axis_weights(grid: Grid | None, dim: int, src: int, dst: int, device: str) -> torch.Tensor:
    if grid is None:
        return _linear_weights(src, dst, device)
    start, step = grid.axis(dim, dst)
    return _linear_weights(src, dst, device, round(start, 9), round(step, 12))


def upsample(maps: torch.Tensor, size: tuple[int, int], grid: Grid | Sequence[Grid] | None = None) -> torch.Tensor:
    """Bilinear resize of ``[B, h, w]`` maps to ``size``.

    Without ``grid``, ``align_corners=False`` (as ``F.interpolate``). With a
    :class:`Grid`, each output pixel reads the map where its centre falls on the grid:
    the map is registered on the image. ``maps`` may be ``[B, M, h, w]`` with one grid
    per ``M``.

    Bilinear resampling is separable, so it is done as ``Wy @ S @ Wx^T``: for the large
    factors of CAMs (a 4 x 4 map to a 512 x 512 image) that is 2.5-4x faster on a CPU
    than ``F.interpolate``, and equal to it within 1e-6.
    """
    h, w = maps.shape[-2:]
    device = str(maps.device)
    dst_h, dst_w = int(size[0]), int(size[1])
    if grid is None or isinstance(grid, Grid):
        wy = _axis_weights(grid, 0, h, dst_h, device)
        wx = _axis_weights(grid, 1, w, dst_w, device)
        return wy @ maps.float() @ wx.T
    grids = tuple(grid)
    wy = _stacked_weights(grids, 0, h, dst_h, device)  # [M, H, h]
    wx = _stacked_weights(grids, 1, w, dst_w, device)  # [M, W, w]
    return wy @ maps.float() @ wx.transpose(1, 2)


@functools.lru_cache(maxsize=64)
def _stacked_weights(grids: tuple[Grid, ...], dim: int, src: int, dst: int, device: str) -> torch.Tensor:
    """Each member's resampling weights (one grid each), stacked: built once per image size, as
    :func:`_linear_weights` are, not per image."""
    return torch.stack([_axis_weights(g, dim, src, dst, device) for g in grids])


class HeadCAM:
    """Base of the CAM methods: ``S = ReLU(sum_k alpha_k A_k)``, with ``alpha`` from
    :meth:`channel_weights`. Subclasses only say how to weigh the channels."""

    def __init__(self, member: Member, closed_form: bool = True) -> None:
        self.member = member
        self.closed_form = closed_form

    def channel_weights(self, features: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """``alpha``: ``[B, K]`` from ``A`` and ``dY/dA`` (both ``[B, K, h, w]``)."""
        raise NotImplementedError

    def raw(self, features: torch.Tensor, class_index: torch.Tensor) -> torch.Tensor:
        """The un-normalised map at feature resolution: ``[B, h, w]``, >= 0."""
        grads = head_gradient(self.member.head, features, class_index, self.closed_form)
        alpha = self.channel_weights(features, grads)
        return torch.relu(torch.einsum("bk,bkhw->bhw", alpha, features))

    def __call__(self, x: torch.Tensor, class_index: int | torch.Tensor,
                 features: torch.Tensor | None = None, registered: bool = True) -> torch.Tensor:
        """Maps ``[B, H, W]`` in [0, 1] at the input size of ``x``.

        ``features`` may be passed when ``A = member.features(x)`` is already at hand, so
        that the backbone runs once for both MC Dropout and the map. ``registered``:
        resized on the member's :class:`Grid` (each cell on its receptive field's
        centre), as AAX's masks are; False resizes as pytorch-grad-cam does.
        """
        if features is None:
            with torch.no_grad():
                features = self.member.features(x)
        index = torch.as_tensor(class_index, device=features.device, dtype=torch.long)
        index = index.expand(features.shape[0]) if index.ndim == 0 else index
        with torch.no_grad():
            # (features come from the member at its current output stride)
            grid = Grid.of(self.member, x.shape[-2:]) if registered else None
            maps = upsample(self.raw(features.detach(), index), tuple(x.shape[-2:]), grid)
        return normalise(maps)


class XGradCAM(HeadCAM):
    """XGrad-CAM (Fu et al., 2020): ``alpha_k = sum_xy A_k / sum(A_k) * dY/dA_k``."""

    def channel_weights(self, features: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        total = features.sum(dim=(2, 3), keepdim=True)
        return (grads * features / (total + EPS)).sum(dim=(2, 3))


class GradCAM(HeadCAM):
    """Grad-CAM (Selvaraju et al., 2017): ``alpha_k = mean_xy dY/dA_k``; for comparison."""

    def channel_weights(self, features: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        return grads.mean(dim=(2, 3))


def xgrad_cam(member: Member, x: torch.Tensor, class_index: int | torch.Tensor,
              features: torch.Tensor | None = None, closed_form: bool = True,
              registered: bool = True) -> torch.Tensor:
    """XGrad-CAM of ``member`` for ``class_index``: ``[B, H, W]`` in [0, 1] at the input size.

    Args:
        member: an ensemble member (eval mode: batch-norm statistics are not updated).
        x: normalised input batch ``[B, 3, H, W]``.
        class_index: one class for the batch, or ``[B]`` classes.
        features: ``member.features(x)`` if already computed.
        closed_form: closed-form head gradient (exact for GAP+Linear) instead of autograd.
        registered: resize on the member's :class:`Grid`, as AAX's masks are (False: as
            pytorch-grad-cam resizes, each cell centred on its block).
    """
    return XGradCAM(member, closed_form=closed_form)(x, class_index, features, registered)
