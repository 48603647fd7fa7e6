"""Cost of the variance term: one training epoch with plain cross-entropy vs with
``CE + lambda * Var`` and its T stochastic head passes.

Both variants run the training loop's own objective, ``aax.training.loop.member_loss``
(``lambda_var=0`` skips the variance term: plain CE), and the same steps as
``train_member``'s inner loop: input normalisation, loss, ``zero_grad``, ``backward``,
Adam ``step``, on the same batches in the same order. Augmentation, validation,
batch-norm recalibration and checkpoint writing are left out: they cost the same in both
variants and would only dilute the ratio, so the figure is the stricter one.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F


def _loss_function() -> tuple[Callable[..., Any], str]:
    try:
        from aax.training.loop import member_loss

        return member_loss, "aax.training.loop.member_loss"
    except ImportError:  # pragma: no cover - the loop's objective, reproduced
        from aax.models.uncertainty import mc_probabilities, variance_penalty

        def member_loss(member, images, labels, *, lambda_var, passes, class_weights=None):
            pooled = member.head.pool(member.features(images))
            logits = member.head.classify(pooled, stochastic=member.training)
            ce = F.cross_entropy(logits, labels, weight=class_weights)
            var = (variance_penalty(mc_probabilities(member.head, pooled, passes))
                   if lambda_var and passes >= 2 else logits.new_zeros(()))
            return ce + lambda_var * var, ce, var, logits

        return member_loss, "reproduced from aax.training.loop (member_loss not importable)"


def training_defaults() -> dict[str, Any]:
    """``lambda_var``, ``T``, batch size and lr of ``aax train`` (TrainConfig)."""
    try:
        from aax.training.train import SCRATCH_LR, TrainConfig

        c = TrainConfig()
        return {"lambda_var": c.lambda_var, "var_passes": c.var_passes,
                "batch_size": c.batch_size, "lr": SCRATCH_LR, "image_size": c.image_size}
    except ImportError:  # pragma: no cover
        return {"lambda_var": 0.1, "var_passes": 4, "batch_size": 16, "lr": 1e-3, "image_size": 128}


def epoch_seconds(member: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  images: torch.Tensor, labels: torch.Tensor, batches: Sequence[torch.Tensor], *,
                  lambda_var: float, passes: int, mean: torch.Tensor, std: torch.Tensor,
                  device: torch.device, loss_fn: Callable[..., Any]) -> float:
    """Wall time of one epoch over ``batches`` (index tensors into ``images``)."""
    member.train()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for idx in batches:
        x = images[idx].to(device, non_blocking=True).float().div_(255.0)
        x = (x - mean) / std
        y = labels[idx].to(device, non_blocking=True)
        parts = loss_fn(member, x, y, lambda_var=lambda_var, passes=passes)
        total = parts[0]
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        float(total.detach())  # the loop reads the loss every step
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def measure(members: dict[str, torch.nn.Module], images: torch.Tensor, labels: torch.Tensor, *,
            batch_size: int, lambda_var: float, passes: int, repeats: int, lr: float,
            device: torch.device, mean: Sequence[float], std: Sequence[float],
            seed: int = 0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Median epoch time of each member, plain CE vs CE + Var, epochs interleaved
    (plain, var, plain, var, ...) after one warm-up epoch of each."""
    loss_fn, loss_source = _loss_function()
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    g = torch.Generator().manual_seed(seed)
    n = len(labels)
    per_member: dict[str, Any] = {}
    for name, base in members.items():
        variants = {}
        for key, lam in (("plain_ce", 0.0), ("ce_var", lambda_var)):
            net = copy.deepcopy(base).to(device)
            variants[key] = (net, torch.optim.Adam(net.parameters(), lr=lr), lam)
        times: dict[str, list[float]] = {"plain_ce": [], "ce_var": []}
        for r in range(repeats + 1):  # r == 0: warm-up
            perm = torch.randperm(n, generator=g)
            batches = [b for b in perm.split(batch_size) if len(b) >= 2]  # BN needs 2
            for key, (net, opt, lam) in variants.items():
                t = epoch_seconds(net, opt, images, labels, batches, lambda_var=lam, passes=passes,
                                  mean=m, std=s, device=device, loss_fn=loss_fn)
                if r:
                    times[key].append(t)
        plain, var = statistics.median(times["plain_ce"]), statistics.median(times["ce_var"])
        per_member[name] = {"plain_ce_s": times["plain_ce"], "ce_var_s": times["ce_var"],
                            "plain_ce_median_s": plain, "ce_var_median_s": var,
                            "overhead": var / plain - 1.0}
        log(f"  training {name:16s} plain CE {plain:8.3f} s/epoch   CE+Var {var:8.3f} s/epoch   "
            f"{100 * (var / plain - 1):+6.1f} %")
        for net, _, _ in variants.values():
            net.to("cpu")
        del variants
    plain_total = sum(v["plain_ce_median_s"] for v in per_member.values())
    var_total = sum(v["ce_var_median_s"] for v in per_member.values())
    return {"loss_function": loss_source, "images": n, "batch_size": batch_size,
            "image_size": int(images.shape[-1]), "lambda_var": lambda_var, "var_passes": passes,
            "repeats": repeats, "members": per_member,
            "plain_ce_epoch_s": plain_total, "ce_var_epoch_s": var_total,
            "overhead": var_total / plain_total - 1.0}
