"""What the benchmark times on: the machine, images, untrained members, RUN folders.

Untrained members cost exactly what trained ones cost (same layers, same shapes). Their
heads are, by default, biased towards the positive class so that every member is
confident and agrees: every image then takes the protocol's costliest path (a mask at the
image's own size from the agreeing members' maps). ``bias=None`` leaves the heads as
initialised (decisions then mostly go to review, and no masks are made).
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

CLASSES = ["diseased", "healthy"]  # sorted; a class index is its position here
NEGATIVE = "healthy"
NORMALISATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


# -- the machine ------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def git_revision(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _parallel_backend() -> str | None:
    for line in torch.__config__.parallel_info().splitlines():
        if "parallel backend" in line:
            return line.split(":", 1)[1].strip()
    return None


def machine_info(device: torch.device, root: Path) -> dict[str, Any]:
    """CPU, cores, memory, torch and thread settings, GPU (when used)."""
    import aax

    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "memory_gib": None,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "aax": aax.__version__,
        "git": git_revision(root),
        "device": str(device),
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "env_threads": {k: os.environ.get(k) for k in
                        ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                         "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")},
        "parallel_backend": _parallel_backend(),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "load_average_start": load_average(),
    }
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            kib = int(fh.readline().split()[1])
        info["memory_gib"] = round(kib / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                       "capability": f"{props.major}.{props.minor}",
                       "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    return info


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- images -----------------------------------------------------------------------------
def synth_images(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    """``n`` distinct synthetic ``lesion`` images (half diseased), ``size`` px, as PNGs.

    Returns their paths, classes alternating, so that any prefix is balanced.
    """
    from aax.data.synth import generate

    per_class = max(1, math.ceil(n / 2))
    generate("lesion", folder, n_per_class=per_class, size=size, seed=seed)
    pos = sorted((folder / "images" / "diseased").glob("*.png"))[:per_class]
    neg = sorted((folder / "images" / "healthy").glob("*.png"))[:per_class]
    paths = [p for pair in zip(pos, neg) for p in pair]
    return paths[:n]


def link_folder(sources: Sequence[Path], dest: Path, n: int, prefix: str = "img") -> Path:
    """A flat folder of ``n`` images named ``{prefix}_00000.png`` ...: hard links to
    ``sources`` (cycled), copies where the file system has no hard links."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    width = max(5, len(str(n)))
    for i in range(n):
        src = Path(sources[i % len(sources)])
        target = dest / f"{prefix}_{i:0{width}d}{src.suffix}"
        try:
            os.link(src, target)
        except OSError:
            shutil.copyfile(src, target)
    return dest


def decode(paths: Sequence[Path], size: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """What ``aax annotate``'s loader makes of ``paths``: the normalised batch
    ``[N, 3, size, size]`` and each image's original ``(height, width)``."""
    from aax.data import read_image
    from aax.data.transforms import prepare

    xs, sizes = [], []
    for p in paths:
        image = read_image(p)
        xs.append(prepare(image, size, *NORMALISATION))
        sizes.append((int(image.shape[0]), int(image.shape[1])))
    return torch.stack(xs), sizes


# -- models -----------------------------------------------------------------------------
def build_members(names: Sequence[str], seed: int = 0, bias: float | None = 6.0,
                  dropout: float = 0.2) -> dict[str, torch.nn.Module]:
    """Untrained members in eval mode. With ``bias``, each head's logits favour the
    positive class (``diseased``) by about ``2 * bias``: confident, agreeing members."""
    from aax.models.members import build_member

    members = {}
    for i, name in enumerate(names):
        torch.manual_seed(seed + i)
        member = build_member(name, len(CLASSES), dropout).eval()
        if bias is not None:
            with torch.no_grad():
                member.head.fc.weight.mul_(0.01)
                member.head.fc.bias.copy_(torch.tensor([bias, -bias]))
        members[name] = member
    return members


def write_run(run: Path, members: dict[str, torch.nn.Module], image_size: int, *,
              theta: float, tau: float, mc_passes: int, dropout: float = 0.2) -> dict[str, Any]:
    """A minimal RUN folder that ``Ensemble.load`` and ``aax annotate`` accept: one
    checkpoint per member (the payload ``aax train`` writes) and ``aax.json``."""
    from aax import __version__
    from aax.models import runfiles

    run.mkdir(parents=True, exist_ok=True)
    norm = {"mean": list(NORMALISATION[0]), "std": list(NORMALISATION[1])}
    entries = []
    for name, member in members.items():
        payload = runfiles.member_checkpoint(member.state_dict(), member=name, classes=CLASSES,
                                             image_size=image_size, normalisation=norm,
                                             dropout=dropout, version=__version__)
        runfiles.save_torch(run / runfiles.checkpoint_name(name), payload)
        entries.append({"name": name, "checkpoint": runfiles.checkpoint_name(name),
                        "dropout": dropout, "converged": True, "note": "untrained (benchmark)"})
    manifest = {
        "aax_version": __version__, "status": "complete", "classes": CLASSES,
        "negative_class": NEGATIVE, "image_size": image_size, "normalisation": norm,
        "members": entries, "theta": theta, "tau": tau, "mc_passes": mc_passes,
        "quorum": len(members) // 2 + 1, "calibration": None,
        "data": {"source": "benchmarks (untrained members)"}, "training": {},
    }
    runfiles.write_json(run / runfiles.MANIFEST, manifest)
    return manifest


class FeatureReplay:
    """Stands in for a member in ``annotate_batch``: its real head, and a backbone that
    returns feature maps computed beforehand (to time everything after the backbone)."""

    def __init__(self, member: Any, features: torch.Tensor) -> None:
        self.head = member.head
        self.name = getattr(member, "name", "")
        self.grid_origin = member.grid_origin  # where its maps' cells lie (aax.models.explain.Grid)
        self._features = features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self._features


def make_ensemble(members: dict[str, torch.nn.Module], run: Path, manifest: dict[str, Any],
                  device: torch.device, channels_last: bool = False) -> Any:
    """An :class:`aax.models.ensemble.Ensemble` built directly from ``members`` (on ``device``),
    pointing at ``run`` (whose checkpoints hold the same weights)."""
    from aax.models.ensemble import Ensemble

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    moved = {n: m.to(device).to(memory_format=fmt).eval() for n, m in members.items()}
    return Ensemble(
        members=moved, classes=list(CLASSES), negative_class=NEGATIVE,
        negative_index=CLASSES.index(NEGATIVE), image_size=int(manifest["image_size"]),
        normalisation=NORMALISATION, theta=float(manifest["theta"]), tau=float(manifest["tau"]),
        mc_passes=int(manifest["mc_passes"]), quorum=int(manifest["quorum"]), manifest=manifest,
        run=run, device=device, channels_last=channels_last)
