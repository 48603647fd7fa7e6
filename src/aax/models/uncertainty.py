"""Monte Carlo Dropout on the head only (paper 3.2).

Dropout sits after the global pool, so K stochastic passes of the head on the pooled
features are exactly K stochastic passes of the whole network, at a fraction of the cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from aax.models.members.head import MCHead


class MCSummary(NamedTuple):
    """Per-image summary of K stochastic passes of one member."""

    probs: torch.Tensor  # [B, C] mean class probabilities p_i
    uncertainty: torch.Tensor  # [B] std over passes of the predicted class's probability u_i
    predicted: torch.Tensor  # [B] argmax of probs


def dropout_masks(seeds: Sequence[int], passes: int, features: int, p: float,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Inverted-dropout masks ``[K, B, F]`` (0 or ``1/(1-p)``), one seeded stream per image.

    Seeding per image (not per batch) makes an image's uncertainty the same whatever
    batch it lands in, so a resumed or re-ordered run reproduces its numbers. The streams
    are NumPy's PCG64: seeding one and drawing ``K * F`` floats costs about a quarter of
    what a seeded ``torch.Generator`` does, and this runs once per image and member.
    """
    keep = 1.0 - p
    uniform = np.empty((len(seeds), passes, features), dtype=np.float32)
    for b, seed in enumerate(seeds):
        np.random.default_rng(int(seed) % 2**64).random(dtype=np.float32, out=uniform[b])
    # compare before moving: a GPU then receives one byte per draw, not four
    kept = torch.from_numpy(uniform < keep).to(device, non_blocking=True).transpose(0, 1).float()
    return kept.div_(keep) if keep > 0 else kept


def mc_probabilities(head: MCHead, pooled: torch.Tensor, passes: int,
                     seeds: Sequence[int] | None = None) -> torch.Tensor:
    """Softmax outputs of ``passes`` stochastic head passes: ``[K, B, C]``.

    All passes run as one batched matrix product (each row draws its own dropout mask).
    With ``seeds`` (one per image), the masks come from :func:`dropout_masks`, so the
    result is reproducible; without, from torch's global generator.
    """
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    b, f = pooled.shape
    stacked = pooled.unsqueeze(0).expand(passes, b, f)
    if seeds is not None:
        if len(seeds) != b:
            raise ValueError(f"need one seed per image: {len(seeds)} seeds for {b} images")
        masked = stacked * dropout_masks(seeds, passes, f, head.p, pooled.device)
        logits = head.classify(masked.reshape(passes * b, f), stochastic=False)
    else:
        logits = head.classify(stacked.reshape(passes * b, f), stochastic=True)
    return logits.softmax(dim=-1).view(passes, b, -1)


def summarize(mc_probs: torch.Tensor) -> MCSummary:
    """Mean probabilities, uncertainty and prediction from ``[K, B, C]`` MC outputs.

    ``u`` is the population standard deviation (over the K passes) of the probability
    of the class the member predicts; with two classes both columns give the same value.
    """
    probs = mc_probs.mean(dim=0)
    predicted = probs.argmax(dim=-1)
    index = predicted.view(1, -1, 1).expand(mc_probs.shape[0], -1, 1)
    picked = mc_probs.gather(2, index).squeeze(2)  # [K, B]
    uncertainty = picked.std(dim=0, correction=0)
    return MCSummary(probs=probs, uncertainty=uncertainty, predicted=predicted)


def variance_penalty(mc_probs: torch.Tensor) -> torch.Tensor:
    """The training term ``Var``: variance of the softmax over passes, averaged over
    batch and classes (paper 3.1, ``L = CE + lambda * Var``)."""
    return mc_probs.var(dim=0, correction=0).mean()
