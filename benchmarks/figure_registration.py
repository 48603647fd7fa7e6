"""The figure of docs/method.md: members' maps resized as a plain resize does (each cell
centred on its block) and registered on the image (each cell on its receptive field's
centre, ``aax.models.explain.Grid``), over the ground truth.

    python benchmarks/figure_registration.py demo-run/run demo-run/data/test docs/figures/registration.png
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

import aax.models.maps
from aax.annotation.annotate import annotate
from aax.models.ensemble import Ensemble


@contextlib.contextmanager
def unregistered() -> Iterator[None]:
    """Maps resized without their grids (the resize every CAM library does)."""
    before = aax.models.maps.member_grid
    aax.models.maps.member_grid = lambda *args, **kwargs: None
    try:
        yield
    finally:
        aax.models.maps.member_grid = before


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("test", type=Path, help="a folder-layout test set with masks (e.g. demo-run/data/test)")
    p.add_argument("out", type=Path)
    p.add_argument("--images", type=int, default=3)
    p.add_argument("--members", nargs="+", default=["resnet50", "efficientnet-b0"])
    args = p.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ensemble = Ensemble.load(args.run, device="cpu")
    paths = sorted(args.test.glob("images/*/*.png"))
    paths = [q for q in paths if (args.test / "masks" / q.relative_to(args.test / "images")).is_file()][:args.images]
    registered = list(annotate(ensemble, paths, keep_saliency=True, novelty=False))
    with unregistered():
        plain = list(annotate(ensemble, paths, keep_saliency=True, novelty=False))
    cols = 1 + 2 * len(args.members)
    fig, axes = plt.subplots(len(paths), cols, figsize=(1.9 * cols, 1.9 * len(paths)), squeeze=False)
    for row, (path, reg, pl) in enumerate(zip(paths, registered, plain)):
        image = np.asarray(Image.open(path).convert("L"))
        gt = np.asarray(Image.open(args.test / "masks" / path.relative_to(args.test / "images"))) > 127
        axes[row, 0].imshow(image, cmap="gray")
        axes[row, 0].contour(gt, levels=[0.5], colors="lime", linewidths=0.8)
        for k, name in enumerate(args.members):
            for j, (record, title) in enumerate(((pl, "plain resize"), (reg, "registered"))):
                ax = axes[row, 1 + 2 * k + j]
                ax.imshow(image, cmap="gray")
                ax.imshow(record.saliency[name], cmap="jet", alpha=0.45, vmin=0, vmax=1)
                ax.contour(gt, levels=[0.5], colors="lime", linewidths=0.8)
                if row == 0:
                    ax.set_title(f"{name}\n{title}", fontsize=7)
    axes[0, 0].set_title("image, ground truth", fontsize=7)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=90, format="png")
    buffer.seek(0)  # 256 colours: a third of the bytes, for a figure kept in git
    Image.open(buffer).convert("RGB").quantize(256).save(args.out, optimize=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
