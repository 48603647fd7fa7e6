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
