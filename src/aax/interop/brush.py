"""Label Studio's brush RLE, in NumPy: masks to ``value.rle`` and back.

A brush region stores the RGBA pixels of its layer (``height x width x 4`` bytes, row
major) as a bit stream (the format of the ``@thi.ng/rle-pack`` package that Label
Studio's editor uses):

- a header: the value count (32 bits), the word size minus one (5 bits) and four run
  length field widths minus one (4 bits each; Label Studio uses 8-bit words and widths
  3, 4, 8, 16);
- then blocks: one bit (1: a run of one repeated word, 0: literal words), two bits
  choosing a width, ``width`` bits of the count minus one, then one word (a run) or
  ``count`` words (literals); zero bits pad the stream to whole bytes.

The encoder writes what the Label Studio SDK's ``label_studio_sdk.converter.brush.mask2rle``
writes for a 0/255 mask (white, alpha 255 where the mask is set), byte for byte, but
vectorised: the SDK builds the stream as a Python string, bit by bit, about a second
for a 512 x 512 mask. The decoder reads any word size and widths the header names
(so also strokes painted in the editor), and a pixel belongs to the mask when its
alpha is at least 128: the editor's anti-aliased stroke edges count when half covered.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

WIDTHS = (3, 4, 8, 16)
"""Run-length field widths Label Studio writes."""

ALPHA_THRESHOLD = 128
_ASCII_BITS = bytes.maketrans(b"\x00\x01", b"01")


def _bits(values: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Concatenate each ``values[i]`` as ``widths[i]`` bits, most significant first."""
    values = np.asarray(values, dtype=np.uint64)
    widths = np.asarray(widths, dtype=np.int64)
    top = int(widths.max()) if widths.size else 0
    k = np.arange(top, dtype=np.int64)
    shifts = widths[:, None] - 1 - k[None, :]  # [n, top]; negative past each width
    keep = shifts >= 0
    bits = (values[:, None] >> np.where(keep, shifts, 0).astype(np.uint64)) & np.uint64(1)
    return bits[keep].astype(np.uint8)  # row-major selection keeps the order


def _runs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run lengths and run values of a flat array."""
    if not values.size:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=values.dtype)
    change = np.flatnonzero(values[1:] != values[:-1]) + 1
    starts = np.concatenate(([0], change))
    return np.diff(np.concatenate((starts, [values.size]))), values[starts]


def encode_rle(values: np.ndarray) -> list[int]:
    """Encode a flat uint8 array as Label Studio RLE bytes, as the SDK's ``encode_rle``
    does (runs of one as literals, longer ones as runs)."""
    values = np.asarray(values, dtype=np.uint8).ravel()
    lengths, run_values = _runs(values)
    return _encode_runs(lengths, run_values, values.size)


def _encode_runs(lengths: np.ndarray, run_values: np.ndarray, n: int) -> list[int]:
    if n >= 1 << 32:
        raise ValueError(f"{n} values do not fit a brush RLE header (at most 2**32 - 1)")
    # The SDK splits runs over 65536 into 65536-long pieces; the remainder comes last.
    pieces = np.maximum(1, -(-lengths // (1 << 16)))
    lengths_split = np.repeat(np.full(lengths.size, 1 << 16), pieces)
    if lengths.size:
        last = np.cumsum(pieces) - 1
        lengths_split[last] = lengths - (pieces - 1) * (1 << 16)
    values_split = np.repeat(run_values, pieces).astype(np.uint64)
    lengths_split = lengths_split.astype(np.int64)
    # The width follows the whole run's length, so every piece of a long run takes 16 bits.
    whole = np.repeat(lengths, pieces)
    single = whole == 1
    index = np.select([whole <= 8, whole <= 16, whole <= 256], [0, 1, 2], 3)
    width = np.asarray(WIDTHS)[index]
    # SDK literals: flag 0, width index 0, count-1 = 0 in 3 bits, then the word
    flag = np.where(single, 0, 1).astype(np.uint64)
    index = np.where(single, 0, index).astype(np.uint64)
    count = np.where(single, 0, lengths_split - 1).astype(np.uint64)
    width = np.where(single, 3, width)
    code = (((flag << np.uint64(2) | index) << width.astype(np.uint64) | count) << np.uint64(8)) | values_split
    header = _bits(np.array([n, 7] + [w - 1 for w in WIDTHS]), np.array([32, 5, 4, 4, 4, 4]))
    stream = np.concatenate((header, _bits(code, 3 + width + 8)))
    # The SDK pads with 1-8 zero bits: a whole zero byte when the stream already ends on one.
    stream = np.concatenate((stream, np.zeros(8 - stream.size % 8, dtype=np.uint8)))
    return np.packbits(stream).tolist()


def decode_rle(rle: Sequence[int]) -> np.ndarray:
    """Decode Label Studio RLE bytes to the flat uint8 array they hold."""
    # A string of '0'/'1': int(slice, 2) reads a field several times faster than NumPy.
    bits = np.unpackbits(np.asarray(rle, dtype=np.uint8)).tobytes().translate(_ASCII_BITS).decode("ascii")
    pos = 0

    def read(nbits: int) -> int:
        nonlocal pos
        if pos + nbits > len(bits):
            raise ValueError(f"brush RLE ends early: needs {nbits} bits at bit {pos} of {len(bits)}")
        value = int(bits[pos:pos + nbits], 2)
        pos += nbits
        return value

    n = read(32)
    word = read(5) + 1
    widths = [read(4) + 1 for _ in range(4)]
    out = np.zeros(n, dtype=np.uint8 if word <= 8 else np.uint32)
    i = 0
    while i < n:
        is_run = read(1)
        j = min(n, i + 1 + read(widths[read(2)]))
        if is_run:
            out[i:j] = read(word)
        else:
            for k in range(i, j):
                out[k] = read(word)
        i = j
    return out


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """A boolean ``[H, W]`` mask as brush RLE: RGBA, white with alpha 255 where set."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a brush mask is [H, W]; got shape {mask.shape}")
    # runs of the mask, four values (RGBA) per pixel: no 4x copy of the image
    lengths, values = _runs(mask.astype(bool).ravel())
    return _encode_runs(lengths * 4, np.where(values, 255, 0).astype(np.uint8), mask.size * 4)


def rle_to_mask(rle: Sequence[int], height: int, width: int) -> np.ndarray:
    """Brush RLE back to a boolean ``[height, width]`` mask (alpha >= 128)."""
    flat = decode_rle(rle)
    if flat.size != height * width * 4:
        raise ValueError(f"brush RLE holds {flat.size} values; a {height}x{width} RGBA layer needs "
                         f"{height * width * 4}")
    return flat.reshape(height, width, 4)[..., 3] >= ALPHA_THRESHOLD
