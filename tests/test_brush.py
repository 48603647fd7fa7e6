"""Label Studio brush RLE: AAX's NumPy codec against the Label Studio SDK's own."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from aax.interop import brush

CHECK = Path(__file__).parent / "interop" / "ls_brush_check.py"


def _masks() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    blob = np.zeros((64, 48), bool)
    blob[10:30, 5:40] = True
    edge = np.zeros((300, 301), bool)  # runs over 65536 values (all-false rows x4 channels)
    edge[-1, -1] = True
    return {"a_empty": np.zeros((7, 5), bool), "b_full": np.ones((130, 140), bool),
            "c_noise": rng.random((33, 47)) > 0.5, "d_blob": blob, "e_pixel": np.ones((1, 1), bool),
            "f_long_runs": edge, "g_sparse": rng.random((64, 64)) > 0.97}


@pytest.mark.parametrize("name", sorted(_masks()))
def test_mask_round_trip(name):
    mask = _masks()[name]
    assert np.array_equal(brush.rle_to_mask(brush.mask_to_rle(mask), *mask.shape), mask)


def test_literal_blocks_decode():
    # Strokes from the editor are RGBA with varying colours: single values are literal
    # blocks, which AAX's own encoder writes for runs of one.
    values = np.array([5, 5, 5, 9, 200, 200, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7], np.uint8)
    assert np.array_equal(brush.decode_rle(brush.encode_rle(values)), values)


def test_wrong_size_and_truncated_stream_are_errors():
    rle = brush.mask_to_rle(np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="4x5 RGBA"):
        brush.rle_to_mask(rle, 4, 5)
    with pytest.raises(ValueError, match="ends early"):
        brush.decode_rle(rle[:6])


def test_alpha_threshold_keeps_half_covered_pixels():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0, 3], rgba[0, 1, 3], rgba[1, 0, 3] = 255, 128, 127
    mask = brush.rle_to_mask(brush.encode_rle(rgba.ravel()), 2, 2)
    assert mask.tolist() == [[True, True], [False, False]]


def test_sdk_agrees_byte_for_byte(label_studio_python, tmp_path):
    masks = _masks()
    np.savez(tmp_path / "masks.npz", **masks)
    ours = [brush.mask_to_rle(masks[k]) for k in sorted(masks)]
    (tmp_path / "ours.json").write_text(json.dumps(ours))
    out = subprocess.run([str(label_studio_python), str(CHECK), str(tmp_path / "masks.npz"),
                          str(tmp_path / "ours.json")], check=True, capture_output=True, text=True)
    results = json.loads(out.stdout)
    assert len(results) == len(masks)
    for name, result in zip(sorted(masks), results):
        assert result["decodes_exactly"], f"the SDK decodes AAX's RLE of {name} to another mask"
        assert result["same_bytes"], f"AAX's RLE of {name} differs from the SDK's mask2rle"
        assert np.array_equal(brush.rle_to_mask(result["sdk_rle"], *masks[name].shape), masks[name])
