"""The trained ensemble, as read back from a RUN folder (see docs/architecture.md).

``Ensemble.load(run)`` checks every checkpoint against the manifest (member, classes,
image size, normalisation) before loading it, with ``torch.load(weights_only=True)``,
and refuses one that does not fit with a message naming the file.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from aax.models import runfiles
from aax.models.device import default_channels_last, resolve_device
from aax.models.maps import MapOptions
from aax.models.mask_settings import parse_tau
from aax.models.members import MEMBERS, Member, build_member
from aax.models.members.segment import fit_head_to
from aax.models.runfiles import RunError

if TYPE_CHECKING:  # pragma: no cover
    from aax.annotation.records import AnnotationRecord

__all__ = ["Ensemble", "RunError"]


def _fail(path: Path, why: str) -> RunError:
    return RunError(f"{path}: {why}")


def _load_member(run: Path, entry: dict[str, Any], manifest: dict[str, Any],
                 device: torch.device) -> Member:
    name = entry.get("name")
    if name not in MEMBERS:
        raise _fail(run / runfiles.MANIFEST, f"unknown member {name!r}")
    path = run / entry.get("checkpoint", runfiles.checkpoint_name(name))
    if not path.is_file():
        raise _fail(path, f"checkpoint of {name} is missing")
    try:
        ckpt = runfiles.load_torch(path, map_location="cpu")
    except Exception as exc:  # unpickling refused (weights_only), truncated file, ...
        raise _fail(path, f"cannot be read as a checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise _fail(path, "is not an AAX member checkpoint (no state_dict)")
    checks = [("member", name), ("classes", manifest["classes"]),
              ("image_size", manifest["image_size"]),
              ("normalisation", manifest["normalisation"])]
    for key, expected in checks:
        found = ckpt.get(key)
        if key == "normalisation" and isinstance(found, dict):
            found = {k: [float(v) for v in found[k]] for k in ("mean", "std") if k in found}
            expected = {k: [float(v) for v in expected[k]] for k in ("mean", "std")}
        if found != expected:
            raise _fail(path, f"does not fit the run: its {key} is {found!r}, the manifest "
                              f"says {expected!r}")
    dropout = float(ckpt.get("dropout", entry.get("dropout", 0.2)))
    member = build_member(name, len(manifest["classes"]), dropout, _train_stride(manifest))
    norm = manifest["normalisation"]
    member.set_input_normalisation((norm["mean"], norm["std"]))
    try:
        member.load_state_dict(fit_head_to(member, ckpt["state_dict"]), strict=True)
    except RuntimeError as exc:
        raise _fail(path, f"weights do not fit {name}: {exc}") from exc
    return member.to(device).eval()


@dataclass
class Ensemble:
    """Members of a trained run and the settings the decision protocol uses.

    Attributes:
        members: member name -> :class:`~aax.models.members.Member` (eval mode, on ``device``),
            in the manifest's order.
        classes: class names (sorted; a class index is its position here).
        negative_class: the negative class; ``negative_index`` its index.
        image_size: model input side in pixels.
        normalisation: ``(mean, std)`` per channel.
        theta, tau, mc_passes, quorum: decision settings (calibrated values when the run
            has been calibrated).
        manifest: ``aax.json`` as a dict; run: the RUN folder; device: where members live.
        channels_last: whether the members' weights are in channels-last memory format.
        maps: output strides, test-time augmentation and fusion of the saliency maps
            (:class:`aax.models.maps.MapOptions`, from the manifest's ``"maps"``).
    """

    members: dict[str, Member]
    classes: list[str]
    negative_class: str
    negative_index: int
    image_size: int
    normalisation: tuple[tuple[float, ...], tuple[float, ...]]
    theta: float
    tau: float | dict[str, float]
    mc_passes: int
    quorum: int
    manifest: dict[str, Any] = field(repr=False)
    run: Path = Path(".")
    device: torch.device = torch.device("cpu")
    channels_last: bool = False
    novelty: Any = field(default=None, repr=False)  # aax.models.novelty.Novelty, or None (no features)
    patches: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # aax.models.patch_maps banks
    maps: MapOptions = field(default_factory=MapOptions)

    @classmethod
    def load(cls, run: str | os.PathLike[str], device: str | torch.device | None = None,
             channels_last: bool | None = None) -> Ensemble:
        """Read ``run/aax.json`` and every member checkpoint it lists.

        ``channels_last`` stores the members in channels-last memory format; None lets
        :func:`aax.models.device.default_channels_last` choose for the device (on for CPUs).

        Raises:
            RunError: no manifest, an unfinished run, or a checkpoint that is missing,
                unreadable or does not fit the manifest (the message names the file).
        """
        run = Path(run)
        path = run / runfiles.MANIFEST
        if not path.is_file():
            raise RunError(f"{path}: no such file; is {run} a RUN folder written by aax train?")
        try:
            manifest = runfiles.read_json(path)
        except ValueError as exc:
            raise _fail(path, f"not valid JSON ({exc})") from exc
        missing = [k for k in ("classes", "negative_class", "image_size", "normalisation",
                               "members") if k not in manifest]
        if missing:
            raise _fail(path, f"manifest lacks {missing}")
        if manifest.get("status", "complete") != "complete" or not manifest["members"]:
            raise _fail(path, "training has not finished; continue it with "
                              "`aax train DATA --out RUN --resume`")
        dev = resolve_device(device)
        if channels_last is None:
            channels_last = default_channels_last(dev)
        members = {e["name"]: _load_member(run, e, manifest, dev) for e in manifest["members"]}
        if channels_last:
            members = {n: m.to(memory_format=torch.channels_last) for n, m in members.items()}
        classes = list(manifest["classes"])
        negative = manifest["negative_class"]
        if negative not in classes:
            raise _fail(path, f"negative class {negative!r} is not among {classes}")
        norm = manifest["normalisation"]
        return cls(
            members=members, classes=classes, negative_class=negative,
            negative_index=classes.index(negative), image_size=int(manifest["image_size"]),
            normalisation=(tuple(float(v) for v in norm["mean"]),
                           tuple(float(v) for v in norm["std"])),
            # aax calibrate rewrites these two in place (and records how in "calibration").
            theta=float(manifest.get("theta", 0.1)),
            tau=parse_tau(manifest.get("tau", 0.5)),
            mc_passes=int(manifest.get("mc_passes", 30)),
            quorum=int(manifest.get("quorum", len(members) // 2 + 1)),
            manifest=manifest, run=run, device=dev, channels_last=channels_last,
            novelty=_novelty(run, manifest, list(members), dev),
            patches=_patches(run, manifest, list(members), dev),
            maps=MapOptions.from_dict(manifest.get("maps"), _train_stride(manifest)))

    # -- annotation: thin wrappers over aax.annotate --------------------------------
    def annotate(self, images: Iterable[Any], **options: Any) -> Iterator[AnnotationRecord]:
        """Annotate ``images`` (paths or an :mod:`aax.data` dataset), yielding one
        :class:`~aax.annotation.records.AnnotationRecord` per image in input order; the records
        ``aax annotate`` stores. Options: see :func:`aax.annotation.annotate.annotate`."""
        from aax.annotation.annotate import annotate

        return annotate(self, images, **options)

    def annotate_to_folder(self, source: str | os.PathLike[str], out: str | os.PathLike[str],
                           **options: Any) -> dict:
        """What ``aax annotate`` does: see :func:`aax.annotation.annotate.annotate_to_folder`."""
        from aax.annotation.annotate import annotate_to_folder

        return annotate_to_folder(self, source, out, **options)



def _novelty(run: Path, manifest: dict[str, Any], names: list[str], device: torch.device) -> Any:
    """The run's novelty scorers (:func:`aax.models.novelty.load`); a run without stored
    features loads and annotates as before, and says once that the step is skipped."""
    from aax.models import novelty

    try:
        found = novelty.load(run, manifest, names, device)
    except ValueError as exc:
        warnings.warn(f"{exc}; the novelty step is skipped (refit with `aax calibrate {run}`)", stacklevel=3)
        return None
    if found is None:
        warnings.warn(f"{run}: no novelty features (a run trained before they were stored); the novelty "
                      f"step is skipped. Add it with `aax calibrate {run}`", stacklevel=3)
    elif not found.ready:
        warnings.warn(f"{run}: novelty features but no thresholds; the novelty step is skipped. "
                      f"Set them with `aax calibrate {run}`", stacklevel=3)
    return found


def _patches(run: Path, manifest: dict[str, Any], names: list[str], device: torch.device) -> Any:
    """The run's patch banks (:func:`aax.models.patch_maps.load_banks`), or None."""
    from aax.models.patch_maps import load_banks

    try:
        return load_banks(run, manifest, names, device)
    except ValueError as exc:
        raise _fail(run, str(exc)) from exc


def _train_stride(manifest: dict[str, Any]) -> int:
    return int((manifest.get("training") or {}).get("output_stride", 32))
