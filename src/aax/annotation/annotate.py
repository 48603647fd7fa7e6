"""The annotation core (paper 3.2-3.4): batches of images in, one record per image out.

Per batch and member, the backbone runs once. From its feature map ``A``:
- MC Dropout re-runs only the head, K times, on the pooled features (``p_i``, ``u_i``);
- XGrad-CAM weighs ``A`` with the head's gradient in closed form (``S_i``).
The protocol (:mod:`aax.annotation.decide`) then turns the members' answers into a decision and,
for positive decisions, the mask ``min_i S_i > tau`` at the image's own size (and for
flagged images the members lean positive on, a draft made the same way, for the reviewer).

Decoding and resizing run in DataLoader workers so that they overlap with compute, and
so does the superpixel cut of runs that refine their masks (:mod:`aax.models.refine`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from aax import runtime
from aax.annotation.decide import (NO_PREDICTION, decide, draft_members, map_class, mask_subset, otsu_threshold,
                                   predicted_classes)
from aax.annotation.records import REVIEW, AnnotationRecord, MemberResult
from aax.data.batches import Decoded, InputItem, collate
from aax.models import runfiles
from aax.annotation.agreement import map_agreement
from aax.models.explain import Grid, normalise, upsample
from aax.models.maps import MapOptions, class_features, fuse_maps, saliency_maps
from aax.models.mask_settings import OTSU, tau_for
from aax.models.novelty import per_image
from aax.models.refine import input_superpixels, pool_resized
from aax.models.uncertainty import mc_probabilities, summarize

if TYPE_CHECKING:  # pragma: no cover
    from aax.models.ensemble import Ensemble

STORE_FORMAT = 2
"""Version of what a store's rows mean: 2 names images relative to the input root (1 kept
the path as typed). A folder of another format is refused with a clear message."""


@dataclass(frozen=True)
class AnnotateSettings:
    """Everything that changes an annotation; a store refuses to mix two of these."""

    theta: float
    tau: float | str | dict[str, float | str]  # one threshold ("otsu": per image), or one per positive class
    mc_passes: int
    quorum: int
    # the novelty step (aax.models.novelty.Novelty.step): score name, member -> threshold and
    # member -> predicted class -> threshold; None = skipped
    novelty: dict[str, Any] | None = None
    maps: MapOptions = field(default_factory=MapOptions)  # strides, test-time augmentation, fusion

    def tau_for(self, class_name: str) -> float | str:
        """The mask threshold for ``class_name`` (a number, or ``"otsu"``)."""
        return tau_for(self.tau, class_name)

    @classmethod
    def from_ensemble(cls, ensemble: Ensemble, theta: float | None = None, tau: float | str | None = None,
                      mc_passes: int | None = None, novelty: bool = True) -> AnnotateSettings:
        tau = ensemble.tau if tau is None else tau
        maps = getattr(ensemble, "maps", None) or MapOptions()
        unknown = [m for m in maps.mask_members or () if m not in ensemble.members]
        if unknown:
            raise ValueError(f"{getattr(ensemble, 'run', 'the run')}: maps.mask_members names {unknown}, which are "
                             f"not members of this run ({', '.join(ensemble.members)})")
        if maps.source == "patch" and not getattr(ensemble, "patches", None):
            raise ValueError(f"{getattr(ensemble, 'run', 'the run')}: the 'patch' map source needs the run's patch "
                             f"bank (patches.npz), which `aax calibrate RUN --map-sources cam patch` makes")
        scorer = getattr(ensemble, "novelty", None)
        step = (scorer.step() if novelty and scorer is not None and scorer.ready else None)
        return cls(theta=float(ensemble.theta if theta is None else theta),
                   tau=dict(tau) if isinstance(tau, dict) else (tau if tau == OTSU else float(tau)),
                   mc_passes=int(ensemble.mc_passes if mc_passes is None else mc_passes),
                   quorum=int(ensemble.quorum), novelty=step, maps=maps)


def as_items(images: Iterable[Any]) -> list[InputItem]:
    """Paths, ``InputItem``s or dataset samples (with ``.image``, ``.label``) as items."""
    items = []
    for entry in images:
        if isinstance(entry, InputItem):
            items.append(entry)
        elif hasattr(entry, "image"):
            items.append(InputItem(Path(entry.image), getattr(entry, "label", None)))
        else:
            items.append(InputItem(Path(entry)))
    return items


def _regions(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """The superpixel labels of one prepared input ``[1, C, S, S]``, cut exactly as
    :func:`annotate_batch` would (run in the decoding workers)."""
    return input_superpixels(x, mean, std)[0]


def image_seed(path: str | os.PathLike) -> int:
    """A stable MC Dropout seed for an image: its file name, not its batch, decides."""
    return zlib.crc32(Path(path).name.encode())


def default_workers(device: torch.device | str = "cpu") -> int:
    """DataLoader worker processes for decoding, when none is asked for.

    With a GPU the CPU is otherwise idle: up to 4 workers. On a CPU the members' threads
    already use every core; a worker then only preempts them (each preemption stalls the
    other threads at their next barrier), so on 2 cores decoding in the main process is
    faster (measured in docs/performance.md). With more cores, one worker.
    """
    cpus = os.cpu_count() or 1
    if torch.device(device).type == "cuda":
        return max(1, min(4, cpus - 1))
    return 0 if cpus <= 2 else 1


def default_batch_size(device: torch.device, image_size: int) -> int:
    """Images per batch when none is given.

    On a CPU, small batches are faster per image (the activations stay in cache): on
    2 cores, 8 images of 128 px run about 15 % faster per image than 16, and 4 of 224 px
    about 50 % faster (docs/performance.md). So about 2^17 input pixels per batch, rounded
    up to a power of two. On a GPU, large batches keep it busy.
    """
    if device.type == "cuda":
        return 32
    want = (1 << 17) / max(1, image_size) ** 2
    return int(min(16, max(1, 2 ** math.ceil(math.log2(want)))))


@torch.no_grad()
def annotate_batch(ensemble: Ensemble, x: torch.Tensor, sizes: Sequence[tuple[int, int]],
                   settings: AnnotateSettings, keep_saliency: bool = False,
                   amp: bool = False, seeds: Sequence[int] | None = None,
                   keep_regions: bool | None = None,
                   regions: Sequence[np.ndarray] | None = None) -> list[AnnotationRecord]:
    """Annotate one prepared batch ``x`` ``[B, 3, S, S]`` (no I/O).

    Args:
        ensemble: a loaded ensemble.
        x: normalised input batch, on any device (moved to the ensemble's).
        sizes: each image's original ``(height, width)``: masks and kept maps come back
            at that size.
        settings: theta, tau, K, quorum and the novelty step (each member's novelty
            scores are computed from the pooled features and logits whenever the
            ensemble has novelty data; the step applies when ``settings.novelty`` is set).
        keep_saliency: keep every member's map (at the original size) in the records.
        keep_regions: with ``keep_saliency``, also keep every image's superpixel labels
            (``record.regions``, :mod:`aax.models.refine`); None: when the run refines its masks
            (evaluation pools the members' maps over them). Calibration asks for them to
            weigh the refinement.
        regions: each image's superpixel labels, cut where it was decoded
            (:func:`aax.models.refine.input_superpixels` of its row of ``x``); None: cut here,
            for the images that need them.
        amp: run the backbones under autocast (CUDA), the head and maps in float32.
        seeds: one MC Dropout seed per image (see :func:`image_seed`), for results that
            do not depend on batching; None draws from torch's global generator.
    """
    device = ensemble.device
    x = x.to(device, non_blocking=True)
    if getattr(ensemble, "channels_last", False):
        x = x.contiguous(memory_format=torch.channels_last)
    names = list(ensemble.members)
    probs, uncert, feats = [], [], []
    scorer = getattr(ensemble, "novelty", None)
    scores: list[dict[str, np.ndarray]] = []  # per member: score name -> [B]
    shared: dict[int, torch.Tensor] = {}  # class-pass maps a finer map pass starts from
    autocast = torch.autocast(device.type) if amp and device.type == "cuda" else contextlib.nullcontext()
    patches: list[torch.Tensor] | None = [] if settings.maps.source == "patch" else None
    segments: list[torch.Tensor] | None = [] if settings.maps.source == "segmentation" else None
    for m, member in enumerate(ensemble.members.values()):
        member_seeds = None if seeds is None else [(s * 31 + m) & 0xFFFFFFFF for s in seeds]
        with autocast:
            a = class_features(member, x, settings.maps, shared, patches, segments)
        a = a.float()
        pooled = member.head.pool(a)
        summary = summarize(mc_probabilities(member.head, pooled, settings.mc_passes, member_seeds))
        if scorer is not None:  # the pooled feature is at hand: no extra backbone pass
            scores.append(scorer.score_member(names[m], pooled, member.head.classify(pooled)))
        probs.append(summary.probs)
        uncert.append(summary.uncertainty)
        feats.append(a)
    probs_np = torch.stack(probs, dim=1).cpu().numpy()  # [B, M, C]
    uncert_np = torch.stack(uncert, dim=1).cpu().numpy()  # [B, M]

    # Every member's map of an image shows the same class: the positive class in question.
    shown = [map_class(p, ensemble.negative_index) for p in probs_np]
    cam_class = torch.tensor(shown, device=device)
    raw, grids = saliency_maps(ensemble, x, feats, cam_class, settings.maps, autocast, shared, patches,
                               segments)  # [B, M, h, w]
    shared.clear()
    agreement = map_agreement(raw)  # [B, M]; what the "disagreement" review order ranks by

    classes = ensemble.classes
    predicted_all = predicted_classes(probs_np.reshape(-1, probs_np.shape[-1])).reshape(probs_np.shape[:2])
    novel = None
    if settings.novelty is not None and scores:
        novel = np.stack([s[settings.novelty["score"]] > _novelty_limits(settings.novelty, n, predicted_all[:, i], classes)
                          for i, (n, s) in enumerate(zip(names, scores))], axis=1)
    decisions = [decide(probs_np[b], uncert_np[b], settings.theta, ensemble.negative_index, settings.quorum,
                        None if novel is None else novel[b])
                 for b in range(len(sizes))]
    mask_members = (None if settings.maps.mask_members is None
                    else [names.index(n) for n in settings.maps.mask_members])
    drafts = [draft_members(d, probs_np[b], ensemble.negative_index, mask_members)
              for b, d in enumerate(decisions)]
    # the members whose maps each image's mask (the agreeing ones) or draft fuses; none for the rest
    fused = [d.agreeing or drafts[b] for b, d in enumerate(decisions)]
    taus = [settings.tau_for(classes[d.label] if d.agreeing else classes[shown[b]]) if fused[b] else 0.0
            for b, d in enumerate(decisions)]
    wanted = [b for b in range(len(sizes)) if keep_saliency or fused[b]]
    refine = settings.maps.refine == "superpixels"
    keep_regions = keep_saliency and (refine if keep_regions is None else keep_regions)
    # regions where masks are refined, and for every image when kept with the maps
    cut = list(range(len(sizes))) if keep_regions else [b for b in wanted if refine and fused[b]]
    if regions is not None:
        regions = {b: regions[b] for b in cut}
    else:
        regions = dict(zip(cut, input_superpixels(x[cut], *ensemble.normalisation))) if cut else {}
    masks, maps = _maps_and_masks(raw, grids, sizes, wanted, fused, taus, keep_saliency,
                                  settings.maps.fusion, settings.quorum, mask_members,
                                  regions if refine else None,
                                  rescale=settings.maps.source != "segmentation")

    # a draft with no pixel set offers the reviewer nothing: none is given
    drafts = [d if d and masks[b].any() else () for b, d in enumerate(drafts)]
    records = []
    for b, (h, w) in enumerate(sizes):
        decision = decisions[b]
        predicted = predicted_all[b]
        records.append(AnnotationRecord(
            image="",
            decision=REVIEW if decision.review else classes[decision.label],
            reason=decision.reason,
            agreeing=[names[i] for i in decision.agreeing],
            members=[MemberResult(name=n, probs=[float(v) for v in probs_np[b, i]],
                                  uncertainty=float(uncert_np[b, i]),
                                  predicted=None if predicted[i] == NO_PREDICTION else classes[predicted[i]],
                                  novelty={k: float(v[b]) for k, v in scores[i].items()} if scores else None,
                                  novel=None if novel is None else bool(novel[b, i]),
                                  map_agreement=round(float(agreement[b, i]), 6))
                     for i, n in enumerate(names)],
            mask=masks.get(b) if decision.agreeing else None,
            draft=masks.get(b) if drafts[b] else None,
            draft_class=classes[shown[b]] if drafts[b] else None,
            saliency=dict(zip(names, maps[b])) if keep_saliency else None,
            regions=regions.get(b) if keep_regions else None,
            size=(h, w),
        ))
    return records


def _novelty_limits(step: dict[str, Any], name: str, predicted: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """A member's novelty threshold for each image: its predicted class's when the step
    has one (:func:`aax.models.novelty.class_thresholds`), else the member's threshold."""
    return per_image(float(step["thresholds"][name]), (step.get("by_class") or {}).get(name) or {},
                     [classes[p] if p != NO_PREDICTION else None for p in predicted])


def map_budget(device: torch.device) -> int:
    """Map pixels upsampled at once. On a CPU, about one image's maps (4 MiB of float32),
    so that the normalise / min / threshold passes that follow read them from cache:
    4x faster than one large chunk at 512 px. On a GPU, large chunks (128 MiB), so that
    few kernels are launched."""
    return 1 << 25 if device.type == "cuda" else 1 << 20


def _maps_and_masks(raw: torch.Tensor, grids: Sequence[Grid], sizes: Sequence[tuple[int, int]],
                    wanted: Sequence[int],
                    fused: Sequence[Sequence[int]], taus: Sequence[float | str], keep: bool,
                    fusion: str = "min", votes: int = 2, mask_members: Sequence[int] | None = None,
                    regions: Mapping[int, np.ndarray] | None = None, rescale: bool = True,
                    ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Masks (the maps of each image's ``fused`` members, i.e. its agreeing members or its draft's,
    fused, ``> tau``, as :func:`aax.annotation.decide.fuse` and :func:`aax.annotation.decide.binarise`;
    only those among ``mask_members`` when any is; none where ``fused`` is empty) and, with
    ``keep``, every member's map, at each image's original size, each resized on its
    member's :class:`~aax.models.explain.Grid`. With ``regions`` (image -> superpixel labels),
    an image's fused score is averaged over its regions first
    (:func:`aax.models.refine.pool_resized`). ``rescale``: min-max normalise each map
    (:func:`aax.models.explain.normalise`), as saliency and novelty maps need, whose scale
    means nothing; a segmentation head's probabilities keep theirs, since a map whose
    highest value is 0.2 says "no finding here" and stretched to [0, 1] it would not.

    Images of one size are upsampled together, on the device, in chunks of
    :func:`map_budget` pixels; only the boolean masks (and kept maps) leave the device.
    """
    masks: dict[int, np.ndarray] = {}
    maps: dict[int, np.ndarray] = {}
    m = raw.shape[1]
    budget = map_budget(raw.device)
    by_size: dict[tuple[int, int], list[int]] = {}
    for b in wanted:
        by_size.setdefault(tuple(sizes[b]), []).append(b)
    for (h, w), group in by_size.items():
        step = max(1, budget // (m * h * w))
        for start in range(0, len(group), step):
            chunk = group[start:start + step]
            up = upsample(raw[chunk], (h, w), grids)
            if rescale:
                up = normalise(up, inplace=True)
            for j, b in enumerate(chunk):
                agreeing = list(mask_subset(fused[b], mask_members))
                if agreeing:
                    # all members agree most of the time: a view then, not a gathered copy
                    chosen = up[j] if len(agreeing) == m else up[j, agreeing]
                    score = fuse_maps(chosen, fusion, votes)
                    if regions is not None:
                        score = pool_resized(score, regions[b])
                    tau = otsu_threshold(score.cpu().numpy()) if taus[b] == OTSU else taus[b]
                    masks[b] = (score > tau).cpu().numpy()
            if keep:
                kept = up.cpu().numpy()
                for j, b in enumerate(chunk):
                    maps[b] = kept[j]
    return masks, maps


def annotate(ensemble: Ensemble, images: Iterable[Any], *, theta: float | None = None,
             tau: float | None = None, mc_passes: int | None = None, batch_size: int | None = None,
             keep_saliency: bool = False, keep_preview: bool = False, workers: int | None = None,
             amp: bool = False, novelty: bool = True, keep_regions: bool | None = None) -> Iterator[AnnotationRecord]:
    """Annotate ``images`` (paths, or an :mod:`aax.data` dataset) and yield one record per
    image, in input order. Unreadable files yield ``status="error"`` records.

    Memory does not grow with the number of images: records are yielded as batches finish.
    With ``keep_preview`` each record carries ``preview``, a small uint8 copy of the image
    (for overlays). ``novelty=False`` skips the novelty step (the scores are still
    recorded when the run has novelty data). ``keep_regions``: as :func:`annotate_batch`.
    """
    settings = AnnotateSettings.from_ensemble(ensemble, theta, tau, mc_passes, novelty)
    items = as_items(images)
    if not items:
        return
    mean, std = ensemble.normalisation
    workers = default_workers(ensemble.device) if workers is None else workers
    # In workers the cut overlaps with the models, so every image is cut there; in this
    # process it would only add work, so only the images that get a mask are cut, later.
    refine = settings.maps.refine == "superpixels" or bool(keep_saliency and keep_regions)
    cut = functools.partial(_regions, mean=mean, std=std) if refine and workers > 0 else None
    source = Decoded(items, ensemble.image_size, mean, std, keep_preview, regions=cut)
    batch_size = batch_size or default_batch_size(ensemble.device, ensemble.image_size)
    loader = DataLoader(source, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                        pin_memory=ensemble.device.type == "cuda",
                        prefetch_factor=4 if workers else None, persistent_workers=False)
    for batch in loader:
        runtime.tick()  # give cores back when another job starts (aax.runtime)
        done: dict[int, AnnotationRecord] = {}
        for index, reason in batch["errors"]:
            done[index] = AnnotationRecord(image="", status="error", error=reason)
        if batch["x"] is not None:
            seeds = [image_seed(items[i].path) for i in batch["index"]]
            results = annotate_batch(ensemble, batch["x"], batch["size"], settings, keep_saliency, amp, seeds,
                                     keep_regions, batch["regions"])
            for index, record, preview in zip(batch["index"], results, batch["preview"]):
                record.preview = preview
                done[index] = record
        for index in sorted(done):
            record = done[index]
            record.image = str(items[index].path)
            record.label = items[index].label
            yield record


def collect_inputs(source: str | os.PathLike, exclude: str | os.PathLike | None = None,
                   ) -> tuple[list[InputItem], Path, list[tuple[Path, str]]]:
    """What ``aax annotate`` runs on: a folder of images (searched recursively), or
    anything :func:`aax.data.open_dataset` reads (a CSV manifest, TBX11K's layout).

    Paths come back absolute, so that an image is the same image whatever the working
    directory. ``exclude`` (the output folder) is never read as input, even when it lies
    inside the input folder.

    Returns the items, the root that output names are relative to, and the files the
    dataset reader already found unusable, with their reasons.
    """
    from aax.data import find_images, open_dataset

    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such file or folder")
    source = source.resolve()
    if source.is_dir() and _format_or_none(source) != "tbx11k":
        items, root, errors = [InputItem(p) for p in find_images(source)], source, []
    else:
        dataset = open_dataset(source)
        root = source if source.is_dir() else source.parent
        errors = [(Path(e.path).resolve(), e.reason) for e in dataset.errors]
        items = [InputItem(item.path.resolve(), item.label) for item in as_items(dataset)]
    if exclude is not None:
        skip = Path(exclude).resolve()
        items = [i for i in items if not i.path.is_relative_to(skip)]
        errors = [(p, r) for p, r in errors if not p.is_relative_to(skip)]
    return items, root, errors


def _format_or_none(folder: Path) -> str | None:
    from aax.data import detect_format

    try:
        return detect_format(folder)
    except ValueError:  # a plain folder of images is no dataset layout, and needs none
        return None


def mask_quality(ensemble: Ensemble) -> dict | None:
    """What calibration measured of the masks on the run's validation masks: their mean
    IoU, the trivial masks' (whole image, centred box) and whether the masks beat them;
    None when the run was calibrated without masks."""
    entry = (getattr(ensemble, "manifest", None) or {}).get("calibration") or {}
    if entry.get("iou_mean") is None or not entry.get("trivial"):
        return None
    return {"validation_iou_mean": entry["iou_mean"],
            "trivial_iou_mean": {k: v.get("iou_mean") for k, v in entry["trivial"].items()},
            "beats_trivial": bool(entry.get("beats_trivial")), "warning": entry.get("mask_warning")}


@dataclass
class StorePlan:
    """An annotation folder opened for writing, and what is left to do in it.

    Attributes:
        store: the open store (its settings checked, files without a row removed).
        settings: the annotation settings the store was opened with.
        todo: input images that have no row yet, in input order.
        bad: files the dataset reader already found unusable (path, reason) and that
            have no row yet; they become error rows.
        skipped: inputs that already have a row (done by an earlier, interrupted run).
    """

    store: Any
    settings: AnnotateSettings
    todo: list[InputItem]
    bad: list[tuple[Path, str]]
    skipped: int


def store_fingerprint(ensemble: Ensemble, settings: AnnotateSettings, source: str | os.PathLike) -> dict:
    """What a store's rows depend on: the run and its weights, the input, the classes and
    every annotation setting. A folder made with another fingerprint is refused."""
    fingerprint = {"store": STORE_FORMAT, "run": str(Path(ensemble.run).resolve()),
                   "weights": runfiles.run_fingerprint(ensemble.run, ensemble.manifest), "input": str(Path(source).resolve()),
                   "classes": list(ensemble.classes), "negative_class": ensemble.negative_class,
                   **dataclasses.asdict(settings)}
    if fingerprint["novelty"] is None:  # as folders made before the step existed
        del fingerprint["novelty"]
    if fingerprint["maps"].get("source") == "cam":  # as folders made before patch maps existed
        del fingerprint["maps"]["source"]
    if fingerprint["maps"].get("mask_members") is None:  # all members, as before the option
        fingerprint["maps"].pop("mask_members", None)
    # masks made before maps were registered on the image (Grid) differ: such a folder is
    # refused (settings differ), not completed with masks of another kind
    fingerprint["maps"]["grid"] = "receptive-field"
    if settings.maps.source == "patch":  # patch maps depend on the bank: a refitted one makes other masks
        from aax.models.patch_maps import FILE as PATCH_FILE

        bank = Path(ensemble.run) / str((ensemble.manifest.get("patches") or {}).get("file", PATCH_FILE))
        fingerprint["maps"]["patch_bank"] = runfiles.checkpoint_digest(bank)[:16]
    return fingerprint


def plan_store(ensemble: Ensemble, source: str | os.PathLike, out: str | os.PathLike, *,
               theta: float | None = None, tau: float | None = None, mc_passes: int | None = None,
               overwrite: bool = False, novelty: bool = True) -> StorePlan:
    """Open ``out`` for annotating ``source`` and work out what is left to do.

    The resume rule of every annotation path (in this process or on a cluster,
    :mod:`aax.scale.annotate`): an image that has a row is skipped; one without is done.
    """
    from aax.annotation.store import AnnotationStore

    settings = AnnotateSettings.from_ensemble(ensemble, theta, tau, mc_passes, novelty)
    items, root, bad = collect_inputs(source, exclude=out)
    store = AnnotationStore(out, store_fingerprint(ensemble, settings, source), input_root=root,
                            overwrite=overwrite)
    done = store.done()
    inputs = len(items) + len(bad)
    todo = [item for item in items if store.key(item.path) not in done]
    bad = [(p, reason) for p, reason in bad if store.key(p) not in done]
    return StorePlan(store, settings, todo, bad, inputs - len(todo) - len(bad))


def finish_store(plan: StorePlan, ensemble: Ensemble, **extra: object) -> dict:
    """Write the review list and ``summary.json`` (with ``extra`` entries), close the
    store and return the summary."""
    from aax.annotation.review_list import write_review_list

    review = write_review_list(plan.store)
    summary = plan.store.write_summary(review_list=review["files"], skipped_already_done=plan.skipped,
                                       mask_quality=mask_quality(ensemble), **extra)
    plan.store.close()
    return summary


def annotate_to_folder(ensemble: Ensemble, source: str | os.PathLike, out: str | os.PathLike, *,
                       theta: float | None = None, tau: float | None = None,
                       mc_passes: int | None = None, batch_size: int | None = None,
                       save_saliency: bool = False, overwrite: bool = False,
                       workers: int | None = None, amp: bool = False,
                       progress: bool = True, novelty: bool = True) -> dict:
    """Annotate ``source`` into ``out`` (``annotations.sqlite``, ``masks/``, ``drafts/`` (the
    flagged images' draft masks), ``summary.json``, and ``saliency/`` with
    ``save_saliency``); return the summary.

    Interrupted runs resume: images that already have a row are skipped. A folder
    made with other settings is refused (:class:`aax.annotation.store.SettingsMismatch`) unless
    ``overwrite``.
    """
    from tqdm.auto import tqdm

    from aax.annotation.overlay import render_record
    from aax.annotation.store import BackgroundWriter

    plan = plan_store(ensemble, source, out, theta=theta, tau=tau, mc_passes=mc_passes,
                      overwrite=overwrite, novelty=novelty)
    settings = plan.settings
    render = (lambda r: render_record(r, settings.tau_for(r.decision), settings.theta)) if save_saliency else None
    writer = BackgroundWriter(plan.store, render)
    bar = tqdm(total=len(plan.todo) + len(plan.bad), unit="img", desc="annotate", disable=not progress,
               initial=0, dynamic_ncols=True)
    flagged = 0
    try:
        for path, reason in plan.bad:
            writer.put(AnnotationRecord(image=str(path), status="error", error=reason))
            bar.update()
        for record in annotate(ensemble, plan.todo, theta=settings.theta, tau=settings.tau,
                               mc_passes=settings.mc_passes, batch_size=batch_size,
                               keep_saliency=save_saliency, keep_preview=save_saliency,
                               workers=workers, amp=amp, novelty=novelty):
            writer.put(record)
            flagged += record.flagged
            bar.update()
            bar.set_postfix(flagged=flagged, refresh=False)
    finally:
        bar.close()
        writer.close()
    return finish_store(plan, ensemble)
