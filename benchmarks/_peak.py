"""Run ``python -m aax ARGS...`` and, at exit, write this process's own peak resident
memory (``VmHWM`` from ``/proc/self/status``, in KiB) to the file named by
``$AAX_PEAK_FILE``.

Why not ``wait4``'s ``ru_maxrss``: Linux carries a process's peak over ``exec``, so a
child started from a large parent (the benchmark holds three models and the images)
reports at least the parent's size, whatever it does itself. ``VmHWM`` belongs to the
address space made by ``exec``: the annotate process's own peak.
"""

from __future__ import annotations

import atexit
import os
import runpy
import sys


def _write_peak() -> None:
    target = os.environ.get("AAX_PEAK_FILE")
    if not target:
        return
    with open("/proc/self/status", encoding="ascii") as fh:
        hwm = next((line.split()[1] for line in fh if line.startswith("VmHWM:")), "0")
    with open(target, "w", encoding="ascii") as fh:
        fh.write(hwm)


if __name__ == "__main__":
    atexit.register(_write_peak)
    sys.argv = ["aax", *sys.argv[1:]]
    runpy.run_module("aax", run_name="__main__", alter_sys=True)
