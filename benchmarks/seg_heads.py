#!/usr/bin/env python
"""Which backbone steps a segmentation head should read: fresh heads, refitted on a
retrained run's reviewed masks over its frozen members, scored on every positive test image.

For each set of strides (``--strides``, one quoted list per layout), every member of RUN
gets a fresh :class:`aax.models.members.segment.SegHead` reading its last step at those
output strides, refitted exactly as ``aax retrain`` refits its heads
(:func:`aax.training.seg_refit.refit_seg_head`: 60 epochs, the image, its mirror image and
14 augmented views). Each head's map (at the run's class stride) is resized to the image
and thresholded at 0.5; the table gives each member's mean IoU and the IoU of the three
heads' mean map, over every positive test image with a mask. No decision protocol, no
flags: this compares the heads alone, so two layouts are measured on the same features.

    python benchmarks/seg_heads.py --run RUN2 --test TEST.csv --negative-class normal \\
        --strides "8 16 32" "4 8 16 32"

``RUN2`` is a run retrained on reviewed masks (``aax retrain``, or a row of
``benchmarks/reviews.py``). The results go to stdout and, with ``--out``, to a JSON file.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from aax.data import open_dataset, read_image, read_mask
from aax.data.layouts import Dataset, Sample
from aax.data.transforms import prepare
from aax.models.ensemble import Ensemble
from aax.models.members.backbones import output_stride
from aax.models.members.segment import build_seg_head, segment_maps
from aax.training.reviewed import reviewed_masks
from aax.training.seg_refit import RefitSettings, refit_seg_head
from aax.training.tensors import decode_samples


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="a run retrained on reviewed masks")
    p.add_argument("--test", required=True, help="test data (a manifest CSV with masks)")
    p.add_argument("--negative-class", required=True)
    p.add_argument("--strides", nargs="+", default=["8 16 32", "4 8 16 32"],
                   help="one quoted list of output strides per head layout")
    p.add_argument("--seed", type=int, default=0, help="the heads' initial weights and the refit's draws")
    p.add_argument("--out", type=Path, help="write the results to this JSON file too")
    return p.parse_args(argv)


def ious(probabilities: torch.Tensor, truths: list[np.ndarray]) -> list[float]:
    """IoU of each map (resized to its mask, thresholded at 0.5) with its mask."""
    out = []
    for p, truth in zip(probabilities, truths):
        mask = F.interpolate(p[None, None], size=truth.shape, mode="bilinear", align_corners=False)[0, 0] > 0.5
        mask = mask.numpy()
        out.append(np.count_nonzero(mask & truth) / max(1, np.count_nonzero(mask | truth)))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ensemble = Ensemble.load(args.run, device="cpu")
    mean, std = ensemble.normalisation
    size = ensemble.image_size
    reviewed = reviewed_masks(ensemble.manifest)
    if not reviewed:
        raise SystemExit(f"{args.run} learnt from no reviewed mask: retrain it on reviews first")
    masked = Dataset([Sample(image=Path(r["path"]), label=r["label"], mask_path=Path(r["mask"])) for r in reviewed],
                     classes=ensemble.classes)
    data = decode_samples(masked, list(range(len(reviewed))), ensemble.classes, size,
                          masks={i: r["mask"] for i, r in enumerate(reviewed)})
    test = [s for s in open_dataset(args.test) if s.label != args.negative_class and s.mask_path]
    x = torch.stack([prepare(read_image(s.image), size, mean, std) for s in test])
    truths = [read_mask(s.mask_path) for s in test]
    print(f"{len(reviewed)} reviewed masks, {len(test)} positive test images", flush=True)

    results = []
    for layout in args.strides:
        strides = tuple(int(s) for s in layout.split())
        row: dict[str, object] = {"strides": list(strides), "members": {}}
        maps = []
        for name, trained in ensemble.members.items():
            t0 = time.perf_counter()
            member = copy.deepcopy(trained)
            member.seg = None
            torch.manual_seed(args.seed)
            member.seg = build_seg_head(member, strides=strides)
            refit_seg_head(member, data, tuple(mean), tuple(std), RefitSettings(seed=args.seed))
            member.eval()
            with torch.no_grad(), output_stride(member, ensemble.maps.class_stride):
                p = torch.cat([segment_maps(member, x[i:i + 32]) for i in range(0, len(x), 32)])
            maps.append(p)
            row["members"][name] = float(np.mean(ious(p, truths)))
            print(f"{layout}: {name} {row['members'][name]:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        row["mean_of_heads"] = float(np.mean(ious(torch.stack(maps).mean(0), truths)))
        print(f"{layout}: mean of the heads' maps {row['mean_of_heads']:.3f}", flush=True)
        results.append(row)

    print("\n| strides | " + " | ".join(ensemble.members) + " | mean of the heads |")
    print("|---|" + "---|" * (len(ensemble.members) + 1))
    for row in results:
        cells = [f"{100 * v:.1f}" for v in row["members"].values()] + [f"{100 * row['mean_of_heads']:.1f}"]
        print(f"| {' '.join(map(str, row['strides']))} | " + " | ".join(cells) + " |")
    if args.out:
        args.out.write_text(json.dumps({"run": str(args.run), "test": args.test, "n_masks": len(reviewed),
                                        "n_test": len(test), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
