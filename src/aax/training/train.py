"""Training the ensemble members on image-level labels (paper 3.1, 4.1): a RUN folder.

``train(data, out, config)`` trains each member on its own with
``L = CE + lambda * Var`` (see :mod:`aax.training.loop`), Adam, batch 16, at most 50
epochs, early stopping after 5 epochs without validation-loss improvement, and keeps the
best epoch. It writes (atomically, see ``docs/architecture.md``):

- ``RUN/aax.json``: the manifest (classes, negative class, members, image size,
  normalisation, decision settings, the data incl. the validation split),
- ``RUN/<member>.pt``: each member's best checkpoint,
- ``RUN/history.csv``: one row per member and epoch,
- ``RUN/<member>.last.pt`` while a member trains, so ``resume=True`` continues an
  interrupted run from its last finished epoch (removed once the member is done).

With ``reviews`` (:mod:`aax.training.reviewed`), the reviewed classes replace the
dataset's, reviewed images always train, and reviewed masks add the localisation term
``localisation_weight * Loc`` to the objective; the manifest lists them under ``reviews``.

By default every member starts from its ImageNet weights (the EfficientNet-Lite members'
ship with the package) and fine-tunes with :data:`FINETUNE_LR` for at most
:data:`FINETUNE_EPOCHS`; from scratch (``pretrained=None``, no ``weights``) the defaults are
:data:`SCRATCH_LR` and :data:`SCRATCH_EPOCHS`. Both use a one-epoch warm-up and a cosine
decay over the epochs; see ``docs/training.md`` for the measurements.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aax import __version__
from aax.data.augment import Augment
from aax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from aax.models import runfiles
from aax.models.device import default_channels_last, resolve_device
from aax.models.members import DEFAULT_MEMBERS, MEMBERS, Member, build_member
from aax.models.members.segment import fit_head_to
from aax.models.runfiles import RunError
from aax.training.init import zero_init_residuals
from aax.training.loop import LoopSettings, MemberOutcome, train_member
from aax.training.tensors import Cached, decode_samples

log = logging.getLogger("aax.training.train")

SCRATCH_LR = 1e-3
"""Default Adam learning rate without pretrained weights (warm-up + cosine)."""
FINETUNE_LR = 3e-4
"""Default Adam learning rate for a member that starts from pretrained weights."""
SCRATCH_EPOCHS = 50
"""Default maximum epochs from scratch (the paper's)."""
FINETUNE_EPOCHS = 15
"""Default maximum epochs when fine-tuning pretrained weights."""
DEFAULT_IMAGE_SIZE = 224
"""Default input side: the native size of EfficientNet-Lite0's ImageNet weights."""
NEGATIVE_NAMES: tuple[str, ...] = ("healthy", "no_fire", "health", "normal", "negative")
"""Class names taken as the negative class when none is given, in this order."""
CHANCE_MARGIN = 0.1
"""A member whose best validation accuracy is within this of the majority-class rate
(capped at half the distance to 1) is reported as not converged."""

# Settings a run written before they existed had implicitly (see _check_resumable).
LEGACY_DEFAULTS: dict[str, Any] = {"pretrained": None, "segmentation_epochs": 0, "segmentation_views": 0}

MIN_SEGMENTATION_MASKS = 10
"""Reviewed masks a run needs before its members get segmentation heads: with fewer, a
head learns little and the masks stay XGrad-CAM's."""

# Decision settings written into every manifest (paper 3.3 / 4.1); calibration may
# replace theta and tau later.
THETA, TAU, MC_PASSES = 0.1, 0.5, 30


@dataclass
class TrainConfig:
    """Settings of one training run (all of them land in the manifest's ``training``).

    Attributes:
        members: member names (see :data:`aax.models.members.MEMBERS`); by default the three
            EfficientNet-Lite members.
        epochs: maximum epochs per member; ``None``: :data:`FINETUNE_EPOCHS` for a
            member that starts from pretrained weights, :data:`SCRATCH_EPOCHS` otherwise.
        patience: stop after this many epochs without validation-loss improvement
            (0 disables early stopping).
        batch_size: images per step.
        lr: Adam learning rate for every member; ``None``: :data:`FINETUNE_LR` for a
            member that starts from pretrained weights, :data:`SCRATCH_LR` otherwise.
        image_size: model input side in pixels.
        val_split: fraction of each class held out for validation.
        dropout: dropout probability of the MC head.
        lambda_var: weight of the variance term in ``L = CE + lambda * Var``.
        var_passes: stochastic head passes ``T`` for ``Var`` (>= 2).
        weights: member name -> pretrained checkpoint (path or URL).
        negative_class: the negative class; ``None`` picks one of
            :data:`NEGATIVE_NAMES`, else the first class alphabetically.
        seed: seeds the split, initialisation, shuffling, augmentation and dropout.
        device: torch device name; ``None``: CUDA when available.
        class_weights: ``None`` or ``"balanced"`` (CE weights ``n / (C * n_c)``).
        resume: continue an interrupted run in ``out`` (the stored settings must match).
        augment: flip / affine / intensity augmentation of training batches.
        hflip: the augmentation flips images left-right (turn off where sides differ,
            as on chest X-rays: the heart is on the left).
        label_map: renames dataset labels as they are read (``{"tb": "diseased"}``).
        recalibrate_bn: re-estimate batch-norm statistics on the training images after
            every epoch, before validation ("precise BN"; see
            :func:`aax.training.loop.recalibrate_bn`).
        zero_init_residual: members trained from scratch start with every residual
            branch at zero (:func:`aax.training.init.zero_init_residuals`).
        warmup_epochs: linear learning-rate warm-up, in epochs.
        min_lr_factor: the cosine schedule ends at ``lr * min_lr_factor``.
        data_format: dataset layout passed to ``aax.data.open_dataset`` (``None``: detect).
        progress: show a progress bar.
        channels_last: train in channels-last memory format; ``None``: on for CPUs, where
            a training step is 1.1-1.4x faster (:func:`aax.models.device.default_channels_last`).
        output_stride: the members' output stride while training (32, 16 or 8; see
            :meth:`aax.models.members.Member.set_output_stride`); annotation may use another.
        localisation_weight: weight ``w`` of the localisation term on reviewed masks
            (:func:`aax.training.loop.localisation_loss`); only used when training with reviews.
        localisation_loss: its form, ``"bce"`` or ``"spatial"`` (:data:`aax.training.loop.LOCALISATION_LOSSES`).
        segmentation_weight: with at least :data:`MIN_SEGMENTATION_MASKS` reviewed masks and a
            weight above 0, every member gets a light segmentation head on its features
            (:mod:`aax.models.members.segment`), trained on the masks with this weight, and
            the run's masks come from the heads' maps (``maps.source = "segmentation"``).
            0 keeps XGrad-CAM's maps and the localisation term alone (docs/reviews.md).
        segmentation_epochs: once a member with a segmentation head is trained, its head
            alone is refitted on the reviewed masks for this many epochs over the frozen
            backbone (:mod:`aax.training.seg_refit`); 0: the head stays as trained.
        segmentation_views: augmented views of each masked image the refit learns from,
            besides the image and its mirror image (the training augmentation, drawn once).
        warm_start: a finished RUN folder: every member starts from that RUN's trained member
            of the same name (backbone and head; the classes must match) instead of
            ``weights`` or ImageNet, at the fine-tuning learning rate (``aax retrain --warm-start``).
        pretrained: ``"imagenet"`` (the default): every member without ``weights``
            starts from its ImageNet checkpoint (:func:`aax.models.members.weights.imagenet_source`:
            installed with the package for the EfficientNet-Lite members, fetched once into
            torch hub's cache for the paper's trio); ``None``: from scratch.
    """

    members: tuple[str, ...] = DEFAULT_MEMBERS
    epochs: int | None = None
    patience: int = 5
    batch_size: int = 16
    lr: float | None = None
    image_size: int = DEFAULT_IMAGE_SIZE
    val_split: float = 0.2
    dropout: float = 0.2
    lambda_var: float = 0.1
    var_passes: int = 4
    weights: dict[str, str] = field(default_factory=dict)
    negative_class: str | None = None
    seed: int = 0
    device: str | None = None
    class_weights: str | None = None
    resume: bool = False
    augment: bool = True
    hflip: bool = True
    label_map: dict[str, str] = field(default_factory=dict)
    recalibrate_bn: bool = True
    zero_init_residual: bool = True
    warmup_epochs: float = 1.0
    min_lr_factor: float = 0.01
    data_format: str | None = None
    progress: bool = True
    channels_last: bool | None = None
    output_stride: int = 32
    pretrained: str | None = "imagenet"
    localisation_weight: float = 0.1
    localisation_loss: str = "bce"
    segmentation_weight: float = 0.3
    segmentation_epochs: int = 60
    segmentation_views: int = 14
    warm_start: str | None = None

    # Fields that do not change what is trained: free to differ on --resume.
    RUNTIME_FIELDS = ("device", "resume", "progress", "channels_last")

    def validate(self) -> None:
        """Raise ``ValueError`` on settings that cannot work."""
        unknown = [m for m in self.members if m not in MEMBERS]
        if unknown or not self.members:
            raise ValueError(f"unknown members {unknown}; choose from {sorted(MEMBERS)}")
        if len(set(self.members)) != len(self.members):
            raise ValueError(f"members listed twice: {list(self.members)}")
        if (self.epochs is not None and self.epochs < 1) or self.batch_size < 2 or self.image_size < 32:
            raise ValueError("need epochs >= 1, batch_size >= 2 and image_size >= 32")
        if not 0.0 < self.val_split < 1.0:
            raise ValueError(f"val_split must be in (0, 1), got {self.val_split}")
        if self.var_passes < 2 and self.lambda_var:
            raise ValueError("var_passes must be >= 2 when lambda_var > 0")
        if self.class_weights not in (None, "balanced"):
            raise ValueError(f"class_weights must be None or 'balanced', got {self.class_weights!r}")
        from aax.models.members import OUTPUT_STRIDES

        if self.output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {self.output_stride}")
        if not self.localisation_weight >= 0.0:
            raise ValueError(f"localisation_weight must be >= 0, got {self.localisation_weight}")
        if not self.segmentation_weight >= 0.0:
            raise ValueError(f"segmentation_weight must be >= 0, got {self.segmentation_weight}")
        if self.segmentation_epochs < 0:
            raise ValueError(f"segmentation_epochs must be >= 0, got {self.segmentation_epochs}")
        if self.segmentation_views < 0:
            raise ValueError(f"segmentation_views must be >= 0, got {self.segmentation_views}")
        from aax.training.loop import LOCALISATION_LOSSES

        if self.localisation_loss not in LOCALISATION_LOSSES:
            raise ValueError(f"localisation_loss must be one of {LOCALISATION_LOSSES}, got {self.localisation_loss!r}")
        if self.pretrained not in (None, "imagenet"):
            raise ValueError(f"pretrained must be None or 'imagenet', got {self.pretrained!r}")
        extra = sorted(set(self.weights) - set(self.members))
        if extra:
            raise ValueError(f"weights given for members not trained: {extra}")

    def segments(self, train_set: Cached) -> bool:
        """Whether the members get segmentation heads: a weight above 0 and enough reviewed masks."""
        return bool(self.segmentation_weight) and train_set.n_masks >= MIN_SEGMENTATION_MASKS

    def settings(self) -> dict[str, Any]:
        """The fields that define what is trained (JSON-friendly), as stored in the manifest."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in self.RUNTIME_FIELDS}
        out["members"] = list(self.members)
        out["weights"] = {k: str(v) for k, v in self.weights.items()}
        out["label_map"] = dict(self.label_map)
        return out

    def member_weights(self, name: str) -> str | None:
        """The checkpoint member ``name`` starts from: its ``weights`` entry, its ImageNet
        checkpoint with ``pretrained="imagenet"``, or None (from scratch)."""
        if name in self.weights:
            return self.weights[name]
        if self.pretrained == "imagenet":
            from aax.models.members.weights import imagenet_source

            return imagenet_source(name)
        return None

    def member_lr(self, name: str) -> float:
        """The learning rate member ``name`` trains with."""
        if self.lr is not None:
            return float(self.lr)
        return FINETUNE_LR if self._starts_pretrained(name) else SCRATCH_LR

    def member_epochs(self, name: str) -> int:
        """The maximum number of epochs member ``name`` trains for."""
        if self.epochs is not None:
            return int(self.epochs)
        return FINETUNE_EPOCHS if self._starts_pretrained(name) else SCRATCH_EPOCHS

    def _starts_pretrained(self, name: str) -> bool:
        # decided without locating the file, so settings can be read where it is absent
        return self.warm_start is not None or name in self.weights or self.pretrained == "imagenet"


def default_maps(train_stride: int, segmentation: bool = False) -> Any:
    """The map settings a new run gets: its class pass at the trained stride, its maps at
    :data:`aax.models.maps.DEFAULT_MAP_STRIDE` (or the trained stride, if finer), the fused map
    averaged over superpixels (docs/quality.md: better or equal on the four sets measured;
    calibration on validation masks may turn it off); with ``segmentation`` (members with
    segmentation heads), masks fused from the heads' maps."""
    from aax.models.maps import DEFAULT_MAP_STRIDE, MapOptions

    return MapOptions(class_stride=train_stride, map_stride=min(train_stride, DEFAULT_MAP_STRIDE),
                      refine="superpixels", source="segmentation" if segmentation else "cam")


def default_negative_class(classes: Sequence[str]) -> str:
    """The negative class: the first of :data:`NEGATIVE_NAMES` present (any case), else
    the first class alphabetically."""
    lowered = {c.lower(): c for c in classes}
    for name in NEGATIVE_NAMES:
        if name in lowered:
            return lowered[name]
    return sorted(classes)[0]


def resolve_negative_class(classes: Sequence[str], negative: str | None) -> str:
    """``negative`` if it is one of ``classes`` (else ``ValueError``), or the default."""
    if negative is None:
        return default_negative_class(classes)
    if negative not in classes:
        raise ValueError(f"negative class {negative!r} is not among the classes {list(classes)}")
    return negative


def _member_seed(seed: int, name: str) -> int:
    # Independent of the member list, so a member trains the same alone or with others.
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _quorum(n: int) -> int:
    return n // 2 + 1


def _open(data: Any, config: TrainConfig) -> tuple[Any, str | None]:
    """The dataset, and the folder its file names are stored relative to."""
    if isinstance(data, (str, os.PathLike)):
        from aax.data import open_dataset

        data = open_dataset(data, format=config.data_format, label_map=config.label_map or None)
    source = getattr(data, "source", None)
    if source is None or str(source) in ("", "."):
        return data, None
    source = Path(source).resolve()
    return data, str(source if source.is_dir() else source.parent)


def _relative(path: Any, root: str | None) -> str:
    """``path`` as the manifest stores it: relative to ``root`` when under it, else resolved
    (so that the same file reads the same however the data's path was spelt)."""
    p = Path(path)
    if root is not None:
        try:
            return p.resolve().relative_to(root).as_posix()
        except ValueError:
            return p.resolve().as_posix()
    return str(p)


def _same_files(stored: Sequence[str], now: Sequence[str], root: str | None) -> bool:
    """Whether two lists of manifest file names (:func:`_relative`) name the same files,
    also when one was written with the images outside ``root`` spelt another way."""
    def where(name: str) -> Path:
        return (Path(root) / name if root is not None else Path(name)).resolve()

    return len(stored) == len(now) and all(a == b or where(a) == where(b) for a, b in zip(stored, now))


def _say(message: str) -> None:
    from tqdm.auto import tqdm

    # Printed rather than logged: logging's last-resort handler would print warnings twice.
    log.debug(message)
    tqdm.write(message, file=sys.stderr)


def _check_resumable(out: Path, config: TrainConfig) -> dict[str, Any] | None:
    manifest_path = out / runfiles.MANIFEST
    existing = manifest_path.is_file() or any(out.glob("*.pt")) if out.is_dir() else False
    if not config.resume:
        if existing:
            raise RunError(f"{out} already holds a run; pass resume=True (--resume) to continue "
                           "it, or choose another folder")
        return None
    if not manifest_path.is_file():
        if existing:
            raise RunError(f"{out} has checkpoints but no {runfiles.MANIFEST}: cannot resume")
        return None  # nothing to resume: a fresh run
    manifest = runfiles.read_json(manifest_path)
    stored = manifest.get("training", {})
    wanted = config.settings()
    # a setting added after the run was made is absent from it: the run had the default
    # of its day (from-scratch runs predate ImageNet weights by default, runs with heads
    # predate their refit and its views)
    defaults = {**TrainConfig().settings(), **LEGACY_DEFAULTS}
    diffs = [f"{k}: run has {stored.get(k, defaults.get(k))!r}, asked {v!r}" for k, v in wanted.items()
             if _jsonish(stored.get(k, defaults.get(k))) != _jsonish(v)]
    if diffs:
        raise RunError(f"cannot resume {out}: settings differ from the stored run:\n  "
                       + "\n  ".join(diffs))
    return manifest


def _jsonish(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonish(v) for v in value]
    if isinstance(value, list):
        return [_jsonish(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonish(v) for k, v in value.items()}
    return value


def _class_weight_tensor(labels: torch.Tensor, n_classes: int, mode: str | None) -> torch.Tensor | None:
    if mode is None:
        return None
    counts = torch.bincount(labels, minlength=n_classes).float()
    weights = labels.numel() / (n_classes * counts.clamp(min=1.0))
    return weights


def _split(dataset: Any, classes: Sequence[str], config: TrainConfig,
           resumed: Mapping[str, Any] | None, root: str | None) -> tuple[list[int], list[int]]:
    from aax.data import stratified_split

    labels = [dataset[i].label for i in range(len(dataset))]
    if resumed is not None:
        data = resumed["data"]
        train_idx, val_idx = list(data["train_indices"]), list(data["val_indices"])
        now = [_relative(dataset[i].image, root) for i in val_idx if i < len(dataset)]
        if (resumed["classes"] != list(classes) or not _same_files(data["val_files"], now, root)
                or data.get("n_images", len(dataset)) != len(dataset)):
            raise RunError("cannot resume: the data differ from the stored run "
                           "(classes, number of images or validation files changed)")
        return train_idx, val_idx
    train_idx, val_idx = stratified_split(labels, config.val_split, config.seed)
    return [int(i) for i in train_idx], [int(i) for i in val_idx]


@dataclass
class PreparedRun:
    """A RUN folder ready for its members: the data decoded and split (reviews merged in),
    the manifest written with status ``training``. :func:`train` trains the members one
    after the other in this process; :mod:`aax.scale.train` trains them as Ray tasks. Both
    finish with :func:`complete_run`, so they write the same folder."""

    out: Path
    config: TrainConfig
    device: torch.device
    dataset: Any
    classes: list[str]
    train_set: Cached
    val_set: Cached
    normalisation: dict[str, list[float]]
    manifest: dict[str, Any]
    history: list[dict[str, Any]]
    negative_index: int = 0

    def todo(self) -> list[str]:
        """The members still to train, in the configured order (finished ones are skipped,
        and their resume state removed)."""
        finished = {m["name"] for m in self.manifest["members"]}
        left = []
        for name in self.config.members:
            if name in finished:
                (self.out / runfiles.last_state_name(name)).unlink(missing_ok=True)
                _say(f"{name}: already trained, skipped")
            else:
                left.append(name)
        return left

    def record(self, entry: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        """Add a trained member (its checkpoint already in place) to the history and the
        manifest; its resume state goes."""
        self.history += rows
        # in the configured member order, whatever order members finish in (Ray tasks)
        order = {n: i for i, n in enumerate(self.config.members)}
        self.history.sort(key=lambda r: order.get(r["member"], len(order)))
        runfiles.write_history(self.out / runfiles.HISTORY, self.history)
        self.manifest["members"].append(entry)
        if not entry["converged"]:
            self.manifest["warnings"].append(entry["warning"])
        runfiles.write_json(self.out / runfiles.MANIFEST, self.manifest)
        (self.out / runfiles.last_state_name(entry["name"])).unlink(missing_ok=True)


def prepare_run(data: Any, out: str | os.PathLike[str], config: TrainConfig | None = None,
                reviews: Sequence[Any] | None = None) -> PreparedRun:
    """Check the settings, decode and split the data (with ``reviews`` merged in) and write
    the manifest (status ``training``) into ``out``; see :func:`train` for the arguments
    and errors."""
    config = config or TrainConfig()
    config.validate()
    out = Path(out)
    resumed = _check_resumable(out, config)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)

    dataset, root = _open(data, config)
    classes = sorted(dataset.classes)
    if len(classes) < 2:
        raise ValueError(f"need at least two classes, found {classes}")
    negative = resolve_negative_class(classes, config.negative_class)
    merged = None
    if reviews:
        from aax.training.reviewed import merge_reviews, reviewed_split

        merged = merge_reviews(dataset, reviews, negative)
        if resumed is None:  # the split of the data alone, then the reviewed images moved to training
            train_idx, val_idx = reviewed_split(*_split(dataset, classes, config, None, root), merged)
        dataset = merged.dataset
    if merged is None or resumed is not None:
        train_idx, val_idx = _split(dataset, classes, config, resumed, root)
    size = config.image_size
    train_set = decode_samples(dataset, train_idx, classes, size, masks=merged.masks if merged else None)
    val_set = decode_samples(dataset, val_idx, classes, size)
    skipped = [{"path": str(e.path), "reason": str(e.reason)} for e in getattr(dataset, "errors", [])]
    skipped += [{"path": p, "reason": r} for p, r in train_set.errors + val_set.errors]
    for item in skipped:
        _say(f"skipped {item['path']}: {item['reason']}")
    _check_data(train_set, val_set, classes)

    normalisation = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    segmentation = config.segments(train_set)
    manifest = resumed or {}
    manifest.update({
        "aax_version": __version__, "status": "training",
        "classes": classes, "negative_class": negative, "image_size": size,
        "normalisation": normalisation,
        "members": list(manifest.get("members", [])),
        # A resumed run keeps what calibration may already have written.
        "theta": manifest.get("theta", THETA), "tau": manifest.get("tau", TAU),
        "mc_passes": manifest.get("mc_passes", MC_PASSES),
        "quorum": _quorum(len(config.members)),
        "maps": manifest.get("maps") or default_maps(config.output_stride, segmentation).to_dict(),
        "data": _data_block(dataset, root, config, train_idx, val_idx, train_set, val_set,
                            classes, skipped),
        "training": config.settings(),
        "calibration": manifest.get("calibration"),
        "warnings": list(manifest.get("warnings", [])),
    })
    if merged is not None:
        manifest["reviews"] = {**merged.record, "n_masks_used": train_set.n_masks,
                               "localisation_weight": config.localisation_weight,
                               "localisation_loss": config.localisation_loss,
                               "segmentation_weight": config.segmentation_weight if segmentation else 0.0,
                               "segmentation_epochs": config.segmentation_epochs if segmentation else 0,
                               # the refit draws no views without the training augmentation
                               "segmentation_views": (config.segmentation_views
                                                      if segmentation and config.augment else 0)}
        _say(f"learning from {merged.record['n']} reviews ({merged.corrected} corrected labels, "
             f"{len(merged.added)} new images, {train_set.n_masks} masks at weight "
             f"{config.localisation_weight})")
    runfiles.write_json(out / runfiles.MANIFEST, manifest)

    finished = {m["name"] for m in manifest["members"]}
    history = [r for r in runfiles.read_history(out / runfiles.HISTORY) if r["member"] in finished]
    return PreparedRun(out, config, device, dataset, classes, train_set, val_set, normalisation,
                       manifest, history, classes.index(negative))


def complete_run(run: PreparedRun) -> Path:
    """Mark the run complete (members in the configured order) and fit its novelty data."""
    manifest = run.manifest
    order = {n: i for i, n in enumerate(run.config.members)}
    manifest["members"].sort(key=lambda m: order.get(m["name"], len(order)))
    # the members' warnings in member order too, whatever order they finished in (Ray tasks)
    theirs = [m["warning"] for m in manifest["members"] if not m.get("converged", True) and m.get("warning")]
    manifest["warnings"] = [w for w in manifest["warnings"] if w not in theirs] + theirs
    manifest["status"] = "complete"
    runfiles.write_json(run.out / runfiles.MANIFEST, manifest)
    _fit_novelty(run.out, run.dataset, run.train_set, run.val_set, run.device, manifest)
    return run.out


def train(data: Any, out: str | os.PathLike[str], config: TrainConfig | None = None, *,
          on_epoch: Callable[[dict[str, Any]], None] | None = None,
          reviews: Sequence[Any] | None = None) -> Path:
    """Train the ensemble members on ``data`` and write the RUN folder ``out``.

    Args:
        data: anything ``aax.data.open_dataset`` reads (a folder, a CSV, ...) or a
            ``Dataset`` already opened.
        out: the RUN folder (created; must not hold a run unless ``config.resume``).
        config: the settings (:class:`TrainConfig`); defaults if ``None``.
        on_epoch: called with each history row after it is written (progress hooks;
            an exception raised here interrupts the run, which ``resume`` continues).
        reviews: reviewed images to learn from
            (:func:`aax.training.reviewed.read_reviews`); see the module's description.

    Returns:
        ``out`` as a ``Path``.

    Raises:
        ValueError / RunError: bad settings, too little data, a run that cannot resume.
    """
    run = prepare_run(data, out, config, reviews)
    for name in run.todo():
        entry, rows = _train_one(name, run.config, run.classes, run.train_set, run.val_set, run.normalisation,
                                 run.out, run.device, run.history, on_epoch, run.negative_index)
        run.record(entry, rows)
    return complete_run(run)


def _fit_novelty(out: Path, dataset: Any, train_set: Cached, val_set: Cached, device: torch.device,
                 manifest: dict[str, Any]) -> None:
    """Keep the training features for the novelty scores and set their thresholds on the
    validation split (:func:`aax.models.novelty_fit.fit_run`), for the score that suits
    the members (:func:`aax.models.novelty.default_score`). A failure leaves a usable run
    without novelty (``aax calibrate RUN`` adds it later) and says so."""
    from aax.models.novelty import default_score
    from aax.models.novelty_fit import fit_run, started_pretrained

    try:
        fit_run(out, [dataset[i].image for i in train_set.indices], train_set.labels.tolist(),
                [dataset[i].image for i in val_set.indices], device=str(device),
                score=default_score(started_pretrained(manifest)))
    except Exception as exc:  # noqa: BLE001 - the trained members stay usable without it
        _say(f"WARNING: novelty features not stored ({type(exc).__name__}: {exc}); "
             f"add them with `aax calibrate {out}`")


def _check_data(train_set: Cached, val_set: Cached, classes: Sequence[str]) -> None:
    for part, cached in (("training", train_set), ("validation", val_set)):
        counts = torch.bincount(cached.labels, minlength=len(classes)).tolist()
        empty = [c for c, n in zip(classes, counts) if n == 0]
        if empty:
            raise ValueError(f"the {part} split has no images of {empty}; add images or "
                             "change val_split")
    if len(train_set.labels) < 2:
        raise ValueError("need at least two training images")


def _source_text(dataset: Any) -> str | None:
    source = getattr(dataset, "source", None)
    if source is None or str(source) in ("", "."):
        return None
    return str(Path(source).resolve())


def _data_block(dataset: Any, root: str | None, config: TrainConfig, train_idx: list[int],
                val_idx: list[int], train_set: Cached, val_set: Cached,
                classes: Sequence[str], skipped: list[dict[str, str]]) -> dict[str, Any]:
    def counts(cached: Cached) -> dict[str, int]:
        c = torch.bincount(cached.labels, minlength=len(classes)).tolist()
        return dict(zip(classes, c))

    return {
        "source": _source_text(dataset), "root": root,
        "format": getattr(dataset, "format", None) or config.data_format,
        "n_images": len(dataset), "n_train": len(train_set.labels), "n_val": len(val_set.labels),
        "seed": config.seed, "val_split": config.val_split,
        "train_counts": counts(train_set), "val_counts": counts(val_set),
        # Indices into the dataset as opened, plus the files, so later stages
        # (calibration, evaluation) reuse exactly the held-out images.
        "train_indices": train_idx, "val_indices": val_idx,
        "val_files": [_relative(dataset[i].image, root) for i in val_idx],
        "skipped": skipped,
    }


def _warm_start(member: Member, name: str, run: str, classes: Sequence[str]) -> str:
    """Load RUN's trained member ``name`` (backbone and head) into ``member``."""
    path = Path(run) / f"{name}.pt"
    if not path.is_file():
        raise RunError(f"cannot warm-start {name}: {path} does not exist (train it in {run}, or leave "
                       "out --warm-start)")
    checkpoint = runfiles.load_torch(path)
    if list(checkpoint.get("classes", [])) != list(classes):
        raise RunError(f"cannot warm-start {name} from {path}: its classes {checkpoint.get('classes')} are not "
                       f"the data's {list(classes)}")
    # a segmentation head the old member lacks, or has of another layout, starts fresh;
    # every other weight must fit
    state = fit_head_to(member, checkpoint["state_dict"], replace=False)
    missing, unexpected = member.load_state_dict(state, strict=False)
    misfits = [k for k in missing if not k.startswith("seg.")] + list(unexpected)
    if misfits:
        raise RunError(f"cannot warm-start {name} from {path}: its weights do not fit ({', '.join(misfits[:5])})")
    _say(f"{name} <- {path} (warm start)")
    return "warm start"


def _train_one(name: str, config: TrainConfig, classes: Sequence[str], train_set: Cached,
               val_set: Cached, normalisation: dict[str, list[float]], out: Path,
               device: torch.device, history: list[dict[str, Any]],
               on_epoch: Callable[[dict[str, Any]], None] | None, negative_index: int = 0,
               ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    seed = _member_seed(config.seed, name)
    torch.manual_seed(seed)
    member = build_member(name, len(classes), config.dropout, config.output_stride)
    member.set_input_normalisation((normalisation["mean"], normalisation["std"]))
    weights_report = None
    init = "default"
    source = config.member_weights(name)
    segmenting = config.segments(train_set)
    if segmenting:  # before any weights load: a warm start may bring the old run's head
        member.add_segmentation()
    if config.warm_start is not None:
        init = _warm_start(member, name, config.warm_start, classes)
    elif source is not None:
        from aax.models.members.weights import load_weights

        report = load_weights(member, source)
        _say(report.summary())
        weights_report = report.to_dict()
        init = "pretrained"
    elif config.zero_init_residual and zero_init_residuals(member):
        init = "zero-init residual"
    lr = config.member_lr(name)
    settings = LoopSettings(
        epochs=config.member_epochs(name), patience=config.patience, batch_size=config.batch_size, lr=lr,
        lambda_var=config.lambda_var, var_passes=config.var_passes,
        warmup_epochs=config.warmup_epochs, min_lr_factor=config.min_lr_factor,
        mean=tuple(normalisation["mean"]), std=tuple(normalisation["std"]), device=device,
        seed=seed,
        class_weights=(None if config.class_weights is None else _class_weight_tensor(
            train_set.labels, len(classes), config.class_weights).to(device)),
        augment=Augment(hflip=config.hflip) if config.augment else None,
        recalibrate_bn=config.recalibrate_bn, progress=config.progress,
        localisation_weight=config.localisation_weight if train_set.n_masks else 0.0,
        localisation_loss=config.localisation_loss,
        segmentation_weight=config.segmentation_weight if segmenting else 0.0,
        negative_index=negative_index,
        channels_last=(default_channels_last(device) if config.channels_last is None
                       else config.channels_last))

    def checkpoint(m: Member, info: dict[str, Any]) -> dict[str, Any]:
        return runfiles.member_checkpoint(
            m.state_dict(), member=name, classes=classes, image_size=config.image_size,
            normalisation=normalisation, dropout=config.dropout, version=__version__, **info)

    def epoch_done(row: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        runfiles.write_history(out / runfiles.HISTORY, history + rows)
        if on_epoch is not None:
            on_epoch(dict(row))

    outcome = train_member(member, train_set, val_set, settings,
                           best_path=out / runfiles.checkpoint_name(name),
                           last_path=out / runfiles.last_state_name(name),
                           checkpoint=checkpoint, on_epoch=epoch_done)
    entry, rows = _member_entry(outcome, config, val_set, lr, weights_report, len(classes))
    entry["init"] = init
    if segmenting and config.segmentation_epochs:
        entry["segmentation_refit"] = _refit_head(member, out / runfiles.checkpoint_name(name), train_set,
                                                  config, normalisation, device, seed)
    return entry, rows


def _refit_head(member: Member, best_path: Path, train_set: Cached, config: TrainConfig,
                normalisation: dict[str, list[float]], device: torch.device, seed: int) -> dict[str, Any]:
    """Refit the kept checkpoint's segmentation head on the reviewed masks
    (:mod:`aax.training.seg_refit`) and write it back; a checkpoint already refitted (a
    resumed run) is left as it is."""
    from aax.training.seg_refit import RefitSettings, refit_seg_head

    payload = runfiles.load_torch(best_path, map_location="cpu")
    if payload.get("segmentation_refit"):
        return payload["segmentation_refit"]
    member.load_state_dict(payload["state_dict"])
    member.to(device)
    report = refit_seg_head(member, train_set, tuple(normalisation["mean"]), tuple(normalisation["std"]),
                            RefitSettings(epochs=config.segmentation_epochs, mirror=config.hflip,
                                          views=config.segmentation_views if config.augment else 0, seed=seed),
                            device)
    _say(f"{member.name}: segmentation head refitted on {report['masks']} reviewed masks for "
         f"{report['epochs']} epochs (loss {report['loss_first']:.3f} -> {report['loss_last']:.3f})")
    payload["state_dict"] = {k: v.detach().cpu().clone() for k, v in member.state_dict().items()}
    payload["segmentation_refit"] = report
    runfiles.save_torch(best_path, payload)
    return report


def _member_entry(outcome: MemberOutcome, config: TrainConfig, val_set: Cached, lr: float,
                  weights_report: dict[str, Any] | None, n_classes: int
                  ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    counts = torch.bincount(val_set.labels, minlength=n_classes)
    majority = float(counts.max()) / max(1, int(counts.sum()))
    margin = min(CHANCE_MARGIN, (1.0 - majority) / 2.0)
    acc = outcome.val_accuracy
    converged = bool(acc == acc and acc > majority + margin + 1e-9)  # acc == acc: not NaN
    warning = "" if converged else (
        f"{outcome.name} did not learn: best validation accuracy {acc:.3f} is within "
        f"{margin:.2f} of the majority-class rate {majority:.3f}; its votes are close to "
        "chance (more epochs, a different lr, or pretrained --weights may help)")
    rows = [dict(r) for r in outcome.rows]
    if warning:
        _say(f"WARNING: {warning}")
        if rows:
            rows[-1]["warning"] = "near chance"
    entry = {
        "name": outcome.name, "checkpoint": runfiles.checkpoint_name(outcome.name),
        "dropout": config.dropout, "best_epoch": outcome.best_epoch,
        "epochs_run": outcome.epochs_run, "stopped_early": outcome.stopped_early,
        "val_loss": outcome.best_val_loss, "val_accuracy": acc, "majority_rate": majority,
        "converged": converged, "warning": warning, "lr": lr, "weights": weights_report,
        "seconds": round(outcome.seconds, 3),
    }
    return entry, rows
