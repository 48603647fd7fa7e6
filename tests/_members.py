"""Helpers for tests that run members with random weights."""

from __future__ import annotations

import torch
from torch import nn


def settle_batch_norm(member: nn.Module, size: int = 96, passes: int = 3) -> nn.Module:
    """A few train-mode passes of random batches, then eval: running statistics off their
    initial values, so eval activations are of a sane size."""
    member.train()
    with torch.no_grad():
        for _ in range(passes):
            member(torch.randn(8, 3, size, size))
    return member.eval()


def without_relu6(member: nn.Module, replacement: type[nn.Module] = nn.ReLU) -> nn.Module:
    """``member`` with every ReLU6 (the Lite members' activation) replaced.

    With random weights and batch norm at its initial statistics, activations grow
    through the residual additions until ReLU6 caps them all at 6: every map is then
    flat. Tests of geometry (where a map's cells look) need the uncapped network."""
    for parent in list(member.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU6):
                setattr(parent, name, replacement())
    return member


class Gain(nn.Module):
    """``x -> gain * x``: a linear stand-in for an activation in tests of geometry.

    A small gain (swish's slope at 0 is 1/2) keeps the residual branches of a random
    network from dominating, so its effective receptive field stays compact, as in
    EfficientNet-B0 with its swish."""

    def __init__(self, gain: float = 0.25) -> None:
        super().__init__()
        self.gain = gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gain * x
