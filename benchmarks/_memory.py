"""Peak memory of ``aax annotate`` as a separate process (its DataLoader workers included).

Figures per run:

- ``peak_rss_mib``: the largest resident set of any single process of the run (the
  annotate process or one of its workers): the annotate process's own ``VmHWM`` at
  exit (``_peak.py``; exact, no polling) and its workers' ``VmHWM`` as last polled; the
  headline figure. (``wait4``'s ``ru_maxrss`` would include the benchmark's own size:
  Linux carries the peak over ``exec``.)
- ``peak_tree_rss_mib``: the largest sum of resident sets over the whole process tree,
  polled from ``/proc/PID/status`` every ``interval`` s (pages shared by the forked
  workers, torch's libraries among them, count once per process);
- ``peak_tree_hwm_mib``: the sum of every process's own peak (VmHWM): an upper bound.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as fh:
                    kids += [int(v) for v in fh.read().split()]
            except OSError:
                continue
    except OSError:
        pass
    return kids


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += _children(p)
    return out


def _status_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of one process in KiB, from ``/proc/PID/status``: counters the
    kernel keeps, cheap to read (``smaps_rollup`` walks the page tables under the
    process's mmap lock and, polled often, slowed ``aax annotate`` down six-fold)."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return rss, hwm


class TreePoller:
    """Polls the resident memory of a process tree in a thread.

    ``peak_rss``: the largest sum of VmRSS seen in one poll (a sample: a peak shorter
    than ``interval`` may be missed); ``peak_hwm``: the sum over every process seen of
    its own peak (VmHWM, exact per process), an upper bound of the tree's peak.
    """

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval = pid, interval
        self.peak_rss = 0
        self.hwm: dict[int, int] = {}
        self.peak_processes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    @property
    def peak_hwm(self) -> int:
        return sum(self.hwm.values())

    def _loop(self) -> None:
        while not self._stop.is_set():
            pids = _tree(self.pid)
            total = 0
            for p in pids:
                rss, hwm = _status_kib(p)
                total += rss
                if hwm:
                    self.hwm[p] = max(self.hwm.get(p, 0), hwm)
            self.peak_rss = max(self.peak_rss, total)
            self.peak_processes = max(self.peak_processes, len(pids))
            self.samples += 1
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_annotate(run: Path, images: Path, out: Path, log: Path, *, device: str,
                 batch_size: int | None, workers: int | None = None, extra: list[str] | None = None,
                 interval: float = 0.2) -> dict[str, Any]:
    """Run ``python -m aax annotate RUN IMAGES --out OUT`` and measure it."""
    cmd = [sys.executable, str(Path(__file__).with_name("_peak.py")), "annotate", str(run), str(images),
           "--out", str(out),
           "--device", device, "--overwrite"]
    if batch_size is not None:
        cmd += ["--batch-size", str(batch_size)]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    cmd += extra or []
    peak_file = log.with_suffix(".peak")
    peak_file.unlink(missing_ok=True)
    env = dict(os.environ, TQDM_DISABLE="1", AAX_PEAK_FILE=str(peak_file))
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        poller = TreePoller(proc.pid, interval)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            poller.stop()
        seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"aax annotate exited with {proc.returncode}: {' '.join(cmd)}\n{tail}")
    own_kib = int(peak_file.read_text() or 0) if peak_file.is_file() else 0
    if not own_kib:  # no /proc (not Linux): fall back to ru_maxrss (KiB on Linux, bytes on macOS)
        own_kib = int(usage.ru_maxrss / 1024 if sys.platform == "darwin" else usage.ru_maxrss)
    workers_kib = max((v for p, v in poller.hwm.items() if p != proc.pid), default=0)
    return {"command": cmd, "seconds": round(seconds, 3),
            "peak_rss_mib": round(max(own_kib, workers_kib) / 1024, 1),
            "annotate_process_peak_mib": round(own_kib / 1024, 1),
            "peak_tree_rss_mib": round(poller.peak_rss / 1024, 1),
            "peak_tree_hwm_mib": round(poller.peak_hwm / 1024, 1),
            "processes": poller.peak_processes, "samples": poller.samples}
