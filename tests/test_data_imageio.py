"""aax.data.imageio: every format the reader takes, and every way a file can be bad."""

from __future__ import annotations

import pickle
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aax.data import ImageError, check_header, image_size, read_image, read_mask
from aax.data.imageio import is_dicom, is_image_file

RNG = np.random.default_rng(0)


def _rgb(h: int = 24, w: int = 32) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _assert_image(arr: np.ndarray, h: int, w: int) -> None:
    assert arr.dtype == np.float32
    assert arr.shape == (h, w, 3)
    assert 0.0 <= arr.min() and arr.max() <= 1.0


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width x height`` (the pixel data is a stub)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))
    return path


# --- formats ---------------------------------------------------------------------------

def test_png_8bit_grey(tmp_path):
    grey = RNG.integers(0, 256, (20, 30), dtype=np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "g.png")
    arr = read_image(tmp_path / "g.png")
    _assert_image(arr, 20, 30)
    np.testing.assert_allclose(arr[..., 0], grey / 255.0, atol=1e-6)
    assert np.array_equal(arr[..., 0], arr[..., 2])


def test_png_16bit_grey_keeps_precision(tmp_path):
    grey = RNG.integers(0, 65536, (20, 30), dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")  # really written as 16-bit
    arr = read_image(tmp_path / "g16.png")
    _assert_image(arr, 20, 30)
    np.testing.assert_allclose(arr[..., 1], grey / 65535.0, atol=1e-6)


def test_png_16bit_rgb_read_at_8bit_precision(tmp_path):
    h, w = 4, 5
    rgb16 = RNG.integers(0, 65536, (h, w, 3)).astype(">u2")
    raw = b"".join(b"\x00" + rgb16[r].tobytes() for r in range(h))  # filter byte per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    (tmp_path / "c16.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    arr = read_image(tmp_path / "c16.png")
    _assert_image(arr, h, w)
    np.testing.assert_allclose(arr, rgb16 / 65535.0, atol=1 / 255)


def test_png_rgb_exact(tmp_path):
    rgb = _rgb()
    Image.fromarray(rgb).save(tmp_path / "c.png")
    np.testing.assert_allclose(read_image(tmp_path / "c.png"), rgb / 255.0, atol=1e-6)


def test_png_rgba_is_composited_on_black(tmp_path):
    rgba = np.concatenate([_rgb(), RNG.integers(0, 256, (24, 32, 1), dtype=np.uint8)], -1)
    rgba[0, 0, 3] = 0  # fully transparent pixel over a nonzero colour
    rgba[0, 0, :3] = 200
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    arr = read_image(tmp_path / "a.png")
    _assert_image(arr, 24, 32)
    expected = rgba[..., :3] / 255.0 * (rgba[..., 3:] / 255.0)
    np.testing.assert_allclose(arr, expected, atol=1e-6)
    assert np.all(arr[0, 0] == 0)


def test_png_palette(tmp_path):
    palette = [0, 0, 0, 255, 0, 0, 0, 255, 0, 10, 20, 30] + [0] * (256 * 3 - 12)
    index = RNG.integers(0, 4, (16, 16), dtype=np.uint8)
    im = Image.fromarray(index, "P")
    im.putpalette(palette)
    im.save(tmp_path / "p.png")
    arr = read_image(tmp_path / "p.png")
    table = np.array(palette[:12], dtype=np.float32).reshape(4, 3) / 255.0
    np.testing.assert_allclose(arr, table[index], atol=1e-6)


def test_palette_with_transparent_index(tmp_path):
    im = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8), "P")
    im.putpalette([255, 255, 255, 255, 0, 0] + [0] * 762)
    im.save(tmp_path / "pt.png", transparency=0)
    arr = read_image(tmp_path / "pt.png")
    assert np.all(arr[0, 0] == 0) and np.allclose(arr[0, 1], [1, 0, 0])


def test_jpeg_exif_orientation_is_applied(tmp_path):
    # Stored 40 wide, 24 high, left half dark; orientation 6 = rotate 90 degrees clockwise.
    stored = np.full((24, 40, 3), 230, dtype=np.uint8)
    stored[:, :20] = 20
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "o.jpg", exif=exif.tobytes(), quality=95)
    assert image_size(tmp_path / "o.jpg") == (40, 24)
    arr = read_image(tmp_path / "o.jpg")
    _assert_image(arr, 40, 24)
    # after a clockwise turn the stored left half is on top
    assert arr[:18].mean() < 0.2 and arr[22:].mean() > 0.8


def test_bmp(tmp_path):
    rgb = _rgb()
    Image.fromarray(rgb).save(tmp_path / "b.bmp")
    np.testing.assert_allclose(read_image(tmp_path / "b.bmp"), rgb / 255.0, atol=1e-6)


def test_tiff_rgb_and_16bit(tmp_path):
    rgb = _rgb()
    Image.fromarray(rgb).save(tmp_path / "t.tif")
    np.testing.assert_allclose(read_image(tmp_path / "t.tif"), rgb / 255.0, atol=1e-6)
    grey = RNG.integers(0, 65536, (12, 9), dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "t16.tiff")
    arr = read_image(tmp_path / "t16.tiff")
    _assert_image(arr, 12, 9)
    np.testing.assert_allclose(arr[..., 0], grey / 65535.0, atol=1e-6)


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2",
                slope: float | None = None, intercept: float | None = None,
                bits_stored: int = 12, frames: int | None = None) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_rescale_and_minmax(tmp_path):
    px = RNG.integers(100, 4000, (10, 14)).astype(np.uint16)
    path = write_dicom(tmp_path / "x.dcm", px, slope=2.0, intercept=-1024.0)
    assert image_size(path) == (10, 14)
    arr = read_image(path)
    _assert_image(arr, 10, 14)
    values = px * 2.0 - 1024.0
    expected = (values - values.min()) / (values.max() - values.min())
    np.testing.assert_allclose(arr[..., 0], expected, atol=1e-6)
    assert arr.min() == 0.0 and arr.max() == 1.0


def test_dicom_negative_slope_shows_the_rescale_is_applied(tmp_path):
    px = RNG.integers(0, 4096, (8, 8)).astype(np.uint16)
    plain = read_image(write_dicom(tmp_path / "a.dcm", px))
    flipped = read_image(write_dicom(tmp_path / "b.dcm", px, slope=-1.0, intercept=0.0))
    np.testing.assert_allclose(flipped, 1.0 - plain, atol=1e-6)


def test_dicom_monochrome1_is_inverted(tmp_path):
    px = RNG.integers(0, 4096, (8, 12)).astype(np.uint16)
    m2 = read_image(write_dicom(tmp_path / "m2.dcm", px, "MONOCHROME2"))
    m1 = read_image(write_dicom(tmp_path / "m1.dcm", px, "MONOCHROME1"))
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)
    assert m1[px == px.max()].max() == 0.0  # the highest value is black in MONOCHROME1


def test_dicom_without_suffix_found_by_marker(tmp_path):
    path = write_dicom(tmp_path / "IM0001", RNG.integers(0, 4096, (6, 5)).astype(np.uint16))
    assert is_dicom(path) and is_image_file(path)
    assert read_image(path).shape == (6, 5, 3)


def test_dicom_refusals(tmp_path):
    (tmp_path / "fake.dcm").write_bytes(b"not a dicom file at all" * 20)
    with pytest.raises(ImageError, match="not a DICOM"):
        check_header(tmp_path / "fake.dcm")


def test_multi_frame_dicom_reads_the_first_frame_with_a_warning(tmp_path):
    from aax.data.imageio import ImageWarning

    frames = RNG.integers(0, 4096, (2, 4, 6)).astype(np.uint16)
    multi = write_dicom(tmp_path / "multi.dcm", frames, frames=2)
    assert check_header(multi) == (4, 6)
    with pytest.warns(ImageWarning, match=r"multi\.dcm: multi-frame DICOM \(2 frames\)"):
        arr = read_image(multi)
    first = read_image(write_dicom(tmp_path / "one.dcm", frames[0]))
    np.testing.assert_array_equal(arr, first)


def test_16_bit_colour_png_keeps_full_precision(tmp_path):
    import png

    rgb = RNG.integers(0, 65536, (5, 7, 3)).astype(np.uint16)
    rgb[0, 0] = (1, 2, 3)  # values Pillow's 8-bit reading would all turn to 0
    png.from_array(rgb.reshape(5, -1).tolist(), "RGB;16").save(str(tmp_path / "c16.png"))
    arr = read_image(tmp_path / "c16.png")
    np.testing.assert_allclose(arr, rgb / 65535.0, atol=1e-7)
    assert not np.allclose(arr * 255, np.round(arr * 255), atol=1e-3)  # not 8-bit levels
    rgba = np.concatenate([rgb, np.full((5, 7, 1), 65535, np.uint16)], axis=-1)
    rgba[1, 1, 3] = 0  # fully transparent: composited on black
    png.from_array(rgba.reshape(5, -1).tolist(), "RGBA;16").save(str(tmp_path / "a16.png"))
    arr = read_image(tmp_path / "a16.png")
    assert arr[1, 1].tolist() == [0.0, 0.0, 0.0]
    np.testing.assert_allclose(arr[0, 0], rgb[0, 0] / 65535.0, atol=1e-7)


# --- bad files -------------------------------------------------------------------------

def test_zero_bytes(tmp_path):
    (tmp_path / "z.png").write_bytes(b"")
    for fn in (check_header, read_image, read_mask):
        with pytest.raises(ImageError) as info:
            fn(tmp_path / "z.png")
        assert info.value.reason == "empty file (0 bytes)"
        assert str(tmp_path / "z.png") in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        read_image(tmp_path / "nope.png")


def test_text_named_png(tmp_path):
    (tmp_path / "t.png").write_text("hello, I am not a picture\n")
    with pytest.raises(ImageError, match="not an image"):
        check_header(tmp_path / "t.png")
    with pytest.raises(ImageError, match="not an image"):
        read_image(tmp_path / "t.png")


def test_truncated_png_passes_header_fails_decoding(tmp_path):
    Image.fromarray(_rgb(64, 64)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    assert check_header(tmp_path / "cut.png") == (64, 64)  # the header is intact
    with pytest.raises(ImageError, match="truncated") as info:
        read_image(tmp_path / "cut.png")
    assert info.value.path == str(tmp_path / "cut.png")


def test_decompression_bomb_header_is_refused(tmp_path):
    bomb = png_header(tmp_path / "bomb.png", 100_000, 100_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither a warning nor a crash: an ImageError
        with pytest.raises(ImageError, match="too large"):
            check_header(bomb)
        with pytest.raises(ImageError, match="too large") as info:
            read_image(bomb)
    # AAX's limit is the one quoted (Pillow's own, ~179 Mpixels, fires first on open)
    assert "100,000,000 pixels" in info.value.reason and "178956970" not in info.value.reason
    assert "10,000,000,000 pixels" in info.value.reason


def test_side_limit_and_pillow_warning_range(tmp_path):
    with pytest.raises(ImageError, match="too large: 25000x10"):
        check_header(png_header(tmp_path / "wide.png", 25_000, 10))
    # 95 Mpixels: over Pillow's warning threshold, under our limit: accepted, silently.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_header(png_header(tmp_path / "big.png", 10_000, 9_500)) == (9_500, 10_000)
    with pytest.raises(ImageError, match="too large"):
        check_header(tmp_path / "big.png", max_pixels=50_000_000)


def test_image_error_pickles_and_names_file_and_reason():
    err = ImageError("/data/x.png", "empty file (0 bytes)")
    back = pickle.loads(pickle.dumps(err))
    assert (back.path, back.reason) == ("/data/x.png", "empty file (0 bytes)")
    assert str(back) == "/data/x.png: empty file (0 bytes)"


# --- masks and sizes -------------------------------------------------------------------

def test_read_mask_grey_rgb_palette(tmp_path):
    grey = np.zeros((10, 12), dtype=np.uint8)
    grey[2:5, 3:9] = 255
    grey[7, 7] = 1  # any nonzero value is foreground
    Image.fromarray(grey).save(tmp_path / "g.png")
    expected = grey != 0
    assert np.array_equal(read_mask(tmp_path / "g.png"), expected)

    rgb = np.zeros((10, 12, 3), dtype=np.uint8)
    rgb[expected, 1] = 128
    Image.fromarray(rgb).save(tmp_path / "c.png")
    m = read_mask(tmp_path / "c.png")
    assert m.dtype == bool and np.array_equal(m, expected)

    p = Image.fromarray(expected.astype(np.uint8) * 3, "P")
    p.putpalette([9, 9, 9] + [255, 255, 255] * 255)  # index 0 drawn non-black on purpose
    p.save(tmp_path / "p.png")
    assert np.array_equal(read_mask(tmp_path / "p.png"), expected)


def test_image_size_reads_header_only(tmp_path):
    Image.fromarray(_rgb(17, 23)).save(tmp_path / "s.png")
    assert image_size(tmp_path / "s.png") == (17, 23)
    assert image_size(png_header(tmp_path / "h.png", 300, 200)) == (200, 300)  # no pixels


def test_keep_grey_gives_one_channel_and_the_same_model_input(tmp_path):
    from aax.data.transforms import prepare

    rng = np.random.default_rng(0)
    grey = (rng.random((40, 30)) * 255).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "rgb.png")
    one = read_image(tmp_path / "g.png", keep_grey=True)
    assert one.shape == (40, 30, 1)
    assert read_image(tmp_path / "g.png").shape == (40, 30, 3)
    assert read_image(tmp_path / "rgb.png", keep_grey=True).shape == (40, 30, 3)  # colour stays colour
    for size in (16, 40):
        assert torch.equal(prepare(one, size), prepare(read_image(tmp_path / "rgb.png"), size))
    with pytest.raises(ValueError, match="shape"):
        prepare(np.zeros((8, 8, 2), np.float32), 8)
