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
