"""Datasets on disk: the folder, CSV and TBX11K layouts, read into one :class:`Dataset`.

Opening a dataset lists its samples and runs the checks that are cheap enough for every
file (:func:`aax.data.imageio.check_header`): the file exists and is not empty, its header
parses, its size is sane, its mask (if any) has the image's size and its label is known.
A file that fails becomes a :class:`DataError` in ``Dataset.errors``; every other sample
is kept. What only shows when the pixels are decoded (a truncated file) is caught by
:meth:`Dataset.verify`, or by :func:`~aax.data.imageio.read_image` when the sample is used.

Ground truth:

* folder and CSV layouts: a mask file when there is one, otherwise none (``mask()`` is
  ``None``: no ground truth, which is not the same as "no finding").
* TBX11K: filled rectangles drawn from the Pascal VOC boxes of ``annotations/xml``,
  scaled from the scan size in each XML to the image size as TBX11K's own tools do
  (``x * image_width / xml_width``, ``y * image_height / xml_height``). Healthy images
  get an all-False mask, because TBX11K's ground truth says they have no lesion; TB images
  without an XML and ``sick`` images (when kept) get none, since nothing says where their
  finding is.

A mask that cannot be used (unreadable, or not the image's size) is reported as an error
naming the mask file, and its image is kept without ground truth: the image is still a
valid labelled sample, and ``aax data check`` still fails so the problem is seen.
"""

from __future__ import annotations

import csv
import os
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import overload

import numpy as np

from aax.data.imageio import (ImageError, check_header, image_size, is_image_file,
                              read_image, read_mask)

FORMATS: tuple[str, ...] = ("folder", "csv", "tbx11k")
"""Names accepted by ``open_dataset(..., format=...)``."""

TBX11K_LABELS: dict[str, str] = {"health": "healthy", "tb": "tb", "sick": "sick"}
"""TBX11K image folder -> AAX class name."""

TBX11K_DEFAULT_LIST = "TBX11K_trainval.txt"

Box = tuple[float, float, float, float]
"""``(xmin, ymin, xmax, ymax)`` in pixel coordinates of the image (x right, y down)."""


@dataclass(frozen=True)
class DataError:
    """A file that cannot be used, and why.

    Attributes:
        path: the file (or ``manifest.csv:LINE`` for a manifest row without a file).
        reason: what is wrong with it, in words.
    """

    path: str
    reason: str

    def to_json(self) -> dict[str, str]:
        """``{"path": ..., "reason": ...}``."""
        return {"path": self.path, "reason": self.reason}

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class Sample:
    """One labelled image of a dataset.

    Attributes:
        image: path of the image file.
        label: its class name.
        mask_path: ground-truth mask file, if any.
        boxes: ground-truth boxes in image pixels, if the ground truth is boxes (an
            empty tuple means "known to have no finding": an all-False mask).
        size: ``(height, width)`` from the image header, when it has been read.
    """

    image: Path
    label: str
    mask_path: Path | None = None
    boxes: tuple[Box, ...] | None = None
    size: tuple[int, int] | None = None

    @property
    def has_mask(self) -> bool:
        """Whether :meth:`mask` returns ground truth rather than ``None``."""
        return self.mask_path is not None or self.boxes is not None

    def mask(self) -> np.ndarray | None:
        """The ground-truth mask, ``bool [H, W]`` at the image's own size, or ``None``.

        Raises:
            ImageError: the mask file cannot be read.
        """
        if self.mask_path is not None:
            return read_mask(self.mask_path)
        if self.boxes is not None:
            height, width = self.size if self.size is not None else image_size(self.image)
            return boxes_to_mask(self.boxes, height, width)
        return None

    def read(self) -> np.ndarray:
        """The image as :func:`~aax.data.imageio.read_image` returns it."""
        return read_image(self.image)


class Dataset(Sequence[Sample]):
    """The usable samples of a source, and the files that could not be used.

    A sequence of :class:`Sample` (``len``, indexing, slicing, iteration).

    Attributes:
        samples: the usable samples, in the source's order.
        classes: sorted class names. Those present when the dataset was opened, or those
            passed as ``classes=``; subsets and :meth:`verify` keep them, so a class's
            index (its position here) never changes between a dataset and its parts.
        errors: one :class:`DataError` per file that cannot be used.
        source: what was opened.
        format: ``"folder"``, ``"csv"`` or ``"tbx11k"``.
    """

    def __init__(self, samples: Iterable[Sample], classes: Sequence[str] | None = None,
                 errors: Iterable[DataError] = (), source: str | os.PathLike = "",
                 format: str = "") -> None:
        self.samples: list[Sample] = list(samples)
        self.classes: list[str] = sorted(set(classes if classes is not None
                                             else (s.label for s in self.samples)))
        self.errors: list[DataError] = list(errors)
        self.source = Path(source)
        self.format = format

    def __len__(self) -> int:
        return len(self.samples)

    @overload
    def __getitem__(self, index: int) -> Sample: ...

    @overload
    def __getitem__(self, index: slice) -> Dataset: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.subset(range(len(self))[index])
        return self.samples[index]

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __repr__(self) -> str:
        return (f"Dataset(source={str(self.source)!r}, format={self.format!r}, "
                f"samples={len(self)}, classes={self.classes}, errors={len(self.errors)})")

    @property
    def labels(self) -> list[str]:
        """The label of every sample, in order (what :func:`stratified_split` takes)."""
        return [s.label for s in self.samples]

    def subset(self, indices: Iterable[int]) -> Dataset:
        """The samples at ``indices``, in that order, with the same ``classes``.

        The subset carries no errors: they stay with the dataset they were found in, so
        that a train/validation pair does not report them twice.
        """
        return Dataset([self.samples[i] for i in indices], classes=self.classes,
                       source=self.source, format=self.format)

    def counts(self) -> dict[str, int]:
        """Number of samples per class (every class in ``classes``, zero included)."""
        out = dict.fromkeys(self.classes, 0)
        for s in self.samples:
            out[s.label] = out.get(s.label, 0) + 1
        return out

    def mask_counts(self) -> dict[str, int]:
        """Number of samples with ground truth per class."""
        out = dict.fromkeys(self.classes, 0)
        for s in self.samples:
            out[s.label] = out.get(s.label, 0) + int(s.has_mask)
        return out

    def verify(self, progress: bool = False) -> Dataset:
        """Decode every image and mask, and move the ones that fail to ``errors``.

        Catches what the header checks cannot (truncated or damaged pixel data). A mask
        that fails is reported and its image kept without ground truth.

        Args:
            progress: show a progress bar on stderr.

        Returns:
            A new dataset with the same ``classes``, ``source`` and ``format``.
        """
        from tqdm import tqdm

        kept: list[Sample] = []
        errors = list(self.errors)
        for sample in tqdm(self.samples, desc="decoding", unit="image", file=sys.stderr,
                           disable=not progress, dynamic_ncols=True):
            try:
                image = read_image(sample.image)
            except ImageError as exc:
                errors.append(DataError(exc.path, exc.reason))
                continue
            if sample.size is not None and image.shape[:2] != sample.size:
                errors.append(DataError(str(sample.image),
                                        f"decoded size {_wh(image.shape[:2])} differs from the "
                                        f"header's {_wh(sample.size)}"))
                continue
            if sample.mask_path is not None:
                try:
                    read_mask(sample.mask_path)
                except ImageError as exc:
                    errors.append(DataError(exc.path, exc.reason))
                    sample = replace(sample, mask_path=None)
            kept.append(sample)
        return Dataset(kept, classes=self.classes, errors=errors, source=self.source,
                       format=self.format)

    def summary(self) -> dict:
        """Counts per class, masks, and errors, as a JSON-ready dict."""
        counts, masks = self.counts(), self.mask_counts()
        return {
            "source": str(self.source),
            "format": self.format,
            "n_samples": len(self),
            "n_masks": sum(masks.values()),
            "classes": {c: {"images": counts[c], "masks": masks[c]} for c in counts},
            "n_errors": len(self.errors),
            "errors": [e.to_json() for e in self.errors],
        }


def open_dataset(source: str | os.PathLike, format: str | None = None, *,
                 include_sick: bool = False, split: str | None = None,
                 classes: Sequence[str] | None = None,
                 label_map: Mapping[str, str] | None = None) -> Dataset:
    """Open a labelled image dataset.

    Args:
        source: a folder (folder or TBX11K layout) or a CSV manifest.
        format: ``"folder"``, ``"csv"`` or ``"tbx11k"``; detected from ``source`` when
            ``None`` (see :func:`detect_format`).
        include_sick: TBX11K only: keep the ``sick`` (ill, but not TB) images as a class
            of their own, named ``sick``. They are left out by default.
        split: TBX11K only: the list to read from ``lists/``, by file name with or without
            ``.txt`` or the ``TBX11K_`` prefix (``"val"``, ``"TBX11K_val"``,
            ``"all_train.txt"``). Default: ``TBX11K_trainval.txt`` when present, otherwise
            every list merged, otherwise every image under ``imgs/``.
        classes: the allowed class names. A sample with another label becomes an error,
            and ``Dataset.classes`` is this set (sorted) even where a class has no sample,
            so indices match a model trained on it.
        label_map: renames labels as they are read (``{"tb": "diseased"}``), before
            they are checked against ``classes``; labels it does not name are kept.
            Datasets whose class names differ from a model's need no copying.

    Returns:
        The dataset; unusable files are in its ``errors``.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: unknown ``format``, a layout that cannot be recognised, a manifest
            without ``image`` and ``label`` columns, or a ``split`` list that does not exist.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"no such file or folder: {source}")
    fmt = format if format is not None else detect_format(source)
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if split is not None and fmt != "tbx11k":
        raise ValueError("split= names a TBX11K list; it has no meaning for the "
                         f"{fmt} layout")
    errors: list[DataError] = []
    if fmt == "folder":
        entries = _folder_entries(source)
    elif fmt == "csv":
        entries = _csv_entries(source, errors)
    else:
        entries = _tbx11k_entries(source, split, include_sick, errors)
    if label_map:
        entries = [replace(e, label=label_map.get(e.label, e.label)) for e in entries]
    allowed = None if classes is None else set(classes)
    samples = _check_entries(entries, allowed, errors)
    return Dataset(samples, classes=classes, errors=errors, source=source, format=fmt)


def detect_format(source: str | os.PathLike) -> str:
    """Which layout ``source`` is in.

    A ``.csv`` file is a manifest; a folder with ``imgs/`` and ``lists/`` or
    ``annotations/`` is TBX11K; any other folder with subfolders is the folder layout
    (``images/<class>/`` or ``<class>/``).

    Raises:
        ValueError: none of these.
    """
    source = Path(source)
    if source.is_file():
        if source.suffix.lower() == ".csv":
            return "csv"
        raise ValueError(f"{source}: a file source must be a .csv manifest")
    if (source / "imgs").is_dir() and ((source / "lists").is_dir()
                                        or (source / "annotations").is_dir()):
        return "tbx11k"
    if (source / "images").is_dir() or any(_class_dirs(source)):
        return "folder"
    raise ValueError(f"{source}: not a dataset: expected images/<class>/..., <class>/..., "
                     "a TBX11K folder (imgs/, lists/) or a .csv manifest")


def find_images(root: str | os.PathLike) -> list[Path]:
    """Every image file under ``root`` (recursively, hidden files skipped), sorted.

    For unlabelled folders, e.g. images to annotate.
    """
    root = Path(root)
    return [p for p in sorted(root.rglob("*"))
            if p.is_file() and is_image_file(p) and not _hidden(p.relative_to(root))]


def boxes_to_mask(boxes: Iterable[Box], height: int, width: int) -> np.ndarray:
    """Filled rectangles as a ``bool [height, width]`` mask.

    A pixel is inside a box when its centre is: pixel ``(r, c)`` covers
    ``[c, c+1) x [r, r+1)``, so column ``c`` is in ``[xmin, xmax)`` when
    ``xmin <= c + 0.5 < xmax``. The True area then equals the box area to within one
    pixel on each edge, whatever the scale. Boxes are clipped to the image.
    """
    mask = np.zeros((height, width), dtype=bool)
    for xmin, ymin, xmax, ymax in boxes:
        c0, c1 = _pixel_span(xmin, xmax, width)
        r0, r1 = _pixel_span(ymin, ymax, height)
        if c1 > c0 and r1 > r0:
            mask[r0:r1, c0:c1] = True
    return mask


def read_voc_boxes(path: str | os.PathLike,
                   image_size: tuple[int, int] | None = None) -> tuple[Box, ...]:
    """The boxes of a Pascal VOC XML file, every object whatever its name.

    Args:
        path: the XML file.
        image_size: ``(height, width)`` of the image the boxes are for. When given, boxes
            are scaled from the XML's ``<size>`` to it (``x * width / xml_width``,
            ``y * height / xml_height``), as TBX11K's tools do; otherwise returned as written.

    Raises:
        ValueError: the file cannot be parsed, or has no usable ``<size>`` when scaling.
    """
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise ValueError(f"unreadable annotation XML ({exc})") from exc
    sx = sy = 1.0
    if image_size is not None:
        try:
            xml_w = float(root.findtext("size/width") or "nan")
            xml_h = float(root.findtext("size/height") or "nan")
        except ValueError:
            xml_w = xml_h = float("nan")
        if not (xml_w > 0 and xml_h > 0):  # also False for NaN
            raise ValueError("annotation XML has no valid <size><width>/<height>")
        sy, sx = image_size[0] / xml_h, image_size[1] / xml_w
    boxes = []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        if bb is None:
            continue
        try:
            xmin, ymin, xmax, ymax = (float(bb.findtext(k) or "nan")
                                      for k in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError as exc:
            raise ValueError(f"annotation XML has a malformed box ({exc})") from exc
        if not np.isfinite([xmin, ymin, xmax, ymax]).all():
            raise ValueError("annotation XML has a box with a missing coordinate")
        boxes.append((xmin * sx, ymin * sy, xmax * sx, ymax * sy))
    return tuple(boxes)


def write_manifest(dataset: Dataset, path: str | os.PathLike) -> Path:
    """Write ``dataset`` as a CSV manifest (``image,label,mask``) that opens as the same data.

    Paths are written relative to the CSV's folder (``/``-separated). Ground truth that
    is not a file (TBX11K boxes) cannot be written to a manifest and is left out.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent.resolve()

    def rel(p: Path) -> str:
        return Path(os.path.relpath(Path(p).resolve(), base)).as_posix()

    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "label", "mask"])
        for s in dataset:
            writer.writerow([rel(s.image), s.label, rel(s.mask_path) if s.mask_path else ""])
    return path


# --- readers: each lists (image, label, ground truth) entries; checks come after -------

@dataclass
class _Entry:
    image: Path
    label: str
    mask: Path | None = None
    xml: Path | None = None
    no_finding: bool = False  # ground truth says there is nothing: all-False mask


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _class_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _folder_entries(root: Path) -> list[_Entry]:
    images_root, masks_root = root, None
    if (root / "images").is_dir():
        images_root, masks_root = root / "images", root / "masks"
    entries = []
    for class_dir in _class_dirs(images_root):
        for image in find_images(class_dir):
            mask = None
            if masks_root is not None:
                candidate = (masks_root / class_dir.name
                             / image.relative_to(class_dir)).with_suffix(".png")
                mask = candidate if candidate.is_file() else None
            entries.append(_Entry(image, class_dir.name, mask=mask))
    return entries


def _csv_entries(manifest: Path, errors: list[DataError]) -> list[_Entry]:
    base = manifest.parent
    entries = []
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = [(f or "").strip().lower() for f in reader.fieldnames or []]
            if "image" not in fields or "label" not in fields:
                raise ValueError(f"{manifest}: a manifest needs the columns image,label[,mask]; "
                                 f"found {','.join(fields) or 'nothing'}")
            for line, row in enumerate(reader, start=2):
                cells = {(k or "").strip().lower(): (v or "").strip()
                         for k, v in row.items() if isinstance(v, str)}
                image = cells.get("image", "")
                if not image:
                    errors.append(DataError(f"{manifest}:{line}", "row has no image path"))
                    continue
                mask = cells.get("mask", "")
                entries.append(_Entry(base / image, cells.get("label", ""),
                                      mask=base / mask if mask else None))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{manifest}: not a UTF-8 text file ({exc})") from exc
    return entries


def _tbx11k_list(root: Path, split: str | None) -> list[str] | None:
    lists_dir = root / "lists"
    if split is not None:
        for name in (split, f"{split}.txt", f"TBX11K_{split}.txt"):
            if (lists_dir / name).is_file():
                return _read_list(lists_dir / name)
        available = sorted(p.stem for p in lists_dir.glob("*.txt")) if lists_dir.is_dir() else []
        raise ValueError(f"{root}: no list {split!r} in lists/; available: "
                         f"{', '.join(available) or 'none'}")
    if (lists_dir / TBX11K_DEFAULT_LIST).is_file():
        return _read_list(lists_dir / TBX11K_DEFAULT_LIST)
    lists = sorted(lists_dir.glob("*.txt")) if lists_dir.is_dir() else []
    if not lists:
        return None
    merged = dict.fromkeys(line for p in lists for line in _read_list(p))
    return list(merged)


def _read_list(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        return [line.strip() for line in fh if line.strip()]


def _tbx11k_entries(root: Path, split: str | None, include_sick: bool,
                    errors: list[DataError]) -> list[_Entry]:
    imgs, xml_dir = root / "imgs", root / "annotations" / "xml"
    rels = _tbx11k_list(root, split)
    if rels is None:  # no lists at all: every labelled image folder
        rels = [p.relative_to(imgs).as_posix()
                for folder in TBX11K_LABELS if (imgs / folder).is_dir()
                for p in find_images(imgs / folder)]
    entries = []
    for rel in rels:
        parts = PurePosixPath(rel).parts
        image = imgs / rel
        if len(parts) < 2 or parts[0] not in TBX11K_LABELS:
            errors.append(DataError(str(image), "no TBX11K label: the image is not under "
                                                "imgs/health, imgs/sick or imgs/tb"))
            continue
        label = TBX11K_LABELS[parts[0]]
        if label == "sick" and not include_sick:
            continue
        xml = xml_dir / f"{PurePosixPath(rel).stem}.xml"
        entries.append(_Entry(image, label, xml=xml if xml.is_file() else None,
                              no_finding=label == "healthy"))
    return entries


def _check_entries(entries: Iterable[_Entry], allowed: set[str] | None,
                   errors: list[DataError]) -> list[Sample]:
    samples = []
    for e in entries:
        if not e.label:
            errors.append(DataError(str(e.image), "empty label"))
            continue
        if allowed is not None and e.label not in allowed:
            errors.append(DataError(str(e.image), f"unknown label {e.label!r} (allowed: "
                                                  f"{', '.join(sorted(allowed))})"))
            continue
        try:
            size = check_header(e.image)
        except ImageError as exc:
            errors.append(DataError(exc.path, exc.reason))
            continue
        mask_path, boxes = None, None
        if e.mask is not None:
            try:
                mask_size = image_size(e.mask)
            except ImageError as exc:
                errors.append(DataError(exc.path, f"mask: {exc.reason}"))
            else:
                if mask_size == size:
                    mask_path = e.mask
                else:
                    errors.append(DataError(str(e.mask), f"mask size {_wh(mask_size)} differs "
                                                         f"from image size {_wh(size)} "
                                                         f"({e.image.name})"))
        elif e.xml is not None:
            try:
                boxes = read_voc_boxes(e.xml, size)
            except ValueError as exc:
                errors.append(DataError(str(e.xml), str(exc)))
        elif e.no_finding:
            boxes = ()
        samples.append(Sample(e.image, e.label, mask_path=mask_path, boxes=boxes, size=size))
    return samples


def _pixel_span(lo: float, hi: float, n: int) -> tuple[int, int]:
    # Pixels i with lo <= i + 0.5 < hi, clipped to [0, n).
    return (min(max(int(np.ceil(lo - 0.5)), 0), n),
            min(max(int(np.ceil(hi - 0.5)), 0), n))


def _wh(size: tuple[int, int]) -> str:
    return f"{size[1]}x{size[0]}"
