"""Process-wide settings that the command line applies before it starts work.

Nothing here runs on import: the CLI calls :func:`tune_allocator` once, and a Python
user may call it too (it changes the whole process, which a library should not do
behind anyone's back).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20  # glibc's largest: only blocks over 32 MiB get their own mapping
TRIM_THRESHOLD = 1 << 30  # give freed heap back to the system only beyond 1 GiB


def tune_allocator(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Keep freed tensor memory in the process instead of returning it to the system.

    By default glibc serves each block over its mmap threshold (128 KiB at first, at most
    32 MiB as it adapts) with freshly mapped pages and trims the heap top once it holds
    twice that. Activations of a batch are megabytes, allocated and freed at every layer,
    so every batch pays page faults and zeroing for memory it just gave back. With the
    thresholds raised, the heap is reused: on 2 CPU cores the members' forward pass was
    12 % faster and ``aax annotate`` 15-20 % faster (docs/performance.md). The cost is
    that the process keeps its peak heap until it exits; the peak itself is unchanged.

    Returns whether the setting took: False off glibc (macOS, musl), or when the user
    chose already (``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` set, or another
    allocator preloaded), which is then left alone.
    """
    if not sys.platform.startswith("linux"):
        return False
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    if any(name in os.environ.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(
        mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))


# -- threads ------------------------------------------------------------------------
def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` elsewhere)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _cpu_times() -> tuple[float, float, float]:
    """``(busy, total)`` jiffies of the whole machine from /proc/stat, and this process's
    own CPU seconds."""
    with open("/proc/stat") as f:
        fields = [float(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user time
    own = sum(os.times()[:2])
    return total - idle, total, own


def _others_busy(before: tuple[float, float, float], after: tuple[float, float, float]) -> float | None:
    """CPUs kept busy by other processes between two :func:`_cpu_times` samples."""
    busy0, total0, own0 = before
    busy1, total1, own1 = after
    if total1 <= total0:
        return None
    ncpu = os.cpu_count() or 1
    machine = (busy1 - busy0) / (total1 - total0) * ncpu
    elapsed = (total1 - total0) / ncpu / os.sysconf("SC_CLK_TCK")
    own = (own1 - own0) / elapsed if elapsed > 0 else 0.0
    return max(0.0, machine - own)


def busy_cpus(interval: float = 0.25) -> float | None:
    """How many CPUs *other* processes keep busy, measured over ``interval`` seconds
    (this process's own CPU time is subtracted). None where /proc/stat cannot be read."""
    import time

    try:
        before = _cpu_times()
        time.sleep(interval)
        after = _cpu_times()
    except (OSError, ValueError, IndexError):
        return None
    return _others_busy(before, after)


def default_threads(max_threads: int | None = None, interval: float = 0.25) -> int:
    """Threads for the models when none are asked for: the usable CPUs that other work
    does not keep busy right now (at least one, at most ``max_threads``).

    Why: PyTorch's OpenMP threads spin while they wait for each other, so two jobs that
    each take every core collapse (measured on 2 cores: training fell from 12-29 img/s to
    2 img/s). A job that starts beside another takes only the free cores.
    """
    cpus = usable_cpus()
    busy = busy_cpus(interval)
    free = cpus if busy is None else cpus - int(busy + 0.5)
    return max(1, min(free, max_threads or cpus, cpus))


class ThreadGovernor:
    """Keeps the model threads at the CPUs other work leaves free, while a job runs.

    A job that took both cores of an idle machine must give one back when a second job
    starts, or both collapse (OpenMP threads spin waiting for a sibling that is not
    scheduled). :meth:`tick` is called once per batch; at most every ``period`` seconds it
    compares the machine's busy time with this process's own (no sleeping: the counters
    are read at two ticks) and sets ``torch.set_num_threads`` to the free CPUs.
    """

    def __init__(self, max_threads: int | None = None, period: float = 5.0) -> None:
        self.max_threads = max_threads or usable_cpus()
        self.period = period
        self._last: tuple[float, float, float] | None = None
        self._last_time = 0.0
        self.threads: int | None = None

    def tick(self) -> int | None:
        """Re-measure when ``period`` has passed; returns the threads now set (or None)."""
        import time

        now = time.monotonic()
        if self._last is not None and now - self._last_time < self.period:
            return self.threads
        try:
            sample = _cpu_times()
        except (OSError, ValueError, IndexError):
            return self.threads
        previous, self._last, self._last_time = self._last, sample, now
        if previous is None:
            return self.threads
        busy = _others_busy(previous, sample)
        if busy is None:
            return self.threads
        threads = max(1, min(self.max_threads, usable_cpus() - int(busy + 0.5)))
        if threads != self.threads:
            import torch

            torch.set_num_threads(threads)
            self.threads = threads
        return self.threads


_GOVERNOR: ThreadGovernor | None = None


def tick() -> None:
    """Let the thread governor the CLI started (if any) re-check the machine's load;
    nearly free otherwise. Training and annotation call this once per batch."""
    if _GOVERNOR is not None:
        _GOVERNOR.tick()


def reset_threads(threads: int) -> None:
    """Stop following the machine's load and set ``threads`` (what :func:`set_threads`
    found), so that a command run in-process leaves the process as it was."""
    import torch

    global _GOVERNOR
    _GOVERNOR = None
    torch.set_num_threads(int(threads))


def set_threads(threads: int | None = None, adapt: bool = True) -> int:
    """Set the number of threads the models run on (``torch.set_num_threads``) to
    ``threads``, or to :func:`default_threads` when None; return what was set.

    With ``threads`` None and ``adapt``, a :class:`ThreadGovernor` then follows the
    machine's load while the job runs (see :func:`tick`). ``OMP_NUM_THREADS`` set in the
    environment counts as the user's choice, and is kept.
    """
    import torch

    global _GOVERNOR
    _GOVERNOR = None
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        if env.isdigit() and int(env) > 0:
            threads = int(env)
        else:
            threads = default_threads()
            if adapt:
                _GOVERNOR = ThreadGovernor()
                _GOVERNOR.threads = threads
                _GOVERNOR.tick()  # the first sample: the next tick compares with it
    torch.set_num_threads(int(threads))
    return int(threads)
