"""Where a stored row's image is, and the name annotation tools know it by.

Every exporter and importer reads image locations through these two functions, so
that how the store keeps them is decided in one place: the path relative to the input
root (kept in the store's ``meta`` table under ``input_root``), or an absolute path for
an image outside it and for stores made before the store kept the root.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from aax.annotation.store import AnnotationStore, relative_name


def input_root(store: AnnotationStore) -> Path | None:
    """The folder the store's images were found under: ``meta.input_root`` when the
    store has one, else the ``input`` of its settings (a folder, or a manifest's folder)."""
    if store.input_root is not None:
        return store.input_root
    source = store.settings.get("input")
    if not source:
        return None
    source = Path(source)
    return source if source.is_dir() or not source.suffix else source.parent


def image_location(store: AnnotationStore, row: dict) -> Path:
    """The image file of ``row`` on this machine."""
    image = Path(row["image"])
    if image.is_absolute():
        return image
    root = input_root(store)
    return root / image if root is not None else image


def image_name(store: AnnotationStore, row: dict) -> str:
    """The image's path relative to the input root (posix), as annotation tools list it;
    images outside the root get ``_external/<digest>/<file name>``."""
    image = PurePosixPath(Path(row["image"]).as_posix())
    if not Path(row["image"]).is_absolute():
        return str(image)
    return str(relative_name(image_location(store, row), input_root(store)))
