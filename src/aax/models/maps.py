"""How the members' saliency maps are made: output stride, test-time augmentation, fusion.

:class:`MapOptions` are the map settings of a run (``RUN/aax.json`` under ``"maps"``;
they are part of :class:`aax.annotation.annotate.AnnotateSettings`, so an annotation store records
them):

* ``class_stride``: the output stride of the pass whose MC Dropout probabilities decide
  the class (the stride the members were trained at, by default);
* ``map_stride``: the output stride of the pass the XGrad-CAM maps come from. When it
  differs from ``class_stride`` each member runs a second, dilated pass for its map
  (:meth:`aax.models.members.Member.set_output_stride`); the head and XGrad-CAM's closed form
  are unchanged, since only the feature map's resolution changes;
* ``tta_scales``, ``tta_flip``: test-time augmentation of the maps only: the input is
  resized by each scale (and mirrored), each view's map is brought back to the input
  size and min-max normalised, and the views are averaged. The class decision never
  uses these views;
* ``fusion``: how the agreeing members' maps become one mask (:mod:`aax.annotation.decide`):
  ``min`` (the paper's intersection), ``mean`` or ``vote`` (a pixel is in the mask when
  at least ``quorum`` maps exceed tau);
* ``mask_members``: the members whose maps a mask may be fused from (None: all, the
  paper's). An image's mask fuses its agreeing members among them, or all its agreeing
  members when none is; ``aax calibrate`` chooses the set on validation masks. The class
  decision never depends on it;
* ``source``: ``"cam"`` (XGrad-CAM, the paper's), ``"patch"``: each member's
  patch-feature novelty map (:mod:`aax.models.patch_maps`; needs the run's patch bank), or
  ``"segmentation"``: each member's segmentation head, trained on reviewed masks
  (:mod:`aax.models.members.segment`). The strides and TTA above apply to CAMs only;
  patch and segmentation maps come from the class pass's stride;
* ``refine``: ``"none"`` (the paper's) or ``"superpixels"``: the fused map is averaged
  over the image's own regions before the threshold (:mod:`aax.models.refine`), so that a
  mask's outline follows the image's edges. Members' masks in ``aax evaluate`` are
  made the same way.

The torch functions here mirror the NumPy reference in :mod:`aax.annotation.decide` (tested equal).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.nn import functional as F

from aax.models.explain import Grid, XGradCAM, normalise, upsample
from aax.models.mask_settings import FUSIONS, MAP_SOURCES
from aax.models.members import OUTPUT_STRIDES, Member
from aax.models.members.backbones import output_stride
from aax.models.members.segment import features_and_segments, segment_maps
from aax.models.patch_maps import distance_maps, features_and_patches, patch_features
from aax.models.refine import REFINES

if TYPE_CHECKING:  # pragma: no cover
    from aax.models.ensemble import Ensemble

DEFAULT_MAP_STRIDE = 16
"""The map stride new runs get (see docs/evaluation.md for the measurements)."""


@dataclass(frozen=True)
class MapOptions:
    """The map settings of a run (see the module docstring). The defaults are what a
    run without a ``"maps"`` entry (one made before these options existed) gets."""

    class_stride: int = 32
    map_stride: int = 32
    tta_scales: tuple[float, ...] = (1.0,)
    tta_flip: bool = False
    fusion: str = "min"
    source: str = "cam"
    mask_members: tuple[str, ...] | None = None
    refine: str = "none"

    def __post_init__(self) -> None:
        for name in ("class_stride", "map_stride"):
            if getattr(self, name) not in OUTPUT_STRIDES:
                raise ValueError(f"{name} must be one of {OUTPUT_STRIDES}, got {getattr(self, name)}")
        scales = tuple(float(s) for s in self.tta_scales)
        if not scales or any(not 0.25 <= s <= 4.0 for s in scales):
            raise ValueError(f"tta_scales must be a non-empty list of scales in [0.25, 4], got {self.tta_scales}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.source not in MAP_SOURCES:
            raise ValueError(f"source must be one of {MAP_SOURCES}, got {self.source!r}")
        if self.refine not in REFINES:
            raise ValueError(f"refine must be one of {REFINES}, got {self.refine!r}")
        object.__setattr__(self, "tta_scales", scales)
        if self.mask_members is not None:
            members = tuple(str(m) for m in self.mask_members)
            if not members or len(set(members)) != len(members):
                raise ValueError(f"mask_members must name distinct members, got {list(self.mask_members)}")
            object.__setattr__(self, "mask_members", members)

    @property
    def views(self) -> tuple[tuple[float, bool], ...]:
        """The ``(scale, mirrored)`` views a map is averaged over. Computed, not stored,
        so that ``dataclasses.asdict`` (``summary.json``'s settings) holds only options."""
        return tuple((s, f) for s in self.tta_scales for f in ((False, True) if self.tta_flip else (False,)))

    @property
    def augmented(self) -> bool:
        """Whether the maps average more than the plain view."""
        return self.views != ((1.0, False),)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``RUN/aax.json["maps"]``). The source, the mask members and the
        refinement are left out when they are the paper's (``"cam"``, all, ``"none"``),
        as runs made before the options existed have them."""
        out = {"class_stride": self.class_stride, "map_stride": self.map_stride,
               "tta_scales": list(self.tta_scales), "tta_flip": self.tta_flip, "fusion": self.fusion}
        if self.source != "cam":
            out["source"] = self.source
        if self.mask_members is not None:
            out["mask_members"] = list(self.mask_members)
        if self.refine != "none":
            out["refine"] = self.refine
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, train_stride: int = 32) -> MapOptions:
        """Read ``RUN/aax.json["maps"]``; missing keys: the trained stride for both passes,
        no augmentation, intersection."""
        data = dict(data or {})
        class_stride = int(data.get("class_stride", train_stride))
        return cls(class_stride=class_stride, map_stride=int(data.get("map_stride", class_stride)),
                   tta_scales=tuple(data.get("tta_scales", (1.0,))), tta_flip=bool(data.get("tta_flip", False)),
                   fusion=str(data.get("fusion", "min")), source=str(data.get("source", "cam")),
                   mask_members=data.get("mask_members"), refine=str(data.get("refine", "none")))

    def replace(self, **changes: Any) -> MapOptions:
        """A copy with ``changes``."""
        return MapOptions(**{**self.to_dict(), **changes})


def class_features(member: Member, x: torch.Tensor, options: MapOptions,
                   shared: dict[int, torch.Tensor] | None = None,
                   patches: list[torch.Tensor] | None = None,
                   segments: list[torch.Tensor] | None = None) -> torch.Tensor:
    """``A`` of the class pass (at ``options.class_stride``).

    With ``shared`` (a dict), when the map pass runs at another stride, the class pass's
    map after the steps both strides compute alike is kept in it (by ``id(member)``):
    the map pass then starts from there (:meth:`~aax.models.members.Member.shared_stages`),
    and only the dilated stages run twice. With ``patches`` (a list), the member's patch
    features (:mod:`aax.models.patch_maps`) are appended to it from the same pass; with
    ``segments``, its segmentation head's map (:mod:`aax.models.members.segment`).
    """
    # (a stand-in without strides, e.g. the benchmark's feature replay, runs as it is)
    if getattr(member, "output_stride", options.class_stride) != options.class_stride:
        member.set_output_stride(options.class_stride)
    if patches is not None:  # the patch features come from steps the class pass runs anyway
        a, f = features_and_patches(member, x)
        patches.append(f)
        return a
    if segments is not None:  # as do the steps a segmentation head reads
        a, s = features_and_segments(member, x)
        segments.append(s)
        return a
    if shared is None or options.map_stride == options.class_stride:
        return member.features(x)
    k = member.shared_stages(options.class_stride, options.map_stride)
    h = member.features(x, 0, k)
    shared[id(member)] = h
    return member.features(h, k)


def _view_size(x: torch.Tensor, scale: float) -> list[int]:
    return [max(32, round(v * scale)) if scale != 1.0 else int(v) for v in x.shape[-2:]]


def _view(x: torch.Tensor, scale: float, mirrored: bool) -> torch.Tensor:
    if scale != 1.0:
        x = F.interpolate(x, size=_view_size(x, scale), mode="bilinear", align_corners=False,
                          antialias=scale < 1.0)
    return x.flip(-1) if mirrored else x


def member_grid(member: Member, options: MapOptions, input_size: Sequence[int]) -> Grid:
    """Where the cells of :func:`member_maps`' output lie on the input (:class:`Grid`):
    the member's grid at ``map_stride``, or the input's pixels for augmented maps."""
    if options.augmented:
        return Grid.pixels(input_size)
    return Grid.of(member, input_size, options.map_stride)


def member_maps(member: Member, x: torch.Tensor, features: torch.Tensor, cam_class: torch.Tensor,
                options: MapOptions, autocast: Any = None, shared: torch.Tensor | None = None) -> torch.Tensor:
    """One member's raw maps ``[B, h, w]`` (>= 0) for ``cam_class``.

    Without augmentation and with ``map_stride == class_stride`` this is XGrad-CAM on
    ``features`` (the class pass's ``A``), at feature resolution. Otherwise every view
    runs the backbone at ``map_stride``; with augmentation the maps come back at the
    input size (each resized on its own :class:`~aax.models.explain.Grid`, so views agree
    where they should), each normalised, averaged. :func:`member_grid` says where the
    output's cells lie. ``shared``: the class pass's map after the steps both strides
    share (:func:`class_features`), for the plain view.
    """
    cam = XGradCAM(member)
    autocast = autocast or contextlib.nullcontext()
    if not options.augmented and options.map_stride == options.class_stride:
        return cam.raw(features, cam_class)
    out = []
    with output_stride(member, options.map_stride):
        for scale, mirrored in options.views:
            if scale == 1.0 and not mirrored and options.map_stride == options.class_stride:
                a = features
            elif scale == 1.0 and not mirrored and shared is not None:
                k = member.shared_stages(options.class_stride, options.map_stride)
                with autocast:
                    a = member.features(shared, k).float()
            else:
                with autocast:
                    a = member.features(_view(x, scale, mirrored)).float()
            raw = cam.raw(a, cam_class)
            grid = Grid.of(member, _view_size(x, scale), options.map_stride)
            if mirrored:
                raw, grid = raw.flip(-1), grid.mirrored(raw.shape[-1])
            out.append((raw, grid))
    if not options.augmented:
        return out[0][0]
    size = tuple(int(v) for v in x.shape[-2:])
    return torch.stack([normalise(upsample(r, size, g), inplace=True) for r, g in out]).mean(dim=0)


def saliency_maps(ensemble: Ensemble, x: torch.Tensor, features: Sequence[torch.Tensor],
                  cam_class: torch.Tensor, options: MapOptions, autocast: Any = None,
                  shared: dict[int, torch.Tensor] | None = None,
                  patches: Sequence[torch.Tensor] | None = None,
                  segments: Sequence[torch.Tensor] | None = None) -> tuple[torch.Tensor, list[Grid]]:
    """Every member's raw maps, ``[B, M, h, w]`` (see :func:`member_maps`; with
    ``options.source == "patch"``, :func:`patch_member_maps`; with ``"segmentation"``, each
    member's segmentation head, :func:`aax.models.members.segment.segment_maps`), and the :class:`Grid`
    of each member's maps, to resize them with (:func:`aax.models.explain.upsample`).
    ``patches``/``segments``: what :func:`class_features` kept of the class pass, if it did."""
    shared = shared or {}
    members = list(ensemble.members.values())
    if options.source == "patch":
        given = list(patches) if patches is not None else [None] * len(members)
        maps = [patch_member_maps(ensemble, name, member, x, options, autocast, f)
                for (name, member), f in zip(ensemble.members.items(), given)]
        grids = [patch_grid(member, x.shape[-2:], m.shape[-2:]) for member, m in zip(members, maps)]
    elif options.source == "segmentation":
        maps = list(segments) if segments is not None else []
        for member in members[len(maps):]:
            with output_stride(member, options.class_stride), (autocast or contextlib.nullcontext()):
                maps.append(segment_maps(member, x))
        maps = [m.float() for m in maps]
        # the head learned its cells where its loss put them, not where its receptive fields are
        grids = [Grid.centred(x.shape[-2:], m.shape[-2:]) for m in maps]
    else:
        maps = [member_maps(member, x, a, cam_class, options, autocast, shared.get(id(member)))
                for member, a in zip(members, features)]
        grids = [member_grid(member, options, x.shape[-2:]) for member in members]
    if len({tuple(m.shape[-2:]) for m in maps}) > 1:  # not so today: every member reaches every stride
        size = tuple(int(v) for v in x.shape[-2:])
        maps = [upsample(m, size, g) for m, g in zip(maps, grids)]
        grids = [Grid.pixels(size)] * len(maps)
    return torch.stack(maps, dim=1), grids


def patch_grid(member: Member, input_size: Sequence[int], map_size: Sequence[int]) -> Grid:
    """Where the cells of a member's patch map (``map_size``) lie on the input."""
    return Grid.of(member, input_size, max(1, round(int(input_size[-1]) / int(map_size[-1]))))


def patch_member_maps(ensemble: Ensemble, name: str, member: Member, x: torch.Tensor, options: MapOptions,
                      autocast: Any = None, features: torch.Tensor | None = None) -> torch.Tensor:
    """One member's patch-feature novelty maps ``[B, h, w]`` (:mod:`aax.models.patch_maps`), at
    the class pass's stride; ``features``: the patch features, when the class pass has
    already made them (:func:`aax.models.patch_maps.features_and_patches`).

    Raises:
        ValueError: the run has no patch bank.
    """
    banks = getattr(ensemble, "patches", None)
    if not banks or name not in banks:
        raise ValueError(f"{getattr(ensemble, 'run', 'this run')}: no patch bank for the 'patch' map source; "
                         f"make one with `aax calibrate RUN --map-sources cam patch`")
    if features is None:
        with output_stride(member, options.class_stride), (autocast or contextlib.nullcontext()):
            features = patch_features(member, x)
    return distance_maps(features.float(), banks[name])


def fuse_maps(maps: torch.Tensor, fusion: str = "min", votes: int = 2) -> torch.Tensor:
    """The fused score ``[H, W]`` of ``[M, H, W]`` maps, as :func:`aax.annotation.decide.fuse`."""
    m = maps.shape[0]
    if fusion == "min" or (fusion == "vote" and votes >= m):
        return maps.amin(dim=0)
    if fusion == "mean":
        return maps.mean(dim=0)
    if fusion == "vote":
        return torch.kthvalue(maps, m - max(1, votes) + 1, dim=0).values
    raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
