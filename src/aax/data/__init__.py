"""The data layer: reading, checking and splitting labelled images.

* :func:`open_dataset` reads the folder, CSV or TBX11K layout into a :class:`Dataset` of
  :class:`Sample` s, with every unusable file as a :class:`DataError`.
* :func:`read_image` gives the array the members take (``float32 [H, W, 3]`` RGB in
  ``[0, 1]``); :func:`read_mask` and :func:`image_size` go with it; failures raise
  :class:`ImageError`.
* :func:`stratified_split` makes a seeded train/validation split.
* :mod:`aax.data.synth` writes the synthetic ``lesion`` and ``fire`` benchmarks.
"""

from aax.data.imageio import (MAX_PIXELS, MAX_SIDE, ImageError, check_header, image_size,
                              read_image, read_mask)
from aax.data.layouts import (FORMATS, DataError, Dataset, Sample, boxes_to_mask,
                              detect_format, find_images, open_dataset, read_voc_boxes,
                              write_manifest)
from aax.data.split import stratified_split

__all__ = [
    "FORMATS", "MAX_PIXELS", "MAX_SIDE", "DataError", "Dataset", "ImageError", "Sample",
    "boxes_to_mask", "check_header", "detect_format", "find_images", "image_size",
    "open_dataset", "read_image", "read_mask", "read_voc_boxes", "stratified_split",
    "write_manifest",
]
