"""The reference: what the usual tools do for the same outputs.

Per member:

- MC Dropout the usual way: K full stochastic forward passes (dropout active in the head),
  i.e. the whole network K times;
- XGrad-CAM as pytorch-grad-cam computes it: a forward hook on ``member.target_layer``
  saves the activations, a tensor hook on its output saves the gradients, one full
  forward and one backward of the class score (through the whole backbone, parameter
  gradients included, as the library does), the channel weights in NumPy, then the map
  resized to the image's size and min-max normalised. The resize places each cell where
  the member's receptive field is centred (``Member.grid_origin``), as AAX does, written
  here independently with ``F.grid_sample``: pytorch-grad-cam's plain resize puts
  ResNet-50's and EfficientNet-B0's cells half a cell off (docs/method.md), and the check
  below is of the maps, not of that.

The decision protocol and the mask are then the same as AAX's (``aax.annotation.decide``): they
cost next to nothing and make the outputs comparable.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

EPS = 1e-7  # pytorch-grad-cam's


class ActivationsAndGradients:
    """pytorch-grad-cam's hook pair on one layer: activations on the way forward, their
    gradients on the way back."""

    def __init__(self, layer: torch.nn.Module) -> None:
        self.activations: torch.Tensor | None = None
        self.gradients: torch.Tensor | None = None
        self.handle = layer.register_forward_hook(self._save)

    def _save(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self.activations = output.detach()
        if output.requires_grad:
            def keep(grad: torch.Tensor) -> None:
                self.gradients = grad.detach()
            output.register_hook(keep)

    def release(self) -> None:
        self.handle.remove()


def xgradcam_reference(member: torch.nn.Module, hooks: ActivationsAndGradients, x: torch.Tensor,
                       classes: np.ndarray, sizes: Sequence[tuple[int, int]],
                       autocast: Any) -> list[np.ndarray]:
    """One forward + backward through ``member``; maps in [0, 1] at each image's size."""
    member.zero_grad(set_to_none=True)
    with torch.enable_grad():
        with autocast:
            logits = member(x)  # eval mode: dropout off, as for the map
        target = torch.as_tensor(classes, device=logits.device).view(-1, 1)
        score = logits.float().gather(1, target).sum()
        score.backward()
    a = hooks.activations.float().cpu().numpy()
    g = hooks.gradients.float().cpu().numpy()
    weights = (g * a / (a.sum(axis=(2, 3), keepdims=True) + EPS)).sum(axis=(2, 3))
    cams = np.maximum((weights[:, :, None, None] * a).sum(axis=1), 0)
    maps = []
    for cam, (h, w) in zip(cams, sizes):
        up = _registered_resize(torch.from_numpy(cam), member, tuple(x.shape[-2:]), (h, w)).numpy()
        up = up - up.min()
        maps.append(up / (up.max() + EPS))
    return maps


def _registered_resize(cam: torch.Tensor, member: Any, input_size: tuple[int, int],
                       size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a ``[h, w]`` map to ``size``: output pixel ``q`` is input pixel
    ``(q + 0.5) * S / H - 0.5``, which lies at cell ``(p - origin) / stride``."""
    coords = []
    for n_cells, n_in, n_out in zip(cam.shape, input_size, size):
        stride = n_in / n_cells
        origin = member.grid_origin(round(stride)) if hasattr(member, "grid_origin") else (stride - 1) / 2
        p = (torch.arange(n_out, dtype=torch.float64) + 0.5) * n_in / n_out - 0.5
        u = (p - origin) / stride
        coords.append((2 * u + 1) / n_cells - 1)  # grid_sample's normalised coordinate
    gy, gx = torch.meshgrid(coords[0], coords[1], indexing="ij")
    grid = torch.stack([gx, gy], dim=-1)[None].float()
    return F.grid_sample(cam[None, None].float(), grid, mode="bilinear", padding_mode="border",
                         align_corners=False)[0, 0]


def reference_batch(ensemble: Any, x: torch.Tensor, sizes: Sequence[tuple[int, int]],
                    hooks: dict[str, ActivationsAndGradients], *, passes: int, theta: float,
                    tau: float, quorum: int, amp: bool = False) -> list[dict[str, Any]]:
    """Decision, per-member probabilities / uncertainty / map and mask for one batch,
    the usual way. ``hooks``: one :class:`ActivationsAndGradients` per member name."""
    from aax.annotation.decide import decide, intersect, map_class

    device = ensemble.device
    x = x.to(device)
    if getattr(ensemble, "channels_last", False):
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(device.type) if amp and device.type == "cuda" else contextlib.nullcontext()
    probs, uncert = [], []
    for member in ensemble.members.values():
        runs = []
        with torch.no_grad(), autocast:
            for _ in range(passes):  # the whole network, K times
                logits = member.head.classify(member.head.pool(member.features(x)), stochastic=True)
                runs.append(logits.float().softmax(dim=-1))
        mc = torch.stack(runs).cpu().numpy()  # [K, B, C]
        p = mc.mean(axis=0)
        pred = p.argmax(axis=1)
        probs.append(p)
        uncert.append(mc[:, np.arange(len(pred)), pred].std(axis=0))
    probs_np = np.stack(probs, axis=1)  # [B, M, C]
    uncert_np = np.stack(uncert, axis=1)  # [B, M]
    cam_class = np.array([map_class(p, ensemble.negative_index) for p in probs_np])
    maps = [xgradcam_reference(m, hooks[n], x, cam_class, sizes, autocast)
            for n, m in ensemble.members.items()]  # [M][B] arrays
    out = []
    for b in range(len(sizes)):
        decision = decide(probs_np[b], uncert_np[b], theta, ensemble.negative_index, quorum)
        mask = (intersect(np.stack([maps[i][b] for i in decision.agreeing]), tau)
                if decision.agreeing else None)
        out.append({"decision": decision, "probs": probs_np[b], "uncertainty": uncert_np[b],
                    "maps": [maps[i][b] for i in range(len(maps))], "mask": mask})
    return out
