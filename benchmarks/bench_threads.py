"""Two PyTorch jobs on one machine: speed alone and side by side, old and new thread policy.

PyTorch's OpenMP threads spin while they wait for one another, so two jobs that each take
every core of a small machine collapse (measured on 2 cores: ``aax train`` fell from
12-29 img/s to 2 img/s beside a second training job). This script measures it with a
training workload (ResNet-50 forward + backward + Adam step, the costliest member):

- ``all``: every job takes every usable CPU (torch's default; AAX before the fix);
- ``spin``: every CPU, but OpenMP's waiting threads go to sleep after 10,000 spins
  (``GOMP_SPINCOUNT``) instead of libgomp's 300,000;
- ``start``: the CPUs other work leaves free when the job starts, kept for the whole job;
- ``default``: what ``aax`` does (:func:`aax.runtime.set_threads`: the CPUs other work
  leaves free at start, re-checked every few seconds while the job runs).

For each policy: one job alone, then two jobs started 3 s apart (the usual case: a second
command started while the first runs). Each job reports its images/s over its last
``--seconds`` seconds (after a warm-up), when both jobs run. Target: a job beside another
runs at >= 40 % of its speed alone.

Run on a quiet machine (nothing else running):

    .venv/bin/python benchmarks/bench_threads.py [--seconds 30] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

JOB = r"""
import json, sys, time
import torch
policy, seconds, size, batch = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
import aax.runtime as runtime
if policy in ("all", "spin"):
    torch.set_num_threads(runtime.usable_cpus())
else:
    runtime.set_threads(None, adapt=policy == "default")
from aax.models.members import build_member
torch.manual_seed(0)
model = build_member("resnet50", 2).train().to(memory_format=torch.channels_last)
opt = torch.optim.Adam(model.parameters(), 1e-4)
x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 2, (batch,))
start_threads = torch.get_num_threads()
t_end = time.perf_counter() + seconds + 5.0
window = []
while time.perf_counter() < t_end:
    t0 = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
    runtime.tick()
    window.append((t0, time.perf_counter()))
last = [w for w in window if w[0] >= t_end - seconds]
span = last[-1][1] - last[0][0] if last else float("nan")
print(json.dumps({"policy": policy, "img_per_s": len(last) * batch / span, "steps": len(last),
                  "threads_at_start": start_threads, "threads_at_end": torch.get_num_threads()}))
"""


def _start(policy: str, seconds: float, size: int, batch: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    if policy == "spin":
        env["GOMP_SPINCOUNT"] = SPINCOUNT
    return subprocess.Popen([sys.executable, "-c", JOB, policy, str(seconds), str(size), str(batch)],
                            stdout=subprocess.PIPE, text=True, env=env)


SPINCOUNT = "10000"  # the "spin" policy: OpenMP threads sleep after ~10k spins, not 300k


def _result(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate()
    return json.loads(out.strip().splitlines()[-1])


def measure(policy: str, seconds: float, size: int, batch: int) -> dict:
    """One job alone, then two jobs 3 s apart, both with ``policy``."""
    alone = _result(_start(policy, seconds, size, batch))
    first = _start(policy, seconds + 3.0, size, batch)
    time.sleep(3.0)
    second = _start(policy, seconds, size, batch)
    a, b = _result(first), _result(second)
    return {"alone": alone, "first_of_two": a, "second_of_two": b,
            "ratio_first": a["img_per_s"] / alone["img_per_s"],
            "ratio_second": b["img_per_s"] / alone["img_per_s"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="measured seconds per job")
    parser.add_argument("--size", type=int, default=64, help="image side (default 64)")
    parser.add_argument("--batch", type=int, default=16, help="images per step (default 16)")
    parser.add_argument("--policies", nargs="+", default=["all", "spin", "start", "default"],
                        choices=["all", "spin", "start", "default"])
    parser.add_argument("--out", default=None, help="folder for threads-<date>.json")
    args = parser.parse_args(argv)
    results = {"cpus": os.cpu_count(), "seconds": args.seconds, "size": args.size, "batch": args.batch}
    for policy in args.policies:
        r = measure(policy, args.seconds, args.size, args.batch)
        results[policy] = r
        print(f"{policy:>8}: alone {r['alone']['img_per_s']:.1f} img/s "
              f"({r['alone']['threads_at_start']} threads); beside another job: first "
              f"{r['first_of_two']['img_per_s']:.1f} ({r['ratio_first']:.0%}, threads "
              f"{r['first_of_two']['threads_at_start']}->{r['first_of_two']['threads_at_end']}), second "
              f"{r['second_of_two']['img_per_s']:.1f} ({r['ratio_second']:.0%}, threads "
              f"{r['second_of_two']['threads_at_start']}->{r['second_of_two']['threads_at_end']})", flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"threads-{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps(results, indent=2))
        print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
