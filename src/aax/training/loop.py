"""The training objective and one member's epoch loop (paper 3.1 and 4.1).

``L = CE + lambda * Var``. The backbone runs once per batch; on its pooled features
the head runs

- once stochastically for the cross-entropy (plain dropout training), and
- ``T`` more times stochastically for ``Var``: the variance over the passes of the
  softmax output, averaged over batch and classes (:func:`aax.models.uncertainty.variance_penalty`).

With reviewed masks (``aax retrain``), ``L = CE + lambda * Var + w * Loc``: for each
training image whose reviewed class is positive and that has a reviewed mask, ``Loc``
compares the head's logit margin at every cell of the feature map (its reviewed class
minus the negative class: the class activation map before the global pool) with the
share of that cell the mask covers (:func:`localisation_loss`): ``"bce"``, a binary
cross-entropy per cell, or ``"spatial"``, the KL divergence from the mask's spread over
the cells to the softmax of the margins over the cells, which only asks *where* the map
is high and so leaves the pooled logit, the classification, to the cross-entropy. It
teaches a member where to look. A member with a segmentation head
(:mod:`aax.models.members.segment`) adds ``s * Seg``, its BCE + Dice on every image with
a reviewed mask, from the same backbone pass.

Validation uses the same function in eval mode: the cross-entropy is then that of the
deterministic head (dropout off, BN running statistics), which is what an eval-mode
accuracy measures, and ``Var`` is still over ``T`` stochastic head passes.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from aax import runtime
from aax.models.members.backbones import Member
from aax.models.members.segment import segmentation_loss
from aax.models.runfiles import RunError, load_torch, save_torch
from aax.models.uncertainty import mc_probabilities, variance_penalty
from aax.training.tensors import Cached

Augmenter = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


class LossParts(NamedTuple):
    """The composite loss and its parts (batch means)."""

    total: torch.Tensor
    ce: torch.Tensor
    var: torch.Tensor
    logits: torch.Tensor  # the logits the CE was taken on
    loc: torch.Tensor | None = None  # the localisation term (None: no reviewed mask in the batch)
    seg: torch.Tensor | None = None  # the segmentation head's term (None: no head, or no mask in the batch)


LOCALISATION_LOSSES = ("bce", "spatial")
"""The forms of the localisation term (:func:`localisation_loss`)."""


def localisation_loss(head: torch.nn.Module, features: torch.Tensor, labels: torch.Tensor,
                      masks: torch.Tensor, negative_index: int, kind: str = "bce") -> torch.Tensor:
    """How far the class activation map of each image is from its reviewed mask.

    ``kind="bce"``: the mean binary cross-entropy between each cell's logit margin and the
    mask's share of the cell. Background cells pull the margin down everywhere, and with it
    the pooled logit, so a large weight costs accuracy. ``kind="spatial"``: the KL
    divergence from the mask's spread over the cells (its shares, summing to one) to the
    softmax of the margins over the cells, averaged over the images; adding a constant to
    every cell changes nothing, so it shapes the map without moving the classification.
    Images whose mask is empty at the map's resolution are left out (zero when none is left).

    Args:
        head: the member's :class:`~aax.models.members.head.MCHead` (its ``fc`` is used
            on every cell of the feature map, as a class activation map).
        features: ``[B, F, h, w]`` feature maps of images with a reviewed mask.
        labels: ``[B]`` their (positive) reviewed classes.
        masks: ``[B, 1, H, W]`` masks in [0, 1] at the input size.
        negative_index: the negative class.
        kind: one of :data:`LOCALISATION_LOSSES`.
    """
    if kind not in LOCALISATION_LOSSES:
        raise ValueError(f"localisation loss must be one of {LOCALISATION_LOSSES}, got {kind!r}")
    weight, bias = head.fc.weight, head.fc.bias
    margin_w = weight[labels] - weight[negative_index]  # [B, F]
    margin_b = bias[labels] - bias[negative_index]  # [B]
    cells = torch.einsum("bfhw,bf->bhw", features.float(), margin_w) + margin_b[:, None, None]
    target = F.adaptive_avg_pool2d(masks.float(), cells.shape[-2:])[:, 0]
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(cells, target)
    cells, target = cells.flatten(1), target.flatten(1)
    covered = target.sum(1)
    keep = covered > 0
    if not bool(keep.any()):
        return cells.sum() * 0.0
    spread = target[keep] / covered[keep, None]
    return F.kl_div(F.log_softmax(cells[keep], dim=1), spread, reduction="batchmean")


def member_loss(member: Member, images: torch.Tensor, labels: torch.Tensor, *,
                lambda_var: float, passes: int,
                class_weights: torch.Tensor | None = None,
                masks: torch.Tensor | None = None, localisation_weight: float = 0.0,
                negative_index: int = 0, localisation: str = "bce",
                segmentation_weight: float = 0.0) -> LossParts:
    """``CE + lambda_var * Var (+ localisation_weight * Loc + segmentation_weight * Seg)``
    for one batch, running the backbone once.

    The CE pass is stochastic iff ``member.training``; ``Var`` always comes from
    ``passes`` stochastic head passes (``mc_probabilities``) on the same pooled features.
    With ``lambda_var == 0`` or ``passes < 2`` the variance term is skipped (zero).
    ``masks`` (``[B, 1, H, W]`` in [0, 1], NaN for images without a reviewed mask) adds
    :func:`localisation_loss` (of kind ``localisation``) over the images of a positive
    class that have one, and, when the member has a segmentation head
    (:mod:`aax.models.members.segment`), its loss over every image that has one.
    """
    seg_head = member.seg if masks is not None and segmentation_weight else None
    if seg_head is not None:
        features, steps = member.features_and_steps(images, seg_head.steps)
    else:
        features = member.features(images)
    pooled = member.head.pool(features)
    logits = member.head.classify(pooled, stochastic=member.training)
    ce = F.cross_entropy(logits, labels, weight=class_weights)
    if lambda_var and passes >= 2:
        var = variance_penalty(mc_probabilities(member.head, pooled, passes))
    else:
        var = logits.new_zeros(())
    total = ce + lambda_var * var
    loc = None
    if masks is not None and localisation_weight:
        keep = ~torch.isnan(masks[:, 0, 0, 0]) & (labels != negative_index)
        if bool(keep.any()):
            loc = localisation_loss(member.head, features[keep], labels[keep], masks[keep], negative_index,
                                    localisation)
            total = total + localisation_weight * loc
    seg = None
    if seg_head is not None:
        has = ~torch.isnan(masks[:, 0, 0, 0])
        if bool(has.any()):
            seg = segmentation_loss(seg_head([s[has] for s in steps]), masks[has])
            total = total + segmentation_weight * seg
    return LossParts(total, ce, var, logits, loc, seg)


@dataclass
class LoopSettings:
    """Everything the epoch loop needs besides the member and the data."""

    epochs: int
    patience: int
    batch_size: int
    lr: float
    lambda_var: float
    var_passes: int
    warmup_epochs: float
    min_lr_factor: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: torch.device
    seed: int
    class_weights: torch.Tensor | None = None
    augment: Augmenter | None = None
    recalibrate_bn: bool = True
    progress: bool = True
    channels_last: bool = False
    localisation_weight: float = 0.0
    localisation_loss: str = "bce"
    segmentation_weight: float = 0.0
    negative_index: int = 0


def lr_factor(step: int, total: int, warmup: int, floor: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``floor`` at ``total``."""
    if warmup > 0 and step < warmup:
        return floor + (1.0 - floor) * (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass
class MemberOutcome:
    """How one member's training went."""

    name: str
    best_epoch: int
    best_val_loss: float
    val_accuracy: float
    epochs_run: int
    stopped_early: bool
    seconds: float
    rows: list[dict[str, Any]] = field(default_factory=list)


def _batches(n: int, size: int, generator: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=generator)
    out = list(perm.split(size))
    if len(out) > 1 and len(out[-1]) < 2:
        out.pop()  # a 1-image batch breaks batch norm; it is shuffled in next epoch
    return out


def _to_input(u8: torch.Tensor, settings: LoopSettings, generator: torch.Generator | None,
              augment: bool) -> torch.Tensor:
    return _inputs(u8, None, settings, generator, augment)[0]


def _inputs(u8: torch.Tensor, masks_u8: torch.Tensor | None, settings: LoopSettings,
            generator: torch.Generator | None, augment: bool
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Normalised (and augmented) images, and their masks moved with them."""
    x = u8.to(settings.device, non_blocking=True).float().div_(255.0)
    masks = None if masks_u8 is None else masks_u8.to(settings.device).float().div_(255.0)
    if augment and settings.augment is not None:
        if masks is None:
            x = settings.augment(x, generator)
        else:
            x, masks = settings.augment(x, generator, masks=masks)
    mean = torch.tensor(settings.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(settings.std, device=x.device).view(1, -1, 1, 1)
    x = (x - mean) / std
    return (x.contiguous(memory_format=torch.channels_last) if settings.channels_last else x), masks


def _batch_masks(data: Cached, idx: torch.Tensor) -> torch.Tensor | None:
    """The batch's reviewed masks as uint8, or None when none of its images has one."""
    if data.has_mask is None or not bool(data.has_mask[idx].any()):
        return None
    return data.masks[idx]


def _mark_missing(masks: torch.Tensor | None, data: Cached, idx: torch.Tensor) -> torch.Tensor | None:
    if masks is None:
        return None
    missing = ~data.has_mask[idx].to(masks.device)
    masks[missing] = float("nan")  # member_loss leaves these images out of its mask terms
    return masks


@torch.no_grad()
def evaluate(member: Member, data: Cached, settings: LoopSettings) -> tuple[float, float]:
    """Eval-mode ``(loss, accuracy)`` of ``member`` on cached images.

    The loss is the same objective as in training (weighted CE over the whole set plus
    ``lambda * Var``), with the deterministic head for the CE.
    """
    member.eval()
    n = len(data.labels)
    if n == 0:
        return float("nan"), float("nan")
    w = settings.class_weights
    ce_sum = var_sum = weight_sum = 0.0
    correct = 0
    for idx in torch.arange(n).split(max(1, settings.batch_size * 4)):
        x = _to_input(data.images[idx], settings, None, augment=False)
        y = data.labels[idx].to(settings.device)
        parts = member_loss(member, x, y, lambda_var=settings.lambda_var,
                            passes=settings.var_passes, class_weights=None)
        per = F.cross_entropy(parts.logits, y, weight=w, reduction="sum")
        ce_sum += float(per)
        weight_sum += float(w[y].sum()) if w is not None else len(idx)
        var_sum += float(parts.var) * len(idx)
        correct += int((parts.logits.argmax(dim=1) == y).sum())
    return ce_sum / weight_sum + settings.lambda_var * var_sum / n, correct / n


@torch.no_grad()
def recalibrate_bn(member: Member, data: Cached, settings: LoopSettings,
                   max_images: int = 2048) -> None:
    """Re-estimate every batch-norm layer's running statistics for the current weights.

    Why: trained from scratch on a few hundred images, the weights change faster than
    the running averages (momentum 0.1) follow, and eval-mode accuracy lags far behind
    train-mode accuracy (chance for several epochs, measured; see docs/training.md). A
    forward pass over (up to ``max_images``) un-augmented training images with
    cumulative averaging ("precise BN") fixes the statistics; only the BN layers are in
    train mode, so stochastic depth and dropout stay off, and no weight changes.
    """
    norms = [m for m in member.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms or len(data.labels) < 2:
        return
    member.eval()
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the batches below
        m.train()
    try:
        n = min(len(data.labels), max_images)
        for idx in torch.arange(n).split(max(2, settings.batch_size)):
            if len(idx) < 2:
                continue
            member.features(_to_input(data.images[idx], settings, None, augment=False))
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum
        member.eval()


def _rng_state(generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def train_member(member: Member, train: Cached, val: Cached, settings: LoopSettings, *,
                 best_path: Path, last_path: Path,
                 checkpoint: Callable[[Member, dict[str, Any]], dict[str, Any]],
                 on_epoch: Callable[[dict[str, Any], list[dict[str, Any]]], None] | None = None,
                 ) -> MemberOutcome:
    """Train ``member`` with Adam and early stopping; returns how it went.

    Each epoch ends by writing ``best_path`` (when the validation loss improved; the
    payload comes from ``checkpoint(member, info)``) and ``last_path`` (model, optimizer,
    scheduler, early-stopping and RNG state), then calling ``on_epoch(row, rows)``.
    If ``last_path`` exists the loop continues from it, so an interrupted member resumes
    at its next epoch with the same random stream it would have had.
    """
    device = settings.device
    member.to(device)
    if settings.channels_last:
        member.to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.Adam(member.parameters(), lr=settings.lr)
    n_train = len(train.labels)
    steps_per_epoch = len(_batches(n_train, settings.batch_size, torch.Generator()))
    total = settings.epochs * steps_per_epoch
    warmup = int(round(settings.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, settings.min_lr_factor))
    state: dict[str, Any] = {"epoch": 0, "best_val_loss": math.inf, "best_epoch": 0,
                             "best_val_accuracy": float("nan"), "bad_epochs": 0,
                             "stopped": False, "rows": [], "seconds": 0.0}
    if last_path.is_file():
        # On the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest.
        saved = load_torch(last_path, map_location="cpu")
        try:
            member.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:  # another layout: e.g. an older version's head
            reason = str(exc).strip().splitlines()[0]
            raise RunError(f"{last_path}: the interrupted state of {member.name} does not fit the member this "
                           f"run trains ({reason}); delete that file to train {member.name} afresh") from None
        scheduler.load_state_dict(saved["scheduler"])
        _set_rng_state(saved["rng"], generator, device)
        state = saved["loop"]
    rows: list[dict[str, Any]] = list(state["rows"])
    bar = tqdm(total=total, initial=state["epoch"] * steps_per_epoch, desc=member.name,
               unit="batch", file=sys.stderr, disable=not settings.progress, leave=True,
               dynamic_ncols=True)
    try:
        while not state["stopped"] and state["epoch"] < settings.epochs:
            epoch = state["epoch"] + 1
            t0 = time.perf_counter()
            member.train()
            seen, loss_sum, ce_sum, var_sum, loc_sum, loc_seen, seg_sum, seg_seen = 0, 0.0, 0.0, 0.0, 0.0, 0, 0.0, 0
            lr_used = optimizer.param_groups[0]["lr"]
            for idx in _batches(n_train, settings.batch_size, generator):
                wanted = (_batch_masks(train, idx) if settings.localisation_weight or settings.segmentation_weight
                          else None)
                x, masks = _inputs(train.images[idx], wanted, settings, generator, augment=True)
                y = train.labels[idx].to(device, non_blocking=True)
                parts = member_loss(member, x, y, lambda_var=settings.lambda_var,
                                    passes=settings.var_passes,
                                    class_weights=settings.class_weights,
                                    masks=_mark_missing(masks, train, idx),
                                    localisation_weight=settings.localisation_weight,
                                    negative_index=settings.negative_index,
                                    localisation=settings.localisation_loss,
                                    segmentation_weight=settings.segmentation_weight)
                optimizer.zero_grad(set_to_none=True)
                parts.total.backward()
                optimizer.step()
                scheduler.step()
                b = len(idx)
                seen += b
                loss_sum += float(parts.total.detach()) * b
                ce_sum += float(parts.ce.detach()) * b
                var_sum += float(parts.var.detach()) * b
                if parts.loc is not None:
                    loc_sum += float(parts.loc.detach()) * b
                    loc_seen += b
                if parts.seg is not None:
                    seg_sum += float(parts.seg.detach()) * b
                    seg_seen += b
                rate = seen / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix_str(f"epoch {epoch}/{settings.epochs} loss {loss_sum / seen:.3f} "
                                    f"{rate:.0f} img/s")
                bar.update(1)
                runtime.tick()  # give cores back when another job starts (aax.runtime)
            train_seconds = time.perf_counter() - t0
            if settings.recalibrate_bn:
                recalibrate_bn(member, train, settings)
            val_loss, val_acc = evaluate(member, val, settings)
            seconds = time.perf_counter() - t0
            # The first epoch is always kept, so a checkpoint exists even if the
            # validation loss is never finite (the member is then reported as not converged).
            improved = val_loss < state["best_val_loss"] or state["best_epoch"] == 0
            if improved:
                state.update(best_val_loss=val_loss, best_epoch=epoch,
                             best_val_accuracy=val_acc, bad_epochs=0)
                save_torch(best_path, checkpoint(member, {"epoch": epoch, "val_loss": val_loss,
                                                          "val_accuracy": val_acc}))
            else:
                state["bad_epochs"] += 1
            row = {"member": member.name, "epoch": epoch,
                   "train_loss": loss_sum / max(seen, 1), "train_ce": ce_sum / max(seen, 1),
                   "train_var": var_sum / max(seen, 1),
                   "train_loc": loc_sum / loc_seen if loc_seen else "",
                   "train_seg": seg_sum / seg_seen if seg_seen else "", "val_loss": val_loss,
                   "val_accuracy": val_acc, "lr": lr_used, "seconds": seconds,
                   "images_per_s": seen / max(train_seconds, 1e-9), "best": improved,
                   "warning": ""}
            rows.append(row)
            state["epoch"] = epoch
            state["seconds"] += seconds
            state["stopped"] = settings.patience > 0 and state["bad_epochs"] >= settings.patience
            state["rows"] = rows
            bar.set_postfix_str(f"epoch {epoch}/{settings.epochs} loss {row['train_loss']:.3f} "
                                f"val {val_loss:.3f} acc {val_acc:.2f} "
                                f"{row['images_per_s']:.0f} img/s")
            save_torch(last_path, {"model": member.state_dict(),
                                   "optimizer": optimizer.state_dict(),
                                   "scheduler": scheduler.state_dict(),
                                   "rng": _rng_state(generator, device), "loop": state})
            if on_epoch is not None:
                on_epoch(row, rows)
    finally:
        bar.close()
    return MemberOutcome(name=member.name, best_epoch=state["best_epoch"],
                         best_val_loss=state["best_val_loss"],
                         val_accuracy=state["best_val_accuracy"], epochs_run=state["epoch"],
                         stopped_early=state["stopped"] and state["epoch"] < settings.epochs,
                         seconds=state["seconds"], rows=rows)
