"""The superpixel figure of docs/method.md: for a few held-out positives of each run, the
fused map, its mask as thresholded, the image's regions (``aax.models.refine``) and the mask
of the map averaged over them, at the same fusion and tau, with each mask's IoU.

    python benchmarks/figure_superpixels.py docs/figures/superpixels.png \\
        --set demo-run/run demo-run/data/test --set FIRE_RUN FIRE_TEST
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from aax.annotation.decide import fuse, mask_subset
from aax.data import open_dataset
from aax.evaluation.metrics import iou
from aax.models.ensemble import Ensemble
from aax.models.mask_settings import tau_for
from aax.models.refine import pool_resized_numpy, resize_labels


def rows(run: Path, test: Path, n: int) -> list[dict]:
    """The first ``n`` positives AAX gives a mask, with what the figure shows."""
    ensemble = Ensemble.load(run, device="cpu")
    names = list(ensemble.members)
    maps = ensemble.maps
    members = None if maps.mask_members is None else [names.index(m) for m in maps.mask_members]
    positives = [s for s in open_dataset(test) if s.label != ensemble.negative_class and s.has_mask][: 4 * n]
    out = []
    for sample, record in zip(positives, ensemble.annotate(positives, keep_saliency=True, keep_preview=True)):
        if record.mask is None or len(out) == n:
            continue
        gt = np.asarray(sample.mask(), bool)
        subset = mask_subset([names.index(a) for a in record.agreeing], members)
        score = fuse(np.stack([record.saliency[names[i]] for i in subset]), maps.fusion, ensemble.quorum)
        tau = tau_for(ensemble.tau, record.decision)
        labels = resize_labels(record.regions, gt.shape)  # drawn as region edges
        plain, refined = score > tau, pool_resized_numpy(score, record.regions) > tau
        out.append({"image": record.preview, "gt": gt, "score": score, "labels": labels, "plain": plain,
                    "refined": refined, "iou_plain": iou(plain, gt), "iou_refined": iou(refined, gt),
                    "title": f"{Path(record.image).name} ({maps.fusion}, tau {tau:g})"})
    return out


def edges(labels: np.ndarray) -> np.ndarray:
    """Pixels whose right or lower neighbour is in another region."""
    e = np.zeros(labels.shape, bool)
    e[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    e[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return e


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--set", nargs=2, action="append", metavar=("RUN", "TEST"), required=True,
                   help="a RUN and its held-out test folder (repeatable)")
    p.add_argument("--images", type=int, default=2, help="images per set")
    args = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    shown = [r for run, test in args.set for r in rows(Path(run), Path(test), args.images)]
    cols = ["image, ground truth", "fused map", "mask as thresholded", "regions", "mask over the regions"]
    fig, axes = plt.subplots(len(shown), len(cols), figsize=(2.3 * len(cols), 2.4 * len(shown)), squeeze=False)
    for r, row in zip(axes, shown):
        h, w = row["gt"].shape
        image = np.asarray(Image.fromarray(row["image"]).resize((w, h)))
        panels = [image, row["score"], row["plain"], image, row["refined"]]
        for k, (ax, panel) in enumerate(zip(r, panels)):
            ax.imshow(panel, cmap=None if k in (0, 3) else ("jet" if k == 1 else "gray"), vmin=0, vmax=1 if k else None)
            ax.contour(row["gt"], levels=[0.5], colors="lime", linewidths=0.8)
            if k == 3:
                ax.imshow(np.ma.masked_where(~edges(row["labels"]), np.ones((h, w))), cmap="autumn", alpha=0.9)
            ax.set_xticks([])
            ax.set_yticks([])
        r[0].set_ylabel(row["title"], fontsize=7)
        r[2].set_title(f"IoU {100 * row['iou_plain']:.0f} %", fontsize=8)
        r[4].set_title(f"IoU {100 * row['iou_refined']:.0f} %", fontsize=8)
    for ax, title in zip(axes[0], cols):
        ax.set_title(f"{title}\n{ax.get_title()}".strip(), fontsize=8)
    fig.suptitle("Superpixel refinement: the same fused map and tau, thresholded as it is and averaged "
                 "over the image's regions (green: ground truth)", fontsize=9)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
