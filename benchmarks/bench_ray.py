#!/usr/bin/env python
"""``aax annotate --ray`` against the single process, on the same images (docs/scale.md).

On 600 synthetic images (``aax.data.synth``, lesion) and the default three members
(untrained, with heads biased so that every image takes the costliest path: a mask for
every image), this measures:

- ``single``: :func:`aax.annotation.annotate.annotate_to_folder`, this process, all threads;
- ``ray-1``: :func:`aax.scale.annotate.annotate_to_folder_ray` with 1 actor on all threads;
- ``ray-2``: 2 actors, the threads shared between them;

each end to end (model load, Ray start-up and its actors' start included; Python and
torch imports not) and in steady state (records stored per second from the first stored
record to the last, which leaves start-up out). Then the driver's side alone: how many
records per second one store writer takes (PNG mask + SQLite row; with the mask
encoded by the actors, as ``--ray`` does; rows alone), and how many the driver unpickles, for the paper estimate of where the single writer
saturates. Writes ``OUT/ray-<name>.json``.

    python benchmarks/bench_ray.py --out benchmarks/results
    python benchmarks/bench_ray.py --out OUT --quick       # smoke run (numbers mean nothing)
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import _fixtures as fx  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=HERE / "results", help="results folder")
    p.add_argument("--name", default=None, help="result name; a UTC timestamp when not given")
    p.add_argument("--images", type=int, default=600, help="images annotated by each configuration")
    p.add_argument("--source-size", type=int, default=256, help="side of the synthetic images, px")
    p.add_argument("--image-size", type=int, default=224, help="model input side, px")
    p.add_argument("--mc-passes", type=int, default=30)
    p.add_argument("--threads", type=int, default=None, help="CPU threads in all (default: usable cores)")
    p.add_argument("--writer-records", type=int, default=2000, help="records for the store writer alone")
    p.add_argument("--configs", nargs="+", default=["single", "ray-1", "ray-2"],
                   help="single, ray-N (N actors)")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds; each round runs every configuration once, so that a load that "
                        "drifts hits them alike (figures are medians over rounds)")
    p.add_argument("--quick", action="store_true", help="tiny settings: does the harness run")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.source_size, args.image_size, args.mc_passes, args.writer_records = 24, 64, 64, 4, 100
    return args


class StoreClock:
    """Times every record handed to the store writer, whichever path hands it."""

    def __init__(self) -> None:
        from aax.annotation.store import BackgroundWriter

        self.times: list[float] = []
        self._put = BackgroundWriter.put
        clock = self

        def put(writer: Any, record: Any, overlay: Any = None) -> None:
            clock.times.append(time.perf_counter())
            clock._put(writer, record, overlay)

        BackgroundWriter.put = put  # type: ignore[method-assign]

    def steady(self) -> float | None:
        """Records per second after the first batch (start-up left out): records come in
        bursts, one per batch, so the first burst's records are not counted."""
        first = [t for t in self.times if t - self.times[0] < 0.05] if self.times else []
        if len(self.times) <= len(first):
            return None
        return (len(self.times) - len(first)) / (self.times[-1] - first[-1])


def run_config(config: str, run: Path, images: Path, out: Path, threads: int, mc: int) -> dict[str, Any]:
    from aax.annotation.annotate import annotate_to_folder
    from aax.models.ensemble import Ensemble

    shutil.rmtree(out, ignore_errors=True)
    clock = StoreClock()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    ensemble = Ensemble.load(run, device="cpu")
    if config == "single":
        summary = annotate_to_folder(ensemble, images, out, mc_passes=mc, workers=0, progress=False)
        actors, per_actor = 0, threads
    else:
        from aax.scale.annotate import annotate_to_folder_ray

        actors = int(config.split("-")[1])
        per_actor = max(1, threads // actors)
        summary = annotate_to_folder_ray(ensemble, images, out, address="local", num_cpus=threads,
                                         actors=actors, threads=per_actor, mc_passes=mc, progress=False)
    wall = time.perf_counter() - t0
    n = summary["images"]
    result = {"config": config, "actors": actors, "threads_per_actor": per_actor, "images": n,
              "end_to_end_s": round(wall, 3), "end_to_end_img_s": round(n / wall, 3),
              "steady_img_s": round(clock.steady() or 0.0, 3), "masks": summary["masks"],
              "first_record_s": round(clock.times[0] - t0, 3) if clock.times else None}
    if "ray" in summary:
        result["ray"] = summary["ray"]
    return result


def writer_rate(records: list, out: Path) -> dict[str, float]:
    """Records per second through the driver's side alone: unpickling what actors send,
    and one :class:`~aax.annotation.store.BackgroundWriter` storing them (mask PNG + row)."""
    from aax.annotation.store import AnnotationStore, BackgroundWriter, EncodedPNG

    payloads = [pickle.dumps((r, None), protocol=pickle.HIGHEST_PROTOCOL) for r in records]
    encoded = {}
    t0 = time.perf_counter()
    for r in records[:200]:
        encoded[id(r)] = EncodedPNG.encode(r.mask) if r.mask is not None else None
    rates = {"encode_masks_s": round(min(200, len(records)) / (time.perf_counter() - t0), 1)}
    t0 = time.perf_counter()
    loaded = [pickle.loads(p)[0] for p in payloads]
    rates["unpickle_records_s"] = round(len(loaded) / (time.perf_counter() - t0), 1)
    rates["payload_bytes_array_mask"] = len(payloads[0])
    sample = records[0]
    if sample.mask is not None:
        import copy

        shipped = copy.copy(sample)
        shipped.mask = EncodedPNG.encode(sample.mask)
        rates["payload_bytes_encoded_mask"] = len(pickle.dumps((shipped, None)))
        rates["mask_shape"] = list(sample.mask.shape)
    for name in ("with_masks", "encoded_masks", "rows_only"):
        shutil.rmtree(out, ignore_errors=True)
        store = AnnotationStore(out, {"bench": name})
        writer = BackgroundWriter(store)
        batch = [pickle.loads(p)[0] for p in payloads]
        for i, record in enumerate(batch):
            record.image = f"img{i:06d}.png"
            if name == "rows_only":
                record.mask = None
            elif name == "encoded_masks" and record.mask is not None:
                record.mask = encoded.get(id(records[i])) or EncodedPNG.encode(record.mask)
        t0 = time.perf_counter()
        for record in batch:
            writer.put(record)
        writer.close()
        store.close()
        rates[f"writer_{name}_records_s"] = round(len(batch) / (time.perf_counter() - t0), 1)
    return rates


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # untrained members have no novelty data, which every actor would warn about
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")
    import warnings

    warnings.simplefilter("ignore", UserWarning)
    from aax.data import synth
    from aax.models.members import DEFAULT_MEMBERS

    threads = args.threads or fx.usable_cores()
    work = Path(tempfile.mkdtemp(prefix="aax-bench-ray-"))
    try:
        per_class = (args.images + 1) // 2
        images = synth.generate("lesion", work / "data", n_per_class=per_class, size=args.source_size, seed=0)
        folder = work / "images"
        for i, path in enumerate(sorted((images / "images").rglob("*.png"))[:args.images]):
            folder.mkdir(exist_ok=True)
            shutil.copy(path, folder / f"img{i:05d}.png")
        run = work / "run"
        members = fx.build_members(DEFAULT_MEMBERS, bias=6.0)
        fx.write_run(run, members, args.image_size, theta=0.1, tau=0.5, mc_passes=args.mc_passes)
        results = {"machine": fx.machine_info(torch.device("cpu"), ROOT), "threads": threads,
                   "images": args.images, "source_size": args.source_size, "image_size": args.image_size,
                   "mc_passes": args.mc_passes, "configs": []}
        import statistics

        runs = []
        for round_ in range(args.repeats):
            for config in args.configs:
                r = run_config(config, run, folder, work / f"out-{config}", threads, args.mc_passes)
                r["round"] = round_
                runs.append(r)
                print(f"round {round_} {config:>8}: end to end {r['end_to_end_img_s']:.2f} img/s "
                      f"({r['end_to_end_s']:.1f} s), steady {r['steady_img_s']:.2f} img/s, first record after "
                      f"{r['first_record_s']:.1f} s", flush=True)
        results["runs"] = runs
        for config in args.configs:
            mine = [r for r in runs if r["config"] == config]
            summary = {"config": config, "actors": mine[0]["actors"], "threads_per_actor": mine[0]["threads_per_actor"],
                       "end_to_end_img_s": statistics.median(r["end_to_end_img_s"] for r in mine),
                       "steady_img_s": statistics.median(r["steady_img_s"] for r in mine),
                       "first_record_s": statistics.median(r["first_record_s"] for r in mine)}
            if "single" in args.configs:  # paired by round: both ran minutes apart at most
                base = {r["round"]: r for r in runs if r["config"] == "single"}
                summary["overhead_steady"] = round(statistics.median(
                    1 - r["steady_img_s"] / base[r["round"]]["steady_img_s"] for r in mine), 3)
                summary["overhead_end_to_end"] = round(statistics.median(
                    1 - r["end_to_end_img_s"] / base[r["round"]]["end_to_end_img_s"] for r in mine), 3)
                print(f"{config:>8}: median over {len(mine)} rounds: steady {summary['steady_img_s']:.2f} img/s, "
                      f"end to end {summary['end_to_end_img_s']:.2f} img/s; overhead vs single: steady "
                      f"{100 * summary['overhead_steady']:+.1f} %, end to end {100 * summary['overhead_end_to_end']:+.1f} %")
            results["configs"].append(summary)

        from aax.annotation.annotate import annotate
        from aax.models.ensemble import Ensemble

        ensemble = Ensemble.load(run, device="cpu")
        sample = list(annotate(ensemble, sorted(folder.glob("*.png"))[:8], mc_passes=2, workers=0))
        records = [sample[i % len(sample)] for i in range(args.writer_records)]
        results["driver"] = writer_rate(records, work / "writer")
        print("driver:", json.dumps(results["driver"]))
        results["machine"]["load_average_end"] = fx.load_average()
        name = args.name or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"ray-{name}.json").write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out / f'ray-{name}.json'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
