"""MC Dropout on the head: statistics against direct computations."""

from __future__ import annotations

import pytest
import torch

from aax.models.members.head import MCHead
from aax.models.uncertainty import dropout_masks, mc_probabilities, summarize, variance_penalty


@torch.no_grad()
def test_summary_matches_a_loop_over_passes():
    torch.manual_seed(0)
    head = MCHead(16, 3, dropout=0.5)
    pooled = torch.randn(4, 16).abs()
    mc = mc_probabilities(head, pooled, passes=50, seeds=[1, 2, 3, 4])
    assert mc.shape == (50, 4, 3)
    masks = dropout_masks([1, 2, 3, 4], 50, 16, 0.5)
    loop = torch.stack([torch.softmax(head.fc(pooled * masks[k]), -1) for k in range(50)])
    torch.testing.assert_close(mc, loop)
    s = summarize(mc)
    torch.testing.assert_close(s.probs, loop.mean(0))
    for b in range(4):
        c = int(loop.mean(0)[b].argmax())
        assert int(s.predicted[b]) == c
        direct = torch.tensor([float(loop[k, b, c]) for k in range(50)]).std(correction=0).item()
        assert float(s.uncertainty[b]) == pytest.approx(direct, rel=1e-5)
    assert variance_penalty(mc).item() == pytest.approx(loop.var(0, correction=0).mean().item(), rel=1e-5)


def test_masks_are_per_image_and_reproducible():
    a = dropout_masks([7, 8], 5, 32, 0.2)
    b = dropout_masks([8], 5, 32, 0.2)
    torch.testing.assert_close(a[:, 1], b[:, 0])  # same seed, same masks, whatever the batch
    assert not torch.equal(a[:, 0], a[:, 1])
    assert set(torch.unique(a).tolist()) <= {0.0, 1 / 0.8}


def test_zero_dropout_has_zero_uncertainty():
    head = MCHead(8, 2, dropout=0.0)
    s = summarize(mc_probabilities(head, torch.randn(3, 8), 10))
    assert torch.all(s.uncertainty == 0)


def test_masks_drop_at_rate_p_independently_of_the_seed_form():
    masks = dropout_masks([3, -3, 2**40], 100, 200, 0.2)
    dropped = (masks == 0).float().mean(dim=(0, 2))
    assert torch.allclose(dropped, torch.full((3,), 0.2), atol=0.01)  # 20,000 draws each
    assert not torch.equal(masks[:, 0], masks[:, 1])
