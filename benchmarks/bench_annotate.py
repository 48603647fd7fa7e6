#!/usr/bin/env python
"""AAX performance, measured side by side in one run (see docs/performance.md).

On the same images and the same (untrained, same-cost) members, at each input size:

- floor: a plain eval-mode forward pass of the members, ``member(x)``, nothing else;
- AAX core: ``aax.annotation.annotate.annotate_batch`` on pre-decoded tensors (K MC passes,
  XGrad-CAM, protocol, masks at the original image size), no disk I/O;
- reference: what the usual tools do (K full stochastic forward passes per member, plus
  one hooked forward + backward per member for XGrad-CAM; ``benchmarks/_reference.py``);
- end to end: ``aax.annotation.annotate.annotate_to_folder`` on a folder of PNGs (decoding,
  database and mask files included);

plus the peak memory of ``aax annotate`` on many vs few images, and the cost of the
variance term in a training epoch. Prints images/s and the ratios, and writes them with
the machine's description to ``OUT/<name>.json`` and ``OUT/latest.json``.

    python benchmarks/bench_annotate.py --out benchmarks/results            # full (make bench)
    python benchmarks/bench_annotate.py --out OUT --quick            # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import inspect
import json
import math
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import _fixtures as fx  # noqa: E402
from _memory import run_annotate  # noqa: E402
from _reference import ActivationsAndGradients, reference_batch  # noqa: E402

PARTS = ("core", "end-to-end", "memory", "training")

TARGETS = {
    "aax_over_floor": (">=", 0.9, "AAX core images/s vs the plain forward pass"),
    "aax_over_reference": (">=", 20.0, "AAX core images/s vs the reference (K = 30)"),
    "end_to_end_over_floor": (">=", 0.8, "aax annotate on a folder vs the plain forward pass"),
    "memory_ratio": ("<=", 1.10, "peak memory, many images vs few"),
    "training_overhead": ("<=", 0.10, "variance term's extra time per epoch"),
}

QUICK = dict(sizes=[64], images=4, e2e_images=8, batch_size=2, repeats=1, warmup=1, reference_images=2,
             reference_repeats=1, source_size=96, memory_counts=[20, 200], memory_image_size=32,
             memory_batch_size=8,
             memory_model_size=32, train_images=8, train_size=32, train_repeats=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=HERE / "results", help="results folder")
    p.add_argument("--name", default=None, help="result file name; a UTC timestamp when not given")
    p.add_argument("--quick", action="store_true",
                   help="tiny settings to check the harness runs (numbers mean nothing); "
                        "flags given explicitly still win")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure")
    p.add_argument("--device", default=None, help="torch device; cuda when present if not given")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads; the cores this process may use if not given")
    p.add_argument("--amp", action="store_true", help="autocast backbones (CUDA only; floor too)")
    p.add_argument("--no-tune-allocator", action="store_true",
                   help="leave glibc's malloc thresholds alone (the aax command raises them, "
                        "aax.runtime.tune_allocator; by default so does this harness, for every figure)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last members and inputs, for every figure (floor too); "
                        "aax's choice for the device if not given (on for CPUs)")
    # core and end to end
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 128], help="model input sizes (px)")
    p.add_argument("--images", type=int, default=64, help="images per timed pass")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per batch for every figure; aax's choice for the device and size if not given")
    p.add_argument("--repeats", type=int, default=5, help="timed passes; the median is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes first")
    p.add_argument("--mc-passes", type=int, default=30, help="K")
    p.add_argument("--theta", type=float, default=0.1)
    p.add_argument("--tau", type=float, default=0.5)
    p.add_argument("--source-size", type=int, default=512,
                   help="side of the PNGs (original size: masks are made at this size)")
    p.add_argument("--e2e-images", type=int, default=256,
                   help="images in the end-to-end folder (the same images, cycled as hard links): "
                        "enough that per-run fixed costs (checkpoint hashing, worker start) amortise")
    p.add_argument("--reference-images", type=int, default=16,
                   help="the reference is slow: it runs on the first N of the same images "
                        "(at least one batch: batches of the same size as the others)")
    p.add_argument("--reference-repeats", type=int, default=1)
    p.add_argument("--workers", type=int, default=None,
                   help="decoding workers for end to end / memory; aax's choice if not given")
    p.add_argument("--new-maps", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the AAX core with the map settings new runs get "
                        "(aax.training.train.default_maps: finer map stride, fusion), beside stride 32")
    p.add_argument("--heads", choices=("positive", "untouched"), default="positive",
                   help="positive: bias the untrained heads so that members agree with confidence "
                        "and every image gets a mask (the costliest path); untouched: as initialised")
    p.add_argument("--no-breakdown", action="store_true",
                   help="skip timing the AAX core's stages separately")
    # memory
    p.add_argument("--memory-counts", type=int, nargs="+", default=[500, 5000],
                   help="image counts for the peak-memory runs (first is the baseline)")
    p.add_argument("--memory-image-size", type=int, default=64, help="side of the memory-run PNGs")
    p.add_argument("--memory-model-size", type=int, default=64, help="model input size of the memory runs")
    p.add_argument("--memory-batch-size", type=int, default=None,
                   help="--batch-size if not given (and then aax's choice)")
    # training
    p.add_argument("--train-images", type=int, default=48, help="images per training epoch")
    p.add_argument("--train-size", type=int, default=128, help="training input size (px)")
    p.add_argument("--train-repeats", type=int, default=3, help="timed epochs per variant")
    p.add_argument("--train-batch-size", type=int, default=None, help="aax train's (16) if not given")
    p.add_argument("--var-passes", type=int, default=None, help="T; aax train's if not given")
    p.add_argument("--lambda-var", type=float, default=None, help="aax train's if not given")
    p.add_argument("--members", nargs="+", default=None, help="members; aax's three if not given")
    p.add_argument("--workdir", type=Path, default=None,
                   help="scratch folder, kept; a temporary one, removed at the end, if not given")
    p.add_argument("--seed", type=int, default=0)
    pre, _ = p.parse_known_args(argv)
    if pre.quick:
        p.set_defaults(**QUICK)
    args = p.parse_args(argv)
    if args.memory_batch_size is None:
        args.memory_batch_size = args.batch_size
    return args


def say(message: str = "") -> None:
    print(message, flush=True)


# -- timing -----------------------------------------------------------------------------
def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (DataLoader workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int,
                device: torch.device) -> dict[str, list[tuple[float, float]]]:
    """Run every function ``warmup`` times untimed, then ``repeats`` rounds, each round
    timing every function once in turn (so a change in machine load hits all of them).
    Returns ``(wall seconds, CPU seconds)`` per timed call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            fx.synchronize(device)
            c0, t0 = cpu_seconds(), time.perf_counter()
            fn()
            fx.synchronize(device)
            times[name].append((time.perf_counter() - t0, cpu_seconds() - c0))
    return times


def rate(images: int, timed: list[tuple[float, float]]) -> dict[str, Any]:
    """images/s from the median wall time; the CPU time (all threads and workers) beside
    it, as a second opinion when the machine is not quiet."""
    wall = [w for w, _ in timed]
    cpu = [c for _, c in timed]
    med, med_cpu = statistics.median(wall), statistics.median(cpu)
    return {"images": images, "seconds": [round(v, 4) for v in wall], "median_s": round(med, 4),
            "images_per_s": images / med if med > 0 else float("inf"),
            "spread": round(max(wall) / min(wall), 3) if min(wall) > 0 else None,
            "cpu_seconds": [round(v, 4) for v in cpu], "median_cpu_s": round(med_cpu, 4),
            "images_per_cpu_s": images / med_cpu if med_cpu > 0 else None}


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or not b else a / b


# -- one input size -----------------------------------------------------------------------
def bench_size(size: int, args: argparse.Namespace, members: dict[str, torch.nn.Module],
               paths: list[Path], work: Path, device: torch.device) -> dict[str, Any]:
    from aax.annotation.annotate import AnnotateSettings, annotate_batch, annotate_to_folder, default_batch_size
    from aax.annotation.decide import map_class
    from aax.models.explain import XGradCAM
    from aax.models.uncertainty import mc_probabilities, summarize

    run = work / f"run_{size}"
    manifest = fx.write_run(run, members, size, theta=args.theta, tau=args.tau,
                            mc_passes=args.mc_passes)
    ens = fx.make_ensemble(members, run, manifest, device, args.channels_last)
    settings = AnnotateSettings.from_ensemble(ens)
    x_all, sizes_all = fx.decode(paths, size)
    x_all = x_all.to(device)
    B = args.batch_size or default_batch_size(device, size)
    seeds_all = image_seeds(paths)
    batches = [(x_all[i:i + B], sizes_all[i:i + B], seeds_all and seeds_all[i:i + B])
               for i in range(0, len(paths), B)]
    amp_on = args.amp and device.type == "cuda"
    autocast = (lambda: torch.autocast(device.type)) if amp_on else contextlib.nullcontext
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    names = list(ens.members)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    say(f"\n== {size} px: {len(paths)} images ({args.source_size} px PNGs), batch {B}, "
        f"K = {args.mc_passes}, {device}, {torch.get_num_threads()} threads"
        f"{', amp' if amp_on else ''}{', channels-last' if args.channels_last else ''}")

    def floor() -> None:
        with torch.inference_mode(), autocast():
            for xb, _, _ in batches:
                xb = xb.contiguous(memory_format=fmt)
                for m in ens.members.values():
                    m(xb)

    last: dict[str, Any] = {}
    from aax.training.train import default_maps

    new_settings = dataclasses.replace(settings, maps=default_maps(32))

    def aax_new_maps() -> None:
        for xb, sz, seeds in batches:
            annotate_batch(ens, xb, sz, new_settings, amp=args.amp, **({"seeds": seeds} if seeds else {}))

    def aax_core() -> None:
        records = []
        for xb, sz, seeds in batches:
            # as aax.annotation.annotate.annotate calls it (with per-image MC seeds where it takes them)
            extra = {"seeds": seeds} if seeds else {}
            records += annotate_batch(ens, xb, sz, settings, amp=args.amp, **extra)
        last["records"] = records

    stage: dict[str, list[float]] = {"features": [], "mc_heads": [], "xgradcam": [],
                                     "after_backbone": []}

    @torch.no_grad()
    def breakdown() -> None:
        # The stages of annotate_batch, timed one by one with the functions it uses;
        # "after_backbone" is annotate_batch itself on members that replay the feature
        # maps just computed: everything but the backbones (MC heads, XGrad-CAM,
        # protocol, per-image maps and masks, records), with no code copied here.
        acc = dict.fromkeys(stage, 0.0)
        for xb, sz, seeds in batches:
            xb = xb.contiguous(memory_format=fmt)
            feats, probs = [], []
            for j, m in enumerate(ens.members.values()):
                fx.synchronize(device)
                t0 = time.perf_counter()
                with autocast():
                    a = m.features(xb)
                a = a.float()
                fx.synchronize(device)
                t1 = time.perf_counter()
                mc_seeds = [(s * 31 + j) & 0xFFFFFFFF for s in seeds] if seeds else None
                mc = (mc_probabilities(m.head, m.head.pool(a), args.mc_passes, mc_seeds) if mc_seeds
                      else mc_probabilities(m.head, m.head.pool(a), args.mc_passes))
                probs.append(summarize(mc).probs)
                fx.synchronize(device)
                acc["features"] += t1 - t0
                acc["mc_heads"] += time.perf_counter() - t1
                feats.append(a)
            t2 = time.perf_counter()
            probs_np = torch.stack(probs, dim=1).cpu().numpy()
            cls = torch.tensor([map_class(p, ens.negative_index) for p in probs_np], device=device)
            for m, a in zip(ens.members.values(), feats):
                XGradCAM(m).raw(a, cls)
            fx.synchronize(device)
            t3 = time.perf_counter()
            acc["xgradcam"] += t3 - t2
            replay = dataclasses.replace(
                ens, members={n: fx.FeatureReplay(m, a) for (n, m), a in zip(ens.members.items(), feats)})
            annotate_batch(replay, xb, sz, settings, amp=args.amp, **({"seeds": seeds} if seeds else {}))
            fx.synchronize(device)
            acc["after_backbone"] += time.perf_counter() - t3
        for k, v in acc.items():
            stage[k].append(v)

    def end_to_end() -> None:
        # a fresh output folder each time (removing the last one is not timed)
        shutil.rmtree(last.pop("e2e_out", work / "none"), ignore_errors=True)
        last["e2e_out"] = out = work / f"e2e_{size}_{time.monotonic_ns()}"
        last["e2e_summary"] = annotate_to_folder(ens, folder, out, batch_size=B, progress=False,
                                                 workers=args.workers, amp=args.amp)

    new_ens = dataclasses.replace(ens, maps=new_settings.maps)

    def end_to_end_new_maps() -> None:
        # what `aax annotate` does with a new run's map settings (finer maps, superpixels)
        shutil.rmtree(last.pop("e2e_new_out", work / "none"), ignore_errors=True)
        last["e2e_new_out"] = out = work / f"e2e_new_{size}_{time.monotonic_ns()}"
        annotate_to_folder(new_ens, folder, out, batch_size=B, progress=False, workers=args.workers,
                           amp=args.amp)

    fns: dict[str, Callable[[], Any]] = {}
    if "core" in args.parts:
        fns.update(floor=floor, aax=aax_core)
        if args.new_maps:
            fns["aax_new_maps"] = aax_new_maps
        if not args.no_breakdown:
            fns["breakdown"] = breakdown
    if "end-to-end" in args.parts:
        folder = fx.link_folder(paths, work / f"images_{size}", args.e2e_images)
        fns.setdefault("floor", floor)
        fns["end_to_end"] = end_to_end
        if args.new_maps:
            fns["end_to_end_new_maps"] = end_to_end_new_maps
    times = interleaved(fns, args.repeats, args.warmup, device)
    n = len(paths)
    result: dict[str, Any] = {"size": size, "images": n, "batch_size": B, "source_size": args.source_size,
                              "mc_passes": args.mc_passes, "amp": amp_on,
                              "channels_last": args.channels_last}
    for key in ("floor", "aax", "aax_new_maps", "end_to_end", "end_to_end_new_maps"):
        if key in times:
            result[key] = rate(args.e2e_images if key.startswith("end_to_end") else n, times[key])
    if "aax_new_maps" in result:
        result["aax_new_maps"]["maps"] = new_settings.maps.to_dict()
    if "end_to_end" in times:
        s = last["e2e_summary"]
        result["end_to_end"]["summary"] = {k: s.get(k) for k in ("images", "annotated", "errors",
                                                                  "masks", "decisions")}
    if "records" in last:
        recs = last["records"]
        result["decisions"] = dict(Counter(r.decision for r in recs))
        result["masks"] = sum(r.mask is not None for r in recs)
    if "breakdown" in times:
        aax_s = result["aax"]["median_s"]
        # the last ``repeats`` entries: the timed passes (the first ones are the warm-up)
        parts = {k: statistics.median(v[-args.repeats:]) for k, v in stage.items()}
        parts["protocol_maps_masks"] = max(0.0, parts["after_backbone"] - parts["mc_heads"]
                                           - parts["xgradcam"])
        parts["aax_core"] = aax_s
        result["aax_stages_s"] = {k: round(v, 4) for k, v in parts.items()}
        result["aax_stages_ms_per_image"] = {k: round(1000 * v / n, 3) for k, v in parts.items()}

    if "core" in args.parts and args.reference_images > 0:
        result["reference"], result["map_check"] = bench_reference(
            ens, x_all, sizes_all, settings, args, device, B)

    floor_r = result.get("floor", {}).get("images_per_s")
    aax_r = result.get("aax", {}).get("images_per_s")
    result["ratios"] = {
        "aax_over_floor": ratio(aax_r, floor_r),
        "aax_new_maps_over_floor": ratio(result.get("aax_new_maps", {}).get("images_per_s"), floor_r),
        "aax_over_reference": ratio(aax_r, result.get("reference", {}).get("images_per_s")),
        "end_to_end_over_floor": ratio(result.get("end_to_end", {}).get("images_per_s"), floor_r),
        "end_to_end_new_maps_over_floor": ratio(result.get("end_to_end_new_maps", {}).get("images_per_s"),
                                                floor_r),
    }

    def per_cpu(key: str) -> float | None:
        return result.get(key, {}).get("images_per_cpu_s")

    result["ratios_cpu_time"] = {
        "aax_over_floor": ratio(per_cpu("aax"), per_cpu("floor")),
        "aax_over_reference": ratio(per_cpu("aax"), per_cpu("reference")),
        "end_to_end_over_floor": ratio(per_cpu("end_to_end"), per_cpu("floor")),
    }
    if device.type == "cuda":
        result["cuda_max_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    print_size(result)
    return result


def bench_reference(ens: Any, x_all: torch.Tensor, sizes_all: list[tuple[int, int]], settings: Any,
                    args: argparse.Namespace, device: torch.device, B: int) -> tuple[dict, dict]:
    """Time the reference on the first ``--reference-images`` images, rounded up to whole
    batches of ``B`` (the batch size of the other figures: on a CPU a smaller batch is
    faster per image, so a smaller one here would flatter the reference); check on the
    first batch that its maps are AAX's."""
    from aax.annotation.annotate import annotate_batch

    n = min(len(x_all), B * max(1, math.ceil(args.reference_images / B)))
    batches = [(x_all[i:i + B], sizes_all[i:i + B]) for i in range(0, n, B)]
    hooks = {name: ActivationsAndGradients(m.target_layer) for name, m in ens.members.items()}
    kw = dict(passes=args.mc_passes, theta=settings.theta, tau=settings.tau_for("diseased"),
              quorum=settings.quorum, amp=args.amp)
    try:
        xb, sz = batches[0]
        ref = reference_batch(ens, xb, sz, hooks, **kw)  # warm-up, and the check below
        aax = annotate_batch(ens, xb, sz, settings, keep_saliency=True, amp=args.amp)
        diffs, same = [], 0
        for r, a in zip(ref, aax):
            same += (a.decision == "review") == r["decision"].review and (
                r["decision"].review or a.decision == ens.classes[r["decision"].label])
            for i, name in enumerate(ens.members):
                diffs.append(float(np.abs(a.saliency[name] - r["maps"][i]).max()))
        check = {"images": len(ref), "same_decision": int(same),
                 "max_abs_map_difference": max(diffs) if diffs else None}

        def reference() -> None:
            for xb, sz in batches:
                reference_batch(ens, xb, sz, hooks, **kw)

        times = interleaved({"reference": reference}, args.reference_repeats, 0, device)
    finally:
        for h in hooks.values():
            h.release()
        for m in ens.members.values():
            m.zero_grad(set_to_none=True)
    return rate(n, times["reference"]), check


def image_seeds(paths: list[Path]) -> list[int] | None:
    """Per-image MC Dropout seeds as ``aax.annotation.annotate.annotate`` passes them, when this
    version of ``annotate_batch`` takes them (None otherwise)."""
    annotate_module = importlib.import_module("aax.annotation.annotate")

    if "seeds" not in inspect.signature(annotate_module.annotate_batch).parameters:
        return None
    seed = getattr(annotate_module, "image_seed", None)
    if seed is None:
        import zlib

        def seed(p: Path) -> int:
            return zlib.crc32(Path(p).name.encode())
    return [seed(p) for p in paths]


def print_size(r: dict[str, Any]) -> None:
    rows = [("floor", "floor (members' forward)"), ("aax", "AAX core (annotate_batch)"),
            ("aax_new_maps", "AAX core, new runs' map settings"),
            ("reference", "reference (K fwd + fwd/bwd)"), ("end_to_end", "end to end (annotate_to_folder)"),
            ("end_to_end_new_maps", "end to end, new runs' map settings")]
    for key, label in rows:
        if key in r:
            v = r[key]
            say(f"  {label:34s} {v['images_per_s']:10.2f} img/s   median {v['median_s']:8.3f} s "
                f"for {v['images']} images (CPU {v['median_cpu_s']:.3f} s)")
    if "aax_stages_ms_per_image" in r:
        st = r["aax_stages_ms_per_image"]
        say("  AAX core, ms per image: " + ", ".join(
            f"{k} {st[k]:.2f}" for k in ("features", "mc_heads", "xgradcam", "protocol_maps_masks",
                                         "after_backbone", "aax_core")))
    if "decisions" in r:
        say(f"  decisions {r['decisions']}, masks {r['masks']}")
    if "map_check" in r:
        c = r["map_check"]
        say(f"  AAX vs reference on {c['images']} images: same decision {c['same_decision']}, "
            f"max |map difference| {c['max_abs_map_difference']:.2e}")
    for key, value in r["ratios"].items():
        if value is not None:
            by_cpu = r["ratios_cpu_time"].get(key)
            cpu_text = f"   (by CPU time {by_cpu:.3f})" if by_cpu is not None else ""
            say(f"  {key:24s} {value:8.3f}   {verdict(key, value)}{cpu_text}")


def verdict(key: str, value: float | None) -> str:
    if value is None or key not in TARGETS:
        return ""
    op, target, _ = TARGETS[key]
    ok = value >= target if op == ">=" else value <= target
    return f"(target {op} {target:g}: {'met' if ok else 'NOT met'})"


# -- memory ---------------------------------------------------------------------------------
def bench_memory(args: argparse.Namespace, members: dict[str, torch.nn.Module], work: Path,
                 device: torch.device) -> dict[str, Any]:
    counts = args.memory_counts
    say(f"\n== memory: `aax annotate` on {' vs '.join(map(str, counts))} images "
        f"({args.memory_image_size} px PNGs, model input {args.memory_model_size} px, "
        f"batch {args.memory_batch_size or 'chosen by aax'})")
    run = work / "run_memory"
    fx.write_run(run, members, args.memory_model_size, theta=args.theta, tau=args.tau,
                 mc_passes=args.mc_passes)
    sources = fx.synth_images(work / "memory_src", min(16, max(counts)), args.memory_image_size,
                              seed=args.seed)
    extra = (["--amp"] if args.amp else []) + (["--channels-last"] if args.channels_last else ["--no-channels-last"])
    runs = []
    for n in counts:
        folder = fx.link_folder(sources, work / f"memory_{n}", n)
        out = work / f"memory_out_{n}"
        r = run_annotate(run, folder, out, work / f"memory_{n}.log", device=str(device),
                         batch_size=args.memory_batch_size, workers=args.workers, extra=extra)
        summary = json.loads((out / "summary.json").read_text())
        r.update(images=n, images_per_s=n / r["seconds"], annotated=summary.get("annotated"),
                 masks=summary.get("masks"))
        r.pop("command")
        runs.append(r)
        say(f"  {n:6d} images: peak RSS (largest process) {r['peak_rss_mib']:8.1f} MiB, "
            f"process tree {r['peak_tree_rss_mib']:8.1f} MiB (sum of peaks {r['peak_tree_hwm_mib']:.1f}), "
            f"{r['seconds']:.1f} s, {r['images_per_s']:.1f} img/s, {r['masks']} masks")
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    base, big = runs[0], runs[-1]
    result = {"counts": counts, "image_size": args.memory_image_size,
              "model_size": args.memory_model_size, "batch_size": args.memory_batch_size,
              "runs": runs,
              "ratio_peak_rss": big["peak_rss_mib"] / base["peak_rss_mib"],
              "ratio_tree_rss": big["peak_tree_rss_mib"] / max(base["peak_tree_rss_mib"], 1e-9),
              "command": "python -m aax annotate RUN DIR --out OUT --device D --overwrite"
                         + (f" --batch-size {args.memory_batch_size}" if args.memory_batch_size else "")}
    result["memory_ratio"] = max(result["ratio_peak_rss"], result["ratio_tree_rss"])
    say(f"  ratio {counts[-1]} / {counts[0]}: largest process {result['ratio_peak_rss']:.3f}, "
        f"process tree {result['ratio_tree_rss']:.3f}   {verdict('memory_ratio', result['memory_ratio'])}")
    return result


# -- training -------------------------------------------------------------------------------
def bench_training(args: argparse.Namespace, names: list[str], work: Path,
                   device: torch.device) -> dict[str, Any]:
    from aax.data import read_image
    from aax.data.transforms import prepare

    import _training

    d = _training.training_defaults()
    lam = d["lambda_var"] if args.lambda_var is None else args.lambda_var
    T = d["var_passes"] if args.var_passes is None else args.var_passes
    bs = d["batch_size"] if args.train_batch_size is None else args.train_batch_size
    say(f"\n== training: one epoch of {args.train_images} images at {args.train_size} px, batch {bs}: "
        f"plain CE vs CE + {lam:g} * Var over T = {T} head passes")
    paths = fx.synth_images(work / "train_src", args.train_images, args.train_size, seed=args.seed + 1)
    images = torch.stack([(prepare(read_image(p), args.train_size, (0.0,) * 3, (1.0,) * 3)
                           .clamp(0, 1) * 255).round().to(torch.uint8) for p in paths])
    labels = torch.tensor([fx.CLASSES.index(p.parent.name) for p in paths])
    members = fx.build_members(names, seed=args.seed, bias=None)
    result = _training.measure(members, images, labels, batch_size=bs, lambda_var=lam, passes=T,
                               repeats=args.train_repeats, lr=d["lr"], device=device,
                               mean=fx.NORMALISATION[0], std=fx.NORMALISATION[1], seed=args.seed,
                               log=say)
    result["training_overhead"] = result["overhead"]
    say(f"  all members: plain CE {result['plain_ce_epoch_s']:.3f} s, CE+Var {result['ce_var_epoch_s']:.3f} s "
        f"per epoch: {100 * result['overhead']:+.1f} %   {verdict('training_overhead', result['overhead'])}")
    return result


# -- main -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from aax.models.device import default_channels_last, resolve_device
    from aax.models.members import DEFAULT_MEMBERS

    device = resolve_device(args.device)
    if args.channels_last is None:
        args.channels_last = default_channels_last(device)
    if not args.no_tune_allocator:
        from aax.runtime import tune_allocator

        args.allocator_tuned = tune_allocator()  # as the aax command does, for every figure
    threads = args.threads or fx.usable_cores()
    torch.set_num_threads(threads)
    names = list(args.members or DEFAULT_MEMBERS)
    machine = fx.machine_info(device, ROOT)
    started = datetime.now(timezone.utc)
    say(f"AAX benchmark{' (--quick: numbers mean nothing)' if args.quick else ''}")
    say(f"machine: {machine['cpu_model']}, {machine['usable_cores']} usable cores "
        f"(of {machine['cpu_count']}), {machine['memory_gib']} GiB, torch {machine['torch']}, "
        f"{machine['torch_num_threads']} threads, device {device}"
        + (f" ({machine['gpu']['name']})" if "gpu" in machine else "")
        + f", load average {machine['load_average_start']}"
        + f", malloc thresholds {'raised (aax.runtime)' if getattr(args, 'allocator_tuned', False) else 'as found'}")

    own_work = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="aax-bench-")) if own_work else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"name": args.name, "started": started.isoformat(timespec="seconds"),
                               "quick": args.quick, "machine": machine,
                               "settings": {k: (str(v) if isinstance(v, Path) else v)
                                            for k, v in vars(args).items()},
                               "members": names, "heads": args.heads, "sizes": {}}
    try:
        torch.manual_seed(args.seed)
        members = fx.build_members(names, seed=args.seed,
                                   bias=6.0 if args.heads == "positive" else None)
        if {"core", "end-to-end"} & set(args.parts):
            paths = fx.synth_images(work / "images", args.images, args.source_size, seed=args.seed)
            for size in args.sizes:
                results["sizes"][str(size)] = bench_size(size, args, members, paths, work, device)
        for m in members.values():
            m.to("cpu")
        if "memory" in args.parts:
            results["memory"] = bench_memory(args, members, work, device)
        if "training" in args.parts:
            results["training"] = bench_training(args, names, work, device)
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    machine["load_average_end"] = fx.load_average()
    results["seconds"] = round((datetime.now(timezone.utc) - started).total_seconds(), 1)
    results["targets"] = {k: {"op": op, "value": v, "what": what} for k, (op, v, what) in TARGETS.items()}
    results["summary"] = summary_rows(results)
    say("\n== summary (target: met?)")
    for row in results["summary"]:
        value = row["value"]
        shown = "n/a" if value is None else f"{value:.3f}"
        say(f"  {row['figure']:40s} {shown:>9s}   {row['target']:>8s}   {row['met']}")
    results["warnings"] = noise_warnings(results)
    for warning in results["warnings"]:
        say(f"  warning: {warning}")
    path = write_results(results, args.out, args.name, started)
    say(f"\nresults: {path} (and {args.out / 'latest.json'}); took {results['seconds']:.0f} s")
    return 0


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []

    def add(figure: str, key: str, value: float | None) -> None:
        op, target, _ = TARGETS[key]
        met = None if value is None else bool(value >= target if op == ">=" else value <= target)
        rows.append({"figure": figure, "key": key, "value": value, "target": f"{op} {target:g}",
                     "met": met})

    for size, r in results["sizes"].items():
        for key, value in r["ratios"].items():
            if value is not None and key in TARGETS:  # (the new-maps figure has no target)
                add(f"{key} @ {size} px", key, value)
    if "memory" in results:
        m = results["memory"]
        add(f"memory {m['counts'][-1]} / {m['counts'][0]} images", "memory_ratio", m["memory_ratio"])
    if "training" in results:
        add("training: variance term, extra per epoch", "training_overhead",
            results["training"]["overhead"])
    return rows


def noise_warnings(results: dict[str, Any]) -> list[str]:
    """Signs that the timings are not to be trusted: a busy machine, scattered repeats."""
    out = []
    cores = results["machine"]["usable_cores"] or 1
    loads = [results["machine"].get(k) for k in ("load_average_start", "load_average_end")]
    busiest = max((la[0] for la in loads if la), default=0.0)
    if busiest > 0.5 * cores + 1.0:
        out.append(f"load average reached {busiest:.1f} on {cores} cores: other work was running, "
                   "timings are noisy; rerun on a quiet machine")
    for size, r in results["sizes"].items():
        for key in ("floor", "aax", "end_to_end"):
            spread = r.get(key, {}).get("spread")
            if spread and spread > 1.15:
                out.append(f"{key} @ {size} px: slowest repeat {spread:.2f} x the fastest")
    return out


def write_results(results: dict[str, Any], out: Path, name: str | None, started: datetime) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stem = name or started.strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(results, indent=2, default=_json_default) + "\n"
    path = out / f"{stem}.json"
    for target in (path, out / "latest.json"):
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (Path, torch.device)):
        return str(value)
    raise TypeError(f"not JSON: {type(value).__name__}")


if __name__ == "__main__":
    sys.exit(main())
