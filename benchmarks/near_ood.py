#!/usr/bin/env python
"""Near-OOD novelty (a new finding of the same modality): the RUN's own scores against
class-conditional Mahalanobis on pooled features of each stage of the frozen ImageNet
backbones, and of the same stages after fine-tuning.

A run trained on some classes of a data set (e.g. BUSI's normal and benign) meets a
class it never saw (malignant). For the seen test images and the unseen ones:

- the run's scores as ``aax annotate`` records them (MC Dropout ``u``, max softmax,
  energy, KNN, Mahalanobis, relative Mahalanobis on each member's fine-tuned pooled
  feature, and the 2-of-3 rule), AUROC of telling unseen from seen;
- for each member and each step of its backbone (``Member.stages``: the stem, up to
  stride 4 or 8, then each later stage), the pooled feature of the frozen ImageNet backbone
  and of the run's fine-tuned one, each with a class-conditional, shrunk Mahalanobis
  score fit on the run's training images (:class:`aax.models.novelty.MahalanobisScore`);
- the time of the extra pass a frozen backbone costs, up to each step, against the
  whole member.

    python benchmarks/near_ood.py --run RUN --seen SEEN.csv --unseen NEAR.csv --out OUT

``OUT/near_ood.json`` and ``OUT/near_ood.md`` hold the tables.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aax.data import find_images, open_dataset
from aax.data.batches import decoded_batches
from aax.evaluation.metrics import auroc
from aax.evaluation.openset import member_scores, side_by_side
from aax.models.ensemble import Ensemble
from aax.models.members import build_member
from aax.models.members.weights import IMAGENET_PACKAGES, imagenet_source, load_weights
from aax.models.novelty import MahalanobisScore
from aax.models.runfiles import recorded_split


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="a trained RUN (aax train)")
    p.add_argument("--seen", type=Path, required=True, help="held-out images of the run's classes")
    p.add_argument("--unseen", type=Path, required=True, help="images of a class the run never saw")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-probe", action="store_true",
                   help="only the run's own scores (no stage features): e.g. for a far-OOD set")
    return p.parse_args(argv)


def image_paths(source: Path) -> list[str]:
    return ([str(s.image) for s in open_dataset(source)] if source.suffix == ".csv"
            else [str(p) for p in find_images(source)])


@torch.inference_mode()
def stage_features(ens: Ensemble, member: torch.nn.Module, paths: list[str],
                   batch_size: int) -> tuple[list[np.ndarray], list[float]]:
    """Pooled feature after each step of ``member``'s backbone for every image, and the
    seconds each step took in all."""
    steps = member.stages()
    feats: list[list[np.ndarray]] = [[] for _ in steps]
    seconds = [0.0] * len(steps)
    for _, x in decoded_batches(ens, paths, batch_size):
        for k, step in enumerate(steps):
            t0 = time.perf_counter()
            x = step(x)
            seconds[k] += time.perf_counter() - t0
            feats[k].append(x.float().mean(dim=(2, 3)).cpu().numpy())
    return [np.concatenate(f) for f in feats], seconds


def frozen_member(name: str, ens: Ensemble) -> torch.nn.Module:
    member = build_member(name, num_classes=len(ens.classes))
    load_weights(member, imagenet_source(name))
    member.set_input_normalisation(ens.normalisation)
    return member.to(ens.device).eval()


def probe(ens: Ensemble, member: torch.nn.Module, train: list[str], labels: np.ndarray, seen: list[str],
          unseen: list[str], batch_size: int) -> dict[str, Any]:
    f_train, sec = stage_features(ens, member, train, batch_size)
    f_seen, _ = stage_features(ens, member, seen, batch_size)
    f_unseen, _ = stage_features(ens, member, unseen, batch_size)
    total = sum(sec)
    rows = []
    for k in range(len(f_train)):
        score = MahalanobisScore().fit(f_train[k], labels)
        s_seen = score.score(torch.from_numpy(f_seen[k]))
        s_unseen = score.score(torch.from_numpy(f_unseen[k]))
        rows.append({"step": k, "dims": int(f_train[k].shape[1]),
                     "auroc_maha": auroc(s_seen["maha"].numpy(), s_unseen["maha"].numpy()),
                     "auroc_rmd": auroc(s_seen["rmd"].numpy(), s_unseen["rmd"].numpy()),
                     "cost_share": sum(sec[:k + 1]) / total})
    return {"steps": rows}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    ens = Ensemble.load(args.run)
    train, labels, _ = recorded_split(args.run)
    labels_np = np.asarray(labels)
    seen, unseen = image_paths(args.seen), image_paths(args.unseen)
    names = list(ens.members)
    print(f"{args.run}: {len(train)} training, {len(seen)} seen, {len(unseen)} unseen images", flush=True)

    t0 = time.perf_counter()
    records_seen = list(ens.annotate(seen, workers=0))
    records_unseen = list(ens.annotate(unseen, workers=0))
    scorer = getattr(ens, "novelty", None)
    rows = side_by_side(member_scores(records_seen, names), member_scores(records_unseen, names), names,
                        scorer.thresholds if scorer is not None else {}, float(ens.theta), int(ens.quorum))
    run_scores = [{"score": r["score"], "method": r["method"], "auroc": r["auroc"]} for r in rows]
    print(f"run's scores ({time.perf_counter() - t0:.0f} s)", flush=True)

    result: dict[str, Any] = {"run": str(args.run), "seen": str(args.seen), "unseen": str(args.unseen),
                              "n": {"train": len(train), "seen": len(seen), "unseen": len(unseen)},
                              "run_scores": run_scores, "frozen": {}, "fine_tuned": {}}
    for name in ([] if args.no_probe else names):
        result["fine_tuned"][name] = probe(ens, ens.members[name], train, labels_np, seen, unseen,
                                           args.batch_size)
        if name in IMAGENET_PACKAGES:
            result["frozen"][name] = probe(ens, frozen_member(name, ens), train, labels_np, seen, unseen,
                                           args.batch_size)
        print(f"{name}: probed ({time.perf_counter() - t0:.0f} s)", flush=True)
    (args.out / "near_ood.json").write_text(json.dumps(result, indent=1))
    (args.out / "near_ood.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict[str, Any]) -> str:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    n = result["n"]
    lines = [f"{n['train']} training images, {n['seen']} seen and {n['unseen']} unseen test images.", "",
             "| the run's score | " + " | ".join(sorted({r["method"] for r in result["run_scores"]})) + " |"]
    methods = sorted({r["method"] for r in result["run_scores"]})
    lines.append("|---" * (len(methods) + 1) + "|")
    for score in dict.fromkeys(r["score"] for r in result["run_scores"]):
        by = {r["method"]: r["auroc"] for r in result["run_scores"] if r["score"] == score}
        lines.append(f"| {score} | " + " | ".join(f(by.get(m)) for m in methods) + " |")
    lines += ["", "Mahalanobis on each backbone step's pooled feature (AUROC; relative Mahalanobis in "
              "brackets; cost: share of the member's backbone time up to that step):", "",
              "| member | step | dims | frozen ImageNet | fine-tuned | cost |", "|---|---|---|---|---|---|"]
    for name, tuned in result["fine_tuned"].items():
        frozen = result["frozen"].get(name, {}).get("steps", [])
        for k, row in enumerate(tuned["steps"]):
            fr = frozen[k] if k < len(frozen) else {}
            lines.append(f"| {name} | {row['step']} | {row['dims']} | {f(fr.get('auroc_maha'))} "
                         f"({f(fr.get('auroc_rmd'))}) | {f(row['auroc_maha'])} ({f(row['auroc_rmd'])}) | "
                         f"{row['cost_share']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
