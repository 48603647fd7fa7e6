"""Device selection: CUDA when present, CPU otherwise, or what the user names."""

from __future__ import annotations

import torch


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """The device to run on: ``name`` if given, else CUDA when available, else CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_channels_last(device: torch.device | str) -> bool:
    """Whether members run in channels-last memory format when nobody says.

    On a CPU, yes: oneDNN's convolutions are 25-35 % faster on channels-last tensors for
    all three members (2 cores, 128 and 224 px; docs/performance.md). On CUDA, no until
    measured there (``--channels-last`` turns it on).
    """
    return torch.device(device).type == "cpu"
