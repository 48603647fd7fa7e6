"""The members' segmentation heads: which steps they read, their loss, their maps."""

from __future__ import annotations

import pytest
import torch

from aax.models.members import MEMBERS, build_member
from aax.models.members.segment import (
    LEGACY_STRIDES,
    STRIDES,
    fit_head_to,
    has_seg_head,
    saved_strides,
    segment_maps,
    segmentation_loss,
)


@pytest.mark.parametrize("name", sorted(MEMBERS))
def test_every_member_segments_at_its_finest_stride_and_its_head_survives_a_round_trip(name):
    member = build_member(name, 2).eval()
    seg = member.add_segmentation()
    assert member.add_segmentation() is seg  # one head, however often asked
    finest = 8 if name == "densenet121" else 4  # DenseNet-121 has no step ending at stride 4
    assert seg.strides.tolist() == [s for s in STRIDES if s >= finest]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = segment_maps(member, x)
    assert maps.shape == (2, 64 // finest, 64 // finest) and float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0
    state = member.state_dict()
    assert has_seg_head(state) and not has_seg_head(build_member(name, 2).state_dict())
    assert saved_strides(state) == tuple(seg.strides.tolist())
    again = build_member(name, 2)
    again.load_state_dict(fit_head_to(again, state), strict=True)
    with torch.no_grad():
        assert torch.allclose(segment_maps(again.eval(), x), maps)


def test_a_head_saved_before_its_strides_were_recorded_loads_on_the_steps_it_was_trained_on():
    member = build_member("efficientnet-lite0", 2).eval()
    member.add_segmentation(LEGACY_STRIDES)
    state = {k: v for k, v in member.state_dict().items() if k != "seg.strides"}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = segment_maps(member, x)
    assert maps.shape == (2, 8, 8)
    again = build_member("efficientnet-lite0", 2)
    again.add_segmentation()  # a head of today's layout is replaced by the saved one's
    again.load_state_dict(fit_head_to(again, state), strict=True)
    assert saved_strides(state) == LEGACY_STRIDES and again.seg.strides.tolist() == list(LEGACY_STRIDES)
    with torch.no_grad():
        assert torch.equal(segment_maps(again.eval(), x), maps)
    plain = build_member("efficientnet-lite0", 2).state_dict()
    assert fit_head_to(build_member("efficientnet-lite0", 2), plain) is plain


def test_segmentation_loss_rewards_the_mask_and_penalises_its_inverse():
    masks = torch.zeros(2, 1, 32, 32)
    masks[0, :, 8:24, 8:24] = 1.0  # a square; the second image has no finding
    right = torch.where(torch.nn.functional.avg_pool2d(masks, 4) > 0.5, 8.0, -8.0)  # [2, 1, 8, 8] logits
    good, bad = segmentation_loss(right, masks).item(), segmentation_loss(-right, masks).item()
    assert good < 0.3 < 2.0 < bad  # (the bilinear resize blurs the right edges a little)


def test_the_segmentation_source_needs_a_head():
    member = build_member("efficientnet-lite0", 2).eval()
    with pytest.raises(ValueError, match="no segmentation head"):
        segment_maps(member, torch.zeros(1, 3, 64, 64))


def test_an_aax_checkpoint_with_a_head_loads_as_backbone_weights():
    from aax.models.members.weights import load_weights

    source = build_member("efficientnet-lite0", 2)
    source.add_segmentation()
    target = build_member("efficientnet-lite0", 3)
    report = load_weights(target, source.state_dict())
    assert not report.backbone_problems and any(k.startswith("seg.") for k in report.skipped)
    assert torch.equal(target.net._conv_stem.weight, source.net._conv_stem.weight)


def test_members_get_heads_only_from_ten_reviewed_masks_and_a_weight():
    from types import SimpleNamespace

    from aax.training.train import MIN_SEGMENTATION_MASKS, TrainConfig

    config = TrainConfig()
    assert config.segments(SimpleNamespace(n_masks=MIN_SEGMENTATION_MASKS))
    assert not config.segments(SimpleNamespace(n_masks=MIN_SEGMENTATION_MASKS - 1))
    assert not TrainConfig(segmentation_weight=0.0).segments(SimpleNamespace(n_masks=500))
    with pytest.raises(ValueError, match="segmentation_weight"):
        TrainConfig(segmentation_weight=-1.0).validate()
    with pytest.raises(ValueError, match="segmentation_views"):
        TrainConfig(segmentation_views=-1).validate()


def test_the_class_pass_gives_the_same_segmentation_maps_as_a_pass_of_their_own():
    from aax.models.members.segment import features_and_segments

    member = build_member("efficientnet-lite0", 2).eval()
    member.add_segmentation()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, maps = features_and_segments(member, x)
        assert torch.allclose(a, member.features(x)) and torch.allclose(maps, segment_maps(member, x))


def test_the_head_refit_fits_the_masks_and_leaves_the_rest_of_the_member_alone():
    from aax.models.members.weights import imagenet_source, load_weights
    from aax.training.seg_refit import RefitSettings, refit_seg_head
    from aax.training.tensors import Cached

    torch.manual_seed(0)
    member = build_member("efficientnet-lite0", 2)
    load_weights(member, imagenet_source("efficientnet-lite0"))  # features that see the squares
    member.add_segmentation()
    n = 12
    images = torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8)
    masks = torch.zeros(n, 1, 64, 64, dtype=torch.uint8)
    for i in range(n):  # a bright square where the mask is, a different place on each image
        r, c = 8 + 4 * (i % 6), 8 + 3 * (i % 5)
        images[i, :, r:r + 20, c:c + 20] = 255
        masks[i, :, r:r + 20, c:c + 20] = 255
    has = torch.ones(n, dtype=torch.bool)
    has[-2:] = False  # two images without a reviewed mask are left out
    data = Cached(images=images, labels=torch.ones(n, dtype=torch.long), indices=list(range(n)),
                  masks=masks, has_mask=has)
    others = {k: v.clone() for k, v in member.state_dict().items() if not k.startswith("seg.")}
    member.train()
    report = refit_seg_head(member, data, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), RefitSettings(epochs=60))
    assert report["masks"] == 10 and report["epochs"] == 60 and report["views"] == 2 + 14
    assert report["loss_last"] < 0.3 * report["loss_first"]
    assert member.training  # its mode is given back
    assert all(torch.equal(v, member.state_dict()[k]) for k, v in others.items())  # BN statistics included
    with pytest.raises(ValueError, match="no reviewed mask"):
        refit_seg_head(member, Cached(images=images, labels=data.labels, indices=data.indices), (0.5,) * 3,
                       (0.25,) * 3, RefitSettings(epochs=1))
    with pytest.raises(ValueError, match="no segmentation head"):
        refit_seg_head(build_member("efficientnet-lite0", 2), data, (0.5,) * 3, (0.25,) * 3, RefitSettings())


def test_the_refit_draws_fewer_views_when_there_are_many_masks(monkeypatch):
    from aax.training import seg_refit
    from aax.training.tensors import Cached

    member = build_member("efficientnet-lite0", 2)
    member.add_segmentation()
    n = 6
    data = Cached(images=torch.randint(0, 256, (n, 3, 128, 128), dtype=torch.uint8),
                  labels=torch.ones(n, dtype=torch.long), indices=list(range(n)),
                  masks=torch.zeros(n, 1, 128, 128, dtype=torch.uint8), has_mask=torch.ones(n, dtype=torch.bool))
    args = (member, data, (0.5,) * 3, (0.25,) * 3)
    assert seg_refit.refit_seg_head(*args, seg_refit.RefitSettings(epochs=0, views=3))["views"] == 2 + 3
    assert seg_refit.refit_seg_head(*args, seg_refit.RefitSettings(epochs=0, views=3, mirror=False))["views"] == 1 + 3
    with torch.no_grad():  # what one view of the six images caches: the head's step outputs and the masks
        steps = member.eval().features_and_steps(torch.zeros(n, 3, 128, 128), member.seg.steps)[1]
    view = sum(t.numel() * 4 for t in steps) + n * 128 * 128 * 4
    monkeypatch.setattr(seg_refit, "MAX_CACHE_BYTES", 4 * view)  # room for the image, its mirror and two more
    assert seg_refit.refit_seg_head(*args, seg_refit.RefitSettings(epochs=0, views=3))["views"] == 4
    monkeypatch.setattr(seg_refit, "MAX_CACHE_BYTES", 1)
    assert seg_refit.refit_seg_head(*args, seg_refit.RefitSettings(epochs=0, views=3))["views"] == 2
    small = Cached(images=data.images[:, :, :64, :64], labels=data.labels, indices=data.indices,
                   masks=data.masks[:, :, :64, :64], has_mask=data.has_mask)
    monkeypatch.setattr(seg_refit, "MAX_CACHE_BYTES", view)  # a quarter of the pixels: four views fit
    assert seg_refit.refit_seg_head(member, small, *args[2:], seg_refit.RefitSettings(epochs=0, views=3))["views"] == 4


def test_segmentation_maps_are_registered_as_the_loss_registers_the_masks():
    """A head learns its map against masks resized with align_corners=False; its cells
    must be read back on that grid, not on the receptive fields' (half a cell away)."""
    import torch.nn.functional as F

    from aax.models.explain import Grid, upsample
    from aax.models.maps import MapOptions, saliency_maps

    torch.manual_seed(0)
    cells = torch.rand(2, 8, 8)
    size = (97, 131)  # the image's own size, as masks are made
    want = F.interpolate(cells[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    got = upsample(cells, size, Grid.centred((64, 64), (8, 8)))
    assert torch.allclose(got, want, atol=1e-5)
    member = build_member("efficientnet-lite0", 2).eval()
    member.add_segmentation()
    shifted = upsample(cells, size, Grid.of(member, (64, 64), 8))
    assert not torch.allclose(shifted, want, atol=1e-2)  # the receptive fields' grid is elsewhere

    from types import SimpleNamespace

    ensemble = SimpleNamespace(members={"efficientnet-lite0": member})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        raw, grids = saliency_maps(ensemble, x, [None], torch.ones(2, dtype=torch.long),
                                   MapOptions(source="segmentation"))
    assert grids[0] == Grid.centred((64, 64), raw.shape[-2:])


def test_a_warm_start_keeps_a_head_of_the_same_layout_and_starts_one_of_another_afresh(tmp_path):
    from aax.training.train import _warm_start

    old = build_member("efficientnet-lite0", 2)
    old.add_segmentation(LEGACY_STRIDES)
    state = {k: v for k, v in old.state_dict().items() if k != "seg.strides"}  # saved before strides were kept
    torch.save({"state_dict": state, "classes": ["healthy", "lesion"]}, tmp_path / "efficientnet-lite0.pt")

    plain = build_member("efficientnet-lite0", 2)  # a run without heads takes the old head as it was
    assert _warm_start(plain, "efficientnet-lite0", str(tmp_path), ["healthy", "lesion"]) == "warm start"
    assert plain.seg.strides.tolist() == list(LEGACY_STRIDES)
    assert torch.equal(plain.seg.lateral[0].weight, old.seg.lateral[0].weight)

    segmenting = build_member("efficientnet-lite0", 2)
    fresh = segmenting.add_segmentation()  # today's layout: the old head cannot fit, so it starts afresh
    _warm_start(segmenting, "efficientnet-lite0", str(tmp_path), ["healthy", "lesion"])
    assert segmenting.seg is fresh and fresh.strides.tolist() == list(STRIDES)
    assert torch.equal(segmenting.head.fc.weight, old.head.fc.weight)  # the rest is the old member's
