"""Session fixtures shared by the whole suite.

- ``lesion_dir``: synthetic ``lesion`` data (64 px, seed 0), generated once.
- ``trained_run``: the default members (three ImageNet EfficientNet-Lite networks)
  fine-tuned once on it (a RUN folder); slow, so every test that needs a trained
  ensemble shares it.
- ``ensemble``: ``Ensemble.load(trained_run)``.
- ``tiny_lesion_dir``: smaller, 32 px data for tests that train a member themselves.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# The test machine has 2 cores; more threads than cores only adds contention.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

LESION_PER_CLASS = 40
"""Images per class of ``lesion_dir`` (80 in all: 64 train, 16 validation)."""

TRAINED_RUN_CONFIG = dict(epochs=12, patience=12, image_size=64, seed=0, progress=False)
"""Settings of ``trained_run`` beyond the defaults (the three pretrained Lite members,
fine-tuned): 64 px images and 12 epochs keep the shared run small, and every member
still classifies its validation split well above chance
(``test_members.py::test_trained_members_are_well_above_chance_in_eval_mode``)."""


@pytest.fixture(scope="session")
def lesion_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic lesion data, ``images/{healthy,diseased}/*.png`` plus masks, 64 px."""
    from aax.data import synth

    out = tmp_path_factory.mktemp("lesion")
    return synth.generate("lesion", out, n_per_class=LESION_PER_CLASS, size=64, seed=0)


@pytest.fixture(scope="session")
def tiny_lesion_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 images per class at 32 px: for tests that train a member for an epoch or two."""
    from aax.data import synth

    out = tmp_path_factory.mktemp("tiny_lesion")
    return synth.generate("lesion", out, n_per_class=12, size=32, seed=1)


def _training_digest() -> str:
    """What the trained fixture depends on: its settings and the code that trains."""
    import hashlib

    import aax

    src = Path(aax.__file__).parent
    digest = hashlib.sha256(repr((TRAINED_RUN_CONFIG, LESION_PER_CLASS)).encode())
    for path in sorted([*src.glob("models/**/*.py"), *src.glob("training/*.py"), *src.glob("data/*.py")]):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def trained_run(lesion_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A RUN folder with the default members (efficientnet-lite0, -lite1, -lite2, from
    their ImageNet weights) trained on ``lesion_dir``.

    For development only: with ``AAX_TEST_RUN_CACHE=DIR`` the run is kept in DIR, keyed by
    a digest of the training code and settings, and reused by later test runs (CI never
    sets it, so it always trains)."""
    import shutil

    from aax.training.train import TrainConfig, train

    out = tmp_path_factory.mktemp("runs") / "lesion-run"
    cache_root = os.environ.get("AAX_TEST_RUN_CACHE")
    cached = Path(cache_root) / _training_digest() if cache_root else None
    if cached is not None and (cached / "aax.json").is_file():
        shutil.copytree(cached, out, ignore=shutil.ignore_patterns("lesion_dir.txt"))
        # the cached run names the data folder of the test run that trained it
        manifest = (out / "aax.json").read_text()
        old = (cached / "lesion_dir.txt").read_text().strip()
        (out / "aax.json").write_text(manifest.replace(old, str(lesion_dir)))
        return out
    run = train(lesion_dir, out, TrainConfig(**TRAINED_RUN_CONFIG))
    if cached is not None:
        shutil.copytree(run, cached.with_name(cached.name + ".tmp"), dirs_exist_ok=True)
        (cached.with_name(cached.name + ".tmp") / "lesion_dir.txt").write_text(str(lesion_dir))
        os.replace(cached.with_name(cached.name + ".tmp"), cached)
    return run


@pytest.fixture(scope="session")
def ensemble(trained_run: Path):
    """The trained ensemble, loaded on the CPU."""
    from aax.models.ensemble import Ensemble

    return Ensemble.load(trained_run, device="cpu")


# -- the real annotation tools (make interop) -------------------------------------
REPO = Path(__file__).resolve().parent.parent


def _tool_python(venv: str, what: str) -> Path:
    """The Python of a tool environment that `make interop` builds; in CI a missing one
    fails the test (`make test` builds them), elsewhere it skips."""
    python = REPO / venv / "bin" / "python"
    if python.is_file():
        return python
    message = f"{python} is missing: `make interop` installs {what} there (`make test` does too)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def label_studio_python() -> Path:
    """Python of ``.venv-ls``: Label Studio and its SDK."""
    return _tool_python(".venv-ls", "Label Studio")


@pytest.fixture(scope="session")
def datumaro_python() -> Path:
    """Python of ``.venv-dm``: Datumaro."""
    return _tool_python(".venv-dm", "Datumaro")
