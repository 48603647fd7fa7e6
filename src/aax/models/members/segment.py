"""A light segmentation head on a member's shared features, trained on reviewed masks.

Image-level labels teach a classifier *what*; a reviewed mask says *where*. The
localisation loss (:func:`aax.training.loop.localisation_loss`) asks the class activation
map to follow the mask, but that map is the last feature map: 4 x 4 cells at 128 px, and
the pooled logit must stay right. :class:`SegHead` instead reads four of the backbone's
steps (:meth:`~aax.models.members.Member.stages`: the last at output stride 4, 8, 16 and
32; DenseNet-121 has none at 4), projects each to :data:`WIDTH` channels, sums them on the
finest grid and predicts a per-cell logit: a feature pyramid (Lin et al. 2017) reduced to
its smallest form, about 56 k parameters on an EfficientNet-Lite backbone of 3.4-4.8 M.
The stride-4 step is what draws a lesion's edge: without it the heads' masks of sharp
synthetic lesions stopped at 80 IoU, with it 88 (docs/reviews.md). Trained with
the members (``aax retrain``, ``--segmentation-weight``), it shares their features, so the
backbone learns from the masks too; its maps are a map source beside XGrad-CAM
(``maps.source = "segmentation"``, :func:`segment_maps`) that the decision protocol
fuses and thresholds exactly as it does the CAMs. The class, the uncertainty and the
flags stay the members'.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:  # pragma: no cover
    from aax.models.members.backbones import Member

WIDTH = 32
"""Channels of every projected step and of the decoder."""
STRIDES: tuple[int, ...] = (4, 8, 16, 32)
"""The output strides whose last step a new head reads."""
LEGACY_STRIDES: tuple[int, ...] = (8, 16, 32)
"""What a head saved before its strides were recorded (no ``seg.strides`` key) reads."""
_PROBE = 64  # side of the blank image the steps' strides are read from


class SegHead(nn.Module):
    """``[step outputs] -> 1x1 projections, summed on the finest grid -> 3x3 -> 1x1 logit``.

    Args:
        steps: indices into ``member.stages()`` of the outputs it reads (ascending).
        channels: their channel counts.
        strides: the output stride of each step, kept with the weights (``seg.strides``), so
            that a saved head is rebuilt on the same steps.
        width: channels of the projections and of the decoder.
    """

    def __init__(self, steps: Sequence[int], channels: Sequence[int], strides: Sequence[int],
                 width: int = WIDTH) -> None:
        super().__init__()
        if not steps or not len(steps) == len(channels) == len(strides):
            raise ValueError(f"need one channel count and stride per step, got steps {list(steps)}, "
                             f"channels {list(channels)} and strides {list(strides)}")
        self.steps = tuple(int(s) for s in steps)
        self.register_buffer("strides", torch.tensor([int(s) for s in strides]))
        self.lateral = nn.ModuleList(nn.Conv2d(int(c), width, 1) for c in channels)
        self.decode = nn.Sequential(nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                    nn.Conv2d(width, 1, 1))

    def forward(self, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Logits ``[B, 1, h, w]`` on the grid of the finest of ``outputs`` (one per step)."""
        size = max((o.shape[-2:] for o in outputs), key=lambda s: s[0] * s[1])
        x = None
        for lateral, o in zip(self.lateral, outputs):
            y = lateral(o.to(lateral.weight.dtype))
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=tuple(size), mode="bilinear", align_corners=False)
            x = y if x is None else x + y
        return self.decode(x)


@torch.no_grad()
def build_seg_head(member: Member, width: int = WIDTH, strides: Sequence[int] | None = None) -> SegHead:
    """A fresh :class:`SegHead` for ``member`` reading its last step at each of ``strides``
    (default :data:`STRIDES`) that it has: the steps and their channels are read off one
    pass of a blank image at output stride 32 (the member's mode and stride are restored)."""
    wanted = tuple(STRIDES if strides is None else strides)
    was_training, was_stride = member.training, member.output_stride
    member.eval()
    member.set_output_stride(32)
    try:
        x = torch.zeros(1, 3, _PROBE, _PROBE, device=next(member.parameters()).device)
        found: dict[int, tuple[int, int]] = {}  # stride -> (last step at it, its channels)
        for i, step in enumerate(member.stages()):
            x = step(x)
            stride = _PROBE // int(x.shape[-1])
            if stride in wanted:
                found[stride] = (i, int(x.shape[1]))
    finally:
        member.set_output_stride(was_stride)
        member.train(was_training)
    if not found:
        raise ValueError(f"{member.name}: no step at output stride {wanted} to segment from")
    order = sorted(found)
    return SegHead([found[s][0] for s in order], [found[s][1] for s in order], order, width)


def has_seg_head(state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether a member's state dict holds a segmentation head (keys ``seg.*``)."""
    return any(k.startswith("seg.") for k in state_dict)


def saved_strides(state_dict: dict[str, torch.Tensor]) -> tuple[int, ...] | None:
    """The strides the head in ``state_dict`` reads (None: it holds no head); a head saved
    before they were recorded reads :data:`LEGACY_STRIDES`."""
    if not has_seg_head(state_dict):
        return None
    found = state_dict.get("seg.strides")
    return LEGACY_STRIDES if found is None else tuple(int(s) for s in found.tolist())


def fit_head_to(member: Member, state_dict: dict[str, torch.Tensor],
                replace: bool = True) -> dict[str, torch.Tensor]:
    """Give ``member`` a head laid out as the one in ``state_dict`` and return ``state_dict``
    ready to load: a head saved before its strides were recorded gets them. A state dict
    without a head is returned as it is.

    A head the member already has, of another layout, is replaced; with ``replace=False``
    it stays, and the saved head is left out of the returned state dict (a warm start into
    a run whose heads are of today's layout starts them afresh).
    """
    strides = saved_strides(state_dict)
    if strides is None:
        return state_dict
    if member.seg is not None and tuple(member.seg.strides.tolist()) != strides:
        if not replace:
            return {k: v for k, v in state_dict.items() if not k.startswith("seg.")}
        member.seg = None
    member.add_segmentation(strides)
    if "seg.strides" not in state_dict:
        state_dict = {**state_dict, "seg.strides": torch.tensor(strides)}
    return state_dict


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice (MONAI's ``DiceLoss``, per image) between
    ``logits`` (``[B, 1, h, w]``, brought to the masks' size) and ``masks`` (``[B, 1, H, W]``
    in [0, 1]). The Dice term keeps a small lesion from being drowned by its background."""
    from monai.losses import DiceLoss

    logits = F.interpolate(logits.float(), size=tuple(masks.shape[-2:]), mode="bilinear", align_corners=False)
    masks = masks.float()
    dice = DiceLoss(sigmoid=True, smooth_nr=1.0, smooth_dr=1.0)(logits, masks)
    return F.binary_cross_entropy_with_logits(logits, masks) + dice


def _head(member: Member) -> SegHead:
    seg = getattr(member, "seg", None)
    if seg is None:
        raise ValueError(f"{member.name} has no segmentation head: the 'segmentation' map source needs a run "
                         "retrained on at least 10 reviewed masks with a --segmentation-weight above 0")
    return seg


def features_and_segments(member: Member, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` (as ``member.features(x)``) and :func:`segment_maps`, from one backbone pass."""
    seg = _head(member)
    a, outputs = member.features_and_steps(x, seg.steps)
    return a, torch.sigmoid(seg(outputs).float())[:, 0]


def segment_maps(member: Member, x: torch.Tensor) -> torch.Tensor:
    """The member's segmentation probabilities ``[B, h, w]`` for a normalised batch ``x``
    (at the member's current output stride; only the steps the head reads run).

    Raises:
        ValueError: the member has no segmentation head.
    """
    seg = _head(member)
    _, outputs = member.features_and_steps(x, seg.steps, stop=max(seg.steps) + 1)
    return torch.sigmoid(seg(outputs).float())[:, 0]
