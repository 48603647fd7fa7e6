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
from typing import Any

__version__ = "0.1.0"

# name -> (module, attribute): the public API, each name where its stage keeps it.
_ENTRY_POINTS = {
    "Ensemble": ("aax.models.ensemble", "Ensemble"),
    "TrainConfig": ("aax.training.train", "TrainConfig"),
    "train": ("aax.training.train", "train"),
    "annotate": ("aax.annotation.annotate", "annotate"),
    "annotate_to_folder": ("aax.annotation.annotate", "annotate_to_folder"),
    "open_dataset": ("aax.data", "open_dataset"),
    "AnnotationRecord": ("aax.annotation.records", "AnnotationRecord"),
}

__all__ = ["__version__", *_ENTRY_POINTS]


def __getattr__(name: str) -> Any:
    if name not in _ENTRY_POINTS:
        raise AttributeError(f"module 'aax' has no attribute {name!r}")
    module, attribute = _ENTRY_POINTS[name]
    return getattr(importlib.import_module(module), attribute)
