"""Reading images and masks, and the cheap header checks that run when a dataset opens.

:func:`read_image` is the one function that turns a file into the array the members
take: ``float32 [H, W, 3]`` RGB in ``[0, 1]``, at the image's own size, oriented as a
viewer shows it. Every failure raises :class:`ImageError`, which names the file and a
reason a person can act on; callers turn it into a record and go on.

Conversions, so that every source means the same thing to a model:

* 8-bit data is divided by 255, 16-bit data by 65535: grey (``I;16`` PNG/TIFF) through
  Pillow, colour PNGs through ``pypng`` (Pillow would read them at 8 bits per channel, and
  ignores their EXIF orientation). 32-bit integer and float images are
  divided by 65535 or kept as they are when they already lie in that range, and min-max
  scaled otherwise.
* Grey and palette images are expanded to three equal channels.
* Transparency (RGBA, LA, palette or grey with a transparent colour) is composited on
  black, i.e. colour times alpha: transparent pixels carry no image, and whatever colour
  a tool left under them must not reach the model.
* The EXIF orientation tag is applied (``PIL.ImageOps.exif_transpose``), and
  :func:`image_size` reports the size after it, so masks drawn on the image as shown fit.
* Multi-page TIFF/GIF: the first page.
* DICOM (``pydicom``, imported only when a DICOM file is read): the modality LUT
  (``RescaleSlope`` / ``RescaleIntercept``) is applied, then the image is min-max scaled
  over its own pixel values, and ``MONOCHROME1`` (where higher values are darker) is
  inverted so that bone is bright in every image. Min-max over the pixels, rather than the
  nominal bit depth, because detectors rarely fill their range (a 12-bit range in a 16-bit
  container would come out nearly black); no VOI window is applied, because window presets
  differ between sites and viewers while the pixel range does not. Of a multi-frame DICOM
  the first frame is read, with an :class:`ImageWarning` naming the file; colour DICOM is
  scaled by its bit depth.

Size limits: an image over :data:`MAX_SIDE` pixels a side or :data:`MAX_PIXELS` pixels is
refused as a likely decompression bomb. Pillow's own guard, which only warns between
about 89 and 179 Mpixels, is silenced here and its error turned into an
:class:`ImageError`, so the limit is ours and is reported like any other bad file.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_SIDE: int = 20_000
"""Largest accepted width or height, in pixels."""

MAX_PIXELS: int = 100_000_000
"""Largest accepted number of pixels (width x height)."""

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"})
"""File suffixes (lower case) that the folder layout treats as images."""

DICOM_SUFFIXES: frozenset[str] = frozenset({".dcm", ".dicom"})

_EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # those that rotate by 90 degrees


class ImageWarning(UserWarning):
    """An image was read, but not all of it (e.g. the first frame of a multi-frame DICOM)."""


class ImageError(Exception):
    """A file that cannot be used as an image or mask.

    Attributes:
        path: the file, as given.
        reason: why it cannot be used, in words (e.g. ``"empty file (0 bytes)"``).
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):
        # The default pickling passes only the message back to __init__; data-loader
        # workers send exceptions between processes, so keep both fields.
        return (type(self), (self.path, self.reason))


def is_dicom(path: str | os.PathLike) -> bool:
    """Whether ``path`` is to be read as DICOM: by suffix, or by the ``DICM`` marker.

    The marker at byte 128 catches DICOM files without a suffix, which is how many
    archives export them.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return True
    if suffix in IMAGE_SUFFIXES:  # a known picture suffix: spare the extra open per file
        return False
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether a file found in a folder should be taken as an image (suffix or DICOM marker)."""
    path = Path(path)
    if path.name.startswith("."):
        return False
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    return path.suffix == "" and is_dicom(path)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(height, width)`` of an image, read from its header without decoding the pixels.

    The size is the one :func:`read_image` returns, i.e. after the EXIF orientation.
    No size limit is applied here; see :func:`check_header`.

    Raises:
        ImageError: the file is missing, empty, or its header cannot be read.
    """
    path = Path(path)
    _check_file(path)
    if is_dicom(path):
        ds = _read_dicom_header(path)
        return int(ds.Rows), int(ds.Columns)
    with _open_pil(path) as im:
        width, height = im.size
        if _orientation(im) in _SWAPPING_ORIENTATIONS:
            width, height = height, width
    return height, width


def check_header(path: str | os.PathLike, *, max_side: int = MAX_SIDE,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """The checks that are cheap enough to run on every file when a dataset opens.

    The file exists and is not empty, its header parses (Pillow identifies it, or the
    DICOM header reads), and its size is sane.

    Returns:
        ``(height, width)``, as :func:`image_size`.

    Raises:
        ImageError: with the reason the file cannot be used.
    """
    height, width = image_size(path)
    _check_dimensions(path, height, width, max_side, max_pixels)
    return height, width


def read_image(path: str | os.PathLike, *, max_side: int = MAX_SIDE,
               max_pixels: int = MAX_PIXELS, keep_grey: bool = False) -> np.ndarray:
    """Decode an image into ``float32 [H, W, 3]`` RGB in ``[0, 1]``.

    Supports PNG, JPEG, BMP, TIFF (and anything else Pillow reads) and DICOM; 8- and
    16-bit; grey, RGB, RGBA, palette. The module docstring says how each is converted.

    Args:
        keep_grey: return grey images as ``[H, W, 1]`` rather than three equal channels.
            :func:`aax.data.transforms.prepare` takes either and gives the same tensor;
            resizing one channel instead of three is what makes this worth having.

    Raises:
        ImageError: the file is missing, empty, not an image, too large, truncated or
            otherwise cannot be decoded.
    """
    path = Path(path)
    _check_file(path)
    if is_dicom(path):
        image = _read_dicom(path, max_side, max_pixels)
    elif _is_16bit_colour_png(path):
        image = _read_png16(path, max_side, max_pixels)
    else:
        try:
            with _open_pil(path) as im:
                _check_dimensions(path, im.size[1], im.size[0], max_side, max_pixels)
                im.load()
                im = ImageOps.exif_transpose(im)
                image = _pil_to_array(im)
        except ImageError:
            raise
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, EOFError...
            raise ImageError(path, _decode_reason(exc)) from exc
    if image.shape[-1] == 1 and not keep_grey:
        image = np.repeat(image, 3, axis=-1)
    return image


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a ground-truth mask as ``bool [H, W]``: any nonzero value is foreground.

    Grey, palette (nonzero index), RGB (any nonzero channel) and masks with alpha
    (nonzero colour where alpha is nonzero) are accepted; EXIF orientation is applied as
    for images.

    Raises:
        ImageError: the file cannot be read.
    """
    path = Path(path)
    _check_file(path)
    try:
        with _open_pil(path) as im:
            _check_dimensions(path, im.size[1], im.size[0], MAX_SIDE, MAX_PIXELS)
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode == "P":
                # The index, not the colour: index 0 is background in every palette mask.
                return np.asarray(im) != 0
            if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
                a = np.asarray(im.convert("RGBA"))
                return (a[..., :3] != 0).any(axis=-1) & (a[..., 3] != 0)
            a = np.asarray(im)
            if a.ndim == 3:
                return (a != 0).any(axis=-1)
            return a != 0
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(path, _decode_reason(exc)) from exc


# --- helpers ---------------------------------------------------------------------------

def _check_file(path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageError(path, "file not found") from None
    except OSError as exc:
        raise ImageError(path, f"cannot access file: {exc.strerror or exc}") from exc
    if not path.is_file():
        raise ImageError(path, "not a regular file")
    if st.st_size == 0:
        raise ImageError(path, "empty file (0 bytes)")


def _check_dimensions(path: str | os.PathLike, height: int, width: int, max_side: int,
                      max_pixels: int) -> None:
    if height <= 0 or width <= 0:
        raise ImageError(path, f"image has no pixels ({width}x{height})")
    if max(height, width) > max_side or height * width > max_pixels:
        raise ImageError(
            path, f"image too large: {width}x{height} px (limit {max_side} px a side, "
                  f"{max_pixels:,} pixels; possible decompression bomb)")


def _open_pil(path: Path) -> Image.Image:
    """``Image.open`` with Pillow's decompression-bomb guard turned into ImageError."""
    try:
        with warnings.catch_warnings():
            # Pillow warns from ~89 Mpixels; our own limit decides, so the warning would
            # only be noise (or an error under -W error) for images we accept.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)
    except Image.DecompressionBombError as exc:
        # Pillow's guard (about 179 Mpixels) fires before ours can read the size: report
        # the size it found against AAX's limit, which is what the user can change.
        import re

        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)):,} pixels" if found else "over Pillow's hard limit"
        raise ImageError(path, f"image too large: {size} (limit {MAX_SIDE} px a side, "
                               f"{MAX_PIXELS:,} pixels; possible decompression bomb)") from exc
    except UnidentifiedImageError:
        raise ImageError(path, "not an image (format not recognised)") from None
    except Exception as exc:
        raise ImageError(path, _decode_reason(exc)) from exc


def _orientation(im: Image.Image) -> int:
    # A PNG's eXIf chunk may follow the pixel data, and Pillow would decode the whole
    # image to find it; a header check must stay cheap, so only a chunk already seen counts.
    if im.format == "PNG" and "exif" not in im.info:
        return 1
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block is no reason to refuse the pixels
        return 1


def _decode_reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    lowered = text.lower()
    if "truncated" in lowered or isinstance(exc, EOFError) or "broken" in lowered:
        return f"truncated or damaged file ({text})"
    return f"cannot decode image ({type(exc).__name__}: {text})"


def _grey(grey: np.ndarray) -> np.ndarray:
    """A grey image as ``[H, W, 1]`` float32; :func:`read_image` expands it to three channels."""
    return grey.astype(np.float32, copy=False)[..., None]


def _minmax(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64, copy=False)
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:  # a constant image carries no contrast to scale
        return np.zeros(a.shape, dtype=np.float32)
    return ((a - lo) / (hi - lo)).astype(np.float32)


def _pil_to_array(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode.startswith("I;16"):
        return _grey(np.asarray(im).astype(np.float32) / 65535.0)
    if mode == "I":
        a = np.asarray(im)
        # Pillow gives some 16-bit files mode "I"; keep their scale when it fits.
        if a.size and a.min() >= 0 and a.max() <= 65535:
            return _grey(a.astype(np.float32) / 65535.0)
        return _grey(_minmax(a))
    if mode == "F":
        a = np.asarray(im, dtype=np.float32)
        if not np.isfinite(a).all():
            raise ValueError("float image contains NaN or infinity")
        if a.size and a.min() >= 0.0 and a.max() <= 1.0:
            return _grey(a)
        return _grey(_minmax(a))
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
        return np.ascontiguousarray(rgba[..., :3] * rgba[..., 3:4])
    if mode == "L":
        return _grey(np.asarray(im, dtype=np.float32) / 255.0)
    if mode != "RGB":
        im = im.convert("RGB")  # 1, P, CMYK, YCbCr, LAB, HSV
    return np.asarray(im, dtype=np.float32) / 255.0


def _is_16bit_colour_png(path: Path) -> bool:
    """A PNG whose header says 16 bits per sample in colour (RGB or RGBA)."""
    try:
        with open(path, "rb") as f:
            head = f.read(26)
    except OSError:
        return False
    # signature (8), IHDR length and type (8), width, height (8), bit depth, colour type
    return (len(head) == 26 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
            and head[24] == 16 and head[25] in (2, 6))


def _read_png16(path: Path, max_side: int, max_pixels: int) -> np.ndarray:
    """A 16-bit colour PNG at full precision (``pypng``); alpha composited on black."""
    import png

    try:
        reader = png.Reader(filename=str(path))
        width, height, rows, info = reader.asDirect()
        _check_dimensions(path, height, width, max_side, max_pixels)
        planes = int(info["planes"])
        a = np.vstack([np.asarray(r, dtype=np.uint16) for r in rows]).reshape(height, width, planes)
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(path, _decode_reason(exc)) from exc
    scale = float(2 ** int(info["bitdepth"]) - 1)
    rgb = a[..., :3].astype(np.float32) / scale
    if planes == 4:
        rgb *= a[..., 3:4].astype(np.float32) / scale
    return np.ascontiguousarray(rgb)


def _pydicom():
    try:
        import pydicom
    except ImportError as exc:  # pragma: no cover - pydicom is a dependency
        raise ImportError("reading DICOM needs pydicom: pip install pydicom") from exc
    return pydicom


def _read_dicom_header(path: Path):
    pydicom = _pydicom()
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except pydicom.errors.InvalidDicomError as exc:
        raise ImageError(path, f"not a DICOM file ({exc})") from exc
    except Exception as exc:
        raise ImageError(path, f"unreadable DICOM header ({type(exc).__name__}: {exc})") from exc
    if "Rows" not in ds or "Columns" not in ds:
        raise ImageError(path, "DICOM file holds no image (no Rows/Columns)")
    return ds


def _read_dicom(path: Path, max_side: int, max_pixels: int) -> np.ndarray:
    header = _read_dicom_header(path)
    _check_dimensions(path, int(header.Rows), int(header.Columns), max_side, max_pixels)
    pydicom = _pydicom()
    ds = None
    try:
        ds = pydicom.dcmread(path)
        if "PixelData" not in ds:
            raise ImageError(path, "DICOM file has no pixel data")
        pixels = ds.pixel_array
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            warnings.warn(f"{path}: multi-frame DICOM ({frames} frames); reading the first frame",
                          ImageWarning, stacklevel=2)
            pixels = pixels[0]
    except ImageError:
        raise
    except Exception as exc:
        # Compressed transfer syntaxes need optional decoders; naming the syntax tells
        # the user which one to install.
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        detail = f"{type(exc).__name__}: {exc}"
        if syntax is not None:
            detail = f"transfer syntax {syntax.name}; {detail}"
        raise ImageError(path, f"cannot decode DICOM pixel data ({detail})") from exc

    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples == 1:
        values = pixels.astype(np.float64)
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        values = values * slope + intercept
        grey = _minmax(values)
        if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1" \
                and values.max() > values.min():
            grey = 1.0 - grey
        return _grey(grey)
    if pixels.ndim != 3 or pixels.shape[-1] < 3:
        raise ImageError(path, f"unsupported DICOM pixel layout {pixels.shape}")
    bits = int(ds.get("BitsStored", 8) or 8)
    # pydicom already converts YBR colour to RGB when it decodes.
    rgb = pixels[..., :3].astype(np.float32) / float(2 ** bits - 1)
    return np.clip(rgb, 0.0, 1.0)
