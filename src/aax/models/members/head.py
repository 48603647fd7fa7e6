"""The classification head every ensemble member shares: GAP -> Dropout -> Linear.

Dropout lives only here, so Monte Carlo Dropout can re-run the head alone on the
pooled features: K stochastic passes cost K small matrix products, not K backbones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MCHead(nn.Module):
    """``A -> global average pool -> Dropout(p) -> Linear(C)``.

    Args:
        in_features: channels of the feature map ``A``.
        num_classes: number of classes ``C``.
        dropout: dropout probability ``p`` applied to the pooled features.
    """

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.2) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.p = float(dropout)
        self.fc = nn.Linear(in_features, num_classes)

    @staticmethod
    def pool(features: torch.Tensor) -> torch.Tensor:
        """Global average pool ``[B, F, h, w] -> [B, F]``."""
        return features.mean(dim=(2, 3))

    def classify(self, pooled: torch.Tensor, stochastic: bool = False) -> torch.Tensor:
        """Logits from pooled features; dropout is applied iff ``stochastic``.

        The flag is explicit (not ``self.training``) so that MC passes at inference
        never depend on, or change, the module's train/eval state.
        """
        return self.fc(F.dropout(pooled, p=self.p, training=stochastic))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classify(self.pool(features), stochastic=self.training)
