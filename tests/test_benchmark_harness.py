"""The benchmark harness runs (its timings are not checked here: they are measured on
demand with ``make bench``), and its side-by-side check holds: on the same images, AAX's
maps and decisions are the hooked reference's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_core_run_writes_ratios_and_agrees_with_the_reference(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_annotate.py"), "--quick", "--parts", "core",
           "--sizes", "32", "--out", str(tmp_path), "--name", "smoke"]
    # no wall-clock limit: on a busy machine this takes minutes, and that is no failure
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "smoke.json").read_text())
    size = result["sizes"]["32"]
    assert size["floor"]["images_per_s"] > 0 and size["aax"]["images_per_s"] > 0
    assert set(size["ratios"]) == {"aax_over_floor", "aax_new_maps_over_floor", "aax_over_reference",
                                   "end_to_end_over_floor"}
    # AAX with the map settings new runs get, timed beside stride 32
    assert size["aax_new_maps"]["images_per_s"] > 0 and size["aax_new_maps"]["maps"]["map_stride"] == 16
    check = size["map_check"]
    assert check["same_decision"] == check["images"] > 0
    assert check["max_abs_map_difference"] < 1e-4
    assert (tmp_path / "latest.json").is_file()
