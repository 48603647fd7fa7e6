"""``aax annotate RUN INPUT --out OUT --ray [ADDRESS]``: the ensemble in a pool of Ray
actors, the store written by the driver.

The pipeline is Ray Data's::

    from_items(images without a row)  ->  map_batches(Annotator, pool of N actors)
                                      ->  driver: records in order of completion -> store

- What is left to do comes from the store, by the rule every annotation path shares
  (:func:`aax.annotation.annotate.plan_store`): an image with a row is skipped.
- Each actor loads the RUN once and runs :func:`aax.annotation.annotate.annotate` on its
  batches, the code the single-process path runs: the same decoding, the same error rows
  for unreadable files, the same per-image MC Dropout seeds. Records therefore equal the
  single-process ones (exactly at the same thread count; within float rounding otherwise).
- Only the driver writes ``OUT``: SQLite stays single-writer, and mask files go where the
  store puts them (files first, row second), so a driver killed at any point resumes as
  ``aax annotate`` does, with nothing stored twice. OUT may live on the driver's disk;
  RUN and INPUT must be readable at the same path on every node.
"""

from __future__ import annotations

import os
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aax.scale.cluster import LOCAL, ClusterInfo, actor_threads, connect, default_cpu_actors

if TYPE_CHECKING:  # pragma: no cover
    from aax.annotation.records import AnnotationRecord
    from aax.annotation.store import EncodedPNG
    from aax.models.ensemble import Ensemble
    from aax.models.maps import MapOptions


@dataclass(frozen=True)
class ActorSpec:
    """What every actor needs to annotate as the driver would.

    ``fingerprint``: the digest of the driver's RUN weights; an actor whose RUN (at the
    same path, on its node) differs refuses to start instead of writing other records."""

    run: str
    fingerprint: str
    maps: MapOptions
    theta: float
    tau: Any
    mc_passes: int
    novelty: bool
    batch_size: int
    threads: int
    device: str | None
    channels_last: bool | None
    save_saliency: bool
    amp: bool


class Annotator:
    """A Ray Data actor: loads the RUN once, then annotates batches of image paths.

    Each batch comes in as columns ``index``, ``path``, ``label`` ('' for none) and goes
    out as ``index`` and ``payload``: each record pickled with its overlay (made here,
    with ``save_saliency``, so that the driver only writes files). Saliency maps, previews
    and superpixel labels stay here: the store keeps none of them.
    """

    def __init__(self, spec: ActorSpec) -> None:
        import torch

        from aax.models import runfiles
        from aax.models.ensemble import Ensemble
        from aax.runtime import tune_allocator

        tune_allocator()  # as the CLI does in its own process (aax.runtime)
        torch.set_num_threads(spec.threads)
        self.spec = spec
        self.ensemble = Ensemble.load(spec.run, device=spec.device, channels_last=spec.channels_last)
        self.ensemble.maps = spec.maps
        found = runfiles.run_fingerprint(spec.run, self.ensemble.manifest)
        if found != spec.fingerprint:
            import socket

            raise RuntimeError(f"{spec.run} on node {socket.gethostname()} holds other weights than the "
                               f"driver's ({found} != {spec.fingerprint}); every node must see the same RUN")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from aax.annotation.annotate import annotate
        from aax.data.batches import InputItem

        spec = self.spec
        index, payload = [], []
        # one row is one model batch, cut by the driver as the single-process path cuts
        # its input: the same images share a batch, so records match to the last bit
        for start, paths, labels in zip(batch["start"], batch["paths"], batch["labels"]):
            items = [InputItem(Path(str(p)), str(label) or None) for p, label in zip(paths, labels)]
            records = annotate(self.ensemble, items, theta=spec.theta, tau=spec.tau, mc_passes=spec.mc_passes,
                               batch_size=len(items), keep_saliency=spec.save_saliency,
                               keep_preview=spec.save_saliency, workers=0, amp=spec.amp, novelty=spec.novelty)
            for offset, record in enumerate(records):
                index.append(int(start) + offset)
                payload.append(pickle.dumps(_shippable(record, spec), protocol=pickle.HIGHEST_PROTOCOL))
        out = np.empty(len(payload), dtype=object)
        out[:] = payload
        return {"index": np.asarray(index, dtype=np.int64), "payload": out}


def _shippable(record: AnnotationRecord, spec: ActorSpec) -> tuple[AnnotationRecord, EncodedPNG | None]:
    """The record as the store needs it, its mask, draft and overlay encoded here (the overlay
    rendered as the single-process writer renders it): PNG encoding is most of what
    storing costs, and the one driver stores every record of the cluster. An encoded
    mask also travels in a fraction of its array's bytes."""
    from aax.annotation.store import EncodedPNG

    overlay = None
    if spec.save_saliency and record.status == "ok":
        from aax.annotation.overlay import render_record
        from aax.models.mask_settings import tau_for

        overlay = EncodedPNG.encode(render_record(record, tau_for(spec.tau, record.decision), spec.theta))
    if record.mask is not None:
        record.mask = EncodedPNG.encode(np.asarray(record.mask, dtype=bool))
    if record.draft is not None:
        record.draft = EncodedPNG.encode(np.asarray(record.draft, dtype=bool))
    record.saliency = record.preview = record.regions = None
    return record, overlay


@dataclass
class RayReport:
    """How a ``--ray`` annotation ran (``summary.json``'s ``ray`` entry)."""

    address: str
    actors: int
    threads_per_actor: int
    gpus_per_actor: float
    images: int  # annotated by the actors in this call
    seconds: float  # from the first batch submitted to the last record stored
    images_per_second: float
    first_record_seconds: float  # until the first record arrived (actor start-up, model load)


def annotate_to_folder_ray(ensemble: Ensemble, source: str | os.PathLike, out: str | os.PathLike, *,
                           address: str | None = LOCAL, actors: int | None = None,
                           threads: int | None = None, gpus: bool | None = None,
                           theta: float | None = None, tau: float | None = None,
                           mc_passes: int | None = None, batch_size: int | None = None,
                           save_saliency: bool = False, overwrite: bool = False, amp: bool = False,
                           progress: bool = True, novelty: bool = True,
                           num_cpus: int | None = None) -> dict:
    """:func:`aax.annotation.annotate.annotate_to_folder` with the ensemble in a pool of Ray
    actors; the same store, the same summary (plus a ``ray`` entry), the same resume.
    The options it shares with that function mean the same here.

    Args:
        ensemble: the loaded ensemble on the driver (its map options are what the actors
            use; the driver never runs it).
        address: ``"local"``: a Ray instance on this machine; ``"auto"`` or ``HOST:PORT``:
            a cluster (see :func:`aax.scale.cluster.connect`).
        actors: actors in the pool; default: one per GPU when the cluster has GPUs and
            ``gpus`` is not False, else one per 4 CPUs (at least one).
        threads: CPU threads (and Ray CPUs) per CPU actor; default: the cluster's CPUs
            shared evenly. Records equal the single-process ones exactly when both run
            at the same thread count.
        gpus: one GPU per actor (``num_gpus=1``); None: when the cluster has GPUs.
        num_cpus: CPUs of a local instance (default: the machine's).

    Raises:
        aax.scale.cluster.RayMissing: Ray is not installed (``pip install 'aax[ray]'``).
        ValueError: GPU actors asked for on a cluster without GPUs.
    """
    from aax.annotation.annotate import default_batch_size, finish_store, plan_store
    from aax.annotation.records import AnnotationRecord
    from aax.annotation.store import BackgroundWriter
    from aax.models import runfiles

    plan = plan_store(ensemble, source, out, theta=theta, tau=tau, mc_passes=mc_passes,
                      overwrite=overwrite, novelty=novelty)
    settings = plan.settings
    try:
        with connect(address, num_cpus=num_cpus) as info:
            use_gpus = bool(info.gpus) if gpus is None else bool(gpus)
            if use_gpus and not info.gpus:
                raise ValueError(f"GPU actors were asked for, but the Ray cluster at {info.address} has no GPUs")
            n_actors = actors or (int(info.gpus) if use_gpus else default_cpu_actors(info))
            n_threads = actor_threads(info, n_actors, threads) if not use_gpus else (threads or 1)
            device = "cuda" if use_gpus else "cpu"
            import torch

            size = batch_size or default_batch_size(torch.device(device), ensemble.image_size)
            spec = ActorSpec(run=str(Path(ensemble.run).resolve()),
                             fingerprint=runfiles.run_fingerprint(ensemble.run, ensemble.manifest),
                             maps=ensemble.maps, theta=settings.theta, tau=settings.tau,
                             mc_passes=settings.mc_passes, novelty=novelty, batch_size=size,
                             threads=n_threads, device=device,
                             channels_last=ensemble.channels_last if device == "cpu" else None,
                             save_saliency=save_saliency, amp=amp)
            writer = BackgroundWriter(plan.store)
            try:
                for path, reason in plan.bad:  # the dataset reader's errors need no actor
                    writer.put(AnnotationRecord(image=str(path), status="error", error=reason))
                report = _run_pool(plan.todo, spec, info, n_actors, use_gpus, writer, progress)
            finally:
                writer.close()
    except BaseException:
        plan.store.close()  # what was stored stays; the next run resumes from it
        raise
    return finish_store(plan, ensemble, ray=report.__dict__)


def _run_pool(todo: list, spec: ActorSpec, info: ClusterInfo, actors: int, use_gpus: bool,
              writer: Any, progress: bool) -> RayReport:
    """Stream ``todo`` through the actor pool into ``writer``; records are stored in the
    order they finish."""
    from tqdm.auto import tqdm

    report = RayReport(address=info.address, actors=actors, threads_per_actor=spec.threads,
                       gpus_per_actor=1.0 if use_gpus else 0.0, images=0, seconds=0.0,
                       images_per_second=0.0, first_record_seconds=0.0)
    if not todo:
        return report
    import ray.data
    from ray.data import ActorPoolStrategy

    step = spec.batch_size
    rows = [{"start": i, "paths": [str(item.path) for item in todo[i:i + step]],
             "labels": [item.label or "" for item in todo[i:i + step]]} for i in range(0, len(todo), step)]
    # One row, one block, one model batch: work is shared out batch by batch, and every
    # finished batch reaches the driver (and the store) at once.
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
    actors = report.actors = min(actors, len(rows))  # an actor with no batch to run is only start-up
    resources = {"num_gpus": 1} if use_gpus else {"num_cpus": spec.threads}
    annotated = dataset.map_batches(Annotator, fn_constructor_args=(spec,), batch_size=1,
                                    batch_format="numpy", compute=ActorPoolStrategy(size=actors),
                                    **resources)
    bar = tqdm(total=len(todo), unit="img", desc=f"annotate ({actors} Ray actors)", disable=not progress,
               dynamic_ncols=True, smoothing=0.1)
    t0 = time.perf_counter()
    flagged = 0
    try:
        for batch in annotated.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            if not report.images:
                report.first_record_seconds = time.perf_counter() - t0
            if os.environ.get("AAX_RAY_TRACE"):
                print(f"{time.perf_counter() - t0:.2f} s: {len(batch['payload'])} records", file=sys.stderr)
            for payload in batch["payload"]:
                record, overlay = pickle.loads(payload)
                writer.put(record, overlay)
                flagged += record.flagged
                report.images += 1
            bar.update(len(batch["payload"]))  # the rate shown is the whole cluster's
            bar.set_postfix(flagged=flagged, refresh=False)
    finally:
        bar.close()
    report.seconds = time.perf_counter() - t0
    report.images_per_second = report.images / report.seconds if report.seconds else 0.0
    return report
