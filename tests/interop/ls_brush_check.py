"""Run by tests/test_brush.py in the Label Studio environment (``.venv-ls``): check
AAX's brush RLE against the Label Studio SDK's own encoder and decoder.

Reads an ``.npz`` of boolean masks and a JSON list of AAX's RLEs (same order); prints a
JSON list, per mask: whether the SDK decodes AAX's RLE to the mask exactly, whether the
SDK's ``mask2rle`` gives the same bytes, and the SDK's RLE (for AAX to decode).
"""

import json
import sys

import numpy as np
from label_studio_sdk.converter.brush import decode_rle, mask2rle

masks = np.load(sys.argv[1])
ours = json.load(open(sys.argv[2]))
out = []
for key, rle in zip(sorted(masks.files), ours):
    mask = masks[key]
    h, w = mask.shape
    decoded = np.reshape(decode_rle(rle), [h, w, 4])
    sdk = mask2rle(np.where(mask, 255, 0).astype(np.uint8))
    out.append({"decodes_exactly": bool(np.array_equal(decoded[..., 3] == 255, mask)
                                        and np.isin(decoded, [0, 255]).all()
                                        and (decoded == decoded[..., 3:]).all()),
                "same_bytes": [int(v) for v in sdk] == list(rle),
                "sdk_rle": [int(v) for v in sdk]})
print(json.dumps(out))
