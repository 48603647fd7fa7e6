"""XGrad-CAM on the head (paper 3.2), in the shape of pytorch-grad-cam: one small base
class, one subclass per CAM method.

A CAM needs the feature map ``A`` and ``dY/dA``. ``A`` comes from one forward pass of
the backbone; ``dY/dA`` flows through the head alone, so no backward pass through the
backbone is ever needed. For the GAP+Linear head, ``dY_c/dA_k(x, y) = W[c, k] / (h w)``
in closed form, and no autograd is needed at all.
"""

from __future__ import annotations

import functools

import torch

from aax.members.backbones import Member
from aax.members.head import MCHead

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


@functools.lru_cache(maxsize=64)
def _linear_weights(src: int, dst: int, device: str) -> torch.Tensor:
    """``[dst, src]`` weights of 1-D linear resampling with ``align_corners=False``
    (PyTorch's and OpenCV's convention: pixel centres at ``i + 0.5``, clamped at the
    edges)."""
    pos = ((torch.arange(dst, dtype=torch.float64) + 0.5) * (src / dst) - 0.5).clamp(min=0.0)
    lo = pos.floor().long().clamp(max=src - 1)
    hi = (lo + 1).clamp(max=src - 1)
    frac = pos - lo
    weights = torch.zeros(dst, src, dtype=torch.float64)
    rows = torch.arange(dst)
    weights.index_put_((rows, lo), 1.0 - frac, accumulate=True)
    weights.index_put_((rows, hi), frac, accumulate=True)
    return weights.float().to(device)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``[B, h, w]`` maps to ``size`` (align_corners=False).

    Bilinear resampling is separable, so it is done as ``Wy @ S @ Wx^T``: for the large
    factors of CAMs (a 4 x 4 map to a 512 x 512 image) that is 2.5-4x faster on a CPU
    than ``F.interpolate``, and equal to it within 1e-6.
    """
    h, w = maps.shape[-2:]
    device = str(maps.device)
    wy = _linear_weights(h, int(size[0]), device)
    wx = _linear_weights(w, int(size[1]), device)
    return wy @ maps.float() @ wx.T


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
                 features: torch.Tensor | None = None) -> torch.Tensor:
        """Maps ``[B, H, W]`` in [0, 1] at the input size of ``x``.

        ``features`` may be passed when ``A = member.features(x)`` is already at hand, so
        that the backbone runs once for both MC Dropout and the map.
        """
        if features is None:
            with torch.no_grad():
                features = self.member.features(x)
        index = torch.as_tensor(class_index, device=features.device, dtype=torch.long)
        index = index.expand(features.shape[0]) if index.ndim == 0 else index
        with torch.no_grad():
            maps = upsample(self.raw(features.detach(), index), tuple(x.shape[-2:]))
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
              features: torch.Tensor | None = None, closed_form: bool = True) -> torch.Tensor:
    """XGrad-CAM of ``member`` for ``class_index``: ``[B, H, W]`` in [0, 1] at the input size.

    Args:
        member: an ensemble member (eval mode: batch-norm statistics are not updated).
        x: normalised input batch ``[B, 3, H, W]``.
        class_index: one class for the batch, or ``[B]`` classes.
        features: ``member.features(x)`` if already computed.
        closed_form: closed-form head gradient (exact for GAP+Linear) instead of autograd.
    """
    return XGradCAM(member, closed_form=closed_form)(x, class_index, features)
