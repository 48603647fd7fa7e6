"""``aax import``: a review tool's export into the store's ``reviews`` table."""

from __future__ import annotations

import os
from pathlib import Path

from aax.interop.reviews import import_reviews

FORMATS = ("label-studio", "cvat")


def import_file(out: str | os.PathLike, source: str, path: str | os.PathLike) -> dict:
    """Import the reviewed annotations in ``path`` (a Label Studio JSON export, or a
    CVAT for images 1.1 ``annotations.xml``) into the output folder ``out``.

    Returns counts (added, updated, unchanged) and a note for every task or image that
    gave no review. Raises :class:`aax.interop.reviews.ReviewImportError` when the file names
    images the store does not hold, ``ValueError`` when it cannot be read.
    """
    from aax.annotation.locations import image_name
    from aax.interop.export import _open

    if source not in FORMATS:
        raise ValueError(f"unknown review format {source!r}; one of {', '.join(FORMATS)}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    store = _open(out)
    try:
        settings = store.settings
        classes, negative = list(settings.get("classes", [])), settings.get("negative_class")
        if source == "label-studio":
            from aax.interop.labelstudio import read_export

            reviews, notes = read_export(path, classes, negative)
        else:
            from aax.interop.cvat import read_annotations

            key_of = {image_name(store, {"image": image}): image
                      for (image,) in store.db.execute("SELECT image FROM annotations")}
            reviews, notes = read_annotations(path, classes, negative, key_of)
        result = import_reviews(store, reviews, path)
    finally:
        store.close()
    return {**result, "file": str(path), "format": source, "reviews_read": len(reviews), "skipped": notes}
