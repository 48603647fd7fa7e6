"""The whole system on an embedded default, for a newcomer: ``aax demo``.

Generates synthetic chest-X-ray-like ``lesion`` data, trains the three members, calibrates
theta and tau on the validation split, annotates a held-out set, evaluates it (paper
tables 1-4, with images never trained on for the open-set view: `fire` scenes far from
the training data, and `implant` X-rays near it, every novelty score beside MC Dropout)
and writes the report.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from aax.models.members import DEFAULT_MEMBERS


@dataclass
class DemoConfig:
    """Sizes of the demo. The default fits in under 10 minutes on 2 CPU cores.

    ``image_size`` is 128 px: at stride 32 the last feature map is 4x4, the smallest on
    which an intersection of maps can draw a mask (a 2x2 map cannot).
    """

    image_size: int = 128
    train_per_class: int = 120  # train + validation (20 % held out for calibration)
    test_per_class: int = 40
    unseen: int = 24  # `fire` images: a kind the ensemble never saw (far OOD)
    near_unseen: int = 24  # `implant` X-rays: the same anatomy, a finding never seen (near OOD)
    epochs: int = 12
    patience: int = 4
    members: tuple[str, ...] = DEFAULT_MEMBERS
    seed: int = 0
    device: str | None = None
    run: str | None = None  # an already trained RUN to use instead of training (tests)

    @classmethod
    def quick(cls) -> DemoConfig:
        """A small version for tests: the same steps, minutes less."""
        return cls(image_size=64, train_per_class=24, test_per_class=8, unseen=6, near_unseen=6, epochs=2,
                   patience=2)


def run_demo(out: str | os.PathLike = "demo-run", config: DemoConfig | None = None,
             log: Callable[[str], Any] = print) -> dict:
    """Run every step of AAX into ``out``; return paths and the evaluation result."""
    from aax.annotation.annotate import annotate_to_folder
    from aax.data import synth
    from aax.evaluation.calibrate import calibrate_run
    from aax.evaluation.evaluate import evaluate
    from aax.evaluation.tables import masks_text
    from aax.models.ensemble import Ensemble
    from aax.training.train import TrainConfig, train

    config = config or DemoConfig()
    out = Path(out)
    started = time.monotonic()

    def step(text: str) -> None:
        log(f"[{time.monotonic() - started:6.0f} s] {text}")

    step(f"1/6 generating synthetic lesion data at {config.image_size} px")
    train_dir = synth.generate("lesion", out / "data" / "train", n_per_class=config.train_per_class,
                               size=config.image_size, seed=config.seed)
    test_dir = synth.generate("lesion", out / "data" / "test", n_per_class=config.test_per_class,
                              size=config.image_size, seed=config.seed + 1000)
    unseen_dir = synth.generate("fire", out / "data" / "unseen", n_per_class=max(1, config.unseen // 2),
                                size=config.image_size, seed=config.seed + 2000)
    near_dir = synth.generate("implant", out / "data" / "near_unseen", n_per_class=max(1, config.near_unseen),
                              size=config.image_size, seed=config.seed + 3000)

    run = out / "run"
    if config.run:
        step(f"2/6 using the trained run {config.run}")
        shutil.copytree(config.run, run, dirs_exist_ok=True)
    else:
        step(f"2/6 training {', '.join(config.members)} (at most {config.epochs} epochs each)")
        train(train_dir, run, TrainConfig(members=config.members, epochs=config.epochs,
                                          patience=config.patience, image_size=config.image_size,
                                          seed=config.seed, device=config.device,
                                          resume=(run / "aax.json").exists()))
    ensemble = Ensemble.load(run, device=config.device)

    step("3/6 calibrating theta and tau on the validation split")
    calibration = calibrate_run(run, ensemble=ensemble)
    ensemble = Ensemble.load(run, device=config.device)  # with the calibrated settings
    step(f"    theta = {ensemble.theta:.4g}, tau = {ensemble.tau}; {masks_text(ensemble.maps.to_dict(), members_too=False)}")
    if calibration.get("trivial"):
        trivial = ", ".join(f"{k} {100 * v['iou_mean']:.1f} %" for k, v in calibration["trivial"].items()
                            if v.get("iou_mean") is not None)
        step(f"    validation masks: mean IoU {100 * calibration['iou_mean']:.1f} % ({trivial})")
        if calibration.get("mask_warning"):
            step(f"    WARNING: {calibration['mask_warning']}")

    step("4/6 annotating the held-out images")
    annotations = out / "annotations"
    summary = annotate_to_folder(ensemble, test_dir / "images", annotations, save_saliency=True,
                                 overwrite=True)
    step(f"    {summary['annotated']} images: {summary['decisions']}, flag rate {summary['flag_rate']:.1%}")

    step("5/6 evaluating members and ensemble (with never-seen fire images for the open-set view)")
    evaluation = out / "evaluation"
    result = evaluate(ensemble, test_dir, unseen=unseen_dir / "images", out=evaluation, report=True)
    near = _near_ood(ensemble, result, near_dir / "images" / "implant", evaluation)

    step("6/6 done")
    log("")
    log(result["tables"])
    if near is not None:
        log(near)
    log(f"report:      {evaluation / 'report.html'}")
    log(f"masks:       {annotations / 'masks'}  (overlays in {annotations / 'saliency'})")
    log(f"annotations: {annotations / 'annotations.sqlite'}")
    log(f"total time:  {time.monotonic() - started:.0f} s")
    return {"run": run, "annotations": annotations, "evaluation": evaluation,
            "calibration": calibration, "result": result, "near_ood": near,
            "seconds": time.monotonic() - started}


def _near_ood(ensemble: Any, result: dict, images: Path, evaluation: Path) -> str | None:
    """The open-set table for near-OOD images (X-rays with a finding never seen) against
    the evaluated data; written to ``evaluation/near_ood.{json,md}``, returned as markdown."""
    import json

    from aax.data import find_images
    from aax.evaluation.openset import compare, table_markdown

    records = list(ensemble.annotate(find_images(images), theta=result["settings"]["theta"]))
    summary = compare(result, records, ensemble, data=str(images))
    if not summary["available"]:
        return None
    text = "\n".join([f"## Open set, near OOD: {summary['n']} X-rays with a finding never seen (implant devices)",
                      "", f"Sent to review: {100 * summary['flag_rate_unseen']:.1f}% (as novel: "
                      f"{100 * summary['novel_rate_unseen']:.1f}%).", "", *table_markdown(summary), ""])
    (evaluation / "near_ood.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (evaluation / "near_ood.md").write_text(text + "\n", encoding="utf-8")
    return text
