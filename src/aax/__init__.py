"""AAX: pixel-level annotations from image-level labels, with uncertainty and review flags.

The main entry points, at the package top::

    import aax

    dataset = aax.open_dataset("DATA")             # folder, CSV manifest or TBX11K layout
    run = aax.train("DATA", "RUN")                 # three members -> a RUN folder
    ensemble = aax.Ensemble.load(run)
    for record in aax.annotate(ensemble, ["x.png"]):   # = ensemble.annotate([...])
        print(record.image, record.decision, record.reason)

They are loaded on first use, so ``import aax`` stays light (no torch until needed).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

# name -> (module, attribute). ``train`` and ``annotate`` are also module names: the
# functions are what ``aax.train`` / ``aax.annotate`` mean at the package top; the
# modules stay importable as ``from aax.train import TrainConfig`` (but
# ``import aax.train as m`` gives the function: use ``importlib.import_module``).
_ENTRY_POINTS = {
    "Ensemble": ("aax.ensemble", "Ensemble"),
    "TrainConfig": ("aax.train", "TrainConfig"),
    "train": ("aax.train", "train"),
    "annotate": ("aax.annotate", "annotate"),
    "annotate_to_folder": ("aax.annotate", "annotate_to_folder"),
    "open_dataset": ("aax.data", "open_dataset"),
    "AnnotationRecord": ("aax.records", "AnnotationRecord"),
}

__all__ = ["__version__", *_ENTRY_POINTS]


def _entry_point(name: str) -> Any:
    module, attribute = _ENTRY_POINTS[name]
    return getattr(importlib.import_module(module), attribute)


class _Package(types.ModuleType):
    """``aax`` itself: ``aax.train`` and ``aax.annotate`` are the functions even after
    their modules were imported (importing a submodule sets the package attribute of
    its name to the module)."""

    def __getattribute__(self, name: str) -> Any:
        if name in _SHADOWED:
            return _entry_point(name)
        return super().__getattribute__(name)


def __getattr__(name: str) -> Any:
    if name not in _ENTRY_POINTS:
        raise AttributeError(f"module 'aax' has no attribute {name!r}")
    return _entry_point(name)


_SHADOWED = frozenset(n for n, (module, _) in _ENTRY_POINTS.items() if module == f"aax.{n}")
sys.modules[__name__].__class__ = _Package
