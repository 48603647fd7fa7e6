"""``aax train DATA --out RUN --ray [ADDRESS]``: each ensemble member trained as a Ray task.

The driver prepares the run exactly as :func:`aax.training.train.train` does (the data
decoded and split once, the manifest written), puts the decoded tensors in Ray's object
store once, and starts one task per member that is not trained yet: one GPU each on a
cluster with GPUs, else a set of CPUs each. Every task trains its member with the
single-process loop (:func:`aax.training.train._train_one`) in a scratch folder on its
node and sends back the best checkpoint; the driver writes it into RUN, then the history
and manifest, then fits the novelty data. The RUN folder is therefore the one
``aax train`` writes, and only the driver needs to reach it and the images.

Weights equal the single-process ones when both train at the same CPU thread count (the
order of floating-point sums depends on it, and Adam amplifies the difference over the
epochs), on the same kind of device.

Data-parallel training of one member over several workers (DDP) is not built: see
docs/scale.md.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aax.scale.cluster import LOCAL, actor_threads, connect


def _train_member_task(name: str, config: Any, classes: list[str], train_set: Any, val_set: Any,
                       normalisation: dict[str, list[float]], threads: int, device: str,
                       last_state: bytes | None, negative_index: int = 0
                       ) -> tuple[dict[str, Any], list[dict[str, Any]], bytes]:
    """Train member ``name`` on a Ray worker; returns its manifest entry, its history rows
    and the bytes of its best checkpoint. ``last_state``: the member's resume state from
    an interrupted run, continued from its next epoch."""
    import torch

    from aax.models import runfiles
    from aax.runtime import tune_allocator
    from aax.training.train import _train_one

    tune_allocator()
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix=f"aax-{name}-") as scratch:
        folder = Path(scratch)
        if last_state is not None:
            (folder / runfiles.last_state_name(name)).write_bytes(last_state)
        entry, rows = _train_one(name, config, classes, train_set, val_set, normalisation, folder,
                                 torch.device(device), [], None, negative_index)
        return entry, rows, (folder / runfiles.checkpoint_name(name)).read_bytes()


def train_ray(data: Any, out: str | os.PathLike[str], config: Any = None, *, address: str | None = LOCAL,
              threads: int | None = None, parallel: int | None = None, gpus: bool | None = None,
              num_cpus: int | None = None,
              on_member: Callable[[dict[str, Any]], None] | None = None,
              reviews: Any = None) -> Path:
    """:func:`aax.training.train.train` with one Ray task per member; the same RUN folder.

    ``data``, ``out`` and ``config`` are those of :func:`~aax.training.train.train`
    (``config.progress`` is ignored in the tasks: the driver reports each member as it
    finishes).

    Args:
        address: ``"local"``, ``"auto"`` or a cluster's address (:func:`aax.scale.cluster.connect`).
        threads: CPU threads (and Ray CPUs) per CPU task; default: the cluster's CPUs
            shared among the members. Give the count a single-process run used to get
            its weights back exactly.
        parallel: members trained at once, on CPUs (sets the default ``threads``);
            default: all of them.
        gpus: one GPU per task; None: when the cluster has GPUs and ``config.device`` is
            not a CPU.
        num_cpus: CPUs of a local instance (default: the machine's).
        on_member: called with each member's manifest entry as it is stored.
        reviews: reviewed images to learn from, as for :func:`~aax.training.train.train`
            (their masks travel decoded, with the training images).
    """
    from aax.models import runfiles
    from aax.training.train import TrainConfig, complete_run, prepare_run

    config = config or TrainConfig()
    run = prepare_run(data, out, config, reviews)
    todo = run.todo()
    if todo:
        with connect(address, num_cpus=num_cpus) as info:
            import ray

            wants_cpu = config.device is not None and str(config.device).startswith("cpu")
            use_gpus = (bool(info.gpus) and not wants_cpu) if gpus is None else bool(gpus)
            if use_gpus and not info.gpus:
                raise ValueError(f"GPU tasks were asked for, but the Ray cluster at {info.address} has no GPUs")
            n_threads = (threads or 1) if use_gpus else actor_threads(info, parallel or len(todo), threads)
            resources = {"num_gpus": 1, "num_cpus": n_threads} if use_gpus else {"num_cpus": n_threads}
            task = ray.remote(max_retries=0, **resources)(_train_member_task)
            task_config = _task_config(config)
            train_ref, val_ref = ray.put(run.train_set), ray.put(run.val_set)  # once, shared by every task
            pending = {}
            for name in todo:
                last = run.out / runfiles.last_state_name(name)
                ref = task.remote(name, task_config, run.classes, train_ref, val_ref, run.normalisation,
                                  n_threads, "cuda" if use_gpus else "cpu",
                                  last.read_bytes() if last.is_file() else None, run.negative_index)
                pending[ref] = name
            _say(f"training {', '.join(todo)} as Ray tasks ({'1 GPU' if use_gpus else f'{n_threads} CPUs'} "
                 f"each; the cluster has {info.cpus:g} CPUs, {info.gpus:g} GPUs)")
            t0 = time.perf_counter()
            while pending:
                [ref], _ = ray.wait(list(pending), num_returns=1)
                name = pending.pop(ref)
                entry, rows, checkpoint = ray.get(ref)  # a task's error is raised here, naming the member
                _write_atomically(run.out / runfiles.checkpoint_name(name), checkpoint)
                run.record(entry, rows)
                _say(f"{name}: trained in {entry['seconds']:.0f} s (best epoch {entry['best_epoch']}, "
                     f"val accuracy {entry['val_accuracy']:.3f}); {time.perf_counter() - t0:.0f} s since start")
                if on_member is not None:
                    on_member(dict(entry))
    return complete_run(run)


def _task_config(config: Any) -> Any:
    """The config a task trains with: no progress bar (a worker's bars would interleave
    on the driver's terminal)."""
    import dataclasses

    return dataclasses.replace(config, progress=False)


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
