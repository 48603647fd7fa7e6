"""What evaluation and calibration read: labelled data, unseen images, and the records
one annotate pass gives for them (in input order, checked image by image)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aax.annotation.records import AnnotationRecord

if TYPE_CHECKING:  # pragma: no cover
    from aax.models.ensemble import Ensemble


def open_data(data: Any, classes: Sequence[str] | None = None,
              label_map: Mapping[str, str] | None = None) -> Any:
    """A dataset from a path (via :func:`aax.data.open_dataset`) or a dataset as is.

    With ``classes`` (the model's), a sample labelled with another class becomes one of
    the dataset's errors instead of stopping the run. ``label_map`` renames labels as
    they are read (``{"tb": "diseased"}``).
    """
    if isinstance(data, (str, os.PathLike)):
        from aax.data import open_dataset

        return open_dataset(data, classes=classes, label_map=label_map)
    return data


def run_label_map(ensemble: Any) -> dict[str, str] | None:
    """The label map a run was trained with (``aax train --label-map``), if any."""
    manifest = getattr(ensemble, "manifest", None) or {}
    return dict((manifest.get("training") or {}).get("label_map") or {}) or None


def no_labelled_images(data: Any, dataset: Any, classes: Sequence[str]) -> ValueError:
    """The error for data with no usable labelled image; when its labels are not the
    model's classes, it names them and says how to map them."""
    import re
    from collections import Counter

    unknown = Counter()
    for e in getattr(dataset, "errors", None) or []:
        found = re.match(r"unknown label '(.*)' \(allowed", getattr(e, "reason", ""))
        if found:
            unknown[found.group(1)] += 1
    if unknown:
        labels = ", ".join(f"{k!r} ({n} images)" for k, n in sorted(unknown.items()))
        example = ",".join(f"{k}={c}" for k, c in zip(sorted(unknown), classes))
        return ValueError(f"{describe(data)}: no image has one of the run's classes "
                          f"({', '.join(classes)}); the data's labels are {labels}. Map them with "
                          f"--label-map, e.g. --label-map {example}")
    return ValueError(f"no readable labelled images in {describe(data)}")


def open_images(source: Any) -> Any:
    """Images for the open-set check: a dataset when ``source`` is in a dataset layout
    (its labels are ignored), else every image file under the folder (unseen data needs
    no labels), or ``source`` itself when it is already a dataset or a list of paths."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    from aax.data import detect_format, find_images

    path = Path(source)
    try:
        detect_format(path)
    except ValueError:
        if not path.is_dir():
            raise
        files = find_images(path)
        if not files:
            raise ValueError(f"{path}: no images found") from None
        return files
    return open_data(path)


def samples(dataset: Any) -> Iterator[Any]:
    """The dataset's samples, or plain paths wrapped so that ``.mask()`` gives None."""
    for s in dataset:
        yield s if hasattr(s, "image") else _PathSample(Path(s))


@dataclass
class _PathSample:
    image: Path
    label: str | None = None

    def mask(self) -> None:
        return None


def dataset_errors(dataset: Any) -> list[dict[str, str]]:
    """Entries the dataset itself could not use (bad label files, missing images ...)."""
    out = []
    for e in getattr(dataset, "errors", None) or []:
        if isinstance(e, dict):
            out.append({"image": str(e.get("image", e.get("path", ""))), "error": str(e.get("error", e.get("reason", e)))})
        elif isinstance(e, (tuple, list)) and len(e) == 2:
            out.append({"image": str(e[0]), "error": str(e[1])})
        else:
            out.append({"image": str(getattr(e, "path", getattr(e, "image", ""))),
                        "error": str(getattr(e, "reason", e))})
    return out


def annotate_with(ensemble: Ensemble, images: Any, *, saliency: bool, preview: bool = False,
                  **kwargs: Any) -> Iterator[AnnotationRecord]:
    """``ensemble.annotate`` with the maps (and small previews) kept; ``kwargs`` that
    are None are left to the ensemble's defaults."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return iter(ensemble.annotate(images, keep_saliency=saliency, keep_preview=preview, **kwargs))


def paired(samples: Iterable[Any], records: Iterable[AnnotationRecord]) -> Iterator[tuple[Any, AnnotationRecord]]:
    """Samples and their records (annotate keeps input order), checked image by image."""
    for sample, record in zip(samples, records, strict=True):
        if Path(record.image) != Path(sample.image):
            raise RuntimeError(f"records out of order: {record.image} for sample {sample.image}")
        yield sample, record


def describe(data: Any) -> str:
    if isinstance(data, (str, os.PathLike)):
        return str(data)
    if isinstance(data, (list, tuple)):
        return f"{len(data)} listed images"
    return str(getattr(data, "source", None) or getattr(data, "root", None) or type(data).__name__)
