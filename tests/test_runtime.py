"""Process-wide settings (aax.runtime)."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = "from aax.runtime import tune_allocator; print(tune_allocator())"


def run(env_extra: dict[str, str]) -> str:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tune_allocator_applies_on_glibc_and_respects_the_users_choice():
    assert run({}) == "True"
    assert run({"MALLOC_TRIM_THRESHOLD_": "1000000"}) == "False"  # the user's setting stands
    assert run({"LD_PRELOAD": "libjemalloc.so.2-not-really"}) == "False"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat")
def test_busy_cpus_sees_another_process():
    from aax.runtime import busy_cpus

    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.3)
        assert busy_cpus(0.5) >= 0.6  # the spinning child keeps one CPU busy
    finally:
        spin.kill()
        spin.wait()


def test_default_threads_takes_the_free_cpus(monkeypatch):
    import aax.runtime as runtime

    monkeypatch.setattr(runtime, "usable_cpus", lambda: 4)
    for busy, expected in [(0.0, 4), (0.4, 4), (1.2, 3), (3.6, 1), (9.0, 1), (None, 4)]:
        monkeypatch.setattr(runtime, "busy_cpus", lambda interval=0.25, b=busy: b)
        assert runtime.default_threads() == expected
    monkeypatch.setattr(runtime, "busy_cpus", lambda interval=0.25: 0.0)
    assert runtime.default_threads(max_threads=2) == 2


def test_set_threads_honours_the_option_and_omp_num_threads(monkeypatch):
    import torch

    from aax.runtime import set_threads

    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert set_threads(None) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_thread_governor_gives_cores_back_when_another_job_starts(monkeypatch):
    import os

    import torch

    import aax.runtime as runtime

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 2)
    monkeypatch.setattr(os, "sysconf", lambda name: 100)
    # (machine busy jiffies, machine total jiffies, own CPU seconds); 1 s = 200 jiffies on 2 CPUs
    samples = iter([(0, 0, 0.0),
                    (190, 200, 1.9),  # 1 s later: we use 1.9 CPUs, nobody else: 2 threads
                    (390, 400, 2.9),  # another job takes one CPU, we get the other
                    (590, 600, 3.9),  # still there
                    (780, 800, 5.8)])  # it ended: both CPUs are ours again
    monkeypatch.setattr(runtime, "_cpu_times", lambda: next(samples))
    before = torch.get_num_threads()
    try:
        governor = runtime.ThreadGovernor(period=0.0)
        assert governor.tick() is None  # the first sample only
        assert governor.tick() == 2
        assert governor.tick() == 1 and torch.get_num_threads() == 1
        assert governor.tick() == 1
        assert governor.tick() == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
