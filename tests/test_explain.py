"""XGrad-CAM on the head vs an independent hook-based XGrad-CAM of the whole network."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aax.models.explain import GradCAM, XGradCAM, head_gradient, xgrad_cam
from aax.models.members import MEMBERS, build_member

from _members import settle_batch_norm

NAMES = sorted(MEMBERS)


def reference_xgrad_cam(model: torch.nn.Module, target_layer: torch.nn.Module,
                        x: torch.Tensor, class_index: int) -> np.ndarray:
    """XGrad-CAM as pytorch-grad-cam computes it: hooks on the target layer, one full
    forward and backward pass of the whole network, NumPy for the weighting."""
    store = {}

    def forward_hook(module, inputs, output):
        store["A"] = output.detach().cpu().numpy()
        output.register_hook(lambda grad: store.__setitem__("G", grad.detach().cpu().numpy()))

    handle = target_layer.register_forward_hook(forward_hook)
    try:
        model.zero_grad()
        logits = model(x.clone().requires_grad_(True))
        logits[:, class_index].sum().backward()
    finally:
        handle.remove()
    a, g = store["A"], store["G"]
    sum_a = a.sum(axis=(2, 3))
    weights = (g * a / (sum_a[:, :, None, None] + 1e-7)).sum(axis=(2, 3))
    cam = np.maximum((weights[:, :, None, None] * a).sum(axis=1), 0)
    cam = F.interpolate(torch.from_numpy(cam)[:, None], size=x.shape[-2:], mode="bilinear",
                        align_corners=False)[:, 0].numpy()
    cam = cam - cam.min(axis=(1, 2), keepdims=True)
    return cam / (cam.max(axis=(1, 2), keepdims=True) + 1e-7)


@pytest.fixture(scope="module")
def random_members():
    from aax.models.members.weights import IMAGENET_PACKAGES, imagenet_source, load_weights

    members = {}
    for name in NAMES:
        torch.manual_seed(0)
        member = build_member(name, num_classes=2)
        if name in IMAGENET_PACKAGES:
            # random ReLU6 networks give flat maps; these weights are installed anyway
            load_weights(member, imagenet_source(name))
            members[name] = member.eval()
        else:  # batch-norm statistics of real batches, so eval activations are sane
            members[name] = settle_batch_norm(member)
    return members


@pytest.mark.parametrize("name", NAMES)
def test_xgrad_cam_matches_hook_reference(random_members, name):
    member = random_members[name]
    x = torch.randn(3, 3, 96, 96)
    peaks = []
    for cls in (0, 1):
        ours = xgrad_cam(member, x, cls, registered=False).numpy()  # resized as the library does
        ref = reference_xgrad_cam(member, member.target_layer, x, cls)
        assert ours.shape == (3, 96, 96)
        assert ours.min() >= 0 and ours.max() <= 1
        np.testing.assert_allclose(ours, ref, atol=1e-4)
        peaks.append(ref.max())
    assert max(peaks) > 0.99  # at least one class gives a non-degenerate map to compare


@pytest.mark.parametrize("name", NAMES)
def test_closed_form_gradient_equals_autograd(random_members, name):
    member = random_members[name]
    with torch.no_grad():
        features = member.features(torch.randn(2, 3, 96, 96))
    index = torch.tensor([0, 1])
    closed = head_gradient(member.head, features, index, closed_form=True)
    auto = head_gradient(member.head, features, index, closed_form=False)
    torch.testing.assert_close(closed, auto, rtol=1e-5, atol=1e-9)
    maps_closed = XGradCAM(member, closed_form=True)(torch.zeros(2, 3, 96, 96), index, features)
    maps_auto = XGradCAM(member, closed_form=False)(torch.zeros(2, 3, 96, 96), index, features)
    torch.testing.assert_close(maps_closed, maps_auto, rtol=1e-5, atol=1e-6)


def test_cam_reuses_given_features_and_classes_differ(random_members):
    member = random_members["resnet50"]
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        features = member.features(x)
    np.testing.assert_allclose(xgrad_cam(member, x, 1, features=features), xgrad_cam(member, x, 1), atol=1e-6)
    # per-image class indices pick per-image gradients
    mixed = xgrad_cam(member, x, torch.tensor([0, 1]), features=features)
    np.testing.assert_allclose(mixed[0], xgrad_cam(member, x, 0, features=features)[0], atol=1e-6)
    np.testing.assert_allclose(mixed[1], xgrad_cam(member, x, 1, features=features)[1], atol=1e-6)
    # Grad-CAM weighs channels differently, so its map is another map
    assert not torch.allclose(GradCAM(member)(x, 1, features), mixed[1:].expand(2, -1, -1))


def test_cam_is_zero_for_inactive_features():
    member = build_member("resnet50", 2).eval()
    features = torch.zeros(1, member.feature_dim, 3, 3)
    maps = xgrad_cam(member, torch.zeros(1, 3, 96, 96), 1, features=features)
    assert torch.count_nonzero(maps) == 0


@pytest.mark.parametrize("src, dst", [((4, 4), (512, 512)), ((7, 5), (100, 130)), ((8, 8), (8, 8)),
                                      ((9, 6), (4, 3)), ((1, 3), (5, 7))])
def test_upsample_is_bilinear_interpolation(src, dst):
    from aax.models.explain import upsample

    maps = torch.rand(3, *src)
    expected = torch.nn.functional.interpolate(maps[:, None], size=dst, mode="bilinear",
                                               align_corners=False)[:, 0]
    torch.testing.assert_close(upsample(maps, dst), expected, atol=1e-6, rtol=0)


def test_registered_map_is_the_plain_map_moved_by_half_a_cell():
    """ResNet-50's cells are centred on 32 j, not on 32 j + 15.5 as a plain resize puts
    them: registered pixel q shows what the plain map shows at q + 15.5 (the mean of its
    pixels q + 15 and q + 16, away from the kinks of the bilinear interpolant). Both
    keep every cell centre inside the image, so min-max normalisation agrees."""
    torch.manual_seed(0)
    member = settle_batch_norm(build_member("resnet50", 2))
    x = torch.randn(2, 3, 96, 96)
    registered = xgrad_cam(member, x, 1).numpy()
    plain = xgrad_cam(member, x, 1, registered=False).numpy()
    assert np.abs(registered - plain).max() > 0.05  # half a cell is visible
    q = np.array([i for i in range(1, 64) if i % 32])
    moved = 0.25 * (plain[:, q + 15][:, :, q + 15] + plain[:, q + 16][:, :, q + 15]
                    + plain[:, q + 15][:, :, q + 16] + plain[:, q + 16][:, :, q + 16])
    np.testing.assert_allclose(registered[:, q][:, :, q], moved, atol=1e-5)
