"""Finer maps: dilated output stride, CAM test-time augmentation, fusion on the device."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from aax.annotation.decide import fuse
from aax.models.explain import XGradCAM
from aax.models.maps import MapOptions, fuse_maps, member_maps
from aax.models.members import MEMBERS, build_member
from aax.models.members.backbones import output_stride

from _members import without_relu6

NAMES = sorted(MEMBERS)


def _member(name: str, seed: int = 0):
    torch.manual_seed(seed)
    # ReLU6 (the Lite members') taken out: with random weights it caps every activation
    # and flattens the maps; where a map's cells look depends on the convolutions alone
    return without_relu6(build_member(name, 2), torch.nn.Identity).eval()


@pytest.mark.parametrize("name", NAMES)
def test_stride_changes_the_grid_and_32_restores_the_member_exactly(name: str) -> None:
    member = _member(name)
    keys = list(member.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a32 = member.features(x)
        shapes = {}
        for stride in (16, 8):
            member.set_output_stride(stride)
            shapes[stride] = tuple(member.features(x).shape[-2:])
        member.set_output_stride(32)
        again = member.features(x)
    assert tuple(a32.shape[-2:]) == (2, 2) and shapes == {16: (4, 4), 8: (8, 8)}
    assert torch.equal(a32, again)  # option off: the stride-32 member is untouched
    assert list(member.state_dict()) == keys  # no parameter or buffer added or renamed


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("stride", [16, 8])
def test_dilated_map_moves_by_one_cell_when_the_input_moves_by_one_stride(name: str, stride: int) -> None:
    member = _member(name).set_output_stride(stride)
    blank = torch.zeros(1, 3, 128, 128)

    def peak(row: int) -> tuple[int, int]:
        x = blank.clone()
        x[..., row:row + 12, 40:52] = 3.0
        with torch.no_grad():
            energy = (member.features(x) - member.features(blank)).abs().sum(1)[0]
        return divmod(int(energy.argmax()), energy.shape[1])

    first, moved, twice = peak(40), peak(40 + stride), peak(40 + 2 * stride)
    assert moved == (first[0] + 1, first[1])
    assert twice == (first[0] + 2, first[1])


def test_converted_resnet_keeps_the_stride_32_values_on_its_coarse_grid() -> None:
    # DeepLab's conversion is exact for ResNet: every other cell of the stride-16 map
    # (every fourth at stride 8) is the stride-32 map, so trained weights carry over.
    member = _member("resnet50")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a32 = member.features(x)
        a16 = member.set_output_stride(16).features(x)
        a8 = member.set_output_stride(8).features(x)
    scale = a32.abs().max()
    assert (a16[..., ::2, ::2] - a32).abs().max() <= 1e-5 * scale
    assert (a8[..., ::4, ::4] - a32).abs().max() <= 1e-5 * scale


def test_build_member_at_a_stride_and_bad_strides() -> None:
    assert build_member("resnet50", 2, output_stride=16).output_stride == 16
    with pytest.raises(ValueError, match="output stride"):
        build_member("resnet50", 2, output_stride=4)
    with pytest.raises(ValueError, match="map_stride"):
        MapOptions(map_stride=12)
    with pytest.raises(ValueError, match="fusion"):
        MapOptions(fusion="max")
    with pytest.raises(ValueError, match="tta_scales"):
        MapOptions(tta_scales=())


def test_output_stride_context_restores() -> None:
    member = _member("densenet121")
    with output_stride(member, 8):
        assert member.output_stride == 8
    assert member.output_stride == 32


def test_map_options_from_a_manifest_without_maps_is_today() -> None:
    assert MapOptions.from_dict(None) == MapOptions()
    assert MapOptions.from_dict(None, train_stride=16) == MapOptions(class_stride=16, map_stride=16)
    opts = MapOptions(map_stride=16, tta_scales=(1, 1.5), tta_flip=True, fusion="vote")
    assert MapOptions.from_dict(opts.to_dict()) == opts
    assert opts.views == ((1.0, False), (1.0, True), (1.5, False), (1.5, True))


def test_plain_options_give_plain_xgradcam() -> None:
    member = _member("efficientnet-b0")
    x = torch.randn(2, 3, 64, 64)
    cls = torch.tensor([1, 0])
    with torch.no_grad():
        a = member.features(x)
        got = member_maps(member, x, a, cls, MapOptions())
        want = XGradCAM(member).raw(a, cls)
    assert torch.equal(got, want)


def test_dilated_map_pass_leaves_the_member_at_its_class_stride() -> None:
    member = _member("resnet50")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = member.features(x)
        maps = member_maps(member, x, a, torch.tensor([1]), MapOptions(map_stride=8))
    assert maps.shape[-2:] == (8, 8) and member.output_stride == 32


def test_flip_tta_makes_the_map_mirror_with_the_image() -> None:
    member = _member("densenet121")
    x = torch.randn(1, 3, 64, 64)
    opts = MapOptions(tta_flip=True, tta_scales=(1.0, 1.5))
    cls = torch.tensor([1])
    with torch.no_grad():
        m = member_maps(member, x, member.features(x), cls, opts)
        xf = x.flip(-1)
        mf = member_maps(member, xf, member.features(xf), cls, opts)
    assert m.shape[-2:] == (64, 64)  # several views: averaged at the input size
    assert torch.allclose(mf, m.flip(-1), atol=1e-5)
    assert not torch.allclose(m, m.flip(-1), atol=1e-3)  # and the test is not vacuous


@pytest.mark.parametrize("fusion", ["min", "mean", "vote"])
@pytest.mark.parametrize("m", [2, 3])
def test_device_fusion_matches_the_numpy_reference(fusion: str, m: int) -> None:
    rng = np.random.default_rng(m)
    maps = rng.random((m, 9, 7)).astype(np.float32)
    got = fuse_maps(torch.from_numpy(maps), fusion, votes=2).numpy()
    np.testing.assert_allclose(got, fuse(maps, fusion, votes=2), rtol=1e-6)


def test_annotate_with_a_finer_map_keeps_the_class_decision(ensemble, lesion_dir) -> None:
    from aax.annotation.annotate import AnnotateSettings, annotate_batch
    from aax.data import find_images, read_image
    from aax.data.transforms import prepare

    paths = find_images(lesion_dir / "images" / "diseased")[:4]
    mean, std = ensemble.normalisation
    x = torch.stack([prepare(read_image(p, keep_grey=True), ensemble.image_size, mean, std) for p in paths])
    sizes = [(64, 64)] * len(paths)
    seeds = list(range(len(paths)))
    base = AnnotateSettings.from_ensemble(ensemble)
    assert base.maps == ensemble.maps
    plain = dataclasses.replace(base, maps=MapOptions(class_stride=32, map_stride=32))
    fine = dataclasses.replace(base, maps=MapOptions(class_stride=32, map_stride=16, fusion="mean"))
    a = annotate_batch(ensemble, x, sizes, plain, keep_saliency=True, seeds=seeds)
    b = annotate_batch(ensemble, x, sizes, fine, keep_saliency=True, seeds=seeds)
    for ra, rb in zip(a, b):
        assert [m.probs for m in ra.members] == [m.probs for m in rb.members]
        assert ra.decision == rb.decision
    assert any(not np.allclose(ra.saliency[n], rb.saliency[n]) for ra, rb in zip(a, b) for n in ensemble.members)
    assert all(m.output_stride == 32 for m in ensemble.members.values())
    # the settings (and so a store's fingerprint) carry the map options
    assert dataclasses.asdict(fine)["maps"]["map_stride"] == 16


@pytest.mark.parametrize("name", NAMES)
def test_a_second_pass_can_start_where_the_strides_part(name: str) -> None:
    member = _member(name)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(member.features(x), member.features(member.features(x, 0, 2), 2))
        for coarse, fine in ((32, 16), (32, 8), (16, 8)):
            member.set_output_stride(coarse)
            k = member.shared_stages(coarse, fine)
            h = member.features(x, 0, k)
            member.set_output_stride(fine)
            assert torch.equal(member.features(h, k), member.features(x)), (coarse, fine)
        member.set_output_stride(32)


def test_map_pass_from_the_shared_steps_equals_a_full_pass() -> None:
    from aax.models.maps import class_features

    member = _member("densenet121")
    x = torch.randn(2, 3, 64, 64)
    cls = torch.tensor([1, 0])
    opts = MapOptions(class_stride=32, map_stride=16)
    shared: dict = {}
    with torch.no_grad():
        a = class_features(member, x, opts, shared)
        assert torch.equal(a, member.features(x)) and id(member) in shared
        fast = member_maps(member, x, a, cls, opts, shared=shared[id(member)])
        full = member_maps(member, x, a, cls, opts)
    assert fast.shape[-2:] == (4, 4) and torch.equal(fast, full)


def test_mask_members_narrow_the_maps_a_mask_fuses() -> None:
    from aax.annotation.annotate import _maps_and_masks
    from aax.annotation.decide import Decision
    from aax.models.explain import Grid

    raw = torch.zeros(1, 3, 4, 4)
    raw[0, :2, 1, 1] = 1.0  # members 0 and 1 point at (1, 1), member 2 at (3, 3)
    raw[0, 2, 3, 3] = 1.0
    grids = [Grid.pixels((4, 4))] * 3

    def mask(agreeing, members):
        decision = Decision(label=0, review=False, reason="", agreeing=agreeing)
        masks, _ = _maps_and_masks(raw, grids, [(4, 4)], [0], [decision.agreeing], [0.5], keep=False,
                                   fusion="min", mask_members=members)
        return {tuple(int(v) for v in p) for p in np.argwhere(masks[0])}

    assert mask((0, 1, 2), None) == set()  # the intersection of all three is empty
    assert mask((0, 1, 2), [0, 1]) == {(1, 1)}
    assert mask((0, 1, 2), [2]) == {(3, 3)}
    assert mask((0, 1), [2]) == {(1, 1)}  # none of the agreeing members is a mask member: all of them


def test_probability_maps_keep_their_scale_and_saliency_maps_are_stretched() -> None:
    """A segmentation head that is nowhere above 0.3 says "no finding"; min-max scaling,
    right for saliency maps, would turn its highest cells into a mask."""
    from aax.annotation.annotate import _maps_and_masks
    from aax.annotation.decide import Decision
    from aax.models.explain import Grid

    raw = torch.full((1, 2, 4, 4), 0.1)
    raw[0, :, 1, 1] = 0.3
    grids = [Grid.pixels((4, 4))] * 2
    decision = Decision(label=0, review=False, reason="", agreeing=(0, 1))

    def masks_and_maps(rescale):
        masks, maps = _maps_and_masks(raw, grids, [(4, 4)], [0], [decision.agreeing], [0.5], keep=True, fusion="mean",
                                      rescale=rescale)
        return masks[0], maps[0]

    mask, maps = masks_and_maps(rescale=False)
    assert not mask.any() and np.allclose(maps, raw[0].numpy())
    mask, maps = masks_and_maps(rescale=True)
    assert {tuple(int(v) for v in q) for q in np.argwhere(mask)} == {(1, 1)} and maps.max() == pytest.approx(1.0)


def test_mask_members_round_trip_and_are_checked() -> None:
    from types import SimpleNamespace

    from aax.annotation.annotate import AnnotateSettings

    options = MapOptions(mask_members=["resnet50", "densenet121"])
    assert options.mask_members == ("resnet50", "densenet121")
    assert MapOptions.from_dict(options.to_dict()) == options
    assert "mask_members" not in MapOptions().to_dict()  # all members: as runs made before the option
    with pytest.raises(ValueError, match="distinct"):
        MapOptions(mask_members=["resnet50", "resnet50"])
    fake = SimpleNamespace(run="RUN", tau=0.5, theta=0.1, mc_passes=4, quorum=2, novelty=None,
                           members={"resnet50": None, "densenet121": None},
                           maps=MapOptions(mask_members=["resnet50", "vgg16"]))
    with pytest.raises(ValueError, match=r"RUN: maps.mask_members names \['vgg16'\]"):
        AnnotateSettings.from_ensemble(fake)
