"""Maps registered on the image: each member's cell centres (Member.grid_origin) and
resizing a map on its grid (aax.models.explain.Grid, upsample)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from aax.annotation.annotate import _maps_and_masks
from aax.annotation.decide import Decision
from aax.models.explain import Grid, upsample
from aax.models.maps import MapOptions, member_grid
from aax.models.members import MEMBERS, build_member

from _members import Gain, without_relu6

NAMES = sorted(MEMBERS)


def _probe_member(name: str, stride: int) -> nn.Module:
    """``name`` at ``stride`` with every kernel flat (1 / fan-in), no squeeze-excitation
    (a per-channel gain that pools the whole image) and a linear gain for ReLU6: a cell's gradient
    on the input is then spread evenly around the centre of its receptive field."""
    member = build_member(name, 2, output_stride=stride).eval()
    for module in member.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.constant_(module.weight, 1.0 / module.weight[0].numel())
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        if hasattr(module, "has_se"):
            module.has_se = False
    # The Lite members' ReLU6 passes these positive activations at gain 1, so every residual
    # branch counts fully and the effective receptive field spreads to the image's edges,
    # which pull its centre; a small linear gain keeps it inside. The padding, and so the
    # grid, is unchanged.
    return without_relu6(member, Gain)


@pytest.mark.parametrize("stride", [32, 16, 8])
@pytest.mark.parametrize("name", NAMES)
def test_grid_origin_is_where_each_cell_looks(name: str, stride: int) -> None:
    size = 256
    member = _probe_member(name, stride)
    origin = member.grid_origin(stride)
    k = round((size / 2 - 0.5 - origin) / stride)  # the cell nearest the image centre
    torch.manual_seed(0)
    x = (0.5 + torch.rand(1, 3, size, size)).requires_grad_(True)
    a = member.features(x)
    assert a.shape[-1] == size // stride
    (grad,) = torch.autograd.grad(a[0, :, k, k].sum(), x)
    weight = grad.abs().sum(dim=(0, 1)).double()
    pos = torch.arange(size, dtype=torch.float64)
    centre_y = float((weight.sum(1) * pos).sum() / weight.sum())
    centre_x = float((weight.sum(0) * pos).sum() / weight.sum())
    expected = origin + stride * k
    # the centred grid that a plain resize assumes is off by 1.5 px (DenseNet-121) to
    # half a cell (ResNet-50, EfficientNet-B0): 1 px tells them apart
    assert abs(centre_y - expected) < 1.0 and abs(centre_x - expected) < 1.0, (centre_y, centre_x, expected)


def test_upsample_without_a_grid_is_interpolate() -> None:
    maps = torch.rand(2, 3, 5)
    got = upsample(maps, (12, 17))
    want = F.interpolate(maps[:, None], size=(12, 17), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    square = torch.rand(2, 5, 5)
    centred = Grid(4.0, (1.5, 1.5), (20, 20))  # the grid align_corners=False assumes
    torch.testing.assert_close(upsample(square, (31, 20), centred), upsample(square, (31, 20)), atol=1e-6, rtol=0)


def test_a_cell_lands_on_its_centre() -> None:
    maps = torch.zeros(1, 4, 4)
    maps[0, 1, 2] = 1.0
    up = upsample(maps, (32, 32), Grid(8.0, (0.0, 7.0), (32, 32)))
    assert up[0, 8, 23] == pytest.approx(1.0)  # row 0 + 8 * 1, column 7 + 8 * 2
    assert up[0, 8, 19] == pytest.approx(0.5)  # half a cell away: half the value
    # at half the input's resolution a pixel covers two input pixels: (8, 23) -> (3.75, 11.25)
    half = upsample(maps, (16, 16), Grid(8.0, (0.0, 7.0), (32, 32)))
    peak = np.unravel_index(int(half[0].argmax()), (16, 16))
    assert peak == (4, 11)


def test_mirrored_grid_brings_a_flipped_map_back() -> None:
    torch.manual_seed(0)
    maps = torch.rand(1, 4, 4)
    grid = Grid(8.0, (0.0, 7.0), (32, 32))
    # the map of the mirrored input, flipped back, on the mirrored grid = the map mirrored
    back = upsample(maps.flip(-1), (32, 32), grid.mirrored(4))
    torch.testing.assert_close(back, upsample(maps, (32, 32), grid).flip(-1), atol=1e-6, rtol=0)


def test_members_maps_are_resized_on_their_own_grids() -> None:
    members = [build_member(name, 2) for name in NAMES]
    grids = [member_grid(m, MapOptions(map_stride=16), (64, 64)) for m in members]
    assert [g.origin[0] for g in grids] == [m.grid_origin(16) for m in members]
    raw = torch.zeros(1, len(members), 4, 4)
    raw[0, :, 1, 1] = 1.0
    raw[0, :, 3, 3] = 0.5  # (so min-max normalisation keeps the peak at 1)
    decision = Decision(label=0, review=False, reason="", agreeing=tuple(range(len(members))))
    _, kept = _maps_and_masks(raw, grids, [(64, 64)], [0], [decision.agreeing], [0.5], keep=True)
    for i, member in enumerate(members):
        peak = np.unravel_index(int(kept[0][i].argmax()), (64, 64))
        expected = round(member.grid_origin(16) + 16)
        assert abs(peak[0] - expected) <= 1 and abs(peak[1] - expected) <= 1, (member.name, peak, expected)
