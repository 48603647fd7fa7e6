"""Joining Ray: a local instance on this machine, or a running cluster.

Ray is an optional extra. It is imported here, lazily, and nowhere else at module level,
so that ``import aax`` and every command without ``--ray`` work where Ray is absent.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

LOCAL = "local"
"""The address that means: start a Ray instance on this machine for this command."""

INSTALL_HINT = "pip install 'aax[ray]'"


class RayMissing(ImportError):
    """Ray (with Ray Data) is not installed."""


def require_ray() -> Any:
    """The ``ray`` module, with Ray Data; a clear error naming the extra when absent."""
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data is part of the extra, and needed
    except ImportError as exc:
        raise RayMissing(f"--ray needs Ray with Ray Data, which is not installed ({exc}); "
                         f"install it with `{INSTALL_HINT}`") from None
    return ray


@dataclass(frozen=True)
class ClusterInfo:
    """What the Ray instance this process is connected to offers."""

    address: str  # the GCS address other drivers can join with (``--ray ADDRESS``)
    cpus: float  # logical CPUs over all nodes
    gpus: float  # GPUs over all nodes
    nodes: int  # alive nodes
    node_cpus: float  # CPUs of the largest node: no actor or task spans nodes
    started_here: bool  # this process started the instance (and stops it at the end)


@contextlib.contextmanager
def connect(address: str | None = LOCAL, *, num_cpus: int | None = None,
            num_gpus: int | None = None) -> Iterator[ClusterInfo]:
    """Use Ray for the ``with`` block.

    Args:
        address: ``"local"`` (or None): start a Ray instance on this machine, stopped at
            the end; ``"auto"``: the cluster this node joined with ``ray start``; else
            a cluster's address (``HOST:6379``, or ``ray://HOST:10001`` for Ray Client).
            When this process is already connected (a notebook, a test, a program that
            called ``ray.init``), that connection is used and left open.
        num_cpus: CPUs a local instance may use (default: the machine's); ignored for
            a cluster, whose nodes say what they have.
        num_gpus: GPUs a local instance may use (default: the machine's); likewise.
    """
    ray = require_ray()
    started = False
    if not ray.is_initialized():
        # Ray's own info lines and notices would bury the command's output; errors still show.
        common: dict[str, Any] = {"logging_level": logging.ERROR, "include_dashboard": False}
        if address in (None, LOCAL):
            ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, **common)
        else:
            ray.init(address=address, **common)
        started = True
    try:
        _quiet_data()
        yield cluster_info(started)
    finally:
        if started:
            ray.shutdown()


def cluster_info(started_here: bool = False) -> ClusterInfo:
    """The resources of the Ray instance this process is connected to."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    context = ray.get_runtime_context()
    address = getattr(context, "gcs_address", None) or os.environ.get("RAY_ADDRESS", "")
    node_cpus = max((float(n.get("Resources", {}).get("CPU", 0.0)) for n in nodes), default=0.0)
    return ClusterInfo(address=str(address), cpus=float(total.get("CPU", 0.0)),
                       gpus=float(total.get("GPU", 0.0)), nodes=len(nodes),
                       node_cpus=node_cpus, started_here=started_here)


def _quiet_data() -> None:
    """Ray Data without its own progress bars: the command draws one bar, over the whole
    cluster, from the records the driver receives."""
    from ray.data import DataContext

    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = False  # records in order of completion
    with contextlib.suppress(AttributeError):  # absent from older versions
        ctx.print_on_execution_start = False
    with contextlib.suppress(AttributeError):
        ctx.enable_operator_progress_bars = False


def actor_threads(info: ClusterInfo, actors: int, threads: int | None = None) -> int:
    """CPU threads (and Ray CPUs) per CPU actor or training task: ``threads`` when given,
    else the cluster's CPUs shared evenly among ``actors``, at most one node's worth
    (an actor runs on one node)."""
    if threads is not None:
        return max(1, int(threads))
    share = int(info.cpus // max(1, actors))
    return max(1, min(share, int(info.node_cpus) or share))


DEFAULT_THREADS_PER_ACTOR = 4
"""CPU actors when none are asked for: one per this many of the cluster's CPUs (at least
one). Fewer, wider actors keep one copy of the models per few cores; on 2 cores this is
one actor on both (docs/scale.md has the measurements)."""


def default_cpu_actors(info: ClusterInfo) -> int:
    """How many CPU actors to run when none are asked for."""
    return max(1, int(info.cpus // DEFAULT_THREADS_PER_ACTOR))
