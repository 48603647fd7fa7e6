"""Patch-feature novelty maps: a map source beside XGrad-CAM.

A member's patch map shows where the image's mid-level features are far from every
patch of the *negative* class's training images (SPADE, Cohen & Hoshen 2020; PatchCore,
Roth et al. 2022): a finding is what healthy images do not contain. It needs no pixel
labels, only the negative images every AAX run has, and it does not depend on the
classifier having learnt *where* the finding is, which a classifier trained from scratch
on a few hundred images rarely has (docs/quality.md measures both).

Per member, the patch feature of a cell is the outputs of steps :data:`PATCH_STAGES` of
:meth:`aax.models.members.Member.stages`, the two steps before the last (for ResNet-50 layer2
and layer3; for DenseNet-121 both at stride 16; for the EfficientNets the stages at strides 16
and 32 before the head), the coarser upsampled to the finer grid,
concatenated and averaged over 3 x 3 cells. The *bank* is a seeded random draw of at
most :data:`BANK_SIZE` such patches from the negative training images, stored with the
run (``RUN/patches.npz``, float16; ``aax calibrate RUN --map-sources cam patch`` makes it
and keeps the source with the better validation IoU). The map is each cell's
Euclidean distance to its nearest bank patch.

The class decision is untouched: the members' MC Dropout probabilities decide as ever,
and the map source (``maps.source``: ``"cam"``, the paper's, or ``"patch"``) only says
which maps the agreeing members' masks are fused from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.nn import functional as F

if TYPE_CHECKING:  # pragma: no cover
    from aax.models.ensemble import Ensemble
    from aax.models.members import Member

PATCH_STAGES: tuple[int, int] = (-3, -2)
"""The steps of ``Member.stages()`` whose outputs form a patch feature (counted from the end:
the two before the last)."""
BANK_SIZE = 1024
"""Patches kept per member: 1,024 did as well as 16,000 in the trial (docs/quality.md),
and the nearest-patch search is most of the cost (1.6x stride 32 annotation at 1,024,
3.0x at 4,096)."""
FILE = "patches.npz"


def patch_features(member: Member, x: torch.Tensor) -> torch.Tensor:
    """Patch features ``[B, C, h, w]`` of a normalised batch ``x`` (at the member's
    current output stride; only the steps up to the last of :data:`PATCH_STAGES` run)."""
    steps = _steps(member)
    return combine(member.features_and_steps(x, steps, max(steps) + 1)[1])


def features_and_patches(member: Member, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` (as ``member.features(x)``) and the patch features, from one pass: the class
    pass computes the steps the patch features come from anyway."""
    a, outs = member.features_and_steps(x, _steps(member))
    return a, combine(outs)


def _steps(member: Member) -> tuple[int, ...]:
    n = len(member.stages())
    return tuple(s % n for s in PATCH_STAGES)


def combine(outs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The stage outputs of :data:`PATCH_STAGES` as one patch feature map: the coarser
    upsampled to the finer grid, concatenated, 3 x 3 averaged."""
    outs = [o.float() for o in outs]
    size = max((o.shape[-2:] for o in outs), key=lambda s: s[0] * s[1])
    f = torch.cat([o if o.shape[-2:] == size else F.interpolate(o, size=tuple(size), mode="bilinear",
                                                                 align_corners=False) for o in outs], dim=1)
    return F.avg_pool2d(f, 3, stride=1, padding=1, count_include_pad=False)


def distance_maps(features: torch.Tensor, bank: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """``[B, h, w]``: each cell's Euclidean distance to its nearest row of ``bank``
    (``[N, C]``), computed ``chunk`` bank rows at a time so that memory stays bounded."""
    b, c, h, w = features.shape
    if bank.ndim != 2 or bank.shape[1] != c or bank.shape[0] == 0:
        raise ValueError(f"the patch bank is {tuple(bank.shape)}; expected [N > 0, {c}] for these features")
    query = features.flatten(2).transpose(1, 2).contiguous()  # [B, hw, C]
    best = torch.full((b, h * w), float("inf"), device=features.device)
    for start in range(0, bank.shape[0], chunk):
        part = bank[start:start + chunk].to(features.device, torch.float32)
        best = torch.minimum(best, torch.cdist(query, part.unsqueeze(0)).amin(dim=-1))
    return best.view(b, h, w)


@torch.no_grad()
def fit_banks(ensemble: Ensemble, paths: Sequence[str | os.PathLike], size: int = BANK_SIZE, seed: int = 0,
              batch_size: int = 16) -> tuple[dict[str, np.ndarray], int]:
    """Each member's bank (``[<= size, C]`` float16, a seeded draw of the patches of
    ``paths``, decoded and resized as annotation does), and how many images were read
    (an unreadable file is left out)."""
    from aax.data.batches import decoded_batches
    from aax.models.members.backbones import output_stride

    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}")
    patches: dict[str, list[torch.Tensor]] = {n: [] for n in ensemble.members}
    n_read = 0
    for index, x in decoded_batches(ensemble, paths, batch_size):
        n_read += len(index)
        for name, member in ensemble.members.items():
            with output_stride(member, ensemble.maps.class_stride):
                f = patch_features(member, x)
            patches[name].append(f.flatten(2).transpose(1, 2).reshape(-1, f.shape[1]).cpu())
    if n_read == 0:
        raise ValueError("no readable image to take patches from")
    generator = torch.Generator().manual_seed(seed)
    banks = {}
    for name, parts in patches.items():
        every = torch.cat(parts)
        if every.shape[0] > size:
            every = every[torch.randperm(every.shape[0], generator=generator)[:size]]
        banks[name] = every.numpy().astype(np.float16)
    return banks, n_read


def save_banks(run: str | os.PathLike, banks: Mapping[str, np.ndarray], n_images: int) -> dict[str, Any]:
    """Write ``RUN/patches.npz`` (atomically) and return the manifest block
    (``RUN/aax.json["patches"]``; the caller writes it)."""
    run = Path(run)
    tmp = run / f".{FILE}.{os.getpid()}.tmp.npz"
    np.savez(tmp, **{name: np.asarray(bank, dtype=np.float16) for name, bank in banks.items()})
    os.replace(tmp, run / FILE)
    return {"file": FILE, "stages": list(PATCH_STAGES), "n_images": int(n_images),
            "n_patches": {name: int(len(bank)) for name, bank in banks.items()}}


def load_banks(run: str | os.PathLike, manifest: Mapping[str, Any], names: Sequence[str],
               device: torch.device | str = "cpu") -> dict[str, torch.Tensor] | None:
    """The run's banks on ``device`` (float32), or None when it has none.

    Raises:
        ValueError: the file is there but does not hold a bank for every member.
    """
    block = manifest.get("patches") or {}
    path = Path(run) / str(block.get("file", FILE))
    if not block or not path.is_file():
        return None
    with np.load(path) as data:
        missing = [n for n in names if n not in data.files]
        if missing:
            raise ValueError(f"{path}: no patch bank for {', '.join(missing)}")
        return {n: torch.from_numpy(data[n].astype(np.float32)).to(device) for n in names}


def fit_run(ensemble: Ensemble, negative_paths: Sequence[str | os.PathLike] | None = None,
            size: int = BANK_SIZE, seed: int = 0) -> dict[str, Any]:
    """Fit, store and load the run's banks: from ``negative_paths``, or the negative
    training images of the split the manifest records. Returns the manifest block, or
    ``{"skipped": why}`` when there are no negative training images to take patches from
    (the run works as before: its maps stay XGrad-CAM's)."""
    from aax.models import runfiles

    run = Path(ensemble.run)
    if negative_paths is None:
        try:
            paths, labels, _ = runfiles.recorded_split(run)
        except (ValueError, FileNotFoundError, KeyError) as exc:
            return {"skipped": str(exc)}
        negative_paths = [p for p, c in zip(paths, labels) if c == ensemble.negative_index]
    if not negative_paths:
        return {"skipped": "no negative training images"}
    try:
        banks, n_read = fit_banks(ensemble, negative_paths, size=size, seed=seed)
    except ValueError as exc:
        return {"skipped": str(exc)}
    block = save_banks(run, banks, n_read)
    manifest = runfiles.read_json(run / runfiles.MANIFEST)  # fresh: others may have written
    manifest["patches"] = block
    runfiles.write_json(run / runfiles.MANIFEST, manifest)
    ensemble.manifest["patches"] = block
    ensemble.patches = load_banks(run, manifest, list(ensemble.members), ensemble.device)
    return block
